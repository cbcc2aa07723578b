//! Why a step runs. Each build records, per recipe and step, what went into
//! the step's key — its [`Ingredients`]: the kind's parameters, the files it
//! read, the layers below it by step, the epoch. When a step's key misses,
//! `kiln build` and `kiln plan --explain` compare it with the step's last
//! recorded build and name what differs ([`Explainer::why`]): the field and
//! its values, the file, or the lower step whose layer changed, with that
//! step's own reasons.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::digest::Digest;
use crate::recipe::Step;
use crate::step::StepContext;
use crate::store::Store;

/// What went into one step's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingredients {
    /// The key, once every lower layer is known.
    pub key: Option<Digest>,
    pub kind: String,
    /// The kind's parameters, as a JSON object of fields.
    pub params: Value,
    /// Each file the kind read (its name in the recipe, or `--ssh-key`) and
    /// the blake3 of its contents.
    pub files: BTreeMap<String, Digest>,
    /// Each step below, by id, with its layer (`None`: not built yet).
    pub lowers: BTreeMap<String, Option<Digest>>,
    pub epoch: i64,
}

impl Ingredients {
    /// The ingredients of `step` over `lowers`, after its key was computed
    /// with `ctx` (which noted the files the kind read).
    pub fn of(
        step: &Step,
        key: Option<Digest>,
        epoch: i64,
        lowers: &[(String, Option<Digest>)],
        ctx: &StepContext,
    ) -> Ingredients {
        let reads = ctx.reads.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let files = reads
            .into_iter()
            .map(|(name, path)| {
                // Streamed: a `source:` file may be large.
                let mut hasher = blake3::Hasher::new();
                let digest = match std::fs::File::open(&path)
                    .and_then(|f| hasher.update_reader(f).map(|_| ()))
                {
                    Ok(()) => Digest::from_hash(hasher.finalize()),
                    Err(_) => Digest::of(b"unreadable"),
                };
                (name, digest)
            })
            .collect();
        Ingredients {
            key,
            kind: step.kind.name().to_string(),
            params: params_with_pins(step),
            files,
            lowers: lowers.iter().cloned().collect(),
            epoch,
        }
    }

    /// What went into step `step` of recipe `recipe` at its last build in
    /// `store`, if it was recorded.
    pub fn last(store: &Store, recipe: &str, step: &str) -> Option<Ingredients> {
        serde_json::from_slice(&store.step_record(recipe, step)?).ok()
    }

    /// Records these as the last build of step `step` of recipe `recipe`.
    /// Advisory: a record that cannot be written costs only an explanation.
    pub fn record(&self, store: &Store, recipe: &str, step: &str) {
        let json = serde_json::to_vec_pretty(self).expect("ingredients serialize");
        let _ = store.put_step_record(recipe, step, &json);
    }
}

/// One thing that differs; `below` names the step below it is about, if any.
struct Reason {
    below: Option<String>,
    text: String,
}

/// Why the steps to build run, asked in graph order (as a build or a plan
/// meets them): remembers each step's own reasons, to quote them on the
/// lines of the steps above it that name it.
#[derive(Debug, Default)]
pub struct Explainer {
    /// The reasons of each step asked about that are its own (not about
    /// the steps below it), by id.
    own: BTreeMap<String, Vec<String>>,
}

impl Explainer {
    /// What differs between step `id`'s last recorded build (`old`) and now
    /// (`new`), one line each (for a step with no record, why that is); a
    /// line that names a step below is followed by that step's own reasons:
    /// "the layer of step `base` below it changed (…); `base`: packages: + jq".
    pub fn why(&mut self, id: &str, old: Option<&Ingredients>, new: &Ingredients) -> Vec<String> {
        let reasons = reasons(old, new);
        let lines = reasons
            .iter()
            .map(|r| {
                let causes = r.below.as_ref().and_then(|b| Some((b, self.own.get(b)?)));
                match causes {
                    Some((below, c)) if !c.is_empty() => {
                        format!("{}; `{below}`: {}", r.text, c.join("; "))
                    }
                    _ => r.text.clone(),
                }
            })
            .collect();
        let own = reasons.into_iter().filter(|r| r.below.is_none());
        self.own
            .insert(id.to_string(), own.map(|r| r.text).collect());
        lines
    }
}

