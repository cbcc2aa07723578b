//! Packs: a step's small file blobs travel through a registry many to one
//! registry blob, so that pushing or pulling a step costs a few requests,
//! not one per file.
//!
//! [`Plan::of`] decides, from the blobs a signed layer names (with the sizes
//! it gives them), which go in which pack: the empty blob goes nowhere (every
//! reader knows it); a blob of fewer than [`SMALL`] bytes is packed, and so
//! is every blob when more than [`MAX_SINGLES`] would be left on their own
//! (a manifest holds only so many layers); the packed ones, sorted by
//! blake3, each once, are cut in that order into packs of at most
//! [`PACK_MAX`] bytes (a bigger blob makes a pack of its own). A pack is its
//! blobs' bytes one after the other, nothing between them:
//! ```text
//! pack = blob₁ ‖ blob₂ ‖ … ‖ blobₙ      sorted by blake3, none empty
//! ```
//! A reader who has the signed layer so knows each pack's contents, order
//! and size without believing anything the registry says.
//! [`Packer`] reads a pack out of the local store (to upload it);
//! [`Splitter`] cuts one being downloaded back into blobs, keeping only
//! those wanted.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use crate::blob_stream::{BlobReader, IncomingBlob};
use crate::digest::Digest;
use crate::remote::{BlobSink, Failure};
use crate::store::Store;

/// Blobs smaller than this are packed. The agent image's 28k files are 98%
/// below 64 KiB; at 1 MiB, 99.6% of them (a third of the bytes) are packed,
/// and the rest, one request each, are big enough that the request is not
/// what they cost.
pub const SMALL: u64 = 1 << 20;
/// The most bytes a pack of several blobs holds.
pub const PACK_MAX: u64 = 256 << 20;
/// The most blobs left on their own in one step; past it, all are packed.
pub const MAX_SINGLES: usize = 3000;

/// A blob and the size the signed layer gives it.
pub type Blob = (Digest, u64);

/// Where a step's blobs go in a registry.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// The packs, in order, each its blobs in order.
    pub packs: Vec<Vec<Blob>>,
    /// The blobs that are a registry blob each, sorted.
    pub singles: Vec<Blob>,
}

impl Plan {
    /// The plan for a layer's blobs (given sorted, each once).
    pub fn of(blobs: &[Blob]) -> Plan {
        Plan::with(blobs, SMALL, PACK_MAX, MAX_SINGLES)
    }

    fn with(blobs: &[Blob], small: u64, pack_max: u64, max_singles: usize) -> Plan {
        let mut blobs: Vec<Blob> = blobs.iter().copied().filter(|(_, s)| *s > 0).collect();
        blobs.sort();
        blobs.dedup();
        let (mut packed, mut singles): (Vec<Blob>, Vec<Blob>) =
            blobs.into_iter().partition(|(_, size)| *size < small);
        if singles.len() > max_singles {
            packed.append(&mut singles);
            packed.sort();
        }
        let mut packs: Vec<Vec<Blob>> = Vec::new();
        let mut filled = 0;
        for blob in packed {
            match packs.last_mut() {
                Some(pack) if filled + blob.1 <= pack_max => {
                    pack.push(blob);
                    filled += blob.1;
                }
                _ => {
                    packs.push(vec![blob]);
                    filled = blob.1;
                }
            }
        }
        Plan { packs, singles }
    }
}

/// A pack's size: its blobs'.
pub fn size(pack: &[Blob]) -> u64 {
    pack.iter().map(|(_, size)| size).sum()
}

/// Reads a pack out of the local store, checking each blob against its
/// name and its size as it goes (a damaged blob fails the read).
pub struct Packer {
    /// The blobs still to open, last first.
    ahead: Vec<(PathBuf, Blob)>,
    /// The blob being read and how many of its bytes are still to come.
    current: Option<(BlobReader, Blob, u64)>,
}

impl Packer {
    pub fn new(store: &Store, pack: &[Blob]) -> Packer {
        Packer {
            ahead: pack
                .iter()
                .rev()
                .map(|blob| (store.blob_path(&blob.0), *blob))
                .collect(),
            current: None,
        }
    }
}

impl Read for Packer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some((reader, (digest, size), left)) = &mut self.current else {
                let Some((path, blob)) = self.ahead.pop() else {
                    return Ok(0);
                };
                self.current = Some((BlobReader::open(path, blob.0)?, blob, blob.1));
                continue;
            };
            let n = reader.read(buf)?;
            if n as u64 > *left || (n == 0 && *left > 0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "blob {} is not the {size} bytes its layer says",
                        digest.short()
                    ),
                ));
            }
            if n == 0 {
                self.current = None;
                continue;
            }
            *left -= n as u64;
            return Ok(n);
        }
    }
}

