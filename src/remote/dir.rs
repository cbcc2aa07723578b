//! A shared directory as a remote: an NFS/SMB mount or a synced folder,
//! named `file:///PATH` or by a plain path.
//!
//! Layout (the local store's, see [`crate::store`]):
//! ```text
//! PATH/
//!   blobs/ab/abcd…        file contents, named by their blake3 digest
//!   layers/ab/abcd….json  layer manifests, named by their blake3 digest
//!   actions/ab/abcd….json step key -> signed entry (RemoteAction JSON)
//!   tmp/                  writes in progress
//! ```
//! Every object is written under a name no other writer uses, in `tmp/`, then
//! renamed into place, so several machines can push at once.
//!
//! Whoever else writes to the directory is not trusted: every directory below
//! the root is opened without following symlinks (`openat`, `O_NOFOLLOW`), so
//! a planted symlink can neither redirect a write nor a read; only regular
//! files are read (a FIFO or a device is refused without blocking), and never
//! more bytes than the object may have (the signed layer's size for a blob).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstat, mkdirat, Mode, SFlag};

use super::{BlobSink, Entry, Failure, Pushed, Remote, MAX_ACTION_BYTES, MAX_LAYER_BYTES};
use crate::digest::Digest;

/// A shared directory with the local store's layout.
pub struct DirRemote {
    root: PathBuf,
}

/// The kinds of object the directory stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Object {
    Blob,
    Layer,
    Action,
}

impl DirRemote {
    pub fn new(root: &Path) -> DirRemote {
        DirRemote {
            root: root.to_path_buf(),
        }
    }

    /// Where an object lives: its directory below the root, and its name.
    fn place(kind: Object, name: &Digest) -> ([String; 2], String) {
        let hex = name.to_hex();
        let (dir, ext) = match kind {
            Object::Blob => ("blobs", ""),
            Object::Layer => ("layers", ".json"),
            Object::Action => ("actions", ".json"),
        };
        (
            [dir.to_string(), hex[..2].to_string()],
            format!("{hex}{ext}"),
        )
    }

    fn path(&self, kind: Object, name: &Digest) -> PathBuf {
        let ([dir, shard], file) = DirRemote::place(kind, name);
        self.root.join(dir).join(shard).join(file)
    }

    /// Opens the root (the user named it: symlinks in its path are followed).
    fn open_root(&self) -> nix::Result<OwnedFd> {
        nix::fcntl::open(
            &self.root,
            OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    }

    /// Opens the directory `parts` below the root, component by component,
    /// never through a symlink; creates missing ones when `create`.
    fn open_dir(&self, root: OwnedFd, parts: &[String], create: bool) -> nix::Result<OwnedFd> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut dir = root;
        for part in parts {
            if create {
                match mkdirat(&dir, part.as_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e),
                }
            }
            dir = openat(&dir, part.as_str(), flags, Mode::empty())?;
        }
        Ok(dir)
    }

    /// Reads an object of at most `limit` bytes; a missing one (or a remote
    /// nobody pushed to yet) is `None`. A symlink, a non-file or an oversized
    /// file is a rejected entry; any other error (an unreadable or dead
    /// mount) is the remote failing.
    fn get(&self, kind: Object, name: &Digest, limit: u64) -> Result<Option<Vec<u8>>, Failure> {
        let path = self.path(kind, name);
        let (parts, file) = DirRemote::place(kind, name);
        let at = |e: Errno| format!("{}: {e}", path.display());
        let root = match self.open_root() {
            Ok(root) => root,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => {
                return Err(Failure::Unreachable(format!(
                    "{}: {e}",
                    self.root.display()
                )))
            }
        };
        let opened = self.open_dir(root, &parts, false).and_then(|dir| {
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
            openat(&dir, file.as_str(), flags, Mode::empty())
        });
        let fd = match opened {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e @ (Errno::ELOOP | Errno::ENOTDIR | Errno::ENXIO)) => {
                return Err(Failure::Rejected(format!(
                    "{}: not a plain file ({e})",
                    path.display()
                )))
            }
            Err(e) => return Err(Failure::Unreachable(at(e))),
        };
        let stat = fstat(&fd).map_err(|e| Failure::Unreachable(at(e)))?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(Failure::Rejected(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        if stat.st_size as u64 > limit {
            return Err(Failure::Rejected(format!(
                "{}: {} bytes, more than the {limit} it may have",
                path.display(),
                stat.st_size
            )));
        }
        let mut bytes = Vec::with_capacity(stat.st_size as usize);
        File::from(fd)
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::Unreachable(format!("{}: {e}", path.display())))?;
        if bytes.len() as u64 > limit {
            return Err(Failure::Rejected(format!(
                "{}: grew past {limit} bytes",
                path.display()
            )));
        }
        Ok(Some(bytes))
    }

    fn put(&self, kind: Object, name: &Digest, bytes: &[u8]) -> Result<(), String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let (parts, file) = DirRemote::place(kind, name);
        let at = |what: &str, e: Errno| format!("{}/{what}: {e}", self.root.display());
        std::fs::create_dir_all(&self.root).map_err(|e| format!("{}: {e}", self.root.display()))?;
        let root = || self.open_root().map_err(|e| at(".", e));
        let tmp_dir = self
            .open_dir(root()?, &["tmp".to_string()], true)
            .map_err(|e| at("tmp", e))?;
        let dest_dir = self
            .open_dir(root()?, &parts, true)
            .map_err(|e| at(&parts.join("/"), e))?;
        // A name no other writer (process or machine) uses, then an atomic rename.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut salt = [0u8; 8];
        let _ = getrandom::fill(&mut salt);
        let tmp = format!(
            "{}-{nanos}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            hex::encode(salt)
        );
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(
            &tmp_dir,
            tmp.as_str(),
            flags,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| at(&format!("tmp/{tmp}"), e))?;
        File::from(fd)
            .write_all(bytes)
            .map_err(|e| format!("{}/tmp/{tmp}: {e}", self.root.display()))?;
        renameat(&tmp_dir, tmp.as_str(), &dest_dir, file.as_str())
            .map_err(|e| at(&format!("{}/{file}", parts.join("/")), e))
    }
}

