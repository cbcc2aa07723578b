//! Whether a tree under the store's `trees/` still is what its layer says.
//!
//! A tree serves as an overlayfs lower dir, so whatever is in it reaches the
//! steps built on it and, through them, their layers, caches and images.
//! [`problems`] compares a tree with its layer manifest path by path: the
//! set of paths, each one's kind, permission bits, owner, mtime, size, link
//! target, device number, xattrs and hard links ([`Depth::Metadata`]; a
//! write to a file changes its mtime), and with [`Depth::Contents`] the
//! blake3 of every file as well (after a reboot, when unsynced writes may
//! have been lost, and in `kiln cache fsck`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use rayon::prelude::*;

use crate::digest::Digest;
use crate::layer::{Entry, Kind, Layer};

/// How deep [`problems`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Paths and metadata only: a `stat` and the xattr list per path.
    Metadata,
    /// Metadata, and every file's contents hashed against its blob digest.
    Contents,
}

/// The xattr that marks an overlayfs directory as opaque (kept in trees).
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// At most this many problems are listed (then a count of the rest).
const MAX_LISTED: usize = 20;

/// How `dir` differs from `layer`'s tree; empty when it is the tree.
pub fn problems(layer: &Layer, dir: &Path, depth: Depth) -> Vec<String> {
    let mut found = Vec::new();
    let expected: HashMap<&str, &Entry> =
        layer.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    // Directories the layer does not list but that hold its entries
    // (materialize creates them): allowed, whatever their metadata.
    let parents: HashSet<&str> = layer
        .entries
        .iter()
        .flat_map(|e| e.path.match_indices('/').map(move |(i, _)| &e.path[..i]))
        .collect();

    let mut seen = 0usize;
    for item in walkdir::WalkDir::new(dir).follow_links(false).min_depth(1) {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                found.push(format!("cannot read the tree: {e}"));
                continue;
            }
        };
        let Some(rel) = item.path().strip_prefix(dir).ok().and_then(Path::to_str) else {
            found.push(format!("{}: name is not UTF-8", item.path().display()));
            continue;
        };
        match expected.get(rel) {
            Some(_) => seen += 1,
            None if parents.contains(rel) && item.file_type().is_dir() => {}
            None => found.push(format!("`{rel}` is not in the layer")),
        }
    }
    if seen != expected.len() {
        for entry in &layer.entries {
            if fs::symlink_metadata(dir.join(&entry.path)).is_err() {
                found.push(format!("`{}` is missing", entry.path));
            }
        }
    }

    let mismatches: Vec<String> = layer
        .entries
        .par_iter()
        .filter_map(|entry| check_entry(entry, dir, depth).err())
        .collect();
    found.extend(mismatches);
    if found.len() > MAX_LISTED {
        let more = found.len() - MAX_LISTED;
        found.truncate(MAX_LISTED);
        found.push(format!("and {more} more"));
    }
    found
}

/// Checks one entry of the tree.
fn check_entry(entry: &Entry, dir: &Path, depth: Depth) -> Result<(), String> {
    let bad = |what: String| format!("`{}`: {what}", entry.path);
    let path = dir.join(&entry.path);
    let Ok(meta) = fs::symlink_metadata(&path) else {
        // Already reported as missing.
        return Ok(());
    };
    let kind = meta.file_type();
    let kind_ok = match &entry.kind {
        Kind::File { size, .. } => {
            if kind.is_file() && meta.len() != *size {
                return Err(bad(format!("{} bytes, the layer says {size}", meta.len())));
            }
            kind.is_file()
        }
        Kind::Dir { .. } => kind.is_dir(),
        Kind::Symlink { target } => {
            if kind.is_symlink() {
                let now = fs::read_link(&path).map_err(|e| bad(e.to_string()))?;
                if now.as_os_str() != target.as_str() {
                    return Err(bad(format!(
                        "links to `{}`, the layer says `{target}`",
                        now.display()
                    )));
                }
            }
            kind.is_symlink()
        }
        Kind::Hardlink { target } => {
            let other = fs::symlink_metadata(dir.join(target)).map_err(|e| bad(e.to_string()))?;
            if (other.dev(), other.ino()) != (meta.dev(), meta.ino()) {
                return Err(bad(format!("is not a hard link to `{target}`")));
            }
            // Its metadata is the target's, checked there.
            return Ok(());
        }
        Kind::CharDevice { rdev } => kind.is_char_device() && meta.rdev() == *rdev,
        Kind::BlockDevice { rdev } => kind.is_block_device() && meta.rdev() == *rdev,
        Kind::Fifo => kind.is_fifo(),
        Kind::Socket => kind.is_socket(),
        Kind::Whiteout => kind.is_char_device() && meta.rdev() == 0,
    };
    if !kind_ok {
        return Err(bad(format!("is a {kind:?}, not what the layer says")));
    }
    if !kind.is_symlink() && meta.mode() & 0o7777 != entry.mode {
        return Err(bad(format!(
            "mode {:o}, the layer says {:o}",
            meta.mode() & 0o7777,
            entry.mode
        )));
    }
    if (meta.uid(), meta.gid()) != (entry.uid, entry.gid) {
        return Err(bad(format!(
            "owner {}:{}, the layer says {}:{}",
            meta.uid(),
            meta.gid(),
            entry.uid,
            entry.gid
        )));
    }
    if (meta.mtime(), meta.mtime_nsec()) != (entry.mtime, 0) {
        return Err(bad(format!(
            "modified since it was written (mtime {}, the layer says {})",
            meta.mtime(),
            entry.mtime
        )));
    }
    check_xattrs(entry, &path).map_err(bad)?;
    if let (Depth::Contents, Kind::File { blob, .. }) = (depth, &entry.kind) {
        let digest = hash_file(&path).map_err(|e| bad(e.to_string()))?;
        if digest != *blob {
            return Err(bad("contents differ from the layer's blob".into()));
        }
    }
    Ok(())
}