/// Cuts a pack being downloaded into its blobs: each wanted one goes into a
/// file of the store, sized by the signed layer, and is handed on as soon as
/// it is whole; the others' bytes are dropped. Refuses bytes past the pack's
/// end.
pub struct Splitter<'a, 's> {
    pack: &'a [Blob],
    wanted: &'a HashSet<Digest>,
    store: &'a Store,
    each: &'a mut BlobSink<'s>,
    /// The blob the next byte belongs to, and how many of its bytes came.
    at: usize,
    came: u64,
    current: Option<IncomingBlob>,
    /// The blobs handed on (a download tried again does not hand them twice).
    handed: HashSet<Digest>,
    /// Why a write was refused.
    refused: Option<String>,
}

impl<'a, 's> Splitter<'a, 's> {
    pub fn new(
        pack: &'a [Blob],
        wanted: &'a HashSet<Digest>,
        store: &'a Store,
        each: &'a mut BlobSink<'s>,
    ) -> Splitter<'a, 's> {
        Splitter {
            pack,
            wanted,
            store,
            each,
            at: 0,
            came: 0,
            current: None,
            handed: HashSet::new(),
            refused: None,
        }
    }

    /// Empties it, for a download that starts over.
    pub fn restart(&mut self) {
        (self.at, self.came, self.current, self.refused) = (0, 0, None, None);
    }

    /// Why it refused a write, when it did.
    pub fn refused(&self) -> Option<String> {
        self.refused.clone()
    }

    /// After the download: the blobs it handed on; why not, if the pack
    /// ended early.
    pub fn finish(self) -> Result<HashSet<Digest>, String> {
        if self.at < self.pack.len() {
            let missing = size(&self.pack[self.at..]) - self.came;
            return Err(format!(
                "{missing} bytes short of what its blobs have in the signed layer (tampered)"
            ));
        }
        Ok(self.handed)
    }

    fn refuse(&mut self, why: String) -> io::Error {
        let error = io::Error::other(why.clone());
        self.refused = Some(why);
        error
    }
}

