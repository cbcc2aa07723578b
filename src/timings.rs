//! `kiln build --timings`: a picture of the build as one self-contained HTML
//! page (inline CSS and SVG, no script, nothing fetched), as `cargo build
//! --timings` gives: one bar per step on a time line (queued for a worker,
//! then built, pulled or cached), the assembly phases after them, each
//! layer's size, the cache hit rate and why each built step ran.

use std::fmt::Write as _;

use crate::build::{BuildReport, Outcome};
use crate::layer::Kind;
use crate::store::Store;

/// Colours, one per outcome, and for time spent queued and assembling.
const BUILT: &str = "#e8833a";
const PULLED: &str = "#4a90d9";
const CACHED: &str = "#5cb85c";
const QUEUED: &str = "#d9d9d9";
const ASSEMBLY: &str = "#9b6bc4";

/// The page for `report`; layer sizes come from `store` (a layer it lacks
/// shows no size).
pub fn page(report: &BuildReport, store: &Store) -> String {
    let layer_bytes = |step: &crate::build::StepReport| -> Option<u64> {
        let layer = store.layer(&step.layer).ok()?;
        Some(
            layer
                .entries
                .iter()
                .map(|e| match &e.kind {
                    Kind::File { size, .. } => *size,
                    _ => 0,
                })
                .sum(),
        )
    };
    let total = report.steps.len().max(1);
    let hits = report.cached + report.pulled;
    let steps_end = report
        .steps
        .iter()
        .map(|s| s.finished_at)
        .fold(0.0, f64::max);
    let assembly: f64 = report.assembly.iter().map(|p| p.seconds).sum();
    let span = (steps_end + assembly).max(report.seconds).max(0.001);

    let mut steps: Vec<&crate::build::StepReport> = report.steps.iter().collect();
    steps.sort_by(|a, b| a.started_at.total_cmp(&b.started_at).then(a.id.cmp(&b.id)));

    // The time line: one row per step, then one per assembly phase.
    let (label_w, chart_w, row_h) = (170.0, 760.0, 22.0);
    let rows = steps.len() + report.assembly.len();
    let height = 30.0 + row_h * rows as f64 + 10.0;
    let x = |t: f64| label_w + chart_w * (t / span);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" role="img" aria-label="build time line">"#,
        w = label_w + chart_w + 90.0
    );
    for tick in ticks(span) {
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" y1="18" x2="{0:.1}" y2="{1:.1}" stroke="#eee"/><text x="{0:.1}" y="12" class="tick">{2}s</text>"##,
            x(tick),
            height - 10.0,
            tick
        );
    }
    let mut y = 24.0;
    for step in &steps {
        let colour = match step.outcome {
            Outcome::Built => BUILT,
            Outcome::Pulled => PULLED,
            Outcome::Cached => CACHED,
        };
        let queued = (step.started_at - step.ready_at).max(0.0);
        let ran = (step.finished_at - step.started_at).max(0.0);
        let _ = write!(
            svg,
            r#"<text x="{lx}" y="{ty:.1}" class="label">{id}</text><rect x="{qx:.1}" y="{y:.1}" width="{qw:.1}" height="16" fill="{QUEUED}"><title>{id}: queued {queued:.1}s</title></rect><rect x="{rx:.1}" y="{y:.1}" width="{rw:.1}" height="16" fill="{colour}"><title>{id}: {outcome} {ran:.1}s</title></rect><text x="{tx:.1}" y="{ty:.1}" class="time">{ran:.1}s</text>"#,
            lx = label_w - 6.0,
            ty = y + 12.5,
            id = esc(&step.id),
            qx = x(step.ready_at),
            qw = chart_w * queued / span,
            rx = x(step.started_at),
            rw = (chart_w * ran / span).max(1.5),
            outcome = outcome_name(step.outcome),
            tx = x(step.finished_at) + 4.0,
        );
        y += row_h;
    }
    let mut at = steps_end;
    for phase in &report.assembly {
        let _ = write!(
            svg,
            r#"<text x="{lx}" y="{ty:.1}" class="label">assembly: {name}</text><rect x="{rx:.1}" y="{y:.1}" width="{rw:.1}" height="16" fill="{ASSEMBLY}"><title>{name}: {s:.1}s</title></rect><text x="{tx:.1}" y="{ty:.1}" class="time">{s:.1}s</text>"#,
            lx = label_w - 6.0,
            ty = y + 12.5,
            name = esc(&phase.phase),
            rx = x(at),
            rw = (chart_w * phase.seconds / span).max(1.5),
            s = phase.seconds,
            tx = x(at + phase.seconds) + 4.0,
        );
        at += phase.seconds;
        y += row_h;
    }
    svg.push_str("</svg>");

    let mut table = String::new();
    for step in &report.steps {
        let size = layer_bytes(step).map(human_bytes).unwrap_or_default();
        let why = step
            .why
            .iter()
            .map(|w| esc(w))
            .collect::<Vec<_>>()
            .join("<br>");
        let _ = write!(
            table,
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td class=\"num\">{:.1}</td><td class=\"num\">{:.1}</td><td class=\"num\">{}</td><td><code>{}</code></td><td>{}</td></tr>",
            esc(&step.id),
            esc(&step.kind),
            outcome_name(step.outcome),
            outcome_name(step.outcome),
            (step.started_at - step.ready_at).max(0.0),
            step.finished_at - step.started_at,
            size,
            step.layer.short(),
            why
        );
    }

    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>kiln build timings: {recipe}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
