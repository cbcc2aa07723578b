//! Layers: what one step changed in the filesystem, as a canonical manifest.
//!
//! A [`Layer`] is a list of [`Entry`]s sorted by path (relative, `/`-separated,
//! no leading slash). File contents live in the store as blobs named by their
//! blake3 digest; the manifest names them. The manifest's canonical JSON is
//! hashed to give the layer digest. This is the pure model: capturing a layer
//! from an overlayfs upper directory and writing one back as a directory are
//! in [`crate::capture`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Version of the manifest format; part of every layer digest.
pub const LAYER_FORMAT: u32 = 1;

/// One step's filesystem changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Always [`LAYER_FORMAT`].
    pub format: u32,
    /// Sorted by `path`, each path once.
    pub entries: Vec<Entry>,
}

/// One path in a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative to the root, `/`-separated, never empty, no leading slash.
    pub path: String,
    /// What kind of file this is, with its kind-specific data.
    #[serde(flatten)]
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`0o7777` mask).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since 1970, already normalized.
    pub mtime: i64,
    /// Extended attributes (name -> value, hex-encoded in JSON), without
    /// overlayfs's own `trusted.overlay.*`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, XattrValue>,
}

/// An extended attribute value; hex in JSON.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct XattrValue(pub Vec<u8>);

impl Serialize for XattrValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for XattrValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text)
            .map(XattrValue)
            .map_err(serde::de::Error::custom)
    }
}

/// The kind of a layer entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Kind {
    /// A regular file whose contents are the blob `blob` of `size` bytes.
    File {
        blob: Digest,
        size: u64,
    },
    /// A directory; `opaque` hides lower layers' contents below it.
    Dir {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        opaque: bool,
    },
    Symlink {
        target: String,
    },
    /// Another name for the file at `target` (a path in the same layer).
    Hardlink {
        target: String,
    },
    CharDevice {
        rdev: u64,
    },
    BlockDevice {
        rdev: u64,
    },
    Fifo,
    Socket,
    /// The path was deleted.
    Whiteout,
}

#[cfg(test)]
impl Entry {
    /// A test entry: `kind` at `path`, mode 0644, root's, mtime 0, no xattrs.
    pub(crate) fn plain(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Default::default(),
        }
    }
}

impl Layer {
    /// The canonical JSON bytes that the layer digest is computed over.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("layers serialize")
    }

    /// Every blob the layer refers to.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        self.entries.iter().filter_map(|e| match &e.kind {
            Kind::File { blob, .. } => Some(blob),
            _ => None,
        })
    }
}
