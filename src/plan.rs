//! Plans: what a build would do, without running anything or needing root.
//!
//! A step's key depends on its lower layers' digests, so it is known only once
//! every step below it is known. Walking the graph in order: a step whose key
//! is in the action cache is *cached* (its layer is known too); a step with a
//! known key that is not cached will be *built*; a step that waits on a step
//! to be built gets its key only then — it is *pending*: it re-runs unless
//! those steps reproduce their old layers exactly.

use std::path::Path;

use serde::Serialize;

use crate::digest::Digest;
use crate::explain::{self, Ingredients};
use crate::graph::Graph;
use crate::key::step_key;
use crate::lock;
use crate::recipe::{Recipe, Step};
use crate::step::StepContext;
use crate::store::Store;

/// The planned status of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Status {
    /// Reused from the cache.
    Cached { layer: Digest },
    /// Runs: its key is not in the cache.
    Build,
    /// Known after the steps it waits on are built.
    Pending,
}

/// One step's line in the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedStep {
    pub id: String,
    pub kind: String,
    pub key: Option<Digest>,
    #[serde(flatten)]
    pub status: Status,
    /// Direct dependencies.
    pub needs: Vec<String>,
    /// Direct dependencies that are to be built first (what it waits on).
    pub waits_on: Vec<String>,
    /// For a step to build or pending: what differs from its last build
    /// (see [`crate::explain`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub why: Vec<String>,
}

/// Plans `recipe` against the store (read only).
pub fn plan(
    recipe: &Recipe,
    graph: &Graph,
    store: &Store,
    ssh_key: Option<&Path>,
) -> Result<Vec<PlannedStep>, String> {
    let n = recipe.steps.len();
    let mut layers: Vec<Option<Digest>> = vec![None; n];
    let mut planned: Vec<Option<PlannedStep>> = vec![None; n];
    for &i in graph.order() {
        let step = &recipe.steps[i];
        let ctx = StepContext {
            recipe_dir: step.origin.dir(),
            scratch: None,
            ssh_key,
            archives: None,
            time_limit: None,
            reads: Default::default(),
        };
        let ancestors = graph.ancestors(i);
        let waits_on: Vec<String> = graph
            .needs(i)
            .iter()
            .filter(|&&a| layers[a].is_none())
            .map(|&a| recipe.steps[a].id.clone())
            .collect();
        let lowers: Option<Vec<Digest>> = ancestors.iter().map(|&a| layers[a]).collect();
        let by_step: Vec<(String, Option<Digest>)> = ancestors
            .iter()
            .map(|&a| (recipe.steps[a].id.clone(), layers[a]))
            .collect();
        let (key, status) = match lowers {
            Some(lowers) => {
                let key_of = |step: &Step| {
                    step_key(step, recipe.output.epoch, &lowers, &ctx)
                        .map_err(|e| format!("step `{}`: {e}", step.id))
                };
                let mut key = key_of(step)?;
                let mut cached = store
                    .action(&key)
                    .ok()
                    .flatten()
                    .filter(|entry| store.has_layer(&entry.layer));
                if lock::resolves(&step.kind) && step.pinned.is_none() {
                    // As the build does: without pins the step runs, unless a
                    // cached run of it gives them (then it has their key).
                    cached = cached.filter(|e| e.resolved.is_some());
                    if let Some(pins) = cached.as_ref().and_then(|e| e.resolved.clone()) {
                        let mut locked = step.clone();
                        locked.pinned = Some(pins);
                        key = key_of(&locked)?;
                    }
                }
                match cached {
                    Some(entry) => {
                        layers[i] = Some(entry.layer);
                        (Some(key), Status::Cached { layer: entry.layer })
                    }
                    None => (Some(key), Status::Build),
                }
            }
            None => {
                // Only to note the files the kind reads, for the explanation.
                let _ = step_key(step, recipe.output.epoch, &[], &ctx);
                (None, Status::Pending)
            }
        };
        let why = match status {
            Status::Cached { .. } => Vec::new(),
            Status::Build | Status::Pending => {
                let now = Ingredients::of(step, key, recipe.output.epoch, &by_step, &ctx);
                let last = Ingredients::last(store, &recipe.name, &step.id);
                explain::differences(last.as_ref(), &now)
            }
        };
        planned[i] = Some(PlannedStep {
            id: step.id.clone(),
            kind: step.kind.name().to_string(),
            key,
            status,
            needs: graph
                .needs(i)
                .iter()
                .map(|&d| recipe.steps[d].id.clone())
                .collect(),
            waits_on,
            why,
        });
    }
    Ok(graph
        .order()
        .iter()
        .map(|&i| planned[i].clone().expect("every step planned"))
        .collect())
}

/// The plan as a table for people; with `explain`, each step to build is
/// followed by what differs from its last build.
pub fn render(steps: &[PlannedStep], explain: bool) -> String {
    let mut out = format!("{:<18} {:<12} {:<14} {}\n", "STEP", "KIND", "KEY", "STATUS");
    for s in steps {
        let key = s.key.map(|k| k.short()).unwrap_or_else(|| "-".into());
        let status = match &s.status {
            Status::Cached { layer } => format!("cached (layer {})", layer.short()),
            Status::Build => "build".to_string(),
            Status::Pending => format!("pending: waits for {}", s.waits_on.join(", ")),
        };
        let needs = if s.needs.is_empty() || s.status == Status::Pending {
            String::new()
        } else {
            format!("  [needs {}]", s.needs.join(", "))
        };
        out.push_str(&format!(
            "{:<18} {:<12} {:<14} {status}{needs}\n",
            s.id, s.kind, key
        ));
        if explain {
            for line in &s.why {
                out.push_str(&format!("    why: {line}\n"));
            }
        }
    }
    let count = |f: fn(&Status) -> bool| steps.iter().filter(|s| f(&s.status)).count();
    out.push_str(&format!(
        "{} steps: {} cached, {} to build, {} pending (built unless what they wait for \
         reproduces its old layer)\n",
        steps.len(),
        count(|s| matches!(s, Status::Cached { .. })),
        count(|s| matches!(s, Status::Build)),
        count(|s| matches!(s, Status::Pending)),
    ));
    out
}
