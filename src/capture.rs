//! Capturing layers and writing them back (the model is [`crate::layer`]).
//!
//! Layers are captured from an overlayfs upper directory ([`capture`]):
//! a 0/0 character device is a whiteout (the path was deleted), a directory
//! with the `trusted.overlay.opaque` xattr hides everything below it in lower
//! layers. The other `trusted.overlay.*` xattrs are overlayfs bookkeeping and
//! are not kept. [`materialize`] writes a layer back as a directory in the
//! same overlayfs form, so it can serve as a lower dir, or (once merged, with no
//! whiteouts left) as the image tree; [`tree`] keeps one such directory per
//! layer in the store, checked before a build first uses it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use rayon::prelude::*;

use crate::digest::Digest;
use crate::io_at::{io_at, IoAt};
use crate::layer::{Entry, Kind, Layer, XattrValue, LAYER_FORMAT};
use crate::normalize::Normalizer;
use crate::store::Store;
use crate::tree_check::{self, Depth};

/// Errors while capturing or writing a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Io(#[from] IoAt),
    #[error("{path}: file name is not valid UTF-8; kiln layers only hold UTF-8 paths")]
    NotUtf8 { path: PathBuf },
    #[error("{path}: {what} is not valid UTF-8; kiln layers only hold UTF-8 text")]
    NotUtf8Value { path: PathBuf, what: &'static str },
    #[error(
        "layer entry `{path}`: {reason}; the layer manifest is corrupt or was not made by kiln"
    )]
    BadEntry { path: String, reason: String },
    #[error("{0}")]
    Store(Box<crate::store::StoreError>),
}

impl From<crate::store::StoreError> for LayerError {
    fn from(e: crate::store::StoreError) -> Self {
        LayerError::Store(Box::new(e))
    }
}

/// The layer `digest` unpacked as a directory in `store` (for use as an
/// overlayfs lower dir), unpacking it on first use. Steps of one build that
/// need the same tree at once wait for one unpacking rather than each doing
/// it. A tree already there is checked against its layer first, as
/// [`unpacked_tree`] does; a tree that fails is unpacked anew.
pub fn tree(store: &Store, digest: &Digest) -> Result<PathBuf, LayerError> {
    if store.tree_is_trusted(digest) {
        return Ok(store.tree_path(digest));
    }
    let gate = store.tree_gate(digest);
    let _unpacking = gate.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dest) = checked_tree(store, digest)? {
        return Ok(dest);
    }
    let layer = store.layer(digest)?;
    let tmp = store.tmp_file_path();
    materialize(&layer, store, &tmp)?;
    Ok(store.place_tree(digest, &tmp)?)
}

/// The tree of layer `digest` if it is unpacked in `store` and still is what
/// its layer says, `None` otherwise. The check runs once per process: the
/// tree's metadata when it was sealed in this boot, its contents too after a
/// reboot (unsynced writes may have been lost). A tree that fails is moved
/// aside.
pub fn unpacked_tree(store: &Store, digest: &Digest) -> Result<Option<PathBuf>, LayerError> {
    if store.tree_is_trusted(digest) {
        return Ok(Some(store.tree_path(digest)));
    }
    let gate = store.tree_gate(digest);
    let _checking = gate.lock().unwrap_or_else(|e| e.into_inner());
    checked_tree(store, digest)
}

/// [`unpacked_tree`] for a caller holding the tree's gate.
fn checked_tree(store: &Store, digest: &Digest) -> Result<Option<PathBuf>, LayerError> {
    let dest = store.tree_path(digest);
    if store.tree_is_trusted(digest) {
        return Ok(Some(dest));
    }
    if !dest.exists() {
        return Ok(None);
    }
    let layer = store.layer(digest)?;
    let sealed_now = store.tree_sealed_this_boot(digest);
    let depth = if sealed_now {
        Depth::Metadata
    } else {
        Depth::Contents
    };
    let problems = tree_check::problems(&layer, &dest, depth);
    if problems.is_empty() {
        if !sealed_now {
            store.seal_tree(digest)?;
        }
        store.trust_tree(digest);
        return Ok(Some(dest));
    }
    eprintln!(
        "kiln: the cached tree {} does not match its layer ({}); removing it (it is unpacked again when needed)",
        dest.display(),
        problems[0]
    );
    store.discard_tree(digest)?;
    Ok(None)
}

/// The xattr that marks an overlayfs directory as opaque.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// overlayfs's own bookkeeping xattrs, which layers do not keep.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";

/// Runs of zeros at least this long (and aligned to it) become holes.
const SPARSE_BLOCK: usize = 4096;

/// Read buffer for copying blobs out; a multiple of [`SPARSE_BLOCK`].
const COPY_BUF: usize = 256 * SPARSE_BLOCK;

/// Attaches the path to an error from a `nix` call.
fn nix_at(path: &Path) -> impl FnOnce(nix::Error) -> LayerError + '_ {
    move |errno| io_at(path)(io::Error::from(errno)).into()
}

/// Attaches the path (or `root`'s) to an error from walking `root`.
fn walk_error(root: &Path) -> impl Fn(walkdir::Error) -> LayerError + '_ {
    move |e| {
        let path = e.path().unwrap_or(root).to_path_buf();
        IoAt {
            path,
            source: e.into(),
        }
        .into()
    }
}