/// The entry's xattrs, plus the opaque marker on an opaque directory.
fn check_xattrs(entry: &Entry, path: &Path) -> Result<(), String> {
    let mut wanted: Vec<(String, Vec<u8>)> = entry
        .xattrs
        .iter()
        .map(|(name, value)| (name.clone(), value.0.clone()))
        .collect();
    if entry.kind == (Kind::Dir { opaque: true }) {
        wanted.push((OPAQUE_XATTR.into(), b"y".to_vec()));
    }
    wanted.sort();
    let mut present = Vec::new();
    for name in xattr::list(path).map_err(|e| e.to_string())? {
        let value = xattr::get(path, &name)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        present.push((name.to_string_lossy().into_owned(), value));
    }
    present.sort();
    if present != wanted {
        let names = |list: &[(String, Vec<u8>)]| {
            list.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "xattrs [{}] differ from the layer's [{}]",
            names(&present),
            names(&wanted)
        ));
    }
    Ok(())
}

/// The blake3 digest of a file's contents.
pub fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(Digest::from_hash(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::normalize::Normalizer;
    use crate::store::Store;
    use std::os::unix::fs::PermissionsExt;

    /// A store with one captured layer (a file, a subdirectory, a symlink,
    /// a hard link) and its tree.
    fn layer_and_tree() -> (tempfile::TempDir, Store, Layer, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("etc/sub")).unwrap();
        fs::write(upper.join("etc/motd"), b"hello\n").unwrap();
        fs::write(upper.join("etc/sub/data"), vec![7u8; 10_000]).unwrap();
        fs::hard_link(upper.join("etc/motd"), upper.join("etc/motd.link")).unwrap();
        std::os::unix::fs::symlink("motd", upper.join("etc/alias")).unwrap();
        let normalizer = Normalizer {
            epoch: 1_704_067_200,
            extra_drops: Vec::new(),
        };
        let layer = crate::capture::capture(&upper, &store, &normalizer).unwrap();
        let tree = tmp.path().join("tree");
        crate::capture::materialize(&layer, &store, &tree).unwrap();
        (tmp, store, layer, tree)
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn an_unpacked_tree_matches_its_layer() {
        let (_tmp, _store, layer, tree) = layer_and_tree();
        assert_eq!(
            problems(&layer, &tree, Depth::Contents),
            Vec::<String>::new()
        );
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn every_kind_of_change_is_found() {
        type Change = fn(&Path);
        let changes: [(&str, Change, Depth); 7] = [
            (
                "written",
                |t| fs::write(t.join("etc/motd"), b"HELLO\n").unwrap(),
                Depth::Metadata,
            ),
            (
                "chmod",
                |t| {
                    fs::set_permissions(t.join("etc/sub/data"), fs::Permissions::from_mode(0o4755))
                        .unwrap()
                },
                Depth::Metadata,
            ),
            (
                "added",
                |t| fs::write(t.join("etc/planted"), b"x").unwrap(),
                Depth::Metadata,
            ),
            (
                "removed",
                |t| fs::remove_file(t.join("etc/alias")).unwrap(),
                Depth::Metadata,
            ),
            (
                "xattr",
                |t| xattr::set(t.join("etc/motd"), "user.planted", b"1").unwrap(),
                Depth::Metadata,
            ),
            (
                "relinked",
                |t| {
                    fs::remove_file(t.join("etc/motd.link")).unwrap();
                    fs::copy(t.join("etc/motd"), t.join("etc/motd.link")).unwrap();
                },
                Depth::Metadata,
            ),
            (
                // A flipped byte with the mtime put back: only hashing sees it.
                "flipped",
                |t| {
                    let path = t.join("etc/sub/data");
                    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
                    let mut bytes = fs::read(&path).unwrap();
                    bytes[5000] ^= 1;
                    fs::write(&path, bytes).unwrap();
                    File::options()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_modified(mtime)
                        .unwrap();
                },
                Depth::Contents,
            ),
        ];
        for (name, change, depth) in changes {
            let (_tmp, _store, layer, tree) = layer_and_tree();
            change(&tree);
            let found = problems(&layer, &tree, depth);
            assert!(!found.is_empty(), "{name}: not found");
            if name == "flipped" {
                assert!(problems(&layer, &tree, Depth::Metadata).is_empty());
            }
        }
    }
}
