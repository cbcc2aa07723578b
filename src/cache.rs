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
use crate::recipe::Recipe;
use crate::remote::Remotes;
use crate::resolve::{self, Found, ResolveError};
use crate::store::{Objects, Store, StoreError};

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

fn tally(store: &Store, kind: Objects) -> Tally {
    let items = store.list(kind);
    Tally {
        count: items.len(),
        bytes: items.iter().map(|(_, _, size)| size).sum(),
    }
}

/// Counts the store's objects.
pub fn stats(store: &Store) -> Stats {
    Stats {
        blobs: tally(store, Objects::Blobs),
        layers: tally(store, Objects::Layers),
        actions: tally(store, Objects::Actions),
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

/// The step keys of `recipe` whose layers the local store holds (for a step
/// whose pins come from a cached run, that run's key too).
pub fn recipe_keys(
    recipe: &Recipe,
    graph: &Graph,
    store: &Store,
    ssh_key: Option<&Path>,
) -> Result<Vec<Digest>, ResolveError> {
    let epoch = recipe.output.epoch;
    let mut keys = Vec::new();
    resolve::walk(recipe, graph, ssh_key, |v| {
        let Some(found) = v.find(store, epoch)? else {
            return Ok(None);
        };
        match &found {
            Found::Cached { key, .. } => keys.push(*key),
            Found::Resolved { key, run_key, .. } => keys.extend([*key, *run_key]),
            Found::Missing { .. } => {}
        }
        Ok::<_, ResolveError>(found.layer())
    })?;
    Ok(keys)
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
    for (key, path, size) in store.list(Objects::Actions) {
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
    for (digest, path, size) in store.list(Objects::Layers) {
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
    for (digest, path, size) in store.list(Objects::Blobs) {
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

/// Why `kiln cache push` stopped.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// A remote refused the step (the remote said why as it happened).
    #[error("could not push step `{0}`")]
    Refused(String),
}

/// Pushes every step of `recipe` the local store holds to the remotes;
/// returns (pushed, steps in the recipe).
pub fn push(
    recipe: &Recipe,
    graph: &Graph,
    store: &Store,
    remotes: &Remotes,
    ssh_key: Option<&Path>,
) -> Result<(usize, usize), PushError> {
    let steps = crate::plan::plan(recipe, graph, store, ssh_key)?;
    let mut pushed = 0;
    for s in &steps {
        if let (Some(k), crate::plan::Status::Cached { layer }) = (s.key, &s.status) {
            if !remotes.push(&k, layer, &s.id, store) {
                return Err(PushError::Refused(s.id.clone()));
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
) -> Result<(usize, usize, usize), ResolveError> {
    let epoch = recipe.output.epoch;
    let (mut here, mut pulled) = (0, 0);
    resolve::walk(recipe, graph, ssh_key, |v| {
        let Some(found) = v.find(store, epoch)? else {
            return Ok(None);
        };
        Ok::<_, ResolveError>(match found {
            Found::Cached { layer, .. } => {
                here += 1;
                Some(layer)
            }
            Found::Resolved { run, .. } => {
                here += 1;
                Some(run.layer)
            }
            // Only a step's key with pins is ever pushed.
            Found::Missing { resolves: true, .. } => None,
            Found::Missing { key, .. } => {
                let layer = remotes.fetch(&key, &v.step.id, store);
                pulled += usize::from(layer.is_some());
                layer
            }
        })
    })?;
    Ok((here, pulled, recipe.steps.len() - here - pulled))
}
