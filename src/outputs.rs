//! Whether a build's output files are up to date, so that a build in which
//! no layer changed skips assembly (merging the layers, writing and checking
//! the ext4, extracting the kernel, hashing it all).
//!
//! The outputs are up to date when the same kiln wrote them from the same
//! layers with the same output settings (the *output key*), and none of the
//! files was touched since: each still has the size, modification time and
//! inode recorded when it was written, like `make` and cargo judge freshness.
//! Booting the image read-write, copying over it or deleting it makes the
//! next build assemble again.
//!
//! The record lives beside the outputs, in `<out>/.kiln/<rootfs>.json`, one
//! per rootfs file name; it is removed before the outputs are rewritten and
//! written after they are all in place, so an interrupted build never leaves
//! a record that vouches for half-written files.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::artifacts::Artifact;
use crate::digest::{Digest, KeyEncoder};
use crate::recipe::Recipe;

/// What the last build that wrote a rootfs file produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outputs {
    pub rootfs: Artifact,
    pub kernel: Option<Artifact>,
    pub initrd: Option<Artifact>,
    pub manifest: Option<PathBuf>,
    pub sbom: Option<Artifact>,
}

/// The record on disk: the output key, the outputs and their file stamps.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    key: Digest,
    outputs: Outputs,
    files: Vec<Stamp>,
}

/// A file as it was when the build finished writing it.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    path: PathBuf,
    bytes: u64,
    mtime_ns: i128,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            path: path.to_path_buf(),
            bytes: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
        })
    }
}

/// The output key: the layers in merge order, the recipe's name (it seeds the
/// filesystem UUID) and output settings, the running kiln binary itself and
/// the version of the e2fsprogs that writes the image (`mkfs`, as
/// [`crate::ext4::writer_version`] gives it), so that neither a kiln nor an
/// e2fsprogs that writes images differently reuses old outputs.
pub fn output_key(recipe: &Recipe, mkfs: &str, layers: &[Digest]) -> std::io::Result<Digest> {
    let mut exe = blake3::Hasher::new();
    exe.update_reader(std::fs::File::open(std::env::current_exe()?)?)?;
    Ok(key_for(
        &Digest::from_hash(exe.finalize()),
        mkfs,
        recipe,
        layers,
    ))
}

/// The output key for the kiln binary whose digest is `kiln`. Every output
/// setting is encoded by name, so that no derive can change a key.
fn key_for(kiln: &Digest, mkfs: &str, recipe: &Recipe, layers: &[Digest]) -> Digest {
    let o = &recipe.output;
    let mut enc = KeyEncoder::new("kiln outputs");
    enc.digest(kiln)
        .str(mkfs)
        .str(&recipe.name)
        .str(&o.rootfs)
        .u64(o.size.0)
        .str(&o.label)
        .u64(o.epoch as u64)
        .opt_str(o.kernel.as_deref())
        .opt_str(o.initrd.as_deref())
        .opt_str(o.manifest.as_deref())
        .opt_str(o.sbom.as_deref())
        .str(&o.reference)
        .opt_str(o.install_dir.as_deref())
        .u64(layers.len() as u64);
    for layer in layers {
        enc.digest(layer);
    }
    enc.finish()
}

fn record_path(out_dir: &Path, rootfs: &str) -> PathBuf {
    out_dir.join(".kiln").join(format!("{rootfs}.json"))
}

/// The recorded outputs, if they were written under `key` and no file has
/// been touched since.
pub fn fresh(out_dir: &Path, rootfs: &str, key: &Digest) -> Option<Outputs> {
    let text = std::fs::read(record_path(out_dir, rootfs)).ok()?;
    let record: Record = serde_json::from_slice(&text).ok()?;
    let untouched = record
        .files
        .iter()
        .all(|stamp| Stamp::of(&stamp.path).as_ref() == Some(stamp));
    (record.key == *key && untouched).then_some(record.outputs)
}

