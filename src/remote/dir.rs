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
//! Blobs are streamed to and from files, never held in memory, and every
//! transfer runs on a thread of its own that the build waits for only a
//! limited time ([`Worker`]): a hung mount makes the remote fail, not the
//! build hang.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstat, mkdirat, Mode, SFlag};

use super::{
    time_limit, BlobSink, Entry, Failure, IncomingBlob, Pushed, Remote, MAX_ACTION_BYTES,
    MAX_LAYER_BYTES,
};
use crate::blob_stream::BlobReader;
use crate::digest::Digest;
use crate::store::Store;

/// A shared directory with the local store's layout.
#[derive(Clone)]
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

    /// How to name an object in messages.
    fn describe_object(&self, kind: Object, name: &Digest) -> String {
        self.path(kind, name).display().to_string()
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

    /// Opens an object of at most `limit` bytes for reading; a missing one
    /// (or a remote nobody pushed to yet) is `None`. A symlink, a non-file or
    /// an oversized file is a rejected entry; any other error (an unreadable
    /// or dead mount) is the remote failing.
    fn open_object(
        &self,
        kind: Object,
        name: &Digest,
        limit: u64,
    ) -> Result<Option<(File, PathBuf)>, Failure> {
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
        Ok(Some((File::from(fd), path)))
    }

    /// Copies an object of at most `limit` bytes into `out`; `false` if it is
    /// missing. Read errors are the remote failing; bytes past `limit` (the
    /// file grew) or a write error reject the entry.
    fn get_into(
        &self,
        kind: Object,
        name: &Digest,
        limit: u64,
        out: &mut dyn Write,
    ) -> Result<bool, Failure> {
        let Some((file, path)) = self.open_object(kind, name, limit)? else {
            return Ok(false);
        };
        let mut file = file.take(limit + 1);
        // Most blobs are small: a buffer the size of the object, at most 256 KiB.
        let mut buf = vec![0u8; (limit + 1).min(256 << 10) as usize];
        let mut total = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| Failure::Unreachable(format!("{}: {e}", path.display())))?;
            if n == 0 {
                drop_from_page_cache(file.get_ref());
                return Ok(true);
            }
            total += n as u64;
            if total > limit {
                return Err(Failure::Rejected(format!(
                    "{}: grew past {limit} bytes",
                    path.display()
                )));
            }
            out.write_all(&buf[..n])
                .map_err(|e| Failure::Rejected(format!("{}: {e}", path.display())))?;
        }
    }

    /// Reads an object of at most `limit` bytes into memory (manifests and entries).
    fn get(&self, kind: Object, name: &Digest, limit: u64) -> Result<Option<Vec<u8>>, Failure> {
        let mut bytes = Vec::new();
        Ok(self
            .get_into(kind, name, limit, &mut bytes)?
            .then_some(bytes))
    }

    /// Writes an object from `source` under a name no other writer (process
    /// or machine) uses, then renames it into place.
    fn put(&self, kind: Object, name: &Digest, source: &mut dyn Read) -> Result<(), String> {
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
        if let Err(e) = std::io::copy(source, &mut File::from(fd)) {
            let _ = nix::unistd::unlinkat(
                &tmp_dir,
                tmp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            return Err(format!("{}/tmp/{tmp}: {e}", self.root.display()));
        }
        renameat(&tmp_dir, tmp.as_str(), &dest_dir, file.as_str())
            .map_err(|e| at(&format!("{}/{file}", parts.join("/")), e))
    }

    /// Pushes a blob the directory lacks, read from the local store's file
    /// `local` and checked against its digest as it is copied.
    fn put_blob(&self, blob: &Digest, local: &Path) -> Result<(), String> {
        if self.path(Object::Blob, blob).exists() {
            return Ok(());
        }
        let mut reader = BlobReader::open(local.to_path_buf(), *blob)
            .map_err(|e| format!("{}: {e}", local.display()))?;
        self.put(Object::Blob, blob, &mut reader)
    }
}

