//! Shared caches: other places a build looks for step results, and pushes its own.
//!
//! A remote holds the same three kinds of object as the local store — blobs and
//! layer manifests (named by their blake3 digest, so they verify themselves)
//! and action entries (step key -> layer, which carry signatures, see
//! [`crate::sign`]). On a local miss, a build asks each remote in order: an
//! entry counts only if a trusted key signed it, and every downloaded object
//! is checked against its digest before it enters the local store. Anything
//! wrong — unsigned, untrusted, tampered, unreachable — is a miss: kiln warns
//! once and builds the step itself.
//!
//! Backends: a shared directory (`file:///PATH` or a plain path: an NFS/SMB
//! mount or a synced folder) with the local store's layout, written with
//! rename-into-place so several writers are safe.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::layer::Layer;
use crate::sign::{self, PublicKey, Signature, SigningKey, Trust};
use crate::store::{ActionEntry, Store};

/// The kinds of object a remote stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Blob,
    Layer,
    Action,
}

/// A place that stores objects by name.
pub trait Remote: Send + Sync {
    /// How to name it in messages.
    fn describe(&self) -> String;
    fn get(&self, kind: Object, name: &Digest) -> Result<Option<Vec<u8>>, String>;
    fn has(&self, kind: Object, name: &Digest) -> Result<bool, String>;
    fn put(&self, kind: Object, name: &Digest, bytes: &[u8]) -> Result<(), String>;
}

/// An action entry as a remote stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteAction {
    pub layer: Digest,
    pub step: String,
    pub signatures: Vec<Signature>,
}

/// Opens a remote from its URL.
pub fn open(url: &str) -> Result<Box<dyn Remote>, String> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Ok(Box::new(DirRemote::new(Path::new(rest))));
    }
    if url.starts_with("oci://") {
        return Err(format!(
            "remote `{url}`: OCI registries are not supported by this kiln yet; use a shared directory (file:///PATH)"
        ));
    }
    if url.contains("://") {
        return Err(format!(
            "remote `{url}`: unknown scheme; use file:///PATH or a plain path"
        ));
    }
    Ok(Box::new(DirRemote::new(Path::new(url))))
}

/// A shared directory with the local store's layout.
pub struct DirRemote {
    root: PathBuf,
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
}