impl Write for Splitter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let Some(&(digest, size)) = self.pack.get(self.at) else {
                let why = format!(
                    "more than the {} bytes the signed layer gives the pack (tampered)",
                    size(self.pack)
                );
                return Err(self.refuse(why));
            };
            let n = (size - self.came).min(rest.len() as u64) as usize;
            if self.wanted.contains(&digest) && !self.handed.contains(&digest) {
                if self.current.is_none() {
                    let incoming = self.store.incoming_blob(size);
                    match incoming {
                        Ok(blob) => self.current = Some(blob),
                        Err(e) => return Err(self.refuse(format!("cannot store it: {e}"))),
                    }
                }
                if let Some(blob) = &mut self.current {
                    if let Err(e) = blob.write_all(&rest[..n]) {
                        return Err(self.refuse(format!("cannot store it: {e}")));
                    }
                }
            }
            self.came += n as u64;
            rest = &rest[n..];
            if self.came == size {
                if let Some(blob) = self.current.take() {
                    self.handed.insert(digest);
                    if let Err(Failure::Rejected(e) | Failure::Unreachable(e)) =
                        (self.each)(&digest, Some(blob))
                    {
                        return Err(self.refuse(e));
                    }
                }
                (self.at, self.came) = (self.at + 1, 0);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(name: &str, size: u64) -> Blob {
        (Digest::of(name.as_bytes()), size)
    }

    #[test]
    fn plans_pack_small_blobs_sorted_and_cut_at_the_pack_size() {
        let (a, b, c, big, empty) = (
            blob("a", 40),
            blob("b", 70),
            blob("c", 50),
            blob("big", 100),
            blob("", 0),
        );
        let mut sorted = vec![a, b, c];
        sorted.sort();
        // Small ones packed (the empty one nowhere), big ones alone; the
        // order given does not matter, duplicates count once.
        let plan = Plan::with(&[big, c, a, empty, b, a], 100, 1000, 10);
        assert_eq!(plan.packs, [sorted.clone()]);
        assert_eq!(plan.singles, [big]);
        // Cut in order when the next would not fit; a blob bigger than a
        // pack is a pack of its own.
        let plan = Plan::with(&[a, b, c, big], 1000, 110, 10);
        let mut all = vec![a, b, c, big];
        all.sort();
        let mut expected: Vec<Vec<Blob>> = Vec::new();
        for blob in all {
            match expected.last_mut() {
                Some(pack) if size(pack) + blob.1 <= 110 => pack.push(blob),
                _ => expected.push(vec![blob]),
            }
        }
        assert_eq!(plan.packs, expected);
        assert!(plan.packs.iter().flatten().count() == 4 && plan.singles.is_empty());
        // Too many singles: everything is packed.
        let plan = Plan::with(&[a, b, c, big], 45, 1000, 2);
        assert_eq!(plan.packs.concat().len(), 4);
        assert!(plan.singles.is_empty());
        assert_eq!(Plan::with(&[empty], 100, 1000, 10).packs.len(), 0);
    }

    /// A store holding `contents`; the pack of them all, in plan order.
    fn packed(dir: &std::path::Path, contents: &[&[u8]]) -> (Store, Vec<Blob>) {
        let store = Store::open(dir).unwrap();
        let mut blobs: Vec<Blob> = contents
            .iter()
            .map(|c| (store.put_blob_bytes(c).unwrap(), c.len() as u64))
            .collect();
        blobs.sort();
        let plan = Plan::of(&blobs);
        (store, plan.packs.concat())
    }

    #[test]
    fn packers_read_blobs_in_order_and_splitters_cut_them_back() {
        let tmp = tempfile::tempdir().unwrap();
        let contents: [&[u8]; 3] = [b"one", b"second blob", b"3"];
        let (store, pack) = packed(&tmp.path().join("a"), &contents);
        let mut bytes = Vec::new();
        Packer::new(&store, &pack).read_to_end(&mut bytes).unwrap();
        let expected: Vec<u8> = pack
            .iter()
            .flat_map(|(d, _)| store.read_blob(d).unwrap())
            .collect();
        assert_eq!(bytes, expected);

        // Split in chunks of every size: the wanted blobs come out whole,
        // the other is skipped.
        let wanted: HashSet<Digest> = [pack[0].0, pack[2].0].into();
        for chunk in 1..=bytes.len() {
            let target = Store::open(&tmp.path().join(format!("b{chunk}"))).unwrap();
            let mut got = Vec::new();
            let mut each = |d: &Digest, b: Option<IncomingBlob>| {
                got.push((*d, b.map(|b| b.digest())));
                Ok(())
            };
            let mut splitter = Splitter::new(&pack, &wanted, &target, &mut each);
            for piece in bytes.chunks(chunk) {
                splitter.write_all(piece).unwrap();
            }
            assert_eq!(splitter.finish().unwrap(), wanted);
            assert_eq!(
                got,
                [(pack[0].0, Some(pack[0].0)), (pack[2].0, Some(pack[2].0))]
            );
        }

        // Tried again after a first half: nothing handed twice.
        let mut count = 0;
        let mut each = |_: &Digest, _: Option<IncomingBlob>| {
            count += 1;
            Ok(())
        };
        let mut splitter = Splitter::new(&pack, &wanted, &store, &mut each);
        splitter.write_all(&bytes[..bytes.len() - 1]).unwrap();
        splitter.restart();
        splitter.write_all(&bytes).unwrap();
        assert_eq!(splitter.finish().unwrap().len(), 2);
        assert_eq!(count, 2);
    }

    #[test]
    fn splitters_refuse_a_pack_too_long_or_too_short() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, pack) = packed(tmp.path(), &[b"abc", b"defgh"]);
        let bytes: Vec<u8> = pack
            .iter()
            .flat_map(|(d, _)| store.read_blob(d).unwrap())
            .collect();
        let wanted: HashSet<Digest> = pack.iter().map(|(d, _)| *d).collect();
        let mut each = |_: &Digest, _: Option<IncomingBlob>| Ok(());
        let mut splitter = Splitter::new(&pack, &wanted, &store, &mut each);
        splitter.write_all(&bytes).unwrap();
        assert!(splitter.write_all(b"x").is_err());
        assert!(splitter.refused().unwrap().contains("(tampered)"));

        let mut splitter = Splitter::new(&pack, &wanted, &store, &mut each);
        splitter.write_all(&bytes[..bytes.len() - 2]).unwrap();
        let e = splitter.finish().unwrap_err();
        assert!(e.contains("2 bytes short"), "{e}");
        // The half blob it held is gone: the store's tmp/ holds only the
        // session's lock.
        for session in std::fs::read_dir(tmp.path().join("tmp")).unwrap() {
            let names: Vec<_> = std::fs::read_dir(session.unwrap().path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, [".lock"]);
        }
    }

    #[test]
    fn packers_fail_on_a_damaged_blob() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, pack) = packed(tmp.path(), &[b"abc", b"defgh"]);
        // The layer says another size.
        let wrong: Vec<Blob> = pack.iter().map(|(d, s)| (*d, s + 1)).collect();
        let err = Packer::new(&store, &wrong)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("bytes its layer says"), "{err}");
        // The contents are not what the name says.
        std::fs::write(store.blob_path(&pack[0].0), b"xyz").unwrap();
        let err = Packer::new(&store, &pack)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
