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
use crate::explain::{Explainer, Ingredients};
use crate::graph::Graph;
use crate::recipe::Recipe;
use crate::resolve::{self, ResolveError, Visit};
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
) -> Result<Vec<PlannedStep>, ResolveError> {
    let epoch = recipe.output.epoch;
    let mut planned: Vec<Option<PlannedStep>> = vec![None; recipe.steps.len()];
    let mut explainer = Explainer::default();
    resolve::walk(recipe, graph, ssh_key, |visit| {
        let found = visit.find(store, epoch)?;
        let Visit {
            index,
            step,
            below,
            layers,
            ctx,
            ..
        } = visit;
        if found.is_none() {
            // Only to note the files the kind reads, for the explanation.
            let _ = resolve::key(step, epoch, &[], &ctx);
        }
        let (key, status) = match &found {
            Some(found) => (
                Some(found.key()),
                match found.layer() {
                    Some(layer) => Status::Cached { layer },
                    None => Status::Build,
                },
            ),
            None => (None, Status::Pending),
        };
        let why = match status {
            Status::Cached { .. } => Vec::new(),
            Status::Build | Status::Pending => {
                let now = Ingredients::of(step, key, epoch, &below, &ctx);
                let last = Ingredients::last(store, &recipe.name, &step.id);
                explainer.why(&step.id, last.as_ref(), &now)
            }
        };
        let ids = |steps: Vec<usize>| steps.iter().map(|&d| recipe.steps[d].id.clone()).collect();
        planned[index] = Some(PlannedStep {
            id: step.id.clone(),
            kind: step.kind.name().to_string(),
            key,
            status,
            needs: ids(graph.needs(index)),
            waits_on: ids(graph
                .needs(index)
                .into_iter()
                .filter(|&a| layers[a].is_none())
                .collect()),
            why,
        });
        Ok::<_, ResolveError>(found.and_then(|f| f.layer()))
    })?;
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