fn bad_entry(path: &str, reason: impl Into<String>) -> LayerError {
    LayerError::BadEntry {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// What a scanned path turned out to be, before its contents are stored.
enum Found {
    /// Fully known.
    Kind(Kind),
    /// A regular file still to be stored; `inode` is set when it has more
    /// than one link, so its other names can become hardlinks.
    File {
        abs: PathBuf,
        inode: Option<(u64, u64)>,
    },
}

/// One scanned path with its metadata.
struct Scanned {
    path: String,
    found: Found,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: BTreeMap<String, XattrValue>,
}

/// Captures an overlayfs upper directory as a layer, storing file contents
/// as blobs in `store` and applying `normalizer`.
///
/// Entries come out sorted by path (byte order, so a directory precedes its
/// contents). A 0/0 character device becomes a [`Kind::Whiteout`] with all
/// metadata zeroed; regular files linked more than once within the captured
/// set keep their first name (in path order) as a [`Kind::File`] and become
/// [`Kind::Hardlink`]s to it under their other names.
pub fn capture(upper: &Path, store: &Store, normalizer: &Normalizer) -> Result<Layer, LayerError> {
    let mut scanned = scan(upper, normalizer)?;
    leave_out_private_keys(&mut scanned)?;
    scanned.sort_by(|a, b| a.path.cmp(&b.path));
    link_hardlinks(&mut scanned);

    // Store the contents of every file (not hardlink), in parallel.
    let to_store: Vec<&Path> = scanned
        .iter()
        .filter_map(|s| match &s.found {
            Found::File { abs, .. } => Some(abs.as_path()),
            Found::Kind(_) => None,
        })
        .collect();
    let stored = store.put_blob_files(&to_store)?;

    let mut stored = stored.into_iter();
    let entries = scanned
        .into_iter()
        .map(|s| {
            let kind = match s.found {
                Found::Kind(kind) => kind,
                Found::File { .. } => {
                    let (blob, size) = stored.next().expect("one stored blob per file");
                    Kind::File { blob, size }
                }
            };
            Entry {
                path: s.path,
                kind,
                mode: s.mode,
                uid: s.uid,
                gid: s.gid,
                mtime: s.mtime,
                xattrs: s.xattrs,
            }
        })
        .collect();
    Ok(Layer {
        format: LAYER_FORMAT,
        entries,
    })
}

/// Walks `upper` (without following symlinks) and reads every kept path's
/// metadata; file contents are not read yet.
fn scan(upper: &Path, normalizer: &Normalizer) -> Result<Vec<Scanned>, LayerError> {
    let mut scanned = Vec::new();
    let mut walk = walkdir::WalkDir::new(upper)
        .follow_links(false)
        .min_depth(1)
        .into_iter();
    while let Some(item) = walk.next() {
        let item = item.map_err(walk_error(upper))?;
        let abs = item.path();
        let rel = abs
            .strip_prefix(upper)
            .expect("walkdir yields paths under its root");
        let file_type = item.file_type();
        let is_dir = file_type.is_dir();
        // The drop rules only look at ASCII names, so deciding on the lossy
        // form is exact; a non-UTF-8 name under a dropped path is no error.
        let lossy = rel.to_string_lossy();
        if !normalizer.keeps(&lossy, is_dir) {
            if is_dir {
                walk.skip_current_dir();
            }
            continue;
        }
        let path = rel
            .to_str()
            .ok_or_else(|| LayerError::NotUtf8 {
                path: abs.to_path_buf(),
            })?
            .to_string();
        let meta = fs::symlink_metadata(abs).map_err(io_at(abs))?;

        if file_type.is_char_device() && meta.rdev() == 0 {
            // A whiteout: only its existence matters, so it is recorded in
            // one canonical form whatever overlayfs gave it.
            scanned.push(Scanned {
                path,
                found: Found::Kind(Kind::Whiteout),
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: 0,
                xattrs: BTreeMap::new(),
            });
            continue;
        }

        let (xattrs, opaque) = read_xattrs(abs)?;
        let found =
            if file_type.is_file() {
                Found::File {
                    abs: abs.to_path_buf(),
                    inode: (meta.nlink() > 1).then(|| (meta.dev(), meta.ino())),
                }
            } else if is_dir {
                Found::Kind(Kind::Dir { opaque })
            } else if file_type.is_symlink() {
                let target = fs::read_link(abs).map_err(io_at(abs))?;
                let target = target.into_os_string().into_string().map_err(|_| {
                    LayerError::NotUtf8Value {
                        path: abs.to_path_buf(),
                        what: "symlink target",
                    }
                })?;
                Found::Kind(Kind::Symlink { target })
            } else if file_type.is_char_device() {
                Found::Kind(Kind::CharDevice { rdev: meta.rdev() })
            } else if file_type.is_block_device() {
                Found::Kind(Kind::BlockDevice { rdev: meta.rdev() })
            } else if file_type.is_fifo() {
                Found::Kind(Kind::Fifo)
            } else if file_type.is_socket() {
                Found::Kind(Kind::Socket)
            } else {
                return Err(io_at(abs)(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "unknown file type",
                ))
                .into());
            };
        scanned.push(Scanned {
            path,
            found,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: normalizer.mtime(meta.mtime()),
            xattrs,
        });
    }
    Ok(scanned)
}

/// Reads the xattrs of `path` (not following symlinks), leaving out
/// overlayfs's own; also says whether the opaque marker is set.
fn read_xattrs(path: &Path) -> Result<(BTreeMap<String, XattrValue>, bool), LayerError> {
    let mut xattrs = BTreeMap::new();
    let mut opaque = false;
    for name in xattr::list(path).map_err(io_at(path))? {
        let name = name.into_string().map_err(|_| LayerError::NotUtf8Value {
            path: path.to_path_buf(),
            what: "an xattr name",
        })?;
        // `None`: removed since it was listed.
        let Some(value) = xattr::get(path, &name).map_err(io_at(path))? else {
            continue;
        };
        if name == OPAQUE_XATTR {
            opaque = value == b"y";
        }
        if !name.starts_with(OVERLAY_XATTR_PREFIX) {
            xattrs.insert(name, XattrValue(value));
        }
    }
    Ok((xattrs, opaque))
}

/// Turns the second and later names (in path order) of each multiply linked
/// file into hardlinks to the first, with the first's metadata.
fn link_hardlinks(scanned: &mut [Scanned]) {
    let mut first: HashMap<(u64, u64), usize> = HashMap::new();
    for i in 0..scanned.len() {
        let Found::File {
            inode: Some(inode), ..
        } = scanned[i].found
        else {
            continue;
        };
        let Some(&t) = first.get(&inode) else {
            first.insert(inode, i);
            continue;
        };
        let target = scanned[t].path.clone();
        let (mode, uid, gid, mtime) = (
            scanned[t].mode,
            scanned[t].uid,
            scanned[t].gid,
            scanned[t].mtime,
        );
        let xattrs = scanned[t].xattrs.clone();
        let link = &mut scanned[i];
        link.found = Found::Kind(Kind::Hardlink { target });
        link.mode = mode;
        link.uid = uid;
        link.gid = gid;
        link.mtime = mtime;
        link.xattrs = xattrs;
    }
}

/// Writes `layer` as a directory tree at `dest` (which must not exist),
/// taking file contents from `store`.
///
/// The tree is in overlayfs form (whiteouts as 0/0 character devices, opaque
/// directories marked with `trusted.overlay.opaque`), so it can be used as a
/// lower dir. Files are written sparsely. Entry paths are checked: none may
/// leave `dest`, pass through a symlink, or name a missing hardlink target.
/// Parent directories missing from the layer are created (mode 0755, root).
pub fn materialize(layer: &Layer, store: &Store, dest: &Path) -> Result<(), LayerError> {
    create_root(dest)?;

    // Paths known to be real directories (not symlinks to one), and the
    // regular files written so far (the only valid hardlink targets).
    let mut dirs: HashSet<String> = HashSet::new();
    let mut files: HashSet<&str> = HashSet::new();

    // First create everything, parents before children; file contents come
    // after, in parallel.
    let mut contents: Vec<(&Digest, u64, PathBuf)> = Vec::new();
    let mut previous: Option<&str> = None;
    for entry in &layer.entries {
        check_path(&entry.path)?;
        if previous.is_some_and(|p| p >= entry.path.as_str()) {
            return Err(bad_entry(
                &entry.path,
                "entries are not sorted by path, or repeat one",
            ));
        }
        previous = Some(&entry.path);
        if let Some(name) = entry
            .xattrs
            .keys()
            .find(|n| n.starts_with(OVERLAY_XATTR_PREFIX))
        {
            return Err(bad_entry(
                &entry.path,
                format!("xattr `{name}` is overlayfs's own and never part of a layer"),
            ));
        }
        make_parents(dest, &entry.path, &mut dirs)?;
        let path = dest.join(&entry.path);
        match &entry.kind {
            Kind::File { blob, size } => {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_at(&path))?;
                contents.push((blob, *size, path));
                files.insert(&entry.path);
            }
            Kind::Dir { opaque } => {
                make_dir(&path, *opaque)?;
                dirs.insert(entry.path.clone());
            }
            Kind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &path).map_err(io_at(&path))?;
            }
            Kind::Hardlink { target } => {
                if !files.contains(target.as_str()) {
                    return Err(bad_entry(
                        &entry.path,
                        format!("hardlink target `{target}` is not a file earlier in the layer"),
                    ));
                }
                fs::hard_link(dest.join(target), &path).map_err(io_at(&path))?;
            }
            Kind::CharDevice { rdev } => mknod(&path, SFlag::S_IFCHR, *rdev)?,
            Kind::BlockDevice { rdev } => mknod(&path, SFlag::S_IFBLK, *rdev)?,
            Kind::Fifo => mknod(&path, SFlag::S_IFIFO, 0)?,
            Kind::Socket => mknod(&path, SFlag::S_IFSOCK, 0)?,
            Kind::Whiteout => mknod(&path, SFlag::S_IFCHR, 0)?,
        }
    }

    contents
        .par_iter()
        .try_for_each(|(blob, size, path)| write_file(store, blob, *size, path))?;

    // Then metadata. Every entry exists by now, so nothing below changes a
    // directory's mtime any more, in whatever order it runs.
    layer
        .entries
        .par_iter()
        .filter(|entry| !matches!(entry.kind, Kind::Hardlink { .. }))
        .try_for_each(|entry| set_metadata(entry, &dest.join(&entry.path)))
}

