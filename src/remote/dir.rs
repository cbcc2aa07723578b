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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BlobSink, Entry, Failure, Pushed, Remote};
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

    fn path(&self, kind: Object, name: &Digest) -> PathBuf {
        let hex = name.to_hex();
        let (dir, ext) = match kind {
            Object::Blob => ("blobs", ""),
            Object::Layer => ("layers", ".json"),
            Object::Action => ("actions", ".json"),
        };
        self.root
            .join(dir)
            .join(&hex[..2])
            .join(format!("{hex}{ext}"))
    }

    /// Reads an object; a missing one (or a remote nobody pushed to yet) is
    /// `None`, any other error (an unreadable or dead mount) is the remote
    /// failing.
    fn get(&self, kind: Object, name: &Digest) -> Result<Option<Vec<u8>>, Failure> {
        let path = self.path(kind, name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Failure::Unreachable(format!("{}: {e}", path.display()))),
        }
    }

    fn put(&self, kind: Object, name: &Digest, bytes: &[u8]) -> Result<(), String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dest = self.path(kind, name);
        let tmp_dir = self.root.join("tmp");
        let parent = dest.parent().unwrap_or(&self.root);
        for dir in [&tmp_dir, &parent.to_path_buf()] {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        // A name no other writer (process or machine) uses, then an atomic rename.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut salt = [0u8; 8];
        let _ = getrandom::fill(&mut salt);
        let tmp = tmp_dir.join(format!(
            "{}-{nanos}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            hex::encode(salt)
        ));
        std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))
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
        self.remote.get(Object::Layer, digest)
    }

    fn blobs(&self, blobs: &[Digest], each: &mut BlobSink<'_>) -> Result<(), Failure> {
        for blob in blobs {
            each(blob, self.remote.get(Object::Blob, blob)?)?;
        }
        Ok(())
    }
}

impl Remote for DirRemote {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn lookup(&self, key: &Digest) -> Result<Option<Box<dyn Entry + '_>>, Failure> {
        Ok(self.get(Object::Action, key)?.map(|action| {
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
        assert_eq!(r.get(Object::Blob, &d).unwrap(), None);
        assert!(r.lookup(&d).unwrap().is_none());
        r.put(Object::Blob, &d, b"x").unwrap();
        r.put(Object::Action, &d, b"{}").unwrap();
        assert_eq!(r.get(Object::Blob, &d).unwrap().as_deref(), Some(&b"x"[..]));
        let entry = r.lookup(&d).unwrap().unwrap();
        assert_eq!(entry.action(), b"{}");
        assert_eq!(entry.layer(&d).unwrap(), None);
        let mut seen = Vec::new();
        entry
            .blobs(&[d, Digest::of(b"y")], &mut |name, bytes| {
                seen.push((*name, bytes));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, [(d, Some(b"x".to_vec())), (Digest::of(b"y"), None)]);
        assert_eq!(
            DirRemote::new(&tmp.path().join("new"))
                .get(Object::Blob, &d)
                .unwrap(),
            None
        );
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        assert!(DirRemote::new(&tmp.path().join("file/share"))
            .lookup(&d)
            .is_err());
    }
}