fn reasons(old: Option<&Ingredients>, new: &Ingredients) -> Vec<Reason> {
    let own = |text: String| Reason { below: None, text };
    let Some(old) = old else {
        return vec![own("no earlier build of this step in this cache".into())];
    };
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(own(format!("kind: {} -> {}", old.kind, new.kind)));
    } else {
        let mut fields = param_differences(&old.params, &new.params);
        // A lock pins a step only for the fields it was resolved for: when
        // those changed, the pins going is their consequence, not a reason.
        let is_lock = |f: &String| f == "lock changed" || f.starts_with("lock: ");
        if fields.iter().any(|f| !is_lock(f)) {
            fields.retain(|f| !is_lock(f));
        }
        out.extend(fields.into_iter().map(own));
    }
    for name in union(old.files.keys(), new.files.keys()) {
        match (old.files.get(name), new.files.get(name)) {
            (Some(a), Some(b)) if a != b => out.push(own(format!("file `{name}` changed"))),
            (None, Some(_)) => out.push(own(format!("now reads file `{name}`"))),
            (Some(_), None) => out.push(own(format!("no longer reads file `{name}`"))),
            _ => {}
        }
    }
    for id in union(old.lowers.keys(), new.lowers.keys()) {
        let text = match (old.lowers.get(id), new.lowers.get(id)) {
            (Some(_), Some(None)) => format!(
                "step `{id}` below it runs first (this one is reused if `{id}` gives its old layer back)"
            ),
            (Some(Some(a)), Some(Some(b))) if a != b => format!(
                "the layer of step `{id}` below it changed ({} -> {})",
                a.short(),
                b.short()
            ),
            (None, Some(_)) => format!("now builds on step `{id}`"),
            (Some(_), None) => format!("no longer builds on step `{id}`"),
            _ => continue,
        };
        out.push(Reason {
            below: Some(id.clone()),
            text,
        });
    }
    if old.epoch != new.epoch {
        out.push(own(format!("output.epoch: {} -> {}", old.epoch, new.epoch)));
    }
    if out.is_empty() {
        out.push(own(match (old.key, new.key) {
            (Some(a), Some(b)) if a == b => {
                "the same inputs as its last build, whose layer is no longer in the cache".into()
            }
            _ => "an input kiln does not itemize changed (a new kiln's key format?)".into(),
        }));
    }
    out
}

fn union<'a>(
    a: impl Iterator<Item = &'a String>,
    b: impl Iterator<Item = &'a String>,
) -> BTreeSet<&'a String> {
    a.chain(b).collect()
}

/// The step's parameters and, as `lock`, the lock's pins for it
/// (`NAME=VERSION`), so a moved pin shows as the package that moved.
fn params_with_pins(step: &Step) -> Value {
    let mut params = step.kind.params();
    if let (Some(pinned), Some(fields)) = (&step.pinned, params.as_object_mut()) {
        let pins = pinned.iter().map(|d| Value::String(d.spec())).collect();
        fields.insert("lock".into(), Value::Array(pins));
    }
    params
}

/// The fields of two parameter objects that differ, as lines.
fn param_differences(old: &Value, new: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (a, b) = (
        old.as_object().unwrap_or(&empty),
        new.as_object().unwrap_or(&empty),
    );
    let mut out = Vec::new();
    for field in union(a.keys(), b.keys()) {
        let (x, y) = (
            a.get(field).unwrap_or(&Value::Null),
            b.get(field).unwrap_or(&Value::Null),
        );
        if x == y {
            continue;
        }
        out.push(match (x, y) {
            (Value::Array(x), Value::Array(y)) if named(x) && named(y) => {
                // Units and the like: by name, and which of them changed.
                let name = |v: &Value| v["name"].as_str().unwrap_or_default().to_string();
                let find = |list: &[Value], n: &str| list.iter().find(|v| name(v) == n).cloned();
                let mut parts = Vec::new();
                for v in y {
                    match find(x, &name(v)) {
                        None => parts.push(format!("+ {}", name(v))),
                        Some(old) if old != *v => parts.push(format!("{} changed", name(v))),
                        Some(_) => {}
                    }
                }
                for v in x.iter().filter(|v| find(y, &name(v)).is_none()) {
                    parts.push(format!("- {}", name(v)));
                }
                if parts.is_empty() {
                    parts.push("reordered".into());
                }
                format!("{field}: {}", parts.join("; "))
            }
            (Value::Array(x), Value::Array(y)) => {
                let added: Vec<String> = y.iter().filter(|v| !x.contains(v)).map(show).collect();
                let removed: Vec<String> = x.iter().filter(|v| !y.contains(v)).map(show).collect();
                let mut parts = Vec::new();
                if !added.is_empty() {
                    parts.push(format!("+ {}", added.join(", ")));
                }
                if !removed.is_empty() {
                    parts.push(format!("- {}", removed.join(", ")));
                }
                if parts.is_empty() {
                    parts.push("reordered".into());
                }
                format!("{field}: {}", parts.join("; "))
            }
            (Value::String(x), Value::String(y)) if x.contains('\n') || y.contains('\n') => {
                format!("{field} changed")
            }
            _ if show(x).ends_with('…') || show(y).ends_with('…') => format!("{field} changed"),
            _ => format!("{field}: {} -> {}", show(x), show(y)),
        });
    }
    out
}