/// An entry found in a directory: its objects are read on demand.
struct DirEntry<'a> {
    remote: &'a DirRemote,
    action: Vec<u8>,
}

impl Entry for DirEntry<'_> {
    fn action(&self) -> &[u8] {
        &self.action
    }

    fn layer(&self, digest: &Digest) -> Result<Option<Vec<u8>>, Failure> {
        self.remote.get(Object::Layer, digest, MAX_LAYER_BYTES)
    }

    fn blobs(&self, blobs: &[(Digest, u64)], each: &mut BlobSink<'_>) -> Result<(), Failure> {
        for (blob, size) in blobs {
            each(blob, self.remote.get(Object::Blob, blob, *size)?)?;
        }
        Ok(())
    }
}

impl Remote for DirRemote {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn lookup(&self, key: &Digest) -> Result<Option<Box<dyn Entry + '_>>, Failure> {
        Ok(self
            .get(Object::Action, key, MAX_ACTION_BYTES)?
            .map(|action| {
                Box::new(DirEntry {
                    remote: self,
                    action,
                }) as Box<dyn Entry>
            }))
    }

    fn push(&self, key: &Digest, result: &Pushed<'_>) -> Result<(), String> {
        // A new shared directory is created on first push.
        std::fs::create_dir_all(&self.root).map_err(|e| format!("{}: {e}", self.root.display()))?;
        for blob in result.blobs {
            if !self.path(Object::Blob, blob).exists() {
                let bytes = result.store.read_blob(blob).map_err(|e| e.to_string())?;
                self.put(Object::Blob, blob, &bytes)?;
            }
        }
        self.put(Object::Layer, &result.action.layer, result.layer_json)?;
        self.put(Object::Action, key, result.action_json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_remotes_store_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let r = DirRemote::new(tmp.path());
        let d = Digest::of(b"x");
        assert_eq!(r.get(Object::Blob, &d, 1).unwrap(), None);
        assert!(r.lookup(&d).unwrap().is_none());
        r.put(Object::Blob, &d, b"x").unwrap();
        r.put(Object::Action, &d, b"{}").unwrap();
        assert_eq!(
            r.get(Object::Blob, &d, 1).unwrap().as_deref(),
            Some(&b"x"[..])
        );
        let entry = r.lookup(&d).unwrap().unwrap();
        assert_eq!(entry.action(), b"{}");
        assert_eq!(entry.layer(&d).unwrap(), None);
        let mut seen = Vec::new();
        entry
            .blobs(&[(d, 1), (Digest::of(b"y"), 1)], &mut |name, bytes| {
                seen.push((*name, bytes));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, [(d, Some(b"x".to_vec())), (Digest::of(b"y"), None)]);
        assert_eq!(
            DirRemote::new(&tmp.path().join("new"))
                .get(Object::Blob, &d, 1)
                .unwrap(),
            None
        );
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        assert!(matches!(
            DirRemote::new(&tmp.path().join("file/share")).lookup(&d),
            Err(Failure::Unreachable(_))
        ));
    }

    #[test]
    fn planted_symlinks_fifos_and_oversized_files_are_refused() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
        let r = DirRemote::new(&share);
        let d = Digest::of(b"x");
        r.put(Object::Blob, &d, b"x").unwrap();
        let blob = r.path(Object::Blob, &d);

        // A blob bigger than the layer says: refused, not read.
        assert!(matches!(
            r.get(Object::Blob, &d, 0),
            Err(Failure::Rejected(_))
        ));
        // A symlink in place of the blob, to a file of the right contents.
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::write(&elsewhere, b"x").unwrap();
        std::fs::remove_file(&blob).unwrap();
        symlink(&elsewhere, &blob).unwrap();
        assert!(matches!(
            r.get(Object::Blob, &d, 1),
            Err(Failure::Rejected(_))
        ));
        // A FIFO: refused at once, without waiting for a writer.
        std::fs::remove_file(&blob).unwrap();
        nix::unistd::mkfifo(&blob, Mode::from_bits_truncate(0o644)).unwrap();
        assert!(matches!(
            r.get(Object::Blob, &d, 1),
            Err(Failure::Rejected(_))
        ));
        // A symlinked shard directory is not followed for reads either.
        std::fs::remove_file(&blob).unwrap();
        let shard = blob.parent().unwrap().to_path_buf();
        std::fs::remove_dir(&shard).unwrap();
        let other = tmp.path().join("other-shard");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join(blob.file_name().unwrap()), b"x").unwrap();
        symlink(&other, &shard).unwrap();
        assert!(matches!(
            r.get(Object::Blob, &d, 1),
            Err(Failure::Rejected(_))
        ));

        // A planted `tmp` symlink does not make a push write elsewhere.
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::remove_dir_all(share.join("tmp")).unwrap();
        symlink(&target, share.join("tmp")).unwrap();
        assert!(r.put(Object::Layer, &d, b"{}").is_err());
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    }
}
