//! The content-addressed store, by default `./cache`.
//!
//! Layout:
//! ```text
//! cache/
//!   lock                 shared by every build, exclusive for gc
//!   blobs/ab/abcd…       file contents, named by their blake3 digest
//!   layers/ab/abcd….json canonical layer manifests, named by their digest
//!   actions/ab/abcd….json step key -> layer digest (the action cache)
//!   logs/abcd….log       the log of the step run that had this key
//!   trees/abcd…/         a layer unpacked once, used as an overlayfs lower dir
//!   trees/abcd….boot     the boot the tree was sealed in
//!   trees/abcd….zeros    which of the tree's files hold blocks of zeros as data (see `ext4::data_blocks`)
//!   debs/NAME_VER_ARCH.deb  downloaded packages, checked by apt on every use (see `debs`)
//!   families/ab…/cd….json   apt runs by family (key without packages): key -> packages (see `delta`)
//!   explain/RECIPE/STEP.json  what went into each step's key at its last build (see `explain`)
//!   apt-lists/NAME       apt's package lists of the last apt run, checked before each use (see `apt_lists`)
//!   tmp/                 work in progress; renamed into place when complete
//! ```
//! Every directory above is private to the cache's owner (0700), and blobs
//! are 0444 whatever the file's mode (its layer records that).
//! Every write lands in `tmp/` first, is synced to disk and only then renamed
//! into place, so a reader never sees half a file and a crash leaves only
//! `tmp/` debris, which the next `Store::open` clears once no running build
//! holds it.
//!
//! What the store hands out is checked: blobs and manifests against their
//! digests whenever they are read, blobs by a cheap `stat` before a cached
//! layer counts as present (every blob is published with mtime 0, which any
//! later write changes), trees against their layer before a build first uses
//! them (see [`crate::tree_check`]). Whatever fails a check is removed, so the
//! next build makes it again; `kiln cache fsck` checks everything in full.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::blob_stream::{BlobReader, IncomingBlob};
use crate::digest::Digest;
use crate::io_at::{io_at, IoAt};
use crate::layer::{Kind, Layer};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] IoAt),
    #[error("{path}: corrupt store entry ({reason}); delete it and rebuild")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: a build is using this cache; try again when it has finished")]
    Busy { path: PathBuf },
}

/// Up to this many new blobs are synced one by one; more take one `syncfs`.
const FEW_BLOBS: usize = 64;

/// The mode of every blob file: readable, never executable or setuid.
pub const BLOB_MODE: u32 = 0o444;

/// What the action cache records for a step key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActionEntry {
    /// The layer the step produced.
    pub layer: Digest,
    /// The step id it was built as (informational).
    pub step: String,
    /// Wall time of the run that produced it, in milliseconds (informational).
    pub build_ms: u64,
    /// Where the entry came from; decides whether and how it is pushed.
    #[serde(default)]
    pub origin: Origin,
    /// For a run of a step without pins in the lock file: the packages it
    /// installed, which a later build without pins may take as the step's
    /// pins instead of running it again (see `lock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Vec<crate::dpkg::Deb>>,
}

/// Where an action entry came from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// This machine ran the step: it may sign the entry when it pushes it.
    Built,
    /// Pulled from a remote: pushed on only with the signatures it came with.
    Pulled(crate::sign::Signed),
    /// Not known (an older kiln, or not written by kiln): never pushed.
    #[default]
    Unknown,
}

/// Whole file contents by digest, read and written: what merging account
/// databases needs (see `assemble`). The store is one; tests use memory.
pub trait Blobs {
    fn read(&self, digest: &Digest) -> Result<Vec<u8>, String>;
    fn write(&self, bytes: &[u8]) -> Result<Digest, String>;
}

impl Blobs for Store {
    fn read(&self, digest: &Digest) -> Result<Vec<u8>, String> {
        self.read_blob(digest)
            .map_err(|e| format!("blob {digest}: {e}"))
    }
    fn write(&self, bytes: &[u8]) -> Result<Digest, String> {
        self.put_blob_bytes(bytes).map_err(|e| e.to_string())
    }
}

/// The kinds of object the store holds by digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objects {
    /// File contents, by blake3.
    Blobs,
    /// Layer manifests, by digest.
    Layers,
    /// Action cache entries, by step key.
    Actions,
}

