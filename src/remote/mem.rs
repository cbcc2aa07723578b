//! A remote in memory: the simplest backend there is, for tests (it runs
//! the same contract suite as the directory and the OCI registry) and as
//! the reference of what a backend must do.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;

use super::{BlobSink, Entry, Failure, Pushed, Remote};
use crate::digest::Digest;
use crate::store::Store;

/// Objects by name: action entries by step key, layer manifests and blobs
/// by digest.
#[derive(Default)]
pub struct MemRemote {
    actions: Mutex<HashMap<Digest, Vec<u8>>>,
    layers: Mutex<HashMap<Digest, Vec<u8>>>,
    blobs: Mutex<HashMap<Digest, Vec<u8>>>,
}

impl MemRemote {
    pub fn new() -> MemRemote {
        MemRemote::default()
    }
}

fn get(map: &Mutex<HashMap<Digest, Vec<u8>>>, name: &Digest) -> Option<Vec<u8>> {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned()
}

fn put(map: &Mutex<HashMap<Digest, Vec<u8>>>, name: Digest, bytes: Vec<u8>) {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name, bytes);
}

struct MemEntry<'a> {
    remote: &'a MemRemote,
    action: Vec<u8>,
}

impl Entry for MemEntry<'_> {
    fn action(&self) -> &[u8] {
        &self.action
    }

    fn layer(&self, digest: &Digest) -> Result<Option<Vec<u8>>, Failure> {
        Ok(get(&self.remote.layers, digest))
    }

    fn blobs(
        &self,
        _layer: &[(Digest, u64)],
        blobs: &[(Digest, u64)],
        store: &Store,
        each: &mut BlobSink<'_>,
    ) -> Result<(), Failure> {
        for (blob, size) in blobs {
            let found = match get(&self.remote.blobs, blob) {
                Some(bytes) => {
                    let mut incoming = super::incoming(store, *size)?;
                    incoming
                        .write_all(&bytes)
                        .map_err(|e| Failure::Rejected(format!("blob {}: {e}", blob.short())))?;
                    Some(incoming)
                }
                None => None,
            };
            each(blob, found)?;
        }
        Ok(())
    }
}

impl Remote for MemRemote {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn lookup(&self, key: &Digest) -> Result<Option<Box<dyn Entry + '_>>, Failure> {
        Ok(get(&self.actions, key).map(|action| {
            Box::new(MemEntry {
                remote: self,
                action,
            }) as Box<dyn Entry>
        }))
    }

    fn push(&self, key: &Digest, result: &Pushed<'_>) -> Result<(), String> {
        for blob in result.blobs {
            let bytes = result.store.read_blob(blob).map_err(|e| e.to_string())?;
            put(&self.blobs, *blob, bytes);
        }
        put(
            &self.layers,
            result.action.layer,
            result.layer_json.to_vec(),
        );
        put(&self.actions, *key, result.action_json.to_vec());
        Ok(())
    }
}
