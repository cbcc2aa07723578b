//! Looking after the local store: what is in it (`kiln cache stats`), what to
//! drop (`kiln cache gc`), and fetching a recipe's steps ahead of a build
//! (`kiln cache pull`).
//!
//! gc keeps every action entry that a `--keep` recipe needs or that a build
//! used within `--max-age`, every layer those name, and every blob those
//! layers name; the rest goes. Of the package cache (`debs/`) it keeps the
//! `.deb`s that a kept layer has installed (its dpkg status lists them) or
//! that a `--keep` recipe's lock pins: what re-running a kept step installs
//! again. Other `.deb`s go (a build downloads what it misses again). It takes the store's lock exclusively, so it
//! never runs while a build holds the store, and a build never starts while
//! gc runs.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::digest::Digest;
use crate::dpkg::Deb;
use crate::graph::Graph;
use crate::layer::{Kind, Layer};
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
    /// `.deb` files of the package cache.
    pub debs: usize,
    pub bytes: u64,
}

/// The file names of the `.deb`s `recipe`'s lock pins (both spellings a
/// version with an epoch gets, see [`Deb::file_names`]).
pub fn pinned_debs(recipe: &Recipe) -> Vec<String> {
    recipe
        .steps
        .iter()
        .flat_map(|s| s.pinned.iter().flatten())
        .flat_map(Deb::file_names)
        .collect()
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

/// Removes what neither `keep` (action keys, and `.deb` file names as
/// [`pinned_debs`] gives them) nor use within `max_age` protects.
pub fn gc(
    store: &Store,
    keep: &BTreeSet<Digest>,
    keep_debs: &BTreeSet<String>,
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
    let mut live_debs = keep_debs.clone();
    for (digest, path, size) in store.list(Objects::Layers) {
        if live_layers.contains(&digest) {
            if let Ok(layer) = store.layer(&digest) {
                live_blobs.extend(layer.blobs().copied());
                live_debs.extend(installed_debs(store, &layer));
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
    let debs = store.debs_dir();
    for entry in std::fs::read_dir(&debs).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && name.ends_with(".deb") && !live_debs.contains(&name) {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            remove(&entry.path(), size, &mut done.bytes);
            done.debs += 1;
        }
    }
    store.prune_families(&|key| matches!(store.action(key), Ok(Some(_))));
    Ok(done)
}

/// The `.deb` file names of the packages `layer`'s dpkg status lists as
/// installed (none when the layer has no status, or it cannot be read).
fn installed_debs(store: &Store, layer: &Layer) -> Vec<String> {
    let status = layer
        .entries
        .binary_search_by(|e| e.path.as_str().cmp(DPKG_STATUS))
        .ok()
        .map(|i| &layer.entries[i].kind);
    let Some(Kind::File { blob, .. }) = status else {
        return Vec::new();
    };
    let Ok(text) = store.read_blob(blob) else {
        return Vec::new();
    };
    crate::dpkg::installed(&String::from_utf8_lossy(&text))
        .into_iter()
        .filter_map(|p| {
            Some(Deb {
                arch: p.arch?,
                name: p.name,
                version: p.version,
                sha256: String::new(),
            })
        })
        .flat_map(|deb| deb.file_names())
        .collect()
}

/// Where a root's dpkg status is, as a layer path.
const DPKG_STATUS: &str = "var/lib/dpkg/status";

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, LAYER_FORMAT};
    use crate::store::{ActionEntry, Origin};

    /// Records a layer whose dpkg status lists `packages` (name, version)
    /// under the action key `key`.
    fn step_installing(store: &Store, key: &Digest, packages: &[(&str, &str)]) {
        let status: String = packages
            .iter()
            .map(|(name, version)| {
                format!(
                    "Package: {name}\nStatus: install ok installed\nArchitecture: amd64\nVersion: {version}\n\n"
                )
            })
            .collect();
        let blob = store.put_blob_bytes(status.as_bytes()).unwrap();
        let layer = Layer {
            format: LAYER_FORMAT,
            entries: vec![Entry::plain(
                DPKG_STATUS,
                Kind::File {
                    blob,
                    size: status.len() as u64,
                },
            )],
        };
        let entry = ActionEntry {
            layer: store.put_layer(&layer).unwrap(),
            step: "packages".into(),
            build_ms: 1,
            origin: Origin::Built,
            resolved: None,
        };
        store.put_action(key, &entry).unwrap();
    }

    #[test]
    fn gc_keeps_the_debs_kept_layers_installed_or_locks_pin() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let (kept, dropped) = (Digest::of(b"kept"), Digest::of(b"dropped"));
        step_installing(&store, &kept, &[("jq", "1.7-1"), ("git", "1:2.43-1")]);
        step_installing(&store, &dropped, &[("old", "1.0")]);
        let debs = store.debs_dir();
        std::fs::create_dir_all(&debs).unwrap();
        let files = [
            "jq_1.7-1_amd64.deb",
            "git_1%3a2.43-1_amd64.deb",
            "old_1.0_amd64.deb",
            "jq_1.6-1_amd64.deb",
            "pinned_2.0_all.deb",
            "a.index",
        ];
        for name in files {
            std::fs::write(debs.join(name), name).unwrap();
        }
        let keep_debs: BTreeSet<String> = ["pinned_2.0_all.deb".to_string()].into();
        let done = gc(&store, &[kept].into(), &keep_debs, None).unwrap();
        assert_eq!((done.actions, done.debs), (1, 2));
        let mut left: Vec<String> = std::fs::read_dir(&debs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "a.index",
                "git_1%3a2.43-1_amd64.deb",
                "jq_1.7-1_amd64.deb",
                "pinned_2.0_all.deb"
            ]
        );
    }
}