impl Objects {
    /// The folder of the store's root they live in.
    fn dir(self) -> &'static str {
        match self {
            Objects::Blobs => "blobs",
            Objects::Layers => "layers",
            Objects::Actions => "actions",
        }
    }
}

/// The file, in the store's root, that holds [`LastBuild`].
const LAST_BUILD: &str = "last-build.json";

/// How the last build that used a store went: how many of its steps were
/// built, pulled from a remote, or found in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastBuild {
    pub recipe: String,
    pub built: usize,
    pub pulled: usize,
    pub cached: usize,
}

impl LastBuild {
    /// The share of steps that did not run, in percent.
    pub fn hit_rate(&self) -> f64 {
        let total = (self.built + self.pulled + self.cached).max(1);
        100.0 * (self.cached + self.pulled) as f64 / total as f64
    }
}

/// An open store. Holds a shared lock on `lock` and its own directory under
/// `tmp/` for as long as it lives.
pub struct Store {
    root: PathBuf,
    /// `None` for a read-only store (see [`Store::open_read_only`]).
    session: Option<WorkDir>,
    _lock: Option<File>,
    /// One gate per tree being unpacked by this process.
    tree_gates: Mutex<HashMap<Digest, Arc<Mutex<()>>>>,
    /// Trees this process checked or wrote: trusted from then on.
    trusted_trees: Mutex<HashSet<Digest>>,
}

