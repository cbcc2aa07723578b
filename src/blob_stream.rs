//! Blobs as streams, so that a remote's blob never has to fit in memory:
//! [`IncomingBlob`] receives a download into the store's `tmp/`, hashing it
//! as it arrives and refusing bytes past the size it may have;
//! [`BlobReader`] reads a stored blob and checks its digest at the end.
//! [`crate::store::Store`] hands both out and publishes incoming blobs.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::path::PathBuf;

use crate::digest::Digest;

/// A blob being downloaded: a file in the store's `tmp/`, removed unless
/// [`crate::store::Store::stage_incoming`] keeps it for publishing.
pub struct IncomingBlob {
    file: File,
    path: PathBuf,
    hasher: blake3::Hasher,
    written: u64,
    max: u64,
    overflowed: bool,
}

impl IncomingBlob {
    /// Creates the file at `path` (which must not exist); at most `max`
    /// bytes may be written to it.
    pub fn create(path: PathBuf, max: u64) -> io::Result<IncomingBlob> {
        let file = File::options().write(true).create_new(true).open(&path)?;
        Ok(IncomingBlob {
            file,
            path,
            hasher: blake3::Hasher::new(),
            written: 0,
            max,
            overflowed: false,
        })
    }

    /// Empties it, for a download that starts over.
    pub fn restart(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.hasher.reset();
        self.written = 0;
        self.overflowed = false;
        Ok(())
    }

    /// Whether a write was refused for going past the size it may have.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The digest of what was written so far.
    pub fn digest(&self) -> Digest {
        Digest::from_hash(self.hasher.finalize())
    }

    /// How many bytes were written.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// The file, for sealing before it is published.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Its path, which from now on is the caller's: dropping no longer removes it.
    pub(crate) fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.path)
    }
}

impl Write for IncomingBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.max {
            self.overflowed = true;
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "more than the {} bytes the signed layer gives the blob",
                    self.max
                ),
            ));
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for IncomingBlob {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Reads a stored blob, checking it against its digest: the read that
/// reaches the end fails with `InvalidData`, and removes the blob, when the
/// contents are not what the name says.
pub struct BlobReader {
    file: File,
    path: PathBuf,
    expected: Digest,
    hasher: blake3::Hasher,
    len: u64,
}

impl BlobReader {
    /// Opens the blob named `expected` at `path`.
    pub fn open(path: PathBuf, expected: Digest) -> io::Result<BlobReader> {
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        Ok(BlobReader {
            file,
            path,
            expected,
            hasher: blake3::Hasher::new(),
            len,
        })
    }

    /// Its size when opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        if n > 0 || buf.is_empty() {
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        if Digest::from_hash(self.hasher.finalize()) != self.expected {
            let _ = fs::remove_file(&self.path);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: content does not match its digest; removed it, \
                     run the build again to make it anew",
                    self.path.display()
                ),
            ));
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_blobs_hash_as_they_go_and_stop_at_their_size() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("in");
        let mut blob = IncomingBlob::create(path.clone(), 5).unwrap();
        blob.write_all(b"abc").unwrap();
        let err = blob.write_all(b"def").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        blob.restart().unwrap();
        blob.write_all(b"hello").unwrap();
        assert_eq!((blob.digest(), blob.len()), (Digest::of(b"hello"), 5));
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        // Dropped unpublished: the file goes.
        drop(blob);
        assert!(!path.exists());
        // Published: the file stays.
        let blob = IncomingBlob::create(path.clone(), 5).unwrap();
        let kept = blob.keep();
        assert!(kept.exists());
    }

    #[test]
    fn blob_readers_fail_at_the_end_of_a_damaged_blob_and_remove_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("b");
        fs::write(&path, b"right").unwrap();
        let mut out = Vec::new();
        BlobReader::open(path.clone(), Digest::of(b"right"))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"right");
        let err = BlobReader::open(path.clone(), Digest::of(b"wrong"))
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(!path.exists());
    }
}
