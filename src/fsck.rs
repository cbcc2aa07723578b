//! `kiln cache fsck`: checks everything in the store in full, and with
//! `--repair` removes what is damaged so that the next build makes it again.
//!
//! - blobs: a regular file of mode 0444 and mtime 0 whose blake3 is its name;
//! - layer manifests: their digest is their name, they parse, and every blob
//!   they name is intact;
//! - action entries: they parse and name an intact layer;
//! - trees: each is its intact layer's tree, contents hashed
//!   ([`tree_check`]); nothing else lives under `trees/` but each tree's
//!   seal and record of which files hold zeros (removed with the tree).
//!
//! Repairs go bottom-up (a removed blob takes the layers naming it, their
//! trees and the action entries naming those with it), so a repaired store is
//! consistent: every cache hit it gives is whole.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;

use crate::digest::Digest;
use crate::layer::Layer;
use crate::store::{ActionEntry, Objects, Store, BLOB_MODE};
use crate::tree_check::{self, Depth};

/// One damaged thing in the store.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub path: PathBuf,
    pub problem: String,
}

/// What fsck looked at and found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub blobs: usize,
    pub layers: usize,
    pub actions: usize,
    pub trees: usize,
    pub findings: Vec<Finding>,
    /// Whether the findings were removed.
    pub repaired: bool,
}

/// Checks every object in `store`; with `repair`, removes the damaged ones.
pub fn fsck(store: &Store, repair: bool) -> Report {
    let mut report = Report {
        repaired: repair,
        ..Report::default()
    };
    let mut note = |path: PathBuf, problem: String| {
        report.findings.push(Finding { path, problem });
    };

    let blobs = store.list(Objects::Blobs);
    let blob_findings: Vec<(Digest, PathBuf, BlobProblem)> = blobs
        .par_iter()
        .filter_map(|(digest, path, _)| {
            blob_problem(digest, path).map(|why| (*digest, path.clone(), why))
        })
        .collect();
    let mut bad_blobs = BTreeSet::new();
    let mut unsealed = 0;
    for (digest, path, problem) in blob_findings {
        match problem {
            BlobProblem::Damaged(why) => {
                note(path, why);
                bad_blobs.insert(digest);
                if repair {
                    store.discard_blob(&digest);
                }
            }
            BlobProblem::Unsealed => {
                unsealed += 1;
                // The contents are right: only the seal is given again.
                if repair && store.seal_blob(&digest).is_err() {
                    note(path, "cannot be resealed; removed".into());
                    bad_blobs.insert(digest);
                    store.discard_blob(&digest);
                }
            }
        }
    }
    if unsealed > 0 {
        note(
            store.objects_dir(Objects::Blobs),
            format!(
                "{unsealed} blobs have the right contents but not the mode 0444 and mtime 0 \
                 kiln publishes them with (an older kiln wrote them, or they were touched \
                 since); builds treat them as missing until `--repair` reseals them"
            ),
        );
    }

    let layers = store.list(Objects::Layers);
    let mut good_layers = BTreeSet::new();
    for (digest, path, _) in &layers {
        match layer_problem(store, digest, &bad_blobs) {
            None => {
                good_layers.insert(*digest);
            }
            Some(why) => {
                note(path.clone(), why);
                if repair {
                    let _ = fs::remove_file(path);
                    let _ = store.discard_tree(digest);
                }
            }
        }
    }

    let actions = store.list(Objects::Actions);
    for (_, path, _) in &actions {
        let why = match fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<ActionEntry>(&b).map_err(|e| e.to_string()))
        {
            Err(e) => Some(format!("does not parse ({e})")),
            Ok(entry) if !good_layers.contains(&entry.layer) => Some(format!(
                "names layer {}, which is missing or damaged",
                entry.layer.short()
            )),
            Ok(_) => None,
        };
        if let Some(why) = why {
            note(path.clone(), why);
            if repair {
                let _ = fs::remove_file(path);
            }
        }
    }

    let (trees, debris) = store.list_trees();
    for digest in &trees {
        let path = store.tree_path(digest);
        let why = if !good_layers.contains(digest) {
            Some("its layer is missing or damaged".to_string())
        } else {
            match store.layer(digest) {
                Ok(layer) => {
                    let found = tree_check::problems(&layer, &path, Depth::Contents);
                    (!found.is_empty()).then(|| found.join("; "))
                }
                Err(e) => Some(e.to_string()),
            }
        };
        if let Some(why) = why {
            note(path, why);
            if repair {
                let _ = store.discard_tree(digest);
            }
        }
    }
    for path in debris {
        note(path.clone(), "is not a tree kiln made".into());
        if repair {
            let _ = fs::remove_file(&path).or_else(|_| fs::remove_dir_all(&path));
        }
    }

    report.blobs = blobs.len();
    report.layers = layers.len();
    report.actions = actions.len();
    report.trees = trees.len();
    report
}

/// What is wrong with a blob file.
enum BlobProblem {
    /// Not a file, or wrong contents: it has to go.
    Damaged(String),
    /// Right contents without the published mode and mtime (written by an
    /// older kiln, or touched): builds treat it as missing until resealed.
    Unsealed,
}

/// Why a blob file is not what kiln published, if it is not.
fn blob_problem(digest: &Digest, path: &std::path::Path) -> Option<BlobProblem> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => return Some(BlobProblem::Damaged(e.to_string())),
    };
    if !meta.file_type().is_file() {
        return Some(BlobProblem::Damaged("is not a regular file".into()));
    }
    match tree_check::hash_file(path) {
        Err(e) => Some(BlobProblem::Damaged(e.to_string())),
        Ok(found) if found != *digest => Some(BlobProblem::Damaged(
            "content does not match its name".into(),
        )),
        Ok(_)
            if meta.mode() & 0o7777 != BLOB_MODE || (meta.mtime(), meta.mtime_nsec()) != (0, 0) =>
        {
            Some(BlobProblem::Unsealed)
        }
        Ok(_) => None,
    }
}

/// Why a layer manifest is not usable, if it is not.
fn layer_problem(store: &Store, digest: &Digest, bad_blobs: &BTreeSet<Digest>) -> Option<String> {
    let layer: Layer = match store.layer(digest) {
        Ok(layer) => layer,
        Err(e) => return Some(e.to_string()),
    };
    let missing = layer
        .blobs()
        .find(|blob| bad_blobs.contains(blob) || !store.blob_path(blob).exists())
        .map(|blob| format!("names blob {}, which is missing or damaged", blob.short()));
    missing
}