impl Store {
    /// Opens (creating if needed) the store at `root` and clears stale `tmp/` work.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_locked(root, false)
    }

    /// Opens the store for garbage collection: an exclusive lock, taken only
    /// when no build holds the store (never waits behind one).
    pub fn open_exclusive(root: &Path) -> Result<Store, StoreError> {
        Store::open_locked(root, true)
    }

    fn open_locked(root: &Path, exclusive: bool) -> Result<Store, StoreError> {
        for sub in [
            "blobs",
            "layers",
            "actions",
            "logs",
            "trees",
            "debs",
            "families",
            "explain",
            "apt-lists",
            "tmp",
        ] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            // Trees hold setuid files and image owners, logs and job files
            // what steps printed: no other user of this machine may reach them.
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_at(&dir))?;
        }
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_at(&lock_path))?;
        if exclusive {
            lock.try_lock().map_err(|_| StoreError::Busy {
                path: root.to_path_buf(),
            })?;
        } else {
            lock.lock_shared().map_err(io_at(&lock_path))?;
        }
        let root = fs::canonicalize(root).map_err(io_at(root))?;
        clear_stale_tmp(&root.join("tmp"))?;
        let session = WorkDir::create(root.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        )))?;
        Ok(Store {
            root,
            session: Some(session),
            _lock: Some(lock),
            tree_gates: Mutex::default(),
            trusted_trees: Mutex::default(),
        })
    }

    /// Opens a store for lookups only: creates nothing, takes no lock, and
    /// works on a store the user cannot write (or one that does not exist yet).
    pub fn open_read_only(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
            session: None,
            _lock: None,
            tree_gates: Mutex::default(),
            trusted_trees: Mutex::default(),
        }
    }

    /// The store's root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sharded(&self, dir: &str, digest: &Digest, ext: &str) -> PathBuf {
        let hex = digest.to_hex();
        self.root
            .join(dir)
            .join(&hex[..2])
            .join(format!("{hex}{ext}"))
    }

    /// The folder that holds objects of `kind`.
    pub fn objects_dir(&self, kind: Objects) -> PathBuf {
        self.root.join(kind.dir())
    }

    /// Where the blob with this digest lives (it may not exist).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.sharded("blobs", digest, "")
    }

    /// Stores the contents of `files` as blobs; returns each one's digest
    /// and size. New blobs are written to `tmp/`, synced (each on its own
    /// when there are few, so a small step never waits for what others are
    /// writing; with one `syncfs` when there are many), and then renamed into
    /// place; a blob already present is replaced when it does not look intact.
    pub fn put_blob_files(&self, files: &[&Path]) -> Result<Vec<(Digest, u64)>, StoreError> {
        use rayon::prelude::*;
        let staged = files
            .par_iter()
            .map(|src| self.stage_blob_file(src))
            .collect::<Result<Vec<_>, _>>()?;
        let new: Vec<(Digest, PathBuf)> = staged
            .iter()
            .filter_map(|(digest, _, tmp)| tmp.clone().map(|tmp| (*digest, tmp)))
            .collect();
        self.publish_staged(new)?;
        Ok(staged
            .into_iter()
            .map(|(digest, size, _)| (digest, size))
            .collect())
    }

    /// Publishes sealed blobs staged in `tmp/` (digest, staged file): synced
    /// first — each on its own when there are few, so a small step never
    /// waits for what others are writing; with one `syncfs` when there are
    /// many — and then renamed into place. So a published blob is on disk.
    pub fn publish_staged(&self, staged: Vec<(Digest, PathBuf)>) -> Result<(), StoreError> {
        use rayon::prelude::*;
        if staged.len() > FEW_BLOBS {
            self.sync()?;
        } else {
            staged.par_iter().try_for_each(|(_, tmp)| {
                File::open(tmp)
                    .and_then(|f| f.sync_data())
                    .map_err(io_at(tmp))
            })?;
        }
        for (digest, tmp) in staged {
            self.publish(&tmp, &self.blob_path(&digest))?;
        }
        Ok(())
    }

    /// Hashes `src`; copies it into `tmp/` as a sealed blob unless an intact
    /// blob with its digest is already there.
    fn stage_blob_file(&self, src: &Path) -> Result<(Digest, u64, Option<PathBuf>), StoreError> {
        let mut hasher = blake3::Hasher::new();
        let mut file = File::open(src).map_err(io_at(src))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io_at(src))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let digest = Digest::from_hash(hasher.finalize());
        if self.blob_looks_intact(&digest, Some(size)) {
            return Ok((digest, size, None));
        }
        let tmp = self.tmp_file_path();
        fs::copy(src, &tmp).map_err(io_at(src))?;
        let copy = File::options()
            .write(true)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        seal_blob(&copy).map_err(io_at(&tmp))?;
        Ok((digest, size, Some(tmp)))
    }

    /// Whether the blob is there as kiln published it: a regular file of
    /// `size` bytes (when given) with mode [`BLOB_MODE`] and mtime 0. A write
    /// to it since would have changed its mtime. Its contents are checked
    /// whenever it is read ([`Store::read_blob`], `capture::materialize`).
    pub fn blob_looks_intact(&self, digest: &Digest, size: Option<u64>) -> bool {
        fs::symlink_metadata(self.blob_path(digest)).is_ok_and(|m| {
            m.file_type().is_file()
                && m.mode() & 0o7777 == BLOB_MODE
                && m.mtime() == 0
                && m.mtime_nsec() == 0
                && size.is_none_or(|size| m.len() == size)
        })
    }

    /// Gives a blob whose contents are right its published mode and mtime.
    pub fn seal_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(io_at(&path))?;
        seal_blob(&file).map_err(io_at(&path))?;
        Ok(())
    }

    /// Removes a blob found damaged, so the next build stores it again.
    pub fn discard_blob(&self, digest: &Digest) {
        let _ = fs::remove_file(self.blob_path(digest));
    }

    /// Reads a blob and checks it against its digest (a damaged blob is removed).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let mut reader = self.open_blob(digest)?;
        let mut bytes = Vec::with_capacity(reader.len() as usize);
        reader.read_to_end(&mut bytes).map_err(io_at(&path))?;
        Ok(bytes)
    }

    /// Opens a blob for reading as a stream, checked against its digest at
    /// its end (see [`BlobReader`]).
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobReader, StoreError> {
        let path = self.blob_path(digest);
        Ok(BlobReader::open(path.clone(), *digest).map_err(io_at(&path))?)
    }

    /// Starts receiving a blob of at most `max` bytes (a download).
    pub fn incoming_blob(&self, max: u64) -> Result<IncomingBlob, StoreError> {
        let path = self.tmp_file_path();
        Ok(IncomingBlob::create(path.clone(), max).map_err(io_at(&path))?)
    }

    /// Seals a received blob (the caller has checked its digest is the one
    /// it asked for) and adds it to `staged`, for [`Store::publish_staged`];
    /// nothing when the store already holds it.
    pub fn stage_incoming(
        &self,
        blob: IncomingBlob,
        staged: &mut Vec<(Digest, PathBuf)>,
    ) -> Result<(), StoreError> {
        let digest = blob.digest();
        if self.blob_looks_intact(&digest, Some(blob.len())) {
            return Ok(());
        }
        let sealed = seal_blob(blob.file());
        let tmp = blob.keep();
        if let Err(e) = sealed {
            let _ = fs::remove_file(&tmp);
            return Err(io_at(&tmp)(e).into());
        }
        staged.push((digest, tmp));
        Ok(())
    }

    /// Stores bytes as a blob; returns the digest.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(bytes);
        if !self.blob_looks_intact(&digest, Some(bytes.len() as u64)) {
            let tmp = self.tmp_file_path();
            let mut file = File::create(&tmp).map_err(io_at(&tmp))?;
            file.write_all(bytes).map_err(io_at(&tmp))?;
            seal_blob(&file).map_err(io_at(&tmp))?;
            file.sync_all().map_err(io_at(&tmp))?;
            self.publish(&tmp, &self.blob_path(&digest))?;
        }
        Ok(digest)
    }

    /// Stores a layer manifest in canonical form; returns its digest.
    pub fn put_layer(&self, layer: &Layer) -> Result<Digest, StoreError> {
        let bytes = layer.to_canonical_json();
        let digest = Digest::of(&bytes);
        let dest = self.sharded("layers", &digest, ".json");
        // Manifests are small: one found damaged is simply written again.
        if fs::read(&dest).ok().as_deref() != Some(&bytes[..]) {
            self.write_atomic(&dest, &bytes)?;
        }
        Ok(digest)
    }

    /// Reads a layer manifest and checks it against its digest.
    pub fn layer(&self, digest: &Digest) -> Result<Layer, StoreError> {
        let path = self.sharded("layers", digest, ".json");
        let bytes = fs::read(&path).map_err(io_at(&path))?;
        if Digest::of(&bytes) != *digest {
            return Err(StoreError::Corrupt {
                path,
                reason: "content does not match its digest".into(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Whether the layer manifest is intact and every blob it names looks so.
    pub fn has_layer(&self, digest: &Digest) -> bool {
        match self.layer(digest) {
            Ok(layer) => layer.entries.iter().all(|e| match &e.kind {
                Kind::File { blob, size } => self.blob_looks_intact(blob, Some(*size)),
                _ => true,
            }),
            Err(_) => false,
        }
    }

    /// Looks up a step key in the action cache. An entry that does not
    /// parse is damaged: it is removed and counts as a miss.
    pub fn action(&self, key: &Digest) -> Result<Option<ActionEntry>, StoreError> {
        let path = self.sharded("actions", key, ".json");
        match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(entry) => Ok(Some(entry)),
                Err(_) => {
                    let _ = fs::remove_file(&path);
                    Ok(None)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&path)(e).into()),
        }
    }

    /// Marks an action entry as just used (its mtime), for `kiln cache gc --max-age`.
    pub fn touch_action(&self, key: &Digest) {
        let path = self.sharded("actions", key, ".json");
        if let Ok(file) = File::options().write(true).open(&path) {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
    }

    /// Every object of one kind: its name, path and size.
    pub fn list(&self, kind: Objects) -> Vec<(Digest, PathBuf, u64)> {
        walkdir::WalkDir::new(self.objects_dir(kind))
            .min_depth(2)
            .max_depth(2)
            .into_iter()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e
                    .file_name()
                    .to_str()?
                    .trim_end_matches(".json")
                    .parse()
                    .ok()?;
                let size = e.metadata().ok()?.len();
                Some((name, e.into_path(), size))
            })
            .collect()
    }

    /// Records a step key's result in the action cache.
    pub fn put_action(&self, key: &Digest, entry: &ActionEntry) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(entry).expect("action entries serialize");
        self.write_atomic(&self.sharded("actions", key, ".json"), &bytes)
    }

    fn family_dir(&self, family: &Digest) -> PathBuf {
        self.root.join("families").join(family.to_hex())
    }

    fn family_member(&self, family: &Digest, key: &Digest) -> PathBuf {
        self.family_dir(family)
            .join(format!("{}.json", key.to_hex()))
    }

    /// The step keys of the runs recorded for `family`.
    fn family_keys(&self, family: &Digest) -> Vec<Digest> {
        let Ok(entries) = fs::read_dir(self.family_dir(family)) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
            .collect()
    }

    /// Records that the `apt` run with step key `key`, of family `family`,
    /// installed `packages` (see [`crate::delta`]).
    pub fn put_family_member(
        &self,
        family: &Digest,
        key: &Digest,
        packages: &[String],
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(packages).expect("package lists serialize");
        self.write_atomic(&self.family_member(family, key), &bytes)
    }

    /// Every recorded run of `family`: its step key and packages.
    pub fn family_members(&self, family: &Digest) -> Vec<(Digest, Vec<String>)> {
        self.family_keys(family)
            .into_iter()
            .filter_map(|key| {
                let bytes = fs::read(self.family_member(family, &key)).ok()?;
                Some((key, serde_json::from_slice(&bytes).ok()?))
            })
            .collect()
    }

    /// Forgets the recorded runs of every family whose step key `live` does
    /// not keep; returns how many were forgotten.
    pub fn prune_families(&self, live: &dyn Fn(&Digest) -> bool) -> usize {
        let mut pruned = 0;
        let Ok(families) = fs::read_dir(self.root.join("families")) else {
            return 0;
        };
        for family in families.filter_map(Result::ok) {
            let Some(family) = family.file_name().to_str().and_then(|f| f.parse().ok()) else {
                continue;
            };
            for key in self.family_keys(&family) {
                if !live(&key) && fs::remove_file(self.family_member(&family, &key)).is_ok() {
                    pruned += 1;
                }
            }
            let _ = fs::remove_dir(self.family_dir(&family));
        }
        pruned
    }

    /// The package cache (see [`crate::debs`]).
    pub fn debs_dir(&self) -> PathBuf {
        self.root.join("debs")
    }

    /// apt's package lists kept between runs (see [`crate::apt_lists`]).
    pub fn apt_lists_dir(&self) -> PathBuf {
        self.root.join("apt-lists")
    }

    /// Where the last build of step `step` of recipe `recipe` left its
    /// ingredients (see [`crate::explain`]).
    fn step_record_path(&self, recipe: &str, step: &str) -> PathBuf {
        let recipe = Digest::of(recipe.as_bytes()).to_hex();
        self.root
            .join("explain")
            .join(&recipe[..16])
            .join(format!("{step}.json"))
    }

    /// Records what went into step `step` of recipe `recipe` this build.
    /// Renamed into place but not synced: a record only explains, and one
    /// lost in a crash costs only an explanation.
    pub fn put_step_record(&self, recipe: &str, step: &str, json: &[u8]) -> Result<(), StoreError> {
        let dest = self.step_record_path(recipe, step);
        if fs::read(&dest).is_ok_and(|old| old == json) {
            return Ok(());
        }
        let tmp = self.tmp_file_path();
        fs::write(&tmp, json).map_err(io_at(&tmp))?;
        self.publish(&tmp, &dest)
    }

    /// What went into step `step` of recipe `recipe` at its last build.
    pub fn step_record(&self, recipe: &str, step: &str) -> Option<Vec<u8>> {
        fs::read(self.step_record_path(recipe, step)).ok()
    }

    /// Records how the last build that used this store went (for `kiln
    /// cache stats`). Advisory: a record that cannot be written is skipped.
    pub fn record_last_build(&self, last: &LastBuild) {
        let json = serde_json::to_vec(last).expect("records serialize");
        let tmp = self.tmp_file_path();
        if fs::write(&tmp, json).is_ok() {
            let _ = self.publish(&tmp, &self.root.join(LAST_BUILD));
        }
    }

    /// How the last build that used this store went, if recorded.
    pub fn last_build(&self) -> Option<LastBuild> {
        serde_json::from_slice(&fs::read(self.root.join(LAST_BUILD)).ok()?).ok()
    }

    /// Where the log of the run with this step key is kept.
    pub fn log_path(&self, key: &Digest) -> PathBuf {
        self.root.join("logs").join(format!("{}.log", key.to_hex()))
    }

    /// Where the tree of layer `digest` is (or would be) unpacked.
    pub fn tree_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("trees").join(digest.to_hex())
    }

    /// Where a tree records the boot it was written or last fully checked in.
    fn tree_seal_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("trees")
            .join(format!("{}.boot", digest.to_hex()))
    }

    /// Whether the tree of `digest` was already checked (or written) by this process.
    pub fn tree_is_trusted(&self, digest: &Digest) -> bool {
        let trusted = self.trusted_trees.lock().unwrap_or_else(|e| e.into_inner());
        trusted.contains(digest)
    }

    /// Notes that the tree of `digest` matches its layer, for this process.
    pub fn trust_tree(&self, digest: &Digest) {
        let mut trusted = self.trusted_trees.lock().unwrap_or_else(|e| e.into_inner());
        trusted.insert(*digest);
    }

    /// The lock that makes steps needing the same tree at once wait for one
    /// unpacking rather than each doing it.
    pub fn tree_gate(&self, digest: &Digest) -> Arc<Mutex<()>> {
        let mut gates = self.tree_gates.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(gates.entry(*digest).or_default())
    }

    /// Whether the tree of `digest` was sealed in this boot (unsynced writes
    /// since then cannot have been lost).
    pub fn tree_sealed_this_boot(&self, digest: &Digest) -> bool {
        fs::read_to_string(self.tree_seal_path(digest)).is_ok_and(|boot| boot.trim() == boot_id())
    }

    /// Moves the unpacked tree `tmp` to be the tree of `digest`, sealed and
    /// trusted; when another build put one there first, theirs is kept.
    pub fn place_tree(&self, digest: &Digest, tmp: &Path) -> Result<PathBuf, StoreError> {
        let dest = self.tree_path(digest);
        let _ = fs::remove_file(self.tree_zeros_path(digest));
        match fs::rename(tmp, &dest) {
            Ok(()) => {}
            Err(_) if dest.exists() => {
                let _ = fs::remove_dir_all(tmp);
            }
            Err(e) => return Err(io_at(&dest)(e).into()),
        }
        self.seal_tree(digest)?;
        self.trust_tree(digest);
        Ok(dest)
    }

    /// Records that the tree is complete as of this boot.
    pub fn seal_tree(&self, digest: &Digest) -> Result<(), StoreError> {
        self.write_atomic(&self.tree_seal_path(digest), boot_id().as_bytes())
    }

    /// Where a tree records which of its files hold blocks of zeros as data.
    fn tree_zeros_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("trees")
            .join(format!("{}.zeros", digest.to_hex()))
    }

    /// The files of the tree of `digest` that hold blocks of zeros (`block`
    /// bytes each) as data, as [`Store::record_tree_zeros`] recorded them
    /// for this very tree: `None` when there is no such record, it is for
    /// another block size, or the tree was replaced since.
    pub fn tree_zeros(&self, digest: &Digest, block: u64) -> Option<Vec<String>> {
        let text = fs::read(self.tree_zeros_path(digest)).ok()?;
        let record: ZerosRecord = serde_json::from_slice(&text).ok()?;
        (record.block == block && Some(record.tree) == tree_identity(&self.tree_path(digest)))
            .then_some(record.files)
    }

    /// Records which files of the tree of `digest` hold blocks of zeros as
    /// data (see [`Store::tree_zeros`]).
    pub fn record_tree_zeros(
        &self,
        digest: &Digest,
        block: u64,
        files: &[String],
    ) -> Result<(), StoreError> {
        let dest = self.tree_path(digest);
        let tree = tree_identity(&dest).ok_or_else(|| {
            StoreError::from(io_at(&dest)(io::Error::from(io::ErrorKind::NotFound)))
        })?;
        let record = ZerosRecord {
            block,
            tree,
            files: files.to_vec(),
        };
        let bytes = serde_json::to_vec(&record).expect("a zeros record serializes");
        self.write_atomic(&self.tree_zeros_path(digest), &bytes)
    }

    /// Removes a tree: its seal and records first, then the tree, moved
    /// aside into `tmp/` before it is deleted (a kill midway leaves no half
    /// tree under `trees/`, only debris in `tmp/`).
    pub fn discard_tree(&self, digest: &Digest) -> Result<(), StoreError> {
        let _ = fs::remove_file(self.tree_seal_path(digest));
        let _ = fs::remove_file(self.tree_zeros_path(digest));
        let dest = self.tree_path(digest);
        if !dest.exists() {
            return Ok(());
        }
        let aside = self.tmp_file_path();
        fs::rename(&dest, &aside).map_err(io_at(&dest))?;
        fs::remove_dir_all(&aside).map_err(io_at(&aside))?;
        Ok(())
    }

    /// Every tree directory under `trees/` by layer digest, and every other
    /// name there (seals and records without a tree, debris).
    pub fn list_trees(&self) -> (Vec<Digest>, Vec<PathBuf>) {
        let (mut trees, mut other) = (Vec::new(), Vec::new());
        for entry in fs::read_dir(self.root.join("trees"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            match name.parse::<Digest>() {
                Ok(digest) if is_dir => trees.push(digest),
                _ => match name
                    .strip_suffix(".boot")
                    .or_else(|| name.strip_suffix(".zeros"))
                    .map(str::parse::<Digest>)
                {
                    Some(Ok(digest)) if self.tree_path(&digest).is_dir() => {}
                    _ => other.push(path),
                },
            }
        }
        trees.sort();
        (trees, other)
    }

    /// Makes `dir`, a step's settled output (see `capture::settle`), the
    /// tree of layer `digest`, by renaming it into place; a tree already
    /// there is kept and `dir` left alone.
    pub fn adopt_tree(&self, digest: &Digest, dir: &Path) -> Result<(), StoreError> {
        let dest = self.tree_path(digest);
        if dest.exists() {
            return Ok(());
        }
        let _ = fs::remove_file(self.tree_zeros_path(digest));
        match fs::rename(dir, &dest) {
            Ok(()) => {
                self.seal_tree(digest)?;
                self.trust_tree(digest);
                Ok(())
            }
            Err(_) if dest.exists() => Ok(()),
            Err(e) => Err(io_at(&dest)(e).into()),
        }
    }

    /// Flushes everything written to the store's filesystem (`syncfs`).
    pub fn sync(&self) -> Result<(), StoreError> {
        let dir = File::open(&self.root).map_err(io_at(&self.root))?;
        nix::unistd::syncfs(&dir).map_err(|e| io_at(&self.root)(e.into()))?;
        Ok(())
    }

    /// Creates a private work directory under `tmp/`, removed when dropped.
    pub fn work_dir(&self) -> Result<WorkDir, StoreError> {
        WorkDir::create(self.tmp_file_path())
    }

    /// A fresh path inside this store's own `tmp/` directory.
    pub fn tmp_file_path(&self) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let session = self
            .session
            .as_ref()
            .expect("writes need a store opened with Store::open");
        session.path.join(n.to_string())
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let tmp = self.tmp_file_path();
        let mut file = File::create(&tmp).map_err(io_at(&tmp))?;
        file.write_all(bytes).map_err(io_at(&tmp))?;
        file.sync_all().map_err(io_at(&tmp))?;
        self.publish(&tmp, dest)
    }

    fn publish(&self, tmp: &Path, dest: &Path) -> Result<(), StoreError> {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        fs::rename(tmp, dest).map_err(io_at(dest))?;
        Ok(())
    }
}