/// Turns the directory `upper`, from which `layer` was just captured, into
/// the same tree [`materialize`] would write for `layer`, in place: removes
/// what normalization dropped and overlayfs's own xattrs (but the opaque
/// marker), and sets every entry's metadata as the layer records it. The
/// step's output then serves as its lower dir at once, without copying it
/// back out of the store.
pub fn settle(upper: &Path, layer: &Layer) -> Result<(), LayerError> {
    let kept: HashSet<&str> = layer.entries.iter().map(|e| e.path.as_str()).collect();
    let mut walk = walkdir::WalkDir::new(upper)
        .follow_links(false)
        .min_depth(1)
        .into_iter();
    while let Some(item) = walk.next() {
        let item = item.map_err(walk_error(upper))?;
        let abs = item.path();
        let rel = abs
            .strip_prefix(upper)
            .expect("walkdir yields paths under its root");
        if rel.to_str().is_some_and(|p| kept.contains(p)) {
            continue;
        }
        if item.file_type().is_dir() {
            walk.skip_current_dir();
            fs::remove_dir_all(abs).map_err(io_at(abs))?;
        } else {
            fs::remove_file(abs).map_err(io_at(abs))?;
        }
    }
    own_root(upper)?;
    for entry in layer.entries.iter().rev() {
        let path = upper.join(&entry.path);
        for name in xattr::list(&path).map_err(io_at(&path))? {
            let marks_opaque = entry.kind == Kind::Dir { opaque: true } && name == OPAQUE_XATTR;
            let bookkeeping = name
                .to_str()
                .is_none_or(|n| n.starts_with(OVERLAY_XATTR_PREFIX) && !marks_opaque);
            if bookkeeping {
                xattr::remove(&path, &name).map_err(io_at(&path))?;
            }
        }
        if !matches!(entry.kind, Kind::Hardlink { .. }) {
            set_metadata(entry, &path)?;
        }
    }
    Ok(())
}

/// Writes `layer` as a tree at `dest` (which must not exist) without copying
/// any contents: every entry but a directory becomes a hard link to
/// `source(path)`, the same entry in a tree that already holds it with the
/// metadata the layer records (a [`Kind::Hardlink`] to its target in `dest`,
/// so a file's names stay one file); directories are created and given theirs.
pub fn link_tree(
    layer: &Layer,
    dest: &Path,
    source: &dyn Fn(&str) -> PathBuf,
) -> Result<(), LayerError> {
    create_root(dest)?;
    let mut dirs: HashSet<String> = HashSet::new();
    for entry in &layer.entries {
        check_path(&entry.path)?;
        make_parents(dest, &entry.path, &mut dirs)?;
        let path = dest.join(&entry.path);
        if let Kind::Dir { opaque } = entry.kind {
            make_dir(&path, opaque)?;
            dirs.insert(entry.path.clone());
        } else {
            // Another name of a file in this layer: that file, as linked here.
            let from = match &entry.kind {
                Kind::Hardlink { target } => {
                    check_path(target)?;
                    dest.join(target)
                }
                _ => source(&entry.path),
            };
            fs::hard_link(&from, &path).map_err(io_at(&from))?;
        }
    }
    for entry in layer.entries.iter().rev() {
        if matches!(entry.kind, Kind::Dir { .. }) {
            set_metadata(entry, &dest.join(&entry.path))?;
        }
    }
    Ok(())
}

/// Creates a tree's root directory: 0755, root's.
fn create_root(dest: &Path) -> Result<(), LayerError> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dest)
        .map_err(io_at(dest))?;
    own_root(dest)
}

/// Gives a tree's root directory the owner and mode every tree's root has.
fn own_root(dest: &Path) -> Result<(), LayerError> {
    std::os::unix::fs::lchown(dest, Some(0), Some(0)).map_err(io_at(dest))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).map_err(io_at(dest))?;
    Ok(())
}

/// Creates a directory entry (private until its metadata is set), marked
/// opaque for overlayfs when the layer says so.
fn make_dir(path: &Path, opaque: bool) -> Result<(), LayerError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(io_at(path))?;
    if opaque {
        xattr::set(path, OPAQUE_XATTR, b"y").map_err(io_at(path))?;
    }
    Ok(())
}

