//! Shared caches: other places a build looks for step results, and pushes its own.
//!
//! A remote holds, for each step key it has, a signed action entry ("step key
//! K built layer L", see [`crate::sign`]), the layer manifest L and the file
//! blobs it names (manifests and blobs are named by their blake3 digest, so
//! they verify themselves). On a local miss, a build asks each remote in
//! order: an entry counts only if a trusted key signed it, and every
//! downloaded object is checked against its blake3 digest here, in
//! [`Remotes::fetch`], before it enters the local store — whatever the
//! backend. Anything wrong — unsigned, untrusted, tampered, unreachable — is a
//! miss: kiln warns once and builds the step itself.
//!
//! Backends ([`Remote`]): a shared directory ([`DirRemote`]: `file:///PATH` or
//! a plain path), an OCI registry ([`OciRemote`]: `oci://HOST[:PORT]/REPO`),
//! and memory ([`MemRemote`], for tests). tests/common/contract.rs is the
//! one suite every backend passes.

mod dir;
mod mem;
mod oci;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::blob_stream::IncomingBlob;
use crate::digest::Digest;
use crate::layer::{Kind, Layer};
use crate::sign::{self, PublicKey, Signature, Signed, SigningKey, Trust};
use crate::store::{ActionEntry, Origin, Store};

pub use dir::DirRemote;
pub use mem::MemRemote;
pub use oci::{OciOpenError, OciRemote};

/// A shared cache: where step results are looked up and pushed.
pub trait Remote: Send + Sync {
    /// How to name it in messages (never with credentials).
    fn describe(&self) -> String;

    /// What the remote holds for a step key; `None` if nothing.
    fn lookup(&self, key: &Digest) -> Result<Option<Box<dyn Entry + '_>>, Failure>;

    /// Stores a step's result: the blobs the remote lacks, the layer manifest,
    /// and the signed entry last, so that a reader who finds the entry finds
    /// everything it names. Pushing what is already there is harmless, and so
    /// are several machines pushing the same step at once.
    fn push(&self, key: &Digest, result: &Pushed<'_>) -> Result<(), String>;
}

/// One step key's entry in a remote, and the objects it names. Nothing read
/// through it is trusted: [`Remotes::fetch`] checks every byte.
pub trait Entry {
    /// The signed action entry as stored ([`RemoteAction`] JSON).
    fn action(&self) -> &[u8];

    /// The layer manifest named `digest`; `None` if the remote lacks it.
    fn layer(&self, digest: &Digest) -> Result<Option<Vec<u8>>, Failure>;

    /// Downloads `wanted`, each with the size the signed layer gives it,
    /// into files of `store` ([`incoming`]: backends never read more than
    /// that size, and may fetch several at once), handing each to `each`
    /// once, in any order, with `None` for one the remote lacks. `layer` is
    /// every blob the signed layer names ([`file_blobs`]), for a backend that
    /// stores some together (the registry's packs). Stops at the first
    /// error, its own or `each`'s.
    fn blobs(
        &self,
        layer: &[(Digest, u64)],
        wanted: &[(Digest, u64)],
        store: &Store,
        each: &mut BlobSink<'_>,
    ) -> Result<(), Failure>;
}

/// Every file blob `layer` names, with the size it gives, once each, sorted.
pub fn file_blobs(layer: &Layer) -> Vec<(Digest, u64)> {
    layer
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::File { blob, size } => Some((*blob, *size)),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Starts receiving a blob of at most `size` bytes into `store`.
fn incoming(store: &Store, size: u64) -> Result<IncomingBlob, Failure> {
    store
        .incoming_blob(size)
        .map_err(|e| Failure::Rejected(format!("cannot store a download: {e}")))
}

/// How long moving `bytes` to or from a remote may take in all: half a
/// minute, and a second more per MiB.
fn time_limit(bytes: u64) -> std::time::Duration {
    const MIB: u64 = 1 << 20;
    REQUEST_TIMEOUT + std::time::Duration::from_secs(bytes.min(64 << 30) / MIB)
}

/// The time any request to a remote may take, whatever its size.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The largest action entry a remote may hand out.
pub const MAX_ACTION_BYTES: u64 = 64 << 10;
/// The largest layer manifest a remote may hand out.
pub const MAX_LAYER_BYTES: u64 = 256 << 20;

/// What [`Entry::blobs`] hands each downloaded blob to.
pub type BlobSink<'a> = dyn FnMut(&Digest, Option<IncomingBlob>) -> Result<(), Failure> + 'a;

/// A step's result, as pushed.
pub struct Pushed<'a> {
    /// The signed entry.
    pub action: &'a RemoteAction,
    /// The same entry as JSON: the bytes every remote stores.
    pub action_json: &'a [u8],
    /// The layer manifest's canonical JSON (named `action.layer`).
    pub layer_json: &'a [u8],
    /// Every blob the layer names, once each, sorted.
    pub blobs: &'a [Digest],
    /// Where the blobs are read from.
    pub store: &'a Store,
}

/// Why a remote did not give a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The remote itself failed (unreachable, timing out, erroring): stop
    /// asking it during this build.
    Unreachable(String),
    /// This entry is not usable (damaged, untrusted, tampered): warn, keep
    /// asking the remote for other steps.
    Rejected(String),
}

