//! Writes a directory tree as a reproducible ext4 image with e2fsprogs.
//!
//! `mkfs.ext4` formats the empty filesystem: the UUID and directory hash
//! seed are fixed (derived from the recipe), `E2FSPROGS_FAKE_TIME` pins every
//! time mke2fs records, and it runs with kiln's own profile
//! ([`MKE2FS_PROFILE`]) and no environment but `PATH`, so the host's
//! `/etc/mke2fs.conf` and the variables kiln was started with do not change
//! the image. Then [`populate`] copies the tree in through libext2fs, as
//! `mkfs.ext4 -d` would but about twice as fast, setting every inode's
//! atime and ctime to its (already normalized) mtime, and [`superblocks`]
//! pins the two superblock fields that record how the image was written.
//! The e2fsprogs version can still change the bytes, so it is part of the
//! output key ([`writer_version`]). Then `e2fsck -fn` must find the image
//! clean. Last, the image is measured (size, blake3, SHA-256; see
//! [`crate::measure`]).
//!
//! The image is written next to its final place, not first in memory: at
//! the end of a cold build the page cache is full, and a 2 GiB image on a
//! tmpfs then costs more in reclaimed memory and a copy than the disk write
//! (bench/results-2026-12-04.md, the assembly rows).

pub mod data_blocks;
mod libext2fs;
mod populate;
mod superblocks;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::io_at::{io_at, IoAt};
use crate::measure::{self, Measured};

// Little-endian fields of on-disk structures (superblocks, inodes).
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Errors while writing the image.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error(transparent)]
    Io(#[from] IoAt),
    #[error("`{tool}` failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("writing the image with libext2fs: {0}")]
    Ext2(#[from] libext2fs::Ext2Error),
}

/// How the image is laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ext4Options {
    /// Image size in bytes.
    pub size: u64,
    /// Filesystem label (at most 16 bytes).
    pub label: String,
    /// Filesystem UUID.
    pub uuid: String,
    /// Directory hash seed (a UUID).
    pub hash_seed: String,
    /// The time recorded for the filesystem itself and the root directory.
    pub epoch: i64,
}

/// Formats a UUID from the first 16 bytes of a digest (version 4 layout bits set).
pub fn uuid_from(bytes: &[u8; 32]) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&bytes[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The mke2fs profile every image is written with (`MKE2FS_CONFIG`), so
/// that the host's `/etc/mke2fs.conf` does not choose the image's features,
/// block size or inode size: Debian 12's settings, with the size classes
/// mke2fs picks by the image's size (`small` below 512 MiB, `floppy` below
/// 3 MiB, `big` from 4 TiB, `huge` from 16 TiB).
const MKE2FS_PROFILE: &str = "\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
\tsmall = {
\t\tblocksize = 1024
\t\tinode_ratio = 4096
\t}
\tfloppy = {
\t\tblocksize = 1024
\t\tinode_ratio = 8192
\t}
\tbig = {
\t\tinode_ratio = 32768
\t}
\thuge = {
\t\tinode_ratio = 65536
\t}
";

/// The block size [`MKE2FS_PROFILE`] gives an image of `size` bytes (the
/// `small` and `floppy` classes below 512 MiB take 1 KiB blocks).
pub fn block_size(size: u64) -> u64 {
    if size < 512 << 20 {
        1024
    } else {
        4096
    }
}

/// An e2fsprogs `program` with only the environment kiln gives it: e2fsprogs
/// takes settings from its environment (`MKE2FS_CONFIG`,
/// `MKE2FS_DEVICE_SECTSIZE`, `E2FSCK_CONFIG`, `SOURCE_DATE_EPOCH` from
/// 1.47.1 on, …), and an image must not depend on how kiln was started.
fn e2fsprogs(program: &str) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut cmd = Command::new(program);
    cmd.env_clear().env("PATH", path).env("LC_ALL", "C");
    cmd
}

/// What writes images: the mkfs that formats them, as it says it, and the
/// libext2fs that fills them (`mke2fs 1.47.0 (5-Feb-2023), libext2fs
/// 1.47.0`). Two versions may write different bytes from one tree, so this
/// goes into the output key and the manifest.
pub fn writer_version() -> Result<String, Ext4Error> {
    let said = run_tool(e2fsprogs("mkfs.ext4").arg("-V"), "mkfs.ext4 -V")?;
    let mkfs = said
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("mke2fs "))
        .ok_or_else(|| Ext4Error::Tool {
            tool: "mkfs.ext4 -V".into(),
            detail: format!("no version in what it said: {}", said.trim()),
        })?;
    Ok(format!(
        "{mkfs}, libext2fs {}",
        libext2fs::library_version()?
    ))
}