/// Rejects paths that are empty, absolute, or have empty, `.` or `..` parts.
fn check_path(path: &str) -> Result<(), LayerError> {
    if path.is_empty() {
        return Err(bad_entry(path, "empty path"));
    }
    if path.contains('\0') {
        return Err(bad_entry(path, "path contains a NUL byte"));
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(bad_entry(
            path,
            "path must be relative, without empty, `.` or `..` components",
        ));
    }
    Ok(())
}

/// Makes sure every ancestor of `path` below `dest` is a real directory,
/// creating missing ones (mode 0755, root) and refusing symlinks and other
/// non-directories, so no entry is ever written outside `dest`.
fn make_parents(dest: &Path, path: &str, dirs: &mut HashSet<String>) -> Result<(), LayerError> {
    let Some((parent, _)) = path.rsplit_once('/') else {
        return Ok(());
    };
    if dirs.contains(parent) {
        return Ok(());
    }
    let mut end = 0;
    for part in parent.split('/') {
        end += part.len();
        let prefix = &parent[..end];
        end += 1;
        if dirs.contains(prefix) {
            continue;
        }
        let abs = dest.join(prefix);
        match fs::symlink_metadata(&abs) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(bad_entry(
                    path,
                    format!("its parent `{prefix}` is not a directory"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&abs)
                    .map_err(io_at(&abs))?;
                std::os::unix::fs::lchown(&abs, Some(0), Some(0)).map_err(io_at(&abs))?;
                fs::set_permissions(&abs, fs::Permissions::from_mode(0o755))
                    .map_err(io_at(&abs))?;
            }
            Err(e) => return Err(io_at(&abs)(e).into()),
        }
        dirs.insert(prefix.to_string());
    }
    Ok(())
}

/// Creates a device node, fifo or socket (permissions come later).
fn mknod(path: &Path, kind: SFlag, rdev: u64) -> Result<(), LayerError> {
    nix::sys::stat::mknod(path, kind, Mode::empty(), rdev).map_err(nix_at(path))
}

/// Writes blob `blob` into the new, empty file at `path`, leaving holes for
/// aligned blocks of zeros, and checks the contents against the digest and size.
fn write_file(store: &Store, blob: &Digest, size: u64, path: &Path) -> Result<(), LayerError> {
    let src_path = store.blob_path(blob);
    let mut src = File::open(&src_path).map_err(io_at(&src_path))?;
    let out = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_at(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; COPY_BUF];
    let mut offset = 0u64;
    loop {
        // Fill the buffer completely (short reads would misalign blocks).
        let mut filled = 0;
        while filled < buf.len() {
            match src.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_at(&src_path)(e).into()),
            }
        }
        if filled == 0 {
            break;
        }
        let data = &buf[..filled];
        hasher.update(data);
        write_sparse(&out, data, offset).map_err(io_at(path))?;
        offset += filled as u64;
    }
    if offset != size || Digest::from_hash(hasher.finalize()) != *blob {
        store.discard_blob(blob);
        return Err(crate::store::StoreError::Corrupt {
            path: src_path,
            reason: "content does not match its digest or the size in the layer; removed it, run the build again to make it anew".into(),
        }
        .into());
    }
    // Gives a trailing hole its length.
    out.set_len(size).map_err(io_at(path))?;
    Ok(())
}

/// Drops every captured file that is a private key
/// ([`crate::normalize::is_private_key`]), saying so on kiln's output.
fn leave_out_private_keys(scanned: &mut Vec<Scanned>) -> Result<(), LayerError> {
    let keys = scanned
        .par_iter()
        .map(|s| match &s.found {
            Found::File { abs, .. } => {
                let mut head = Vec::with_capacity(crate::normalize::PRIVATE_KEY_HEAD);
                File::open(abs)
                    .and_then(|f| {
                        f.take(crate::normalize::PRIVATE_KEY_HEAD as u64)
                            .read_to_end(&mut head)
                    })
                    .map_err(io_at(abs))?;
                Ok(crate::normalize::is_private_key(&head))
            }
            Found::Kind(_) => Ok(false),
        })
        .collect::<Result<Vec<bool>, LayerError>>()?;
    let mut keys = keys.into_iter();
    scanned.retain(|s| {
        let key = keys.next().unwrap_or(false);
        if key {
            eprintln!(
                "kiln: /{} is a private key: left out of the layer (no key may reach a cache \
                 or registry; make it at first boot, or hand it to each VM)",
                s.path
            );
        }
        !key
    });
    Ok(())
}

/// Writes `data` at `offset`, skipping whole blocks of zeros.
fn write_sparse(out: &File, data: &[u8], offset: u64) -> io::Result<()> {
    // Start of the current run of non-zero blocks, if any.
    let mut run: Option<usize> = None;
    for (i, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let start = i * SPARSE_BLOCK;
        if block.iter().all(|&b| b == 0) {
            if let Some(r) = run.take() {
                out.write_all_at(&data[r..start], offset + r as u64)?;
            }
        } else if run.is_none() {
            run = Some(start);
        }
    }
    if let Some(r) = run {
        out.write_all_at(&data[r..], offset + r as u64)?;
    }
    Ok(())
}