impl Remote for DirRemote {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn get(&self, kind: Object, name: &Digest) -> Result<Option<Vec<u8>>, String> {
        // A missing object (or a remote nobody pushed to yet) is a miss; any
        // other error (an unreadable or dead mount) is the remote failing.
        match std::fs::read(self.path(kind, name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn has(&self, kind: Object, name: &Digest) -> Result<bool, String> {
        // Asked before pushing: a new shared directory is created on first push.
        std::fs::create_dir_all(&self.root).map_err(|e| format!("{}: {e}", self.root.display()))?;
        Ok(self.path(kind, name).exists())
    }

    fn put(&self, kind: Object, name: &Digest, bytes: &[u8]) -> Result<(), String> {
        use std::sync::atomic::AtomicU64;
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

/// The remotes of one build, with what it trusts and how it signs.
pub struct Remotes {
    /// Each remote with whether it may still be read, and written, in this build.
    remotes: Vec<(Box<dyn Remote>, AtomicBool, AtomicBool)>,
    trusted: Vec<PublicKey>,
    signing: Option<SigningKey>,
    push: bool,
    warned: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Remotes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.remotes.iter().map(|(r, _, _)| r.describe()))
            .finish()
    }
}

impl Remotes {
    pub fn new(
        remotes: Vec<Box<dyn Remote>>,
        trusted: Vec<PublicKey>,
        signing: Option<SigningKey>,
        push: bool,
    ) -> Remotes {
        Remotes {
            remotes: remotes
                .into_iter()
                .map(|r| (r, AtomicBool::new(true), AtomicBool::new(true)))
                .collect(),
            trusted,
            signing,
            push,
            warned: Mutex::new(BTreeSet::new()),
        }
    }

    /// Whether there is any remote at all.
    pub fn is_empty(&self) -> bool {
        self.remotes.is_empty()
    }

    /// Prints a warning once per distinct message.
    fn warn(&self, message: String) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.insert(message.clone()) {
            eprintln!("warning: {message}");
        }
    }

    /// A remote that failed is not asked again during this build.
    fn disable(&self, index: usize, pushing: bool, error: &str) {
        let (remote, readable, writable) = &self.remotes[index];
        let (flag, what) = if pushing {
            (writable, "not pushing to it")
        } else {
            (readable, "building without it")
        };
        if flag.swap(false, Ordering::Relaxed) {
            self.warn(format!(
                "remote {} failed ({error}); {what}",
                remote.describe()
            ));
        }
    }

    /// Looks for `key` in the remotes; on a trusted, intact hit, copies what the
    /// local store lacks into it and records the action. Returns the layer.
    pub fn fetch(&self, key: &Digest, step: &str, store: &Store) -> Option<Digest> {
        for (index, (remote, readable, _)) in self.remotes.iter().enumerate() {
            if !readable.load(Ordering::Relaxed) {
                continue;
            }
            match self.fetch_from(remote.as_ref(), key, step, store) {
                Ok(Some(layer)) => return Some(layer),
                Ok(None) => {}
                Err(Failure::Unreachable(e)) => self.disable(index, false, &e),
                Err(Failure::Rejected(e)) => self.warn(format!(
                    "remote {}: step `{step}`: {e}; building it locally",
                    remote.describe()
                )),
            }
        }
        None
    }

    fn fetch_from(
        &self,
        remote: &dyn Remote,
        key: &Digest,
        step: &str,
        store: &Store,
    ) -> Result<Option<Digest>, Failure> {
        let Some(bytes) = remote
            .get(Object::Action, key)
            .map_err(Failure::Unreachable)?
        else {
            return Ok(None);
        };
        let action: RemoteAction = serde_json::from_slice(&bytes)
            .map_err(|e| Failure::Rejected(format!("damaged entry ({e})")))?;
        match sign::trust(&self.trusted, key, &action.layer, &action.signatures) {
            Trust::Trusted(_) => {}
            Trust::Unsigned => return Err(Failure::Rejected("the entry is unsigned".into())),
            Trust::UnknownSigner => {
                return Err(Failure::Rejected(
                    "the entry is signed by a key this build does not trust".into(),
                ))
            }
            Trust::BadSignature => {
                return Err(Failure::Rejected(
                    "the entry's signature does not verify (tampered?)".into(),
                ))
            }
        }
        let layer_bytes = remote
            .get(Object::Layer, &action.layer)
            .map_err(Failure::Unreachable)?
            .ok_or_else(|| Failure::Rejected("the layer manifest is missing".into()))?;
        if Digest::of(&layer_bytes) != action.layer {
            return Err(Failure::Rejected(
                "the layer manifest does not match its digest (tampered)".into(),
            ));
        }
        let layer: Layer = serde_json::from_slice(&layer_bytes)
            .map_err(|e| Failure::Rejected(format!("damaged layer manifest ({e})")))?;
        for blob in layer.blobs() {
            if store.blob_path(blob).exists() {
                continue;
            }
            let bytes = remote
                .get(Object::Blob, blob)
                .map_err(Failure::Unreachable)?
                .ok_or_else(|| Failure::Rejected(format!("blob {} is missing", blob.short())))?;
            if Digest::of(&bytes) != *blob {
                return Err(Failure::Rejected(format!(
                    "blob {} does not match its digest (tampered)",
                    blob.short()
                )));
            }
            store
                .put_blob_bytes(&bytes)
                .map_err(|e| Failure::Rejected(e.to_string()))?;
        }
        let local = store
            .put_layer(&layer)
            .map_err(|e| Failure::Rejected(e.to_string()))?;
        store
            .put_action(
                key,
                &ActionEntry {
                    layer: local,
                    step: step.to_string(),
                    build_ms: 0,
                },
            )
            .map_err(|e| Failure::Rejected(e.to_string()))?;
        Ok(Some(local))
    }

    /// Pushes a step's result (blobs the remote lacks, the manifest, the signed
    /// entry) to every working remote; `false` if it reached none.
    pub fn push(&self, key: &Digest, layer_digest: &Digest, step: &str, store: &Store) -> bool {
        if !self.push || self.remotes.is_empty() {
            return false;
        }
        let Some(signing) = &self.signing else {
            self.warn(
                "no signing key: nothing is pushed (create one with `kiln key generate`)".into(),
            );
            return false;
        };
        let Ok(layer) = store.layer(layer_digest) else {
            return false;
        };
        let mut reached = false;
        for (index, (remote, _, writable)) in self.remotes.iter().enumerate() {
            if !writable.load(Ordering::Relaxed) {
                continue;
            }
            let result = (|| -> Result<(), String> {
                for blob in layer.blobs() {
                    if !remote.has(Object::Blob, blob)? {
                        let bytes =
                            std::fs::read(store.blob_path(blob)).map_err(|e| e.to_string())?;
                        remote.put(Object::Blob, blob, &bytes)?;
                    }
                }
                remote.put(Object::Layer, layer_digest, &layer.to_canonical_json())?;
                let action = RemoteAction {
                    layer: *layer_digest,
                    step: step.to_string(),
                    signatures: vec![signing.sign(key, layer_digest)],
                };
                remote.put(
                    Object::Action,
                    key,
                    &serde_json::to_vec_pretty(&action).expect("entries serialize"),
                )
            })();
            match result {
                Ok(()) => reached = true,
                Err(e) => self.disable(index, true, &e),
            }
        }
        reached
    }
}

/// Why a remote did not give a step.
enum Failure {
    /// The remote itself failed: stop asking it.
    Unreachable(String),
    /// This entry is not usable: warn, keep asking others.
    Rejected(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(open("file:///tmp/x")
            .unwrap()
            .describe()
            .ends_with("/tmp/x"));
        assert!(open("/tmp/x").is_ok());
        assert!(open("oci://localhost:5000/kiln")
            .err()
            .unwrap()
            .contains("not supported"));
        assert!(open("s3://bucket")
            .err()
            .unwrap()
            .contains("unknown scheme"));
    }

    #[test]
    fn directory_remotes_store_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let r = DirRemote::new(tmp.path());
        let d = Digest::of(b"x");
        assert_eq!(r.get(Object::Blob, &d).unwrap(), None);
        r.put(Object::Blob, &d, b"x").unwrap();
        assert!(r.has(Object::Blob, &d).unwrap());
        assert_eq!(r.get(Object::Blob, &d).unwrap().as_deref(), Some(&b"x"[..]));
        assert!(!r.has(Object::Layer, &d).unwrap());
        assert_eq!(
            DirRemote::new(&tmp.path().join("new"))
                .get(Object::Blob, &d)
                .unwrap(),
            None
        );
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        assert!(DirRemote::new(&tmp.path().join("file/share"))
            .get(Object::Blob, &d)
            .is_err());
    }
}