fn run_tool(cmd: &mut Command, tool: &str) -> Result<String, Ext4Error> {
    let out = cmd.output().map_err(|e| Ext4Error::Tool {
        tool: tool.into(),
        detail: format!("{e}; install e2fsprogs (`apt-get install e2fsprogs`)"),
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(Ext4Error::Tool {
            tool: tool.into(),
            detail: text.trim().to_string(),
        })
    }
}

/// Writes `tree` to `image` at `options.size` and measures it. The image
/// appears only when complete, checked and synced; on failure nothing is
/// left (the image is written beside it as `NAME.ext4.partial` first).
/// `to_read`: which files are read to find their blocks of zeros, if not
/// all ([`populate::copy_tree`]). `phase` is told how long each part took.
pub fn write_image(
    tree: &Path,
    image: &Path,
    options: &Ext4Options,
    to_read: Option<&data_blocks::ToRead>,
    phase: &mut dyn FnMut(&'static str, std::time::Duration),
) -> Result<Measured, Ext4Error> {
    let partial = image.with_extension("ext4.partial");
    let written = write_partial(tree, &partial, options, to_read, phase).and_then(|measured| {
        std::fs::rename(&partial, image).map_err(io_at(image))?;
        Ok(measured)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Until `finished` is dropped, starts the disk writing what has been
/// written to `file` every 50 ms, without waiting for it
/// (`sync_file_range`): the image is synced only at its end, and the kernel
/// would otherwise hold most of the 1 GiB back until then, so that the disk
/// then has it all still to write. Best effort: a failure only leaves the
/// work to the final sync.
fn write_back_until(file: &File, finished: std::sync::mpsc::Receiver<()>) {
    use std::os::fd::AsRawFd;
    use std::sync::mpsc::RecvTimeoutError;
    let every = std::time::Duration::from_millis(50);
    while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(every) {
        // SAFETY: a plain system call on a file descriptor `file` keeps
        // open; it reads and writes no memory of this process.
        unsafe {
            nix::libc::sync_file_range(file.as_raw_fd(), 0, 0, nix::libc::SYNC_FILE_RANGE_WRITE);
        }
    }
}

/// Writes, checks, syncs and measures the image at `partial`.
fn write_partial(
    tree: &Path,
    partial: &Path,
    options: &Ext4Options,
    to_read: Option<&data_blocks::ToRead>,
    phase: &mut dyn FnMut(&'static str, std::time::Duration),
) -> Result<Measured, Ext4Error> {
    let mut started = std::time::Instant::now();
    let mut lap = |name: &'static str| {
        phase(name, started.elapsed());
        started = std::time::Instant::now();
    };
    let file = File::create(partial).map_err(io_at(partial))?;
    file.set_len(options.size).map_err(io_at(partial))?;
    let fake_time = options.epoch.to_string();
    let mut profile = tempfile::Builder::new()
        .prefix("kiln-mke2fs-")
        .suffix(".conf")
        .tempfile()
        .map_err(io_at(&std::env::temp_dir()))?;
    profile
        .write_all(MKE2FS_PROFILE.as_bytes())
        .map_err(io_at(profile.path()))?;
    let (written, finished) = std::sync::mpsc::channel();
    let made = std::thread::scope(|scope| {
        scope.spawn(|| write_back_until(&file, finished));
        let made = run_tool(
            e2fsprogs("mkfs.ext4")
                .env("MKE2FS_CONFIG", profile.path())
                .env("E2FSPROGS_FAKE_TIME", &fake_time)
                .args([
                    "-q",
                    "-F",
                    "-t",
                    "ext4",
                    "-L",
                    &options.label,
                    "-U",
                    &options.uuid,
                ])
                .arg("-E")
                .arg(format!(
                    "hash_seed={},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                    options.hash_seed
                ))
                .arg(partial),
            "mkfs.ext4",
        )
        .and_then(|_| populate::copy_tree(tree, partial, options.epoch, to_read));
        drop(written);
        made
    });
    made?;
    lap("write");

    superblocks::pin_superblocks(partial, options.epoch).map_err(io_at(partial))?;
    file.sync_all().map_err(io_at(partial))?;
    lap("sync");
    run_tool(
        e2fsprogs("e2fsck")
            .env("E2FSCK_CONFIG", "/dev/null")
            .arg("-fn")
            .arg(partial),
        "e2fsck -fn",
    )?;
    lap("fsck");
    // Read for the last time: the image's pages (1.3 GB of the agent
    // image) leave the page cache as they are hashed, rather than push out
    // what the next build reads, the layers' trees.
    let measured = measure::measure_last_read(partial).map_err(io_at(partial))?;
    lap("digests");
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt;

    /// Settings for a test image of `size` bytes.
    fn test_options(size: u64) -> Ext4Options {
        Ext4Options {
            size,
            label: "test".into(),
            uuid: uuid_from(&[1; 32]),
            hash_seed: uuid_from(&[2; 32]),
            epoch: 1_100_000_000,
        }
    }

    fn stat_times(image: &Path, path: &str) -> String {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .filter(|l| l.contains("time:"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A roomy image whose files stay in group 0: the groups holding only a
    /// superblock copy have their block bitmaps written (as mke2fs 1.47.2
    /// leaves them), whichever e2fsprogs wrote the image; only wholly free
    /// groups stay `BLOCK_UNINIT`.
    #[test]
    fn groups_in_use_are_never_block_uninit() {
        let tmp = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/motd"), "hi\n").unwrap();
        let options = test_options(1 << 30);
        let image = tmp.path().join("roomy.ext4");
        // write_image has `e2fsck -fn` check the rewritten bitmaps and checksums.
        write_image(&tree, &image, &options, None, &mut |_, _| {}).unwrap();
        let out = Command::new("dumpe2fs").arg(&image).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let groups: Vec<&str> = text
            .split("\nGroup ")
            .filter(|g| g.contains(": (Blocks "))
            .collect();
        assert_eq!(groups.len(), 8, "{text}");
        let mut uninit = 0;
        for group in &groups {
            if group.lines().next().unwrap().contains("BLOCK_UNINIT") {
                assert!(!group.contains("superblock at"), "Group {group}");
                assert!(group.contains(" 32768 free blocks"), "Group {group}");
                uninit += 1;
            }
        }
        // Groups 2 and 6 hold nothing: mke2fs leaves them so.
        assert_eq!(uninit, 2, "{text}");
    }

    /// Needs root and e2fsprogs: writes the same tree twice, at different
    /// real times, and expects identical, clean images with pinned times.
    #[test]
    fn images_are_reproducible_and_clean() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/motd"), "hi\n").unwrap();
        std::fs::set_permissions(
            tree.join("etc/motd"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        // A name no debugfs script could carry.
        let odd = "etc/we\"ird\r\nname";
        std::fs::write(tree.join(odd), "odd\n").unwrap();
        let t = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
        for p in [odd, "etc/motd", "etc"] {
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &tree.join(p),
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }
        let options = test_options(16 << 20);
        let (a, b) = (tmp.path().join("a.ext4"), tmp.path().join("b.ext4"));
        let measured_a = write_image(&tree, &a, &options, None, &mut |_, _| {}).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(tree.join("etc/motd"), "hi\n").unwrap(); // new real ctime
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &tree.join("etc/motd"),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        let measured_b = write_image(&tree, &b, &options, None, &mut |_, _| {}).unwrap();
        assert!(!b.with_extension("ext4.partial").exists());
        assert_eq!(measured_a, measured_b);
        assert_eq!(measured_a, crate::measure::measure(&b).unwrap());
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "images differ"
        );
        let times = stat_times(&a, "/etc/motd");
        assert_eq!(
            times.matches("0x3b9aca00").count(),
            3,
            "atime, ctime, mtime pinned:\n{times}"
        );
        assert!(!a.with_extension("ext4.partial").exists());
        // Every inode of the tree (lost+found is 11, then etc, motd and the
        // odd name), the odd one too, has its three times equal.
        for inode in 12..=14 {
            let times = stat_times(&a, &format!("<{inode}>"));
            assert_eq!(
                times.matches("0x3b9aca00").count(),
                3,
                "inode {inode}:\n{times}"
            );
        }
        let listing = Command::new("debugfs")
            .args(["-R", "ls -p /etc"])
            .arg(&a)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&listing.stdout).contains("we\"ird"));
    }

    #[test]
    fn the_writer_version_is_what_mke2fs_says() {
        let version = writer_version().unwrap();
        let said = Command::new("mke2fs").arg("-V").output().unwrap();
        let said = String::from_utf8_lossy(&said.stderr).to_string();
        // `mke2fs 1.47.0 (5-Feb-2023)` then `Using EXT2FS Library version 1.47.0`.
        let mut lines = said.lines().map(str::trim);
        let mkfs = lines.next().unwrap();
        let library = lines.next().unwrap().rsplit(' ').next().unwrap();
        assert!(mkfs.starts_with("mke2fs 1."), "{said}");
        assert_eq!(version, format!("{mkfs}, libext2fs {library}"));
    }

    #[test]
    fn uuids_have_version_4_layout() {
        let u = uuid_from(&[0xff; 32]);
        assert_eq!(u, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(u.len(), 36);
    }
}