/// An action entry as a remote stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteAction {
    pub layer: Digest,
    pub step: String,
    /// When the signer made the entry, seconds since 1970 (signed with it);
    /// missing in entries from before kiln signed creation times.
    #[serde(default)]
    pub created: Option<u64>,
    pub signatures: Vec<Signature>,
}

/// Why a remote URL cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "remote `{0}`: unknown scheme; use file:///PATH, a plain path or oci://HOST[:PORT]/REPOSITORY"
    )]
    UnknownScheme(String),
    #[error(transparent)]
    Oci(#[from] OciOpenError),
}

/// Opens a remote from its URL. Contacts nothing: a remote that is down is
/// found out (and skipped) when a build first asks it.
pub fn open(url: &str) -> Result<Box<dyn Remote>, OpenError> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Ok(Box::new(DirRemote::new(Path::new(rest))));
    }
    if oci::is_oci_url(url) {
        return Ok(Box::new(OciRemote::open(url)?));
    }
    if url.contains("://") {
        return Err(OpenError::UnknownScheme(url.to_string()));
    }
    Ok(Box::new(DirRemote::new(Path::new(url))))
}

/// The remotes of one build, with what it trusts and how it signs.
pub struct Remotes {
    /// Each remote with whether it may still be read, and written, in this build.
    remotes: Vec<(Box<dyn Remote>, AtomicBool, AtomicBool)>,
    trusted: Vec<PublicKey>,
    signing: Option<SigningKey>,
    push: bool,
    /// Entries signed longer ago than this are not used.
    max_age: Option<std::time::Duration>,
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
            max_age: None,
            warned: Mutex::new(BTreeSet::new()),
        }
    }

    /// Refuses entries signed longer ago than `max_age`.
    pub fn with_max_age(mut self, max_age: Option<std::time::Duration>) -> Remotes {
        self.max_age = max_age;
        self
    }

    /// Whether there is any remote at all.
    pub fn is_empty(&self) -> bool {
        self.remotes.is_empty()
    }

    /// Whether this build pushes what it makes (a remote, pushing on, a signing key).
    pub fn pushes(&self) -> bool {
        self.push && !self.remotes.is_empty() && self.signing.is_some()
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
        let Some(entry) = remote.lookup(key)? else {
            return Ok(None);
        };
        let action: RemoteAction = serde_json::from_slice(entry.action())
            .map_err(|e| Failure::Rejected(format!("damaged entry ({e})")))?;
        let created = action.created.ok_or_else(|| {
            Failure::Rejected(
                "the entry has no signed creation time (an older kiln pushed it)".into(),
            )
        })?;
        match sign::trust(
            &self.trusted,
            key,
            &action.layer,
            created,
            &action.signatures,
        ) {
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
        if let Some(max_age) = self.max_age {
            let age = sign::now().saturating_sub(created);
            if age > max_age.as_secs() {
                return Err(Failure::Rejected(format!(
                    "the entry was signed {} days ago, longer ago than the {} days the build accepts",
                    age / 86_400,
                    max_age.as_secs() / 86_400
                )));
            }
        }
        let layer_bytes = entry
            .layer(&action.layer)?
            .ok_or_else(|| Failure::Rejected("the layer manifest is missing".into()))?;
        if Digest::of(&layer_bytes) != action.layer {
            return Err(Failure::Rejected(
                "the layer manifest does not match its digest (tampered)".into(),
            ));
        }
        let layer: Layer = serde_json::from_slice(&layer_bytes)
            .map_err(|e| Failure::Rejected(format!("damaged layer manifest ({e})")))?;
        let blobs = file_blobs(&layer);
        let missing: Vec<(Digest, u64)> = blobs
            .iter()
            .copied()
            .filter(|(blob, size)| !store.blob_looks_intact(blob, Some(*size)))
            .collect();
        // Received blobs are published together once all are in: one
        // `syncfs` for a step's thousands of files instead of one fsync each.
        let mut staged = Vec::new();
        let received = entry.blobs(&blobs, &missing, store, &mut |blob, incoming| {
            let incoming = incoming
                .ok_or_else(|| Failure::Rejected(format!("blob {} is missing", blob.short())))?;
            if incoming.digest() != *blob {
                return Err(Failure::Rejected(format!(
                    "blob {} does not match its digest (tampered)",
                    blob.short()
                )));
            }
            store
                .stage_incoming(incoming, &mut staged)
                .map_err(|e| Failure::Rejected(e.to_string()))
        });
        if let Err(e) = received {
            for (_, tmp) in staged {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(e);
        }
        store
            .publish_staged(staged)
            .map_err(|e| Failure::Rejected(e.to_string()))?;
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
                    origin: Origin::Pulled(Signed {
                        created,
                        signatures: action.signatures.clone(),
                    }),
                    resolved: None,
                },
            )
            .map_err(|e| Failure::Rejected(e.to_string()))?;
        Ok(Some(local))
    }

    /// Pushes a step's result (blobs the remote lacks, the manifest, the signed
    /// entry) to every working remote; `false` if it reached none. A step
    /// this machine built goes out signed with its key, now; one it pulled
    /// goes out with the signatures it came with (if this build trusts
    /// them), never signed again; an entry of unknown origin not at all. So
    /// a machine never vouches for what it did not build.
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
        let origin = match store.action(key) {
            Ok(Some(entry)) if entry.layer == *layer_digest => entry.origin,
            _ => Origin::Unknown,
        };
        let signed = match origin {
            Origin::Built => {
                let created = sign::now();
                Some(Signed {
                    created,
                    signatures: vec![signing.sign(key, layer_digest, created)],
                })
            }
            Origin::Pulled(signed) => Some(signed).filter(|s| {
                matches!(
                    sign::trust(&self.trusted, key, layer_digest, s.created, &s.signatures),
                    Trust::Trusted(_)
                )
            }),
            Origin::Unknown => None,
        };
        let Some(signed) = signed else {
            self.warn(format!(
                "step `{step}` is not pushed: this machine did not build it and it carries \
                 no signature this build trusts (or an older kiln cached it: rebuild it to share it)"
            ));
            return false;
        };
        let Ok(layer) = store.layer(layer_digest) else {
            return false;
        };
        let action = RemoteAction {
            layer: *layer_digest,
            step: step.to_string(),
            created: Some(signed.created),
            signatures: signed.signatures,
        };
        let action_json = serde_json::to_vec_pretty(&action).expect("entries serialize");
        let layer_json = layer.to_canonical_json();
        let blobs: Vec<Digest> = layer
            .blobs()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let pushed = Pushed {
            action: &action,
            action_json: &action_json,
            layer_json: &layer_json,
            blobs: &blobs,
            store,
        };
        let mut reached = false;
        for (index, (remote, _, writable)) in self.remotes.iter().enumerate() {
            if !writable.load(Ordering::Relaxed) {
                continue;
            }
            match remote.push(key, &pushed) {
                Ok(()) => reached = true,
                Err(e) => self.disable(index, true, &e),
            }
        }
        reached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::layer::{Entry, Kind, Layer, LAYER_FORMAT};
    use crate::store::ActionEntry;

    /// A store holding a one-file layer; its digest.
    fn store_with_layer(dir: &Path) -> (Store, Digest) {
        let store = Store::open(dir).unwrap();
        let blob = store.put_blob_bytes(b"contents\n").unwrap();
        let layer = Layer {
            format: LAYER_FORMAT,
            entries: vec![Entry {
                path: "etc/x".into(),
                kind: Kind::File { blob, size: 9 },
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: 0,
                xattrs: Default::default(),
            }],
        };
        let digest = store.put_layer(&layer).unwrap();
        (store, digest)
    }

    fn remotes(dirs: &[&Path], trusted: &[&str], signing: Option<SigningKey>) -> Remotes {
        Remotes::new(
            dirs.iter()
                .map(|d| open(d.to_str().unwrap()).unwrap())
                .collect(),
            trusted
                .iter()
                .map(|k| PublicKey::parse(k).unwrap())
                .collect(),
            signing,
            true,
        )
    }

    fn record(store: &Store, key: &Digest, layer: Digest, origin: Origin) {
        let entry = ActionEntry {
            layer,
            step: "s".into(),
            build_ms: 1,
            origin,
            resolved: None,
        };
        store.put_action(key, &entry).unwrap();
    }

    /// Who signed the entry a remote directory holds for `key`.
    fn signers(dir: &Path, key: &Digest) -> Vec<String> {
        let remote = open(dir.to_str().unwrap()).unwrap();
        let entry = remote
            .lookup(key)
            .unwrap()
            .expect("the remote has the entry");
        let action: RemoteAction = serde_json::from_slice(entry.action()).unwrap();
        action.signatures.into_iter().map(|s| s.key).collect()
    }

    #[test]
    fn only_signed_builds_are_pushed_and_never_signed_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (a_dir, b_dir) = (tmp.path().join("remote-a"), tmp.path().join("remote-b"));
        let builder = SigningKey::generate().unwrap();
        let relay = SigningKey::generate().unwrap();
        let builder_public = builder.public();

        // The builder signs what it built; an entry in its cache that it
        // did not build (planted, or of an older kiln) is not pushed.
        let (store, layer) = store_with_layer(&tmp.path().join("builder"));
        let as_builder = remotes(&[&a_dir], &[&builder_public], Some(builder));
        let (built, planted) = (Digest::of(b"built"), Digest::of(b"planted"));
        record(&store, &built, layer, Origin::Built);
        record(&store, &planted, layer, Origin::Unknown);
        assert!(as_builder.push(&built, &layer, "s", &store));
        assert!(!as_builder.push(&planted, &layer, "s", &store));
        assert!(open(a_dir.to_str().unwrap())
            .unwrap()
            .lookup(&planted)
            .unwrap()
            .is_none());

        // A machine that pulled the entry passes it on with the builder's
        // signature, not its own.
        let relay_store = Store::open(&tmp.path().join("relay")).unwrap();
        let relay_public = relay.public();
        let as_relay = Remotes::new(
            vec![
                open(a_dir.to_str().unwrap()).unwrap(),
                open(b_dir.to_str().unwrap()).unwrap(),
            ],
            vec![
                PublicKey::parse(&builder_public).unwrap(),
                PublicKey::parse(&relay_public).unwrap(),
            ],
            Some(relay),
            true,
        );
        assert_eq!(as_relay.fetch(&built, "s", &relay_store), Some(layer));
        assert!(as_relay.push(&built, &layer, "s", &relay_store));
        assert_eq!(signers(&b_dir, &built), vec![builder_public.clone()]);

        // So a reader who trusts only the relay does not take it.
        let reader_store = Store::open(&tmp.path().join("reader")).unwrap();
        let as_reader = Remotes::new(
            vec![open(b_dir.to_str().unwrap()).unwrap()],
            vec![PublicKey::parse(&relay_public).unwrap()],
            None,
            false,
        );
        assert_eq!(as_reader.fetch(&built, "s", &reader_store), None);
    }

    #[test]
    fn entries_signed_too_long_ago_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("remote");
        let builder = SigningKey::generate().unwrap();
        let (store, layer) = store_with_layer(&tmp.path().join("builder"));
        let key = Digest::of(b"old");
        let created = sign::now() - 10 * 86_400;
        let signed = Signed {
            created,
            signatures: vec![builder.sign(&key, &layer, created)],
        };
        record(&store, &key, layer, Origin::Pulled(signed));
        let public = builder.public();
        assert!(remotes(&[&dir], &[&public], Some(builder)).push(&key, &layer, "s", &store));

        let reader = |days: Option<u64>| {
            Remotes::new(
                vec![open(dir.to_str().unwrap()).unwrap()],
                vec![PublicKey::parse(&public).unwrap()],
                None,
                false,
            )
            .with_max_age(days.map(|d| std::time::Duration::from_secs(d * 86_400)))
        };
        let fresh = || Store::open(&tempfile::tempdir().unwrap().keep().join("c")).unwrap();
        assert_eq!(reader(Some(5)).fetch(&key, "s", &fresh()), None);
        assert_eq!(reader(Some(30)).fetch(&key, "s", &fresh()), Some(layer));
        assert_eq!(reader(None).fetch(&key, "s", &fresh()), Some(layer));
    }

    #[test]
    fn urls() {
        assert!(open("file:///tmp/x")
            .unwrap()
            .describe()
            .ends_with("/tmp/x"));
        assert!(open("/tmp/x").is_ok());
        assert_eq!(
            open("oci://localhost:5000/kiln/cache").unwrap().describe(),
            "oci://localhost:5000/kiln/cache"
        );
        let bad_repository = open("oci://localhost:5000/Kiln").err().unwrap();
        assert!(matches!(
            bad_repository,
            OpenError::Oci(OciOpenError::Url(_))
        ));
        assert!(bad_repository.to_string().contains("repository"));
        let unknown = open("s3://bucket").err().unwrap();
        assert!(matches!(unknown, OpenError::UnknownScheme(_)));
        assert_eq!(
            unknown.to_string(),
            "remote `s3://bucket`: unknown scheme; use file:///PATH, a plain path or oci://HOST[:PORT]/REPOSITORY"
        );
    }
}