/// Whether every element is an object with a `name` (units, say).
fn named(list: &[Value]) -> bool {
    !list.is_empty()
        && list
            .iter()
            .all(|v| v.get("name").is_some_and(Value::is_string))
}

/// A value in one short line.
fn show(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Null => "(none)".into(),
        other => other.to_string(),
    };
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What differs for one step, with nothing below it asked about.
    fn differences(old: Option<&Ingredients>, new: &Ingredients) -> Vec<String> {
        Explainer::default().why("step", old, new)
    }
    use serde_json::json;

    fn ingredients(
        params: Value,
        files: &[(&str, &[u8])],
        lowers: &[(&str, Option<&[u8]>)],
    ) -> Ingredients {
        Ingredients {
            key: lowers
                .iter()
                .all(|(_, l)| l.is_some())
                .then(|| Digest::of(params.to_string().as_bytes())),
            kind: "apt".into(),
            params,
            files: files
                .iter()
                .map(|(n, b)| (n.to_string(), Digest::of(b)))
                .collect(),
            lowers: lowers
                .iter()
                .map(|(n, l)| (n.to_string(), l.map(Digest::of)))
                .collect(),
            epoch: 0,
        }
    }

    #[test]
    fn names_the_field_the_file_and_the_lower_step() {
        let old = ingredients(
            json!({"packages": ["git", "less"], "install_recommends": false}),
            &[("files/hosts", b"a")],
            &[("base", Some(b"1")), ("kernel", Some(b"2"))],
        );
        let new = ingredients(
            json!({"packages": ["git", "jq"], "install_recommends": true}),
            &[("files/hosts", b"b")],
            &[("base", Some(b"1")), ("kernel", Some(b"3"))],
        );
        let lines = differences(Some(&old), &new);
        assert_eq!(
            lines[..3],
            [
                "install_recommends: false -> true",
                "packages: + jq; - less",
                "file `files/hosts` changed"
            ]
        );
        assert!(
            lines[3].starts_with("the layer of step `kernel` below it changed"),
            "{lines:?}"
        );
        assert_eq!(lines.len(), 4);

        let pending = ingredients(
            old.params.clone(),
            &[("files/hosts", b"a")],
            &[("base", Some(b"1")), ("kernel", None)],
        );
        assert_eq!(
            differences(Some(&old), &pending),
            ["step `kernel` below it runs first (this one is reused if `kernel` gives its old layer back)"]
        );
        assert_eq!(
            differences(Some(&old), &old),
            ["the same inputs as its last build, whose layer is no longer in the cache"]
        );
        assert_eq!(
            differences(None, &new),
            ["no earlier build of this step in this cache"]
        );

        // Units are told apart by name; a long value that changed is named, not cut.
        let unit = |name: &str, body: &str| json!({"name": name, "content": body});
        let long = "x".repeat(80);
        let old = ingredients(
            json!({"units": [unit("a.service", "1"), unit("b.service", "2")], "script": long}),
            &[],
            &[],
        );
        let new = ingredients(
            json!({"units": [unit("a.service", "1b"), unit("c.service", "3")], "script": format!("{long}!")}),
            &[],
            &[],
        );
        assert_eq!(
            differences(Some(&old), &new),
            [
                "script changed",
                "units: a.service changed; + c.service; - b.service"
            ]
        );
    }
}