.summary span {{ display: inline-block; margin: 6px 18px 12px 0; }}
.summary b {{ font-size: 18px; }}
svg .label {{ font-size: 12px; text-anchor: end; }}
svg .time, svg .tick {{ font-size: 11px; fill: #555; }}
.legend i {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 14px; vertical-align: -1px; }}
table {{ border-collapse: collapse; margin-top: 18px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }}
td.num {{ text-align: right; white-space: nowrap; }}
td.built {{ color: {BUILT}; }} td.pulled {{ color: {PULLED}; }} td.cached {{ color: {CACHED}; }}
</style></head><body>
<h1>kiln build of {recipe}</h1>
<div class="summary">
<span><b>{seconds:.1} s</b> in all</span>
<span><b>{steps}</b> steps: {built} built, {pulled} pulled, {cached} cached</span>
<span>cache hit rate <b>{rate:.0}%</b></span>
<span>assembly <b>{assembly:.1} s</b></span>
<span>kiln's peak memory <b>{rss} MiB</b></span>
</div>
<div class="legend"><i style="background:{QUEUED}"></i>queued<i style="background:{BUILT}"></i>built<i style="background:{PULLED}"></i>pulled<i style="background:{CACHED}"></i>cached<i style="background:{ASSEMBLY}"></i>assembly</div>
{svg}
<table>
<tr><th>step</th><th>kind</th><th>outcome</th><th>queued (s)</th><th>ran (s)</th><th>layer files</th><th>layer</th><th>why it ran</th></tr>
{table}
</table>
</body></html>
"#,
        recipe = esc(&report.recipe),
        seconds = report.seconds,
        steps = report.steps.len(),
        built = report.built,
        pulled = report.pulled,
        cached = report.cached,
        rate = 100.0 * hits as f64 / total as f64,
        rss = report.peak_rss_kib / 1024,
    )
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Built => "built",
        Outcome::Pulled => "pulled",
        Outcome::Cached => "cached",
    }
}

/// Round tick marks for a time line `span` seconds long.
fn ticks(span: f64) -> Vec<f64> {
    let step = [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|s| span / s <= 10.0)
        .unwrap_or(1200.0);
    (0..=(span / step) as usize)
        .map(|i| i as f64 * step)
        .collect()
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_few() {
        assert_eq!(ticks(4.0), [0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            ticks(95.0),
            [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
        );
        assert!(ticks(3600.0).len() <= 11);
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
