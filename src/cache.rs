//! Looking after the local store: what is in it (`kiln cache stats`), what to
//! drop (`kiln cache gc`), and fetching a recipe's steps ahead of a build
//! (`kiln cache pull`).
//!
//! gc keeps every action entry that a `--keep` recipe needs or that a build
//! used within `--max-age`, every layer those name, and every blob those
//! layers name; the rest goes. It takes the store's lock exclusively, so it
//! never runs while a build holds the store, and a build never starts while
//! gc runs.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::digest::Digest;
use crate::graph::Graph;
use crate::key::step_key;
use crate::recipe::Recipe;
use crate::remote::Remotes;
use crate::step::StepContext;
use crate::store::{Store, StoreError};

/// Counts and bytes of one kind of object.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Tally {
    pub count: usize,
    pub bytes: u64,
}

/// What the store holds.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub blobs: Tally,
    pub layers: Tally,
    pub actions: Tally,
}

fn tally(store: &Store, kind: &str) -> Tally {
    let items = store.list(kind);
    Tally {
        count: items.len(),
        bytes: items.iter().map(|(_, _, size)| size).sum(),
    }
}

/// Counts the store's objects.
pub fn stats(store: &Store) -> Stats {
    Stats {
        blobs: tally(store, "blobs"),
        layers: tally(store, "layers"),
        actions: tally(store, "actions"),
    }
}

/// What gc removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Collected {
    pub actions: usize,
    pub layers: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// Walks `recipe` in graph order, computing each step's key from its lower
/// layers; `resolve` says which layer a key stands for (or `None`, which
/// leaves the steps above it unknown). Returns the keys it resolved.
fn walk(
    recipe: &Recipe,
    graph: &Graph,
    ssh_key: Option<&Path>,
    mut resolve: impl FnMut(&crate::recipe::Step, &Digest) -> Option<Digest>,
) -> Vec<Digest> {
    let mut layers: Vec<Option<Digest>> = vec![None; recipe.steps.len()];
    let mut keys = Vec::new();
    for &i in graph.order() {
        let step = &recipe.steps[i];
        let Some(lowers) = graph
            .ancestors(i)
            .iter()
            .map(|&a| layers[a])
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let ctx = StepContext {
            recipe_dir: step.origin.dir(),
            scratch: None,
            ssh_key,
            archives: None,
            time_limit: None,
            reads: Default::default(),
        };
        let Ok(key) = step_key(step, recipe.output.epoch, &lowers, &ctx) else {
            continue;
        };
        if let Some(layer) = resolve(step, &key) {
            layers[i] = Some(layer);
            keys.push(key);
        }
    }
    keys
}

/// The local layer a key has, if it is complete.
fn local(store: &Store, key: &Digest) -> Option<Digest> {
    store
        .action(key)
        .ok()
        .flatten()
        .map(|e| e.layer)
        .filter(|l| store.has_layer(l))
}

/// The step keys of `recipe` that the local store holds.
pub fn recipe_keys(
    recipe: &Recipe,
    graph: &Graph,
    store: &Store,
    ssh_key: Option<&Path>,
) -> Vec<Digest> {
    walk(recipe, graph, ssh_key, |_, key| local(store, key))
}

/// Removes what neither `keep` nor use within `max_age` protects.
pub fn gc(
    store: &Store,
    keep: &BTreeSet<Digest>,
    max_age: Option<Duration>,
) -> Result<Collected, StoreError> {
    let now = SystemTime::now();
    let mut done = Collected::default();
    let mut live_layers = BTreeSet::new();
    for (key, path, size) in store.list("actions") {
        let recent = max_age.is_some_and(|age| {
            std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|used| used <= age)
        });
        if keep.contains(&key) || recent {
            if let Ok(Some(entry)) = store.action(&key) {
                live_layers.insert(entry.layer);
            }
            continue;
        }
        remove(&path, size, &mut done.bytes);
        let _ = std::fs::remove_file(store.log_path(&key));
        done.actions += 1;
    }
    let mut live_blobs = BTreeSet::new();
    for (digest, path, size) in store.list("layers") {
        if live_layers.contains(&digest) {
            if let Ok(layer) = store.layer(&digest) {
                live_blobs.extend(layer.blobs().copied());
            }
            continue;
        }
        remove(&path, size, &mut done.bytes);
        let _ = store.discard_tree(&digest);
        done.layers += 1;
    }
    for (digest, path, size) in store.list("blobs") {
        if !live_blobs.contains(&digest) {
            remove(&path, size, &mut done.bytes);
            done.blobs += 1;
        }
    }
    store.prune_families(&|key| matches!(store.action(key), Ok(Some(_))));
    Ok(done)
}

fn remove(path: &Path, size: u64, bytes: &mut u64) {
    if std::fs::remove_file(path).is_ok() {
        *bytes += size;
    }
}

/// Pushes every step of `recipe` the local store holds to the remotes;
/// returns (pushed, steps in the recipe).
pub fn push(
    recipe: &Recipe,
    graph: &Graph,
    store: &Store,
    remotes: &Remotes,
    ssh_key: Option<&Path>,
) -> Result<(usize, usize), String> {
    let steps = crate::plan::plan(recipe, graph, store, ssh_key)?;
    let mut pushed = 0;
    for s in &steps {
        if let (Some(k), crate::plan::Status::Cached { layer }) = (s.key, &s.status) {
            if !remotes.push(&k, layer, &s.id, store) {
                return Err(format!("could not push step `{}`", s.id));
            }
            pushed += 1;
        }
    }
    Ok((pushed, steps.len()))
}

/// Fetches every step of `recipe` the remotes have into the local store;
/// returns (already here, pulled, not available).
pub fn pull(
    recipe: &Recipe,
    graph: &Graph,
    store: &Store,
    remotes: &Remotes,
    ssh_key: Option<&Path>,
) -> (usize, usize, usize) {
    let (mut here, mut pulled) = (0, 0);
    walk(recipe, graph, ssh_key, |step, key| {
        if let Some(layer) = local(store, key) {
            here += 1;
            return Some(layer);
        }
        let layer = remotes.fetch(key, &step.id, store);
        pulled += usize::from(layer.is_some());
        layer
    });
    (here, pulled, recipe.steps.len() - here - pulled)
}