/// Gives a staged blob its published form: mode [`BLOB_MODE`], mtime 0.
fn seal_blob(file: &File) -> io::Result<()> {
    file.set_modified(UNIX_EPOCH)?;
    file.set_permissions(fs::Permissions::from_mode(BLOB_MODE))
}

/// What `trees/<digest>.zeros` holds.
#[derive(Serialize, Deserialize)]
struct ZerosRecord {
    block: u64,
    /// The tree's root directory as it was recorded: a tree unpacked anew
    /// (after it was removed by hand, say) is another directory.
    tree: (u64, u64, i64, i64),
    files: Vec<String>,
}

/// A tree's root directory: device, inode and change time, which moving it
/// into place set and nothing changes after.
fn tree_identity(tree: &Path) -> Option<(u64, u64, i64, i64)> {
    let meta = fs::symlink_metadata(tree).ok()?;
    Some((meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec()))
}

/// This boot of the machine (`/proc/sys/kernel/random/boot_id`).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// Whether `name` is that of a session directory kiln makes under `tmp/`
/// (`PID-NANOS`, see [`Store::open`]).
fn is_session_name(name: &str) -> bool {
    name.split_once('-').is_some_and(|(pid, nanos)| {
        [pid, nanos]
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Removes `tmp/` directories left by builds that are no longer running:
/// a session directory whose `.lock` can be taken has no owner. A directory
/// younger than a minute is left alone even then: its owner may be between
/// creating it and locking it. Nothing but kiln's own session directories is
/// ever removed (a `tmp/` may hold someone else's files when the cache is
/// pointed at an existing directory).
fn clear_stale_tmp(tmp: &Path) -> Result<(), StoreError> {
    let grace = std::time::Duration::from_secs(60);
    for entry in fs::read_dir(tmp).map_err(io_at(tmp))? {
        let entry = entry.map_err(io_at(tmp))?;
        let path = entry.path();
        let ours = entry.file_name().to_str().is_some_and(is_session_name)
            && fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if !ours {
            continue;
        }
        let owned = File::open(path.join(".lock"))
            .map(|f| f.try_lock().is_err())
            .unwrap_or(false);
        let young = fs::symlink_metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < grace);
        if !owned && !young {
            let _ = fs::remove_dir_all(&path);
        }
    }
    Ok(())
}

/// A directory under the store's `tmp/`, owned by this process while it lives.
pub struct WorkDir {
    path: PathBuf,
    _lock: File,
}

impl WorkDir {
    fn create(path: PathBuf) -> Result<WorkDir, StoreError> {
        fs::create_dir(&path).map_err(io_at(&path))?;
        let lock_path = path.join(".lock");
        let lock = File::create(&lock_path).map_err(io_at(&lock_path))?;
        lock.lock().map_err(io_at(&lock_path))?;
        Ok(WorkDir { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path) {
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        File::open(path).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn the_store_is_private_and_blobs_are_never_executable() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        fs::create_dir_all(root.join("blobs")).unwrap();
        fs::set_permissions(root.join("blobs"), fs::Permissions::from_mode(0o755)).unwrap();
        let store = Store::open(&root).unwrap();
        for sub in ["blobs", "layers", "actions", "logs", "trees", "tmp"] {
            let mode = fs::metadata(root.join(sub)).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o700, "{sub}");
        }
        let suid = tmp.path().join("su");
        fs::write(&suid, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
        let [(digest, _)] = store.put_blob_files(&[&suid]).unwrap()[..] else {
            panic!("one blob per file")
        };
        let mode = fs::metadata(store.blob_path(&digest))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, BLOB_MODE);
    }

    #[test]
    fn stale_cleanup_removes_only_abandoned_kiln_sessions() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let scratch = root.join("tmp");
        fs::create_dir_all(&scratch).unwrap();
        // Someone's own files in a `tmp/` the cache was pointed at, all old.
        fs::write(scratch.join("notes.txt"), b"mine").unwrap();
        fs::create_dir(scratch.join("project")).unwrap();
        fs::write(scratch.join("project/a"), b"a").unwrap();
        fs::create_dir(scratch.join("12-x")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), scratch.join("34-56")).unwrap();
        // A session of a build that died, and one of a build still running.
        let dead = scratch.join("111-222");
        fs::create_dir(&dead).unwrap();
        File::create(dead.join(".lock")).unwrap();
        let alive = WorkDir::create(scratch.join("333-444")).unwrap();
        for name in ["notes.txt", "project", "12-x", "111-222", "333-444"] {
            age(&scratch.join(name));
        }

        let store = Store::open(&root).unwrap();
        for kept in ["notes.txt", "project/a", "12-x", "34-56", "333-444"] {
            assert!(
                fs::symlink_metadata(scratch.join(kept)).is_ok(),
                "{kept} was removed"
            );
        }
        assert!(!dead.exists(), "the dead build's session is still there");
        assert!(tmp.path().exists());
        drop((store, alive));
        assert!(is_session_name("1-2") && !is_session_name("-2") && !is_session_name("1-"));
    }

    #[test]
    fn a_zeros_record_holds_for_its_own_tree_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let digest = Digest::from_hash(blake3::hash(b"a layer"));
        let unpack = || {
            let dir = store.tmp_file_path();
            fs::create_dir(&dir).unwrap();
            store.place_tree(&digest, &dir).unwrap();
        };
        unpack();
        let files = vec!["usr/bin/a".to_string()];
        store.record_tree_zeros(&digest, 4096, &files).unwrap();
        assert_eq!(store.tree_zeros(&digest, 4096), Some(files.clone()));
        assert_eq!(store.tree_zeros(&digest, 1024), None, "another block size");
        let (trees, other) = store.list_trees();
        assert_eq!((trees, other), (vec![digest], vec![]));

        // Replaced by hand: another directory, so the record does not hold.
        fs::remove_dir(store.tree_path(&digest)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::create_dir(store.tree_path(&digest)).unwrap();
        assert_eq!(store.tree_zeros(&digest, 4096), None);
        // Removed or unpacked anew by kiln: the record goes too.
        store.record_tree_zeros(&digest, 4096, &files).unwrap();
        store.discard_tree(&digest).unwrap();
        assert!(!store.tree_zeros_path(&digest).exists());
        unpack();
        store.record_tree_zeros(&digest, 4096, &files).unwrap();
        fs::remove_dir(store.tree_path(&digest)).unwrap();
        unpack();
        assert!(!store.tree_zeros_path(&digest).exists());
    }
}