/// Removes the record before the outputs are rewritten.
pub fn forget(out_dir: &Path, rootfs: &str) -> std::io::Result<()> {
    match std::fs::remove_file(record_path(out_dir, rootfs)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Records the outputs just written under `key`.
pub fn remember(out_dir: &Path, key: &Digest, outputs: &Outputs) -> std::io::Result<()> {
    let paths = [
        Some(&outputs.rootfs),
        outputs.kernel.as_ref(),
        outputs.initrd.as_ref(),
        outputs.sbom.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|a| a.path.clone())
    .chain(outputs.manifest.clone());
    let files = paths
        .map(|p| {
            Stamp::of(&p).ok_or_else(|| std::io::Error::other(format!("{} vanished", p.display())))
        })
        .collect::<std::io::Result<Vec<Stamp>>>()?;
    let record = Record {
        key: *key,
        outputs: outputs.clone(),
        files,
    };
    let path = record_path(out_dir, &outputs.rootfs.file);
    let dir = path.parent().expect("the record has a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.{}", outputs.rootfs.file, std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&record).expect("records serialize"),
    )?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_output_setting_is_in_the_key() {
        let recipe = |output: &str| {
            crate::recipe::parse(
                &format!("name: k\noutput: {{{output}}}\nsteps:\n  a:\n    file: {{path: /x, content: y}}\n"),
                Path::new("k.yaml"),
            )
            .unwrap()
        };
        let (kiln, layers) = (Digest::of(b"kiln"), [Digest::of(b"layer")]);
        let base = key_for(&kiln, MKFS, &recipe(""), &layers);
        // Pinned: if this fails, the encoding changed (outputs are rewritten once).
        assert_eq!(
            base.to_hex(),
            "d9d092b0b6da0a23b6a4cd2e6a1ca431b17f078456b173e8f51a81506624627c"
        );
        for setting in [
            "rootfs: r.ext4",
            "size: 1GiB",
            "label: other",
            "epoch: 5",
            "kernel: k",
            "kernel: k, initrd: i",
            "manifest: m.json",
            "sbom: s.json",
            "reference: x:y",
            "install_dir: /srv",
        ] {
            assert_ne!(
                base,
                key_for(&kiln, MKFS, &recipe(setting), &layers),
                "{setting}"
            );
        }
        assert_ne!(
            base,
            key_for(&Digest::of(b"other kiln"), MKFS, &recipe(""), &layers)
        );
        assert_ne!(base, key_for(&kiln, MKFS, &recipe(""), &[]));
        assert_ne!(
            base,
            key_for(&kiln, "mke2fs 1.47.2 (1-Jan-2025)", &recipe(""), &layers)
        );
    }

    const MKFS: &str = "mke2fs 1.47.0 (5-Feb-2023)";

    fn artifact(path: &Path) -> Artifact {
        Artifact::of(path).unwrap()
    }

    #[test]
    fn outputs_are_fresh_until_touched_or_rekeyed() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("rootfs.ext4");
        std::fs::write(&image, b"image").unwrap();
        let outputs = Outputs {
            rootfs: artifact(&image),
            kernel: None,
            initrd: None,
            manifest: None,
            sbom: None,
        };
        let key = Digest::of(b"one");
        assert!(fresh(dir.path(), "rootfs.ext4", &key).is_none());
        remember(dir.path(), &key, &outputs).unwrap();
        let again = fresh(dir.path(), "rootfs.ext4", &key).expect("fresh");
        assert_eq!(again.rootfs.blake3, outputs.rootfs.blake3);
        assert!(fresh(dir.path(), "rootfs.ext4", &Digest::of(b"two")).is_none());
        // Rewritten in place (same size, new mtime), or replaced.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&image, b"IMAGE").unwrap();
        assert!(fresh(dir.path(), "rootfs.ext4", &key).is_none());
        remember(dir.path(), &key, &outputs).unwrap();
        assert!(fresh(dir.path(), "rootfs.ext4", &key).is_some());
        forget(dir.path(), "rootfs.ext4").unwrap();
        forget(dir.path(), "rootfs.ext4").unwrap();
        assert!(fresh(dir.path(), "rootfs.ext4", &key).is_none());
    }
}