/// Runs a directory remote's file work on a thread of its own, so that the
/// build waits at most a time limit for each job: a hung mount (an NFS
/// server that stopped answering) blocks that thread, never the build. A
/// thread that overran is abandoned; the remote is then dropped for the
/// build, as any failing remote is.
struct Worker {
    jobs: mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl Worker {
    fn start() -> Worker {
        let (jobs, queue) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::spawn(move || {
            for job in queue {
                job();
            }
        });
        Worker { jobs }
    }

    /// Runs `job`, waiting for it at most `limit`.
    fn run<T: Send + 'static>(
        &self,
        limit: Duration,
        what: &str,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Failure> {
        let (done, result) = mpsc::sync_channel(1);
        let gone = || Failure::Unreachable(format!("{what}: the remote's file thread stopped"));
        self.jobs
            .send(Box::new(move || {
                let _ = done.send(job());
            }))
            .map_err(|_| gone())?;
        match result.recv_timeout(limit) {
            Ok(value) => Ok(value),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Failure::Unreachable(format!(
                "{what}: no answer within {} s (a hung mount?)",
                limit.as_secs_f64()
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

/// Tells the kernel an object read whole will not be read again soon, so
/// that its pages go first when memory is needed: a pull reads a gigabyte
/// that then sits in the page cache twice, as the remote's file and as the
/// store's blob. Best effort.
fn drop_from_page_cache(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a file descriptor `file` keeps open; it
    // reads and writes no memory of this process.
    unsafe {
        nix::libc::posix_fadvise(file.as_raw_fd(), 0, 0, nix::libc::POSIX_FADV_DONTNEED);
    }
}

/// How many blobs an entry reads at once.
const BLOB_READERS: usize = 4;

/// An entry found in a directory: its objects are read on demand.
struct DirEntry<'a> {
    remote: &'a DirRemote,
    action: Vec<u8>,
}

impl DirEntry<'_> {
    /// Reads one blob into the store's incoming area on `worker`; `None`
    /// when the directory does not have it.
    fn read_blob(
        &self,
        worker: &Worker,
        store: &Store,
        blob: Digest,
        size: u64,
    ) -> Result<Option<IncomingBlob>, Failure> {
        let mut incoming = super::incoming(store, size)?;
        let remote = self.remote.clone();
        worker.run(
            time_limit(size),
            &self.remote.describe_object(Object::Blob, &blob),
            move || {
                remote
                    .get_into(Object::Blob, &blob, size, &mut incoming)
                    .map(|found| found.then_some(incoming))
            },
        )?
    }
}

impl Entry for DirEntry<'_> {
    fn action(&self) -> &[u8] {
        &self.action
    }

    fn layer(&self, digest: &Digest) -> Result<Option<Vec<u8>>, Failure> {
        let (remote, digest) = (self.remote.clone(), *digest);
        Worker::start().run(
            time_limit(MAX_LAYER_BYTES),
            &self.remote.describe_object(Object::Layer, &digest),
            move || remote.get(Object::Layer, &digest, MAX_LAYER_BYTES),
        )?
    }

    /// Reads [`BLOB_READERS`] blobs at a time, each on its own [`Worker`]
    /// with its own time limit (a step has thousands of small files; one at
    /// a time, their opens, copies and seals add up); `each` is given them
    /// as they come, on this thread. The first failure stops the readers
    /// (their channel closes).
    fn blobs(
        &self,
        _layer: &[(Digest, u64)],
        blobs: &[(Digest, u64)],
        store: &Store,
        each: &mut BlobSink<'_>,
    ) -> Result<(), Failure> {
        let next = AtomicUsize::new(0);
        let (read, received) = mpsc::sync_channel(2 * BLOB_READERS);
        std::thread::scope(|scope| {
            for _ in 0..BLOB_READERS.min(blobs.len()) {
                let read = read.clone();
                let next = &next;
                scope.spawn(move || {
                    let worker = Worker::start();
                    while let Some(&(blob, size)) = blobs.get(next.fetch_add(1, Ordering::Relaxed))
                    {
                        let found = self.read_blob(&worker, store, blob, size);
                        // The receiver is gone once a failure stopped the read.
                        if read.send(found.map(|found| (blob, found))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(read);
            // Returning drops `received`, which closes the channel.
            received
                .into_iter()
                .try_for_each(|found| found.and_then(|(blob, found)| each(&blob, found)))
        })
    }
}

impl Remote for DirRemote {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn lookup(&self, key: &Digest) -> Result<Option<Box<dyn Entry + '_>>, Failure> {
        let (remote, key) = (self.clone(), *key);
        let action = Worker::start().run(
            time_limit(MAX_ACTION_BYTES),
            &self.describe_object(Object::Action, &key),
            move || remote.get(Object::Action, &key, MAX_ACTION_BYTES),
        )??;
        Ok(action.map(|action| {
            Box::new(DirEntry {
                remote: self,
                action,
            }) as Box<dyn Entry>
        }))
    }

    /// The blobs the directory lacks, the layer manifest, and the entry
    /// last; each object is one job with its own time limit.
    fn push(&self, key: &Digest, result: &Pushed<'_>) -> Result<(), String> {
        // A new shared directory is created on first push.
        std::fs::create_dir_all(&self.root).map_err(|e| format!("{}: {e}", self.root.display()))?;
        let worker = Worker::start();
        let run =
            |what: String, bytes: u64, job: Box<dyn FnOnce() -> Result<(), String> + Send>| {
                match worker.run(time_limit(bytes), &what, job) {
                    Ok(result) => result,
                    Err(Failure::Unreachable(e) | Failure::Rejected(e)) => Err(e),
                }
            };
        for blob in result.blobs {
            let (remote, blob, local) = (self.clone(), *blob, result.store.blob_path(blob));
            let bytes = local.metadata().map(|m| m.len()).unwrap_or(0);
            run(
                self.describe_object(Object::Blob, &blob),
                bytes,
                Box::new(move || remote.put_blob(&blob, &local)),
            )?;
        }
        for (kind, name, bytes) in [
            (
                Object::Layer,
                result.action.layer,
                result.layer_json.to_vec(),
            ),
            (Object::Action, *key, result.action_json.to_vec()),
        ] {
            let remote = self.clone();
            run(
                self.describe_object(kind, &name),
                bytes.len() as u64,
                Box::new(move || remote.put(kind, &name, &mut &bytes[..])),
            )?;
        }
        Ok(())
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
        r.put(Object::Blob, &d, &mut &b"x"[..]).unwrap();
        r.put(Object::Action, &d, &mut &b"{}"[..]).unwrap();
        assert_eq!(
            r.get(Object::Blob, &d, 1).unwrap().as_deref(),
            Some(&b"x"[..])
        );
        let entry = r.lookup(&d).unwrap().unwrap();
        assert_eq!(entry.action(), b"{}");
        assert_eq!(entry.layer(&d).unwrap(), None);
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();
        let mut seen = Vec::new();
        entry
            .blobs(
                &[],
                &[(d, 1), (Digest::of(b"y"), 1)],
                &store,
                &mut |name, blob| {
                    seen.push((*name, blob.map(|b| b.digest())));
                    Ok(())
                },
            )
            .unwrap();
        // Handed over in any order (several are read at once).
        seen.sort();
        let mut expected = [(d, Some(d)), (Digest::of(b"y"), None)];
        expected.sort();
        assert_eq!(seen, expected);
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
        r.put(Object::Blob, &d, &mut &b"x"[..]).unwrap();
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
        assert!(r.put(Object::Layer, &d, &mut &b"{}"[..]).is_err());
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    }

    #[test]
    fn a_job_that_never_answers_fails_within_its_time_limit() {
        let worker = Worker::start();
        let started = std::time::Instant::now();
        // A read from a dead NFS server blocks like this sleep does.
        let hung = worker.run(Duration::from_millis(200), "blobs/ab/abcd", || {
            std::thread::sleep(Duration::from_secs(30))
        });
        let Err(Failure::Unreachable(message)) = hung else {
            panic!("a hung job must fail the remote, got {hung:?}");
        };
        assert!(message.contains("no answer within 0.2 s"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // A job that answers in time gives its result.
        let worker = Worker::start();
        assert_eq!(worker.run(Duration::from_secs(5), "x", || 7).unwrap(), 7);
    }
}
