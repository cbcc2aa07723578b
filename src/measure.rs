//! Measuring a file: its size, blake3 and SHA-256 in one read, the two
//! digests on two threads (SHA-256 of a 2 GiB image is the slow part, ~1.2 s
//! here), the holes of a sparse file hashed as zeros without reading them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};
use sha2::Digest as _;

use crate::digest::Digest;

/// A file's size and digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measured {
    pub bytes: u64,
    pub blake3: Digest,
    pub sha256: String,
}

/// How much is read (or hashed as a hole) at a time.
const CHUNK: usize = 4 << 20;

/// Measures the file at `path`.
pub fn measure(path: &Path) -> io::Result<Measured> {
    measure_file(&File::open(path)?, false)
}

/// Measures the file at `path`, which no one will read soon (a written
/// image, synced): its pages leave the page cache as they are read, so
/// that it does not push out what will be. Best effort.
pub fn measure_last_read(path: &Path) -> io::Result<Measured> {
    measure_file(&File::open(path)?, true)
}

/// The SHA-256 of the file at `path`, in hex (when that is all a caller
/// checks, as against an archive's index).
pub fn sha256_of(path: &Path) -> io::Result<String> {
    let mut hasher = sha2::Sha256::new();
    io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The data ranges of `file` (`SEEK_DATA`/`SEEK_HOLE`), in order; the
/// whole file where the file system cannot tell.
pub(crate) fn data_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    let seek = |at: u64, whence| lseek(file, at as i64, whence).map(|p| p as u64);
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match seek(at, Whence::SeekData) {
            Ok(start) => start,
            // No data from `at` on.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => return vec![(0, len)],
        };
        let end = seek(start, Whence::SeekHole).unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        ranges.push((start, end));
        at = end;
    }
    ranges
}

/// One piece of the file in order: read data, or a run of a hole.
struct Piece {
    bytes: Arc<Vec<u8>>,
    len: usize,
}

fn measure_file(file: &File, last_read: bool) -> io::Result<Measured> {
    let len = file.metadata()?.len();
    let ranges = data_ranges(file, len);
    let zeros = Arc::new(vec![0u8; CHUNK]);
    let (to_b3, b3_pieces) = sync_channel::<Arc<Piece>>(4);
    let (to_sha, sha_pieces) = sync_channel::<Arc<Piece>>(4);
    let (read, b3, sha) = std::thread::scope(|scope| {
        let b3 = scope.spawn(move || {
            let mut hasher = blake3::Hasher::new();
            for piece in b3_pieces {
                hasher.update(&piece.bytes[..piece.len]);
            }
            hasher.finalize()
        });
        let sha = scope.spawn(move || {
            let mut hasher = sha2::Sha256::new();
            for piece in sha_pieces {
                hasher.update(&piece.bytes[..piece.len]);
            }
            hasher.finalize()
        });
        let read = (|| -> io::Result<()> {
            let send = |piece: Piece| {
                let piece = Arc::new(piece);
                // A hasher thread only stops early by panicking.
                if to_b3.send(piece.clone()).is_err() || to_sha.send(piece).is_err() {
                    return Err(io::Error::other("a hashing thread stopped"));
                }
                Ok(())
            };
            let mut at = 0u64;
            let hole = |from: u64, to: u64| -> io::Result<()> {
                let mut left = to - from;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    send(Piece {
                        bytes: zeros.clone(),
                        len: n,
                    })?;
                    left -= n as u64;
                }
                Ok(())
            };
            for (start, end) in ranges.iter().copied().chain([(len, len)]) {
                hole(at, start)?;
                let mut offset = start;
                while offset < end {
                    let n = (end - offset).min(CHUNK as u64) as usize;
                    let mut bytes = vec![0u8; n];
                    file.read_exact_at(&mut bytes, offset)?;
                    if last_read {
                        let _ = posix_fadvise(
                            file,
                            offset as i64,
                            n as i64,
                            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                        );
                    }
                    send(Piece {
                        bytes: Arc::new(bytes),
                        len: n,
                    })?;
                    offset += n as u64;
                }
                at = end;
            }
            Ok(())
        })();
        drop((to_b3, to_sha));
        fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
            handle
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        }
        (read, join(b3), join(sha))
    });
    read?;
    Ok(Measured {
        bytes: len,
        blake3: Digest::from_hash(b3),
        sha256: hex::encode(sha),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(bytes: &[u8]) -> Measured {
        Measured {
            bytes: bytes.len() as u64,
            blake3: Digest::from_hash(blake3::hash(bytes)),
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
        }
    }

    /// How many of the file's pages are in the page cache (`mincore`).
    fn cached_pages(path: &Path) -> usize {
        use nix::libc;
        use std::os::fd::AsRawFd;
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: maps the open file read-only, asks which of its pages are
        // resident into a vector of one byte per page, and unmaps it; no
        // mapped byte is touched.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            let mut resident = vec![0u8; len.div_ceil(page)];
            assert_eq!(libc::mincore(at, len, resident.as_mut_ptr()), 0);
            libc::munmap(at, len);
            resident.iter().filter(|&&b| b & 1 == 1).count()
        }
    }

    /// A file measured as read for the last time leaves the page cache, with
    /// the same measure; a plain measure leaves it there.
    #[test]
    fn a_last_read_leaves_the_page_cache() {
        // On the repository's disk: a tmpfs would keep the pages anyway.
        let tmp = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = tmp.path().join("image");
        let bytes: Vec<u8> = (0..(CHUNK as u32) * 2 + 5000)
            .map(|i| (i % 253) as u8)
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        assert_eq!(measure(&path).unwrap(), plain(&bytes));
        let pages = cached_pages(&path);
        assert!(pages > 2000, "{pages} pages cached after a plain measure");
        assert_eq!(measure_last_read(&path).unwrap(), plain(&bytes));
        assert_eq!(cached_pages(&path), 0);
    }

    /// A sparse file (holes at the start, between data and at the end,
    /// data across chunk boundaries) measures as its bytes do.
    #[test]
    fn sparse_files_measure_as_their_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sparse");
        let file = File::create(&path).unwrap();
        let len = 3 * CHUNK as u64 + 12345;
        file.set_len(len).unwrap();
        let data: Vec<u8> = (0..CHUNK + 777).map(|i| (i % 251) as u8 + 1).collect();
        file.write_all_at(&data, 1 << 20).unwrap();
        file.write_all_at(b"tail", 2 * CHUNK as u64 + 4096 * 3)
            .unwrap();
        drop(file);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(measure(&path).unwrap(), plain(&bytes));

        let empty = tmp.path().join("empty");
        File::create(&empty).unwrap();
        assert_eq!(measure(&empty).unwrap(), plain(b""));
    }
}