/// Sets owner, mode, xattrs and mtime of a created entry, in that order:
/// chown clears setuid/setgid and `security.capability`, so it goes first.
fn set_metadata(entry: &Entry, path: &Path) -> Result<(), LayerError> {
    std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid)).map_err(io_at(path))?;
    if !matches!(entry.kind, Kind::Symlink { .. }) {
        fs::set_permissions(path, fs::Permissions::from_mode(entry.mode & 0o7777))
            .map_err(io_at(path))?;
    }
    for (name, value) in &entry.xattrs {
        xattr::set(path, name, &value.0).map_err(io_at(path))?;
    }
    let time = TimeSpec::new(entry.mtime, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &time,
        &time,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(nix_at(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{lchown, symlink};
    use tempfile::TempDir;

    /// `setcap cap_net_raw+ep`: version 2, permitted bit 13, effective.
    const CAP_NET_RAW: [u8; 20] = [
        0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    fn open_store(tmp: &TempDir) -> Store {
        Store::open(&tmp.path().join("cache")).unwrap()
    }

    fn write(path: &Path, bytes: &[u8], mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mkdir(path: &Path, mode: u32) {
        fs::create_dir_all(path).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn node(path: &Path, kind: SFlag, mode: u32, rdev: u64) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        nix::sys::stat::mknod(path, kind, Mode::from_bits_truncate(mode), rdev).unwrap();
        // mknod is subject to the umask.
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn set_mtime(path: &Path, secs: i64) {
        let t = TimeSpec::new(secs, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    fn entry<'a>(layer: &'a Layer, path: &str) -> &'a Entry {
        layer
            .entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no entry {path} in {:#?}", layer.entries))
    }

    fn paths(layer: &Layer) -> Vec<&str> {
        layer.entries.iter().map(|e| e.path.as_str()).collect()
    }

    fn layer_digest(layer: &Layer) -> Digest {
        Digest::of(&layer.to_canonical_json())
    }

    /// A tree with every kind of entry and every kind of metadata.
    fn full_tree(root: &Path) {
        fs::create_dir(root).unwrap();
        write(&root.join("bin/su"), b"#!/bin/true su\n", 0o755);
        fs::set_permissions(root.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
        write(&root.join("bin/ping"), b"ping", 0o755);
        xattr::set(root.join("bin/ping"), "security.capability", &CAP_NET_RAW).unwrap();
        write(&root.join("etc/kiln.conf"), b"conf", 0o644);
        xattr::set(root.join("etc/kiln.conf"), "user.kiln", b"hello").unwrap();
        // overlayfs bookkeeping, which must not end up in the layer.
        xattr::set(root.join("etc"), "trusted.overlay.impure", b"y").unwrap();
        write(&root.join("usr/a"), b"linked", 0o640);
        fs::hard_link(root.join("usr/a"), root.join("usr/b")).unwrap();
        symlink("bin/su", root.join("link")).unwrap();
        symlink("does/not/exist", root.join("dangling")).unwrap();
        node(
            &root.join("dev/null"),
            SFlag::S_IFCHR,
            0o666,
            nix::sys::stat::makedev(1, 3),
        );
        node(
            &root.join("dev/loop0"),
            SFlag::S_IFBLK,
            0o660,
            nix::sys::stat::makedev(7, 0),
        );
        lchown(root.join("dev/loop0"), Some(0), Some(6)).unwrap();
        node(&root.join("srv/fifo"), SFlag::S_IFIFO, 0o620, 0);
        node(&root.join("srv/sock"), SFlag::S_IFSOCK, 0o755, 0);
        mkdir(&root.join("scratch"), 0o1777);
        write(&root.join("home/user/notes"), b"mine", 0o600);
        lchown(root.join("home/user/notes"), Some(1000), Some(1000)).unwrap();
        lchown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
        fs::set_permissions(root.join("home/user"), fs::Permissions::from_mode(0o2750)).unwrap();
        let sparse = File::create(root.join("sparse.img")).unwrap();
        sparse.set_len(10 << 20).unwrap();
        sparse.write_all_at(b"kiln!", 8 << 20).unwrap();
        drop(sparse);
        node(&root.join("gone"), SFlag::S_IFCHR, 0, 0);
        mkdir(&root.join("opaque"), 0o755);
        xattr::set(root.join("opaque"), OPAQUE_XATTR, b"y").unwrap();
        write(&root.join("opaque/kept"), b"kept", 0o644);
        set_mtime(&root.join("link"), 1_000_000);
        set_mtime(&root.join("usr/a"), 1_234_567);
        // Last, since creating entries in a directory touches its mtime.
        set_mtime(&root.join("usr"), 7_654_321);
    }

    #[test]
    fn private_keys_never_reach_a_layer() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let src = tmp.path().join("src");
        let files: [(&str, &[u8], bool); 6] = [
            (
                "etc/ssl/private/snakeoil.key",
                b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
                false,
            ),
            (
                "home/u/.ssh/id_ed25519",
                b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n",
                false,
            ),
            (
                "home/u/.ssh/key.ppk",
                b"PuTTY-User-Key-File-3: ssh-ed25519\n",
                false,
            ),
            (
                "home/u/.ssh/id_ed25519.pub",
                b"ssh-ed25519 AAAA u@h\n",
                true,
            ),
            // A program that only mentions the marker, and a certificate.
            (
                "usr/bin/tool",
                b"\x7fELF\0\0-----BEGIN RSA PRIVATE KEY-----",
                true,
            ),
            (
                "etc/ssl/certs/ca.pem",
                b"-----BEGIN CERTIFICATE-----\nMIIB\n",
                true,
            ),
        ];
        for (path, bytes, _) in files {
            write(&src.join(path), bytes, 0o600);
        }
        let layer = capture(&src, &store, &Normalizer::new(i64::MAX)).unwrap();
        for (path, _, kept) in files {
            assert_eq!(paths(&layer).contains(&path), kept, "{path}");
        }
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn round_trip_keeps_full_posix_metadata() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let normalizer = Normalizer::new(i64::MAX);
        let src = tmp.path().join("src");
        full_tree(&src);

        let first = capture(&src, &store, &normalizer).unwrap();
        let out = tmp.path().join("out");
        materialize(&first, &store, &out).unwrap();
        let second = capture(&out, &store, &normalizer).unwrap();
        assert_eq!(first, second);
        let json: Layer = serde_json::from_slice(&first.to_canonical_json()).unwrap();
        assert_eq!(json, first);

        // The manifest says what the tree had.
        assert_eq!(first.format, LAYER_FORMAT);
        let mut sorted = paths(&first);
        sorted.sort();
        assert_eq!(paths(&first), sorted);
        assert_eq!(entry(&first, "bin/su").mode, 0o4755);
        assert_eq!(
            entry(&first, "bin/ping").xattrs.get("security.capability"),
            Some(&XattrValue(CAP_NET_RAW.to_vec()))
        );
        assert_eq!(
            entry(&first, "etc/kiln.conf").xattrs.get("user.kiln"),
            Some(&XattrValue(b"hello".to_vec()))
        );
        assert!(entry(&first, "etc").xattrs.is_empty());
        assert!(matches!(
            entry(&first, "usr/a").kind,
            Kind::File { size: 6, .. }
        ));
        assert_eq!(
            entry(&first, "usr/b").kind,
            Kind::Hardlink {
                target: "usr/a".into()
            }
        );
        assert_eq!(entry(&first, "usr/b").mode, 0o640);
        assert_eq!(entry(&first, "usr/b").mtime, 1_234_567);
        assert_eq!(entry(&first, "usr").mtime, 7_654_321);
        assert_eq!(
            entry(&first, "link").kind,
            Kind::Symlink {
                target: "bin/su".into()
            }
        );
        assert_eq!(entry(&first, "link").mtime, 1_000_000);
        assert_eq!(
            entry(&first, "dangling").kind,
            Kind::Symlink {
                target: "does/not/exist".into()
            }
        );
        assert_eq!(
            entry(&first, "dev/null").kind,
            Kind::CharDevice {
                rdev: nix::sys::stat::makedev(1, 3)
            }
        );
        assert_eq!(entry(&first, "dev/null").mode, 0o666);
        assert_eq!(
            entry(&first, "dev/loop0").kind,
            Kind::BlockDevice {
                rdev: nix::sys::stat::makedev(7, 0)
            }
        );
        assert_eq!(entry(&first, "dev/loop0").gid, 6);
        assert_eq!(entry(&first, "srv/fifo").kind, Kind::Fifo);
        assert_eq!(entry(&first, "srv/sock").kind, Kind::Socket);
        assert_eq!(entry(&first, "scratch").mode, 0o1777);
        assert_eq!(entry(&first, "scratch").kind, Kind::Dir { opaque: false });
        let notes = entry(&first, "home/user/notes");
        assert_eq!((notes.uid, notes.gid, notes.mode), (1000, 1000, 0o600));
        assert_eq!(entry(&first, "home/user").mode, 0o2750);
        assert!(matches!(
            entry(&first, "sparse.img").kind,
            Kind::File {
                size: 0xa0_0000,
                ..
            }
        ));
        let gone = entry(&first, "gone");
        assert_eq!(gone.kind, Kind::Whiteout);
        assert_eq!((gone.mode, gone.uid, gone.gid, gone.mtime), (0, 0, 0, 0));
        let opaque = entry(&first, "opaque");
        assert_eq!(opaque.kind, Kind::Dir { opaque: true });
        assert!(opaque.xattrs.is_empty());

        // The materialized tree has it too.
        let meta = |p: &str| fs::symlink_metadata(out.join(p)).unwrap();
        assert_eq!(meta("bin/su").mode() & 0o7777, 0o4755);
        assert_eq!(
            xattr::get(out.join("bin/ping"), "security.capability").unwrap(),
            Some(CAP_NET_RAW.to_vec())
        );
        assert_eq!(meta("usr/a").ino(), meta("usr/b").ino());
        assert_eq!(meta("usr/a").nlink(), 2);
        assert_eq!(meta("dev/null").rdev(), nix::sys::stat::makedev(1, 3));
        assert!(meta("dev/loop0").file_type().is_block_device());
        assert!(meta("srv/sock").file_type().is_socket());
        assert!(meta("gone").file_type().is_char_device());
        assert_eq!(meta("gone").rdev(), 0);
        assert_eq!(
            xattr::get(out.join("opaque"), OPAQUE_XATTR).unwrap(),
            Some(b"y".to_vec())
        );
        assert_eq!(
            fs::read_link(out.join("dangling")).unwrap(),
            Path::new("does/not/exist")
        );
        assert_eq!(meta("home/user/notes").uid(), 1000);
        let sparse = meta("sparse.img");
        assert_eq!(sparse.len(), 10 << 20);
        assert!(
            sparse.blocks() * 512 < sparse.len(),
            "not sparse: {} blocks",
            sparse.blocks()
        );
        assert_eq!(
            fs::read(out.join("sparse.img")).unwrap(),
            fs::read(src.join("sparse.img")).unwrap()
        );
        let root = meta("");
        assert_eq!(
            (root.mode() & 0o7777, root.uid(), root.gid()),
            (0o755, 0, 0)
        );
    }

    /// Everything about a tree a lower dir shows: each path's type,
    /// metadata, every xattr (overlayfs's too), contents and link target.
    fn listing(root: &Path) -> Vec<String> {
        let mut lines = Vec::new();
        for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            let mut names: Vec<_> = xattr::list(e.path()).unwrap().collect();
            names.sort();
            let xattrs: Vec<String> = names
                .iter()
                .map(|n| format!("{n:?}={:?}", xattr::get(e.path(), n).unwrap()))
                .collect();
            let content = if m.is_file() {
                format!("{}", Digest::of(&fs::read(e.path()).unwrap()))
            } else if m.is_symlink() {
                format!("-> {:?}", fs::read_link(e.path()).unwrap())
            } else {
                String::new()
            };
            lines.push(format!(
                "{:?} {:o} {}:{} mtime {} rdev {} nlink {} {xattrs:?} {content}",
                e.path().strip_prefix(root).unwrap(),
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.rdev(),
                m.nlink(),
            ));
        }
        lines
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn settled_output_is_the_tree_materialize_writes() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let normalizer = Normalizer::new(1_500_000_000);
        let src = tmp.path().join("src");
        full_tree(&src);
        // Dropped by normalization: gone from the settled tree as well.
        write(&src.join("tmp/junk/deep"), b"x", 0o644);
        write(&src.join("etc/machine-id"), b"id", 0o444);
        mkdir(&src.join("var/log"), 0o755);
        fs::hard_link(src.join("etc/kiln.conf"), src.join("var/log/linked.log")).unwrap();
        xattr::set(src.join("bin/su"), "trusted.overlay.origin", b"fh").unwrap();
        set_mtime(&src.join("etc"), 4_000_000_000);

        let layer = capture(&src, &store, &normalizer).unwrap();
        let made = tmp.path().join("made");
        materialize(&layer, &store, &made).unwrap();
        settle(&src, &layer).unwrap();
        assert_eq!(listing(&src), listing(&made));
        assert!(!src.join("tmp/junk").exists());
        assert!(src.join("tmp").is_dir());
        assert_eq!(capture(&src, &store, &normalizer).unwrap(), layer);
        let root = fs::symlink_metadata(&src).unwrap();
        assert_eq!((root.mode() & 0o7777, root.uid()), (0o755, 0));
    }

    #[test]
    fn normalization_drops_volatile_paths_and_clamps_mtimes() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let epoch = 1_700_000_000;
        let normalizer = Normalizer::new(epoch);
        let src = tmp.path().join("src");
        write(&src.join("tmp/x"), b"x", 0o644);
        write(&src.join("tmp/sub/deep/y"), b"y", 0o644);
        write(
            &src.join(std::ffi::OsStr::from_bytes(b"tmp/\xff")),
            b"",
            0o644,
        );
        write(&src.join("var/log/dpkg.log"), b"log", 0o644);
        write(&src.join("var/log/apt/history.log"), b"log", 0o644);
        write(&src.join("etc/machine-id"), b"0123", 0o444);
        write(&src.join("etc/hosts"), b"hosts", 0o644);
        write(&src.join("usr/future"), b"later", 0o644);
        // The first name of this pair is dropped; the kept one must not
        // become a hardlink to it.
        fs::hard_link(src.join("tmp/x"), src.join("usr/linked")).unwrap();
        set_mtime(&src.join("etc/hosts"), 1_000_000_000);
        set_mtime(&src.join("usr/future"), 4_000_000_000);

        let layer = capture(&src, &store, &normalizer).unwrap();
        assert_eq!(
            paths(&layer),
            [
                "etc",
                "etc/hosts",
                "tmp",
                "usr",
                "usr/future",
                "usr/linked",
                "var",
                "var/log",
                "var/log/apt"
            ]
        );
        assert_eq!(entry(&layer, "etc/hosts").mtime, 1_000_000_000);
        assert_eq!(entry(&layer, "usr/future").mtime, epoch);
        assert_eq!(entry(&layer, "usr").mtime, epoch);
        assert!(matches!(
            entry(&layer, "usr/linked").kind,
            Kind::File { size: 1, .. }
        ));
    }

    /// Builds the same content in either order, with different real times.
    fn same_tree(root: &Path, reversed: bool, mtime: i64) {
        fs::create_dir(root).unwrap();
        // The hardlinked pair is created from a different first name.
        let (first, second) = if reversed {
            ("opt/two", "usr/one")
        } else {
            ("usr/one", "opt/two")
        };
        let mut steps: Vec<Box<dyn Fn()>> = vec![
            Box::new(|| write(&root.join("etc/a"), b"alpha", 0o644)),
            Box::new(|| write(&root.join("etc/b"), b"beta", 0o600)),
            Box::new(|| mkdir(&root.join("var/empty"), 0o755)),
            Box::new(|| {
                fs::create_dir_all(root.join("var")).unwrap();
                symlink("../etc/a", root.join("var/link")).unwrap();
            }),
            Box::new(|| write(&root.join("a-b"), b"dash", 0o644)),
            Box::new(|| write(&root.join("a/b"), b"slash", 0o644)),
            Box::new(|| {
                write(&root.join(first), b"same inode", 0o755);
                fs::create_dir_all(root.join(second).parent().unwrap()).unwrap();
                fs::hard_link(root.join(first), root.join(second)).unwrap();
            }),
        ];
        if reversed {
            steps.reverse();
        }
        for step in &steps {
            step();
        }
        let mut names: Vec<(&str, &[u8])> = vec![("user.a", b"1"), ("user.b", b"2")];
        if reversed {
            names.reverse();
        }
        for (name, value) in names {
            xattr::set(root.join("etc/a"), name, value).unwrap();
        }
        for e in walkdir::WalkDir::new(root).contents_first(true) {
            set_mtime(e.unwrap().path(), mtime);
        }
    }

    #[test]
    fn same_content_gives_same_layer_digest() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let normalizer = Normalizer::new(1_600_000_000);
        let one = tmp.path().join("one");
        let two = tmp.path().join("two");
        same_tree(&one, false, 1_650_000_000);
        same_tree(&two, true, 1_900_000_000);

        let a = capture(&one, &store, &normalizer).unwrap();
        let b = capture(&two, &store, &normalizer).unwrap();
        assert_eq!(a, b);
        assert_eq!(layer_digest(&a), layer_digest(&b));
        // Byte order, not walk order: `a-b` sorts before `a/`.
        assert_eq!(
            &paths(&a)[..4],
            ["a", "a-b", "a/b", "etc"],
            "{:?}",
            paths(&a)
        );
        assert_eq!(
            entry(&a, "usr/one").kind,
            Kind::Hardlink {
                target: "opt/two".into()
            }
        );
        // A different mtime below the epoch is a different layer.
        set_mtime(&two.join("etc/b"), 12345);
        let c = capture(&two, &store, &normalizer).unwrap();
        assert_ne!(layer_digest(&a), layer_digest(&c));
    }

    #[test]
    fn identical_contents_share_one_blob() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let src = tmp.path().join("src");
        write(&src.join("one"), b"same bytes", 0o644);
        write(&src.join("dir/two"), b"same bytes", 0o755);
        write(&src.join("three"), b"other bytes", 0o644);

        let layer = capture(&src, &store, &Normalizer::new(i64::MAX)).unwrap();
        let blob_of = |p: &str| match &entry(&layer, p).kind {
            Kind::File { blob, size } => (*blob, *size),
            other => panic!("{p} is {other:?}"),
        };
        assert_eq!(blob_of("one"), blob_of("dir/two"));
        assert_ne!(blob_of("one").0, blob_of("three").0);
        let (blob, size) = blob_of("one");
        assert_eq!(size, 10);
        assert_eq!(blob, Digest::of(b"same bytes"));
        assert_eq!(fs::read(store.blob_path(&blob)).unwrap(), b"same bytes");
        let stored = walkdir::WalkDir::new(store.objects_dir(crate::store::Objects::Blobs))
            .into_iter()
            .filter(|e| e.as_ref().unwrap().file_type().is_file())
            .count();
        assert_eq!(stored, 2);
        let mut blobs: Vec<_> = layer.blobs().collect();
        blobs.dedup();
        assert_eq!(blobs.len(), 2);
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn sparse_copy_is_byte_exact() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let mut odd = vec![0u8; 3 * COPY_BUF + 17];
        for (at, len) in [
            (0, 5000),
            (9000, 3),
            (COPY_BUF - 2, 4),
            (2 * COPY_BUF + 4095, 2),
        ] {
            odd[at..at + len].fill(0xab);
        }
        *odd.last_mut().unwrap() = 1;
        let mut trailing_hole = vec![0u8; 5 * SPARSE_BLOCK + 100];
        trailing_hole[10] = 7;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("zeros", vec![0; SPARSE_BLOCK]),
            ("short", b"abc".to_vec()),
            ("odd", odd),
            ("trailing-hole", trailing_hole),
        ];
        let mut entries = Vec::new();
        for (name, bytes) in &cases {
            let blob = store.put_blob_bytes(bytes).unwrap();
            entries.push(file_entry(name, blob, bytes.len() as u64));
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let layer = Layer {
            format: LAYER_FORMAT,
            entries,
        };
        let out = tmp.path().join("out");
        materialize(&layer, &store, &out).unwrap();
        for (name, bytes) in &cases {
            assert_eq!(&fs::read(out.join(name)).unwrap(), bytes, "{name}");
        }
        assert_eq!(fs::metadata(out.join("zeros")).unwrap().blocks(), 0);
    }

    fn file_entry(path: &str, blob: Digest, size: u64) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File { blob, size },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: BTreeMap::new(),
        }
    }

    fn with_kind(path: &str, kind: Kind) -> Entry {
        Entry {
            kind,
            ..file_entry(path, Digest::of(b""), 0)
        }
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn materialize_creates_missing_parents() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let blob = store.put_blob_bytes(b"deep").unwrap();
        let layer = Layer {
            format: LAYER_FORMAT,
            entries: vec![file_entry("a/b/c", blob, 4)],
        };
        let out = tmp.path().join("out");
        materialize(&layer, &store, &out).unwrap();
        assert_eq!(fs::read(out.join("a/b/c")).unwrap(), b"deep");
        for dir in ["a", "a/b"] {
            let meta = fs::symlink_metadata(out.join(dir)).unwrap();
            assert!(meta.is_dir());
            assert_eq!(
                (meta.mode() & 0o7777, meta.uid(), meta.gid()),
                (0o755, 0, 0)
            );
        }
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn materialize_refuses_unsafe_or_malformed_layers() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let blob = store.put_blob_bytes(b"evil").unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut overlay_xattr = with_kind("d", Kind::Dir { opaque: false });
        overlay_xattr.xattrs.insert(
            "trusted.overlay.redirect".into(),
            XattrValue(b"/x".to_vec()),
        );
        let cases: Vec<(&str, Vec<Entry>)> = vec![
            ("parent", vec![file_entry("../x", blob, 4)]),
            ("absolute", vec![file_entry("/x", blob, 4)]),
            ("empty part", vec![file_entry("a//x", blob, 4)]),
            ("dot", vec![file_entry("./x", blob, 4)]),
            ("empty", vec![file_entry("", blob, 4)]),
            (
                "through a symlink",
                vec![
                    with_kind(
                        "link",
                        Kind::Symlink {
                            target: outside.to_str().unwrap().into(),
                        },
                    ),
                    file_entry("link/x", blob, 4),
                ],
            ),
            (
                "under a file",
                vec![file_entry("f", blob, 4), file_entry("f/x", blob, 4)],
            ),
            (
                "hardlink to nothing",
                vec![with_kind(
                    "h",
                    Kind::Hardlink {
                        target: "missing".into(),
                    },
                )],
            ),
            (
                "hardlink to a directory",
                vec![
                    with_kind("d", Kind::Dir { opaque: false }),
                    with_kind("h", Kind::Hardlink { target: "d".into() }),
                ],
            ),
            (
                "unsorted",
                vec![file_entry("b", blob, 4), file_entry("a", blob, 4)],
            ),
            (
                "repeated",
                vec![file_entry("a", blob, 4), file_entry("a", blob, 4)],
            ),
            ("overlay xattr", vec![overlay_xattr]),
        ];
        for (i, (what, entries)) in cases.into_iter().enumerate() {
            let layer = Layer {
                format: LAYER_FORMAT,
                entries,
            };
            let out = tmp.path().join(format!("out{i}"));
            match materialize(&layer, &store, &out) {
                Err(LayerError::BadEntry { .. }) => {}
                other => panic!("{what}: {other:?}"),
            }
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!tmp.path().join("x").exists());
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn materialize_needs_a_new_dest_and_intact_blobs() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let blob = store.put_blob_bytes(b"good").unwrap();
        let layer = Layer {
            format: LAYER_FORMAT,
            entries: vec![file_entry("f", blob, 4)],
        };
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        assert!(matches!(
            materialize(&layer, &store, &out),
            Err(LayerError::Io(_))
        ));

        fs::write(store.blob_path(&blob), b"bad!").unwrap();
        match materialize(&layer, &store, &tmp.path().join("out2")) {
            Err(LayerError::Store(e)) => {
                assert!(matches!(*e, crate::store::StoreError::Corrupt { .. }))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn capture_rejects_non_utf8_names() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let src = tmp.path().join("src");
        write(
            &src.join(std::ffi::OsStr::from_bytes(b"usr/\xff")),
            b"",
            0o644,
        );
        match capture(&src, &store, &Normalizer::new(0)) {
            Err(LayerError::NotUtf8 { path }) => {
                assert!(path.ends_with(std::ffi::OsStr::from_bytes(b"\xff")))
            }
            other => panic!("{other:?}"),
        }
    }

    /// Unmounts on drop, so a failing test leaves no mount behind.
    struct Mounted(PathBuf);

    impl Mounted {
        fn overlay(target: &Path, options: &str) -> Mounted {
            fs::create_dir_all(target).unwrap();
            nix::mount::mount(
                Some("overlay"),
                target,
                Some("overlay"),
                nix::mount::MsFlags::empty(),
                Some(options),
            )
            .unwrap();
            Mounted(target.to_path_buf())
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn captures_and_serves_real_overlayfs_layers() {
        let tmp = TempDir::new().unwrap();
        let store = open_store(&tmp);
        let dir = tmp.path();
        let lower = dir.join("lower");
        write(&lower.join("etc/gone"), b"old", 0o644);
        write(&lower.join("etc/kept"), b"kept", 0o644);
        write(&lower.join("data/old1"), b"1", 0o644);
        write(&lower.join("data/old2"), b"2", 0o644);
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        fs::create_dir(&upper).unwrap();
        fs::create_dir(&work).unwrap();

        let merged = dir.join("merged");
        {
            let _mount = Mounted::overlay(
                &merged,
                &format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    work.display()
                ),
            );
            fs::remove_file(merged.join("etc/gone")).unwrap();
            fs::remove_dir_all(merged.join("data")).unwrap();
            fs::create_dir(merged.join("data")).unwrap();
            fs::write(merged.join("data/new"), b"new").unwrap();
        }

        let layer = capture(&upper, &store, &Normalizer::new(i64::MAX)).unwrap();
        assert_eq!(paths(&layer), ["data", "data/new", "etc", "etc/gone"]);
        assert_eq!(entry(&layer, "etc/gone").kind, Kind::Whiteout);
        assert_eq!(entry(&layer, "data").kind, Kind::Dir { opaque: true });
        assert_eq!(entry(&layer, "etc").kind, Kind::Dir { opaque: false });
        for e in &layer.entries {
            assert!(e.xattrs.keys().all(|k| !k.starts_with("trusted.overlay.")));
        }

        // Materialized, the layer hides what it deleted when stacked.
        let tree = dir.join("tree");
        materialize(&layer, &store, &tree).unwrap();
        let view = dir.join("view");
        let _mount = Mounted::overlay(
            &view,
            &format!("lowerdir={}:{}", tree.display(), lower.display()),
        );
        assert!(!view.join("etc/gone").exists());
        assert_eq!(fs::read(view.join("etc/kept")).unwrap(), b"kept");
        let mut data: Vec<_> = fs::read_dir(view.join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        data.sort();
        assert_eq!(data, ["new"]);
    }

    #[test]
    fn a_linked_tree_keeps_a_files_names_one_file() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        for dir in [&a, &b] {
            fs::create_dir(dir).unwrap();
            fs::write(dir.join("p"), "x").unwrap();
            fs::write(dir.join("q"), "x").unwrap();
        }
        let blob = Digest::of(b"x");
        let layer = Layer {
            format: LAYER_FORMAT,
            entries: vec![
                Entry::plain("p", Kind::File { blob, size: 1 }),
                Entry::plain("q", Kind::Hardlink { target: "p".into() }),
            ],
        };
        // `p` comes from one tree, `q` (as a delta's base would give it) from another.
        let dest = tmp.path().join("dest");
        let source = |path: &str| {
            if path == "p" {
                a.join(path)
            } else {
                b.join(path)
            }
        };
        link_tree(&layer, &dest, &source).unwrap();
        let ino = |p: &str| fs::metadata(dest.join(p)).unwrap().ino();
        assert_eq!(ino("p"), ino("q"));
        assert_eq!(ino("p"), fs::metadata(a.join("p")).unwrap().ino());
    }
}
