//! Copies a directory tree into a freshly formatted ext4 image through
//! libext2fs: what `mkfs.ext4 -d` does, with each file's blocks allocated
//! at once and its data written straight into the image file.
//!
//! mke2fs 1.47's `-d` writes a file block by block, and for each block
//! walks and re-checksums the file's extent tree: on kiln's agent image
//! that was most of its 3.8-4.4 s (perf). Here libext2fs does all the
//! metadata (inodes, directories, extents, bitmaps, extended attributes, as
//! `-d` does), a file's blocks are allocated in one `ext2fs_fallocate`, and
//! its bytes are copied with `pread`/`pwrite` on other threads, since
//! libext2fs never reads or writes a data block it hands out this way.
//!
//! What lands in the image is what `-d` gives: entries in byte order of
//! their names, the source's mode, owner, extended attributes and mtime
//! (atime and ctime equal to it, to the second; creation time `epoch`),
//! hard links of regular files as one inode, device numbers, and blocks of
//! zeros left out (holes), whether the source has them as holes or as zeros.
//! The root directory takes only the tree's extended attributes; its mode,
//! owner and times are mke2fs's. Only how blocks are laid out differs.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use super::data_blocks::{self, ToRead};
use super::libext2fs::{EntryType, Filesystem, INODE_SIZE};
use super::{put_u16, put_u32, u16_at, Ext4Error};
use crate::io_at::io_at;

const ROOT: u32 = 2;

// Inode fields (on-disk offsets).
const I_MODE: usize = 0x00;
const I_UID: usize = 0x02;
const I_SIZE: usize = 0x04;
const I_ATIME: usize = 0x08;
const I_CTIME: usize = 0x0C;
const I_MTIME: usize = 0x10;
const I_GID: usize = 0x18;
const I_LINKS: usize = 0x1A;
const I_BLOCK: usize = 0x28;
const I_SIZE_HIGH: usize = 0x6C;
const I_UID_HIGH: usize = 0x78;
const I_GID_HIGH: usize = 0x7A;
const I_EXTRA_ISIZE: usize = 0x80;
const I_CRTIME: usize = 0x90;
/// The extra inode fields kiln's inodes carry (up to and with `i_crtime`
/// and `i_version_hi`), as libext2fs sets for a new inode.
const EXTRA_ISIZE: u16 = 32;

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

/// One file's data to copy: from `source` (its bytes up to `size`) to the
/// image, extent by extent (first logical block, first physical block,
/// blocks).
struct Copy {
    source: PathBuf,
    file: File,
    size: u64,
    extents: Vec<(u64, u64, u64)>,
}

/// How many threads copy file data while libext2fs writes the metadata.
const COPIERS: usize = 2;

/// Copies `tree` into the filesystem in `image` (formatted, empty but for
/// lost+found). Every file is read to find its blocks of zeros, or, with
/// `to_read` found for the image's block size, only the files it names
/// (paths relative to `tree`; see [`data_blocks`]) and the others' blocks
/// are their data ranges.
pub fn copy_tree(
    tree: &Path,
    image: &Path,
    epoch: i64,
    to_read: Option<&ToRead>,
) -> Result<(), Ext4Error> {
    let mut fs = Filesystem::open(image)?;
    let out = File::options()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io_at(image))?;
    let block = fs.block_size();
    let (to_copiers, copies) = sync_channel::<Copy>(256);
    let copies = std::sync::Mutex::new(Some(copies));
    std::thread::scope(|scope| {
        let copiers: Vec<_> = (0..COPIERS)
            .map(|_| scope.spawn(|| copy_data(&copies, block, &out, image)))
            .collect();
        let mut writer = Writer {
            block,
            tree,
            to_read,
            scratch: vec![0; 1 << 20],
            fs: &mut fs,
            epoch: epoch as u32,
            links: HashMap::new(),
            copies: to_copiers,
        };
        let walked = writer.root(tree);
        drop(writer);
        let copied = copiers
            .into_iter()
            .map(|c| c.join().expect("a data copier panicked"))
            .collect::<Result<Vec<()>, Ext4Error>>();
        // A copier's error first: the walk stops when all copiers have.
        copied.and(walked)
    })?;
    Ok(fs.close()?)
}

/// Copies each file's data handed over until the walk ends. On an error
/// the queue is dropped, so that the walk's next hand-over fails instead of
/// waiting for copiers that are gone.
fn copy_data(
    copies: &std::sync::Mutex<Option<Receiver<Copy>>>,
    block: u64,
    out: &File,
    image: &Path,
) -> Result<(), Ext4Error> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let next = match &*copies.lock().expect("copy queue") {
            Some(queue) => queue.recv(),
            None => return Ok(()),
        };
        let Ok(copy) = next else { return Ok(()) };
        if let Err(e) = copy_file(&copy, block, &mut buf, out, image) {
            copies.lock().expect("copy queue").take();
            return Err(e);
        }
    }
}

/// Copies one file's extents into the image (`block` bytes a block).
fn copy_file(
    copy: &Copy,
    block: u64,
    buf: &mut [u8],
    out: &File,
    image: &Path,
) -> Result<(), Ext4Error> {
    for &(lblk, pblk, blocks) in &copy.extents {
        let mut from = lblk * block;
        let end = ((lblk + blocks) * block).min(copy.size);
        let mut to = pblk * block;
        while from < end {
            let n = (end - from).min(buf.len() as u64) as usize;
            copy.file
                .read_exact_at(&mut buf[..n], from)
                .map_err(io_at(&copy.source))?;
            out.write_all_at(&buf[..n], to).map_err(io_at(image))?;
            from += n as u64;
            to += n as u64;
        }
    }
    Ok(())
}

struct Writer<'a> {
    /// The block size in bytes.
    block: u64,
    /// The tree being copied, and which of its files must be read to find
    /// their blocks (all when `None`).
    tree: &'a Path,
    to_read: Option<&'a ToRead>,
    /// A buffer for reading files (a whole number of blocks).
    scratch: Vec<u8>,
    fs: &'a mut Filesystem,
    epoch: u32,
    /// Inodes of regular files with more than one name, by the source's
    /// (dev, ino). Only regular files: layers record hard links of nothing
    /// else, so a device or fifo that a step's tree has under two names
    /// gets two inodes, as it does from an unpacked copy.
    links: HashMap<(u64, u64), u32>,
    copies: SyncSender<Copy>,
}

impl Writer<'_> {
    fn root(&mut self, tree: &Path) -> Result<(), Ext4Error> {
        self.xattrs(ROOT, tree)?;
        self.dir(ROOT, tree)
    }

    /// Copies the entries of the source directory `path` into `dir`.
    fn dir(&mut self, dir: u32, path: &Path) -> Result<(), Ext4Error> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io_at(path))? {
            names.push(entry.map_err(io_at(path))?.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let source = path.join(&name);
            let meta = std::fs::symlink_metadata(&source).map_err(io_at(&source))?;
            self.entry(dir, name.as_bytes(), &source, &meta)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: u32,
        name: &[u8],
        source: &Path,
        meta: &Metadata,
    ) -> Result<(), Ext4Error> {
        let kind = meta.file_type();
        let key = (meta.dev(), meta.ino());
        if kind.is_file() && meta.nlink() > 1 {
            if let Some(&ino) = self.links.get(&key) {
                return self.another_name(dir, name, ino);
            }
        }
        let ino = if kind.is_dir() {
            let ino = if dir == ROOT && name == b"lost+found" {
                self.fs.lookup(dir, name)?
            } else {
                let ino = self.fs.new_inode(dir, S_IFDIR | 0o755, false)?;
                self.fs.mkdir(dir, name, ino)?;
                ino
            };
            self.dir(ino, source)?;
            self.restamp(ino, meta)?;
            ino
        } else if kind.is_symlink() {
            let target = std::fs::read_link(source).map_err(io_at(source))?;
            let ino = self.fs.new_inode(dir, S_IFLNK | 0o777, false)?;
            self.fs
                .symlink(dir, name, ino, target.as_os_str().as_bytes())?;
            self.restamp(ino, meta)?;
            ino
        } else if kind.is_file() {
            self.file(dir, name, source, meta)?
        } else {
            self.special(dir, name, meta)?
        };
        self.xattrs(ino, source)?;
        if kind.is_file() && meta.nlink() > 1 {
            self.links.insert(key, ino);
        }
        Ok(())
    }

    /// Stamps an inode libext2fs made (a directory, once its entries are
    /// in, or a symbolic link) with what the source says of it.
    fn restamp(&mut self, ino: u32, meta: &Metadata) -> Result<(), Ext4Error> {
        let mut inode = self.fs.read_inode(ino)?;
        self.stamp(&mut inode, meta);
        Ok(self.fs.write_inode(ino, &inode)?)
    }

    /// Sets what the source says of an inode: permissions, owner, times.
    fn stamp(&self, inode: &mut [u8; INODE_SIZE], meta: &Metadata) {
        let mode = (u32::from(u16_at(inode, I_MODE)) & S_IFMT) | (meta.mode() & !S_IFMT);
        put_u16(inode, I_MODE, mode as u16);
        put_u16(inode, I_UID, meta.uid() as u16);
        put_u16(inode, I_UID_HIGH, (meta.uid() >> 16) as u16);
        put_u16(inode, I_GID, meta.gid() as u16);
        put_u16(inode, I_GID_HIGH, (meta.gid() >> 16) as u16);
        let mtime = meta.mtime() as u32;
        for at in [I_ATIME, I_CTIME, I_MTIME] {
            put_u32(inode, at, mtime);
        }
        // The nanosecond words stay zero, as with `mkfs.ext4 -d`.
        put_u16(inode, I_EXTRA_ISIZE, EXTRA_ISIZE);
        put_u32(inode, I_CRTIME, self.epoch);
    }

    /// Adds `name` in `dir` for the regular file `ino`.
    fn another_name(&mut self, dir: u32, name: &[u8], ino: u32) -> Result<(), Ext4Error> {
        self.fs.link(dir, name, ino, EntryType::File)?;
        let mut inode = self.fs.read_inode(ino)?;
        let links = u16_at(&inode, I_LINKS) + 1;
        put_u16(&mut inode, I_LINKS, links);
        self.fs.write_inode(ino, &inode).map_err(Ext4Error::from)
    }

    /// A regular file: its inode and blocks now, its data on a copier.
    fn file(
        &mut self,
        dir: u32,
        name: &[u8],
        source: &Path,
        meta: &Metadata,
    ) -> Result<u32, Ext4Error> {
        let ino = self.fs.new_inode(dir, S_IFREG | 0o755, true)?;
        self.fs.link(dir, name, ino, EntryType::File)?;
        let size = meta.len();
        let mut inode = [0u8; INODE_SIZE];
        put_u16(
            &mut inode,
            I_MODE,
            (S_IFREG | (meta.mode() & !S_IFMT)) as u16,
        );
        put_u16(&mut inode, I_LINKS, 1);
        put_u32(&mut inode, I_SIZE, size as u32);
        put_u32(&mut inode, I_SIZE_HIGH, (size >> 32) as u32);
        self.stamp(&mut inode, meta);
        self.fs.init_extents(ino, &mut inode)?;
        self.fs.write_inode(ino, &inode)?;
        if size == 0 {
            return Ok(ino);
        }
        let file = File::open(source).map_err(io_at(source))?;
        let runs = if self.must_read(source) {
            data_blocks::written_blocks(&file, size, self.block, &mut self.scratch)
                .map_err(io_at(source))?
        } else {
            data_blocks::data_blocks(&file, size, self.block)
        };
        for (first, blocks) in runs {
            self.fs.allocate(ino, &mut inode, first, blocks)?;
        }
        self.fs.write_inode(ino, &inode)?;
        let extents = self.fs.extents(ino, &mut inode)?;
        let copy = Copy {
            source: source.to_path_buf(),
            file,
            size,
            extents,
        };
        if self.copies.send(copy).is_err() {
            // Every copier stopped on an error, which `copy_tree` reports.
            return Err(Ext4Error::Tool {
                tool: "kiln".into(),
                detail: "the data copiers stopped".into(),
            });
        }
        Ok(ino)
    }

    /// Whether the blocks of the file at `source` are found by reading it:
    /// unless `to_read` was found for this image's block size and does not
    /// name it.
    fn must_read(&self, source: &Path) -> bool {
        let Some(to_read) = self.to_read.filter(|t| t.block == self.block) else {
            return true;
        };
        source.strip_prefix(self.tree).map_or(true, |relative| {
            to_read.files.contains(&*relative.to_string_lossy())
        })
    }

    /// A device, fifo or socket.
    fn special(&mut self, dir: u32, name: &[u8], meta: &Metadata) -> Result<u32, Ext4Error> {
        let kind = special_type(meta);
        let ino = self.fs.new_inode(dir, meta.mode(), true)?;
        self.fs.link(dir, name, ino, kind)?;
        let mut inode = [0u8; INODE_SIZE];
        put_u16(&mut inode, I_MODE, meta.mode() as u16);
        put_u16(&mut inode, I_LINKS, 1);
        if matches!(kind, EntryType::CharDevice | EntryType::BlockDevice) {
            let (major, minor) = (
                nix::sys::stat::major(meta.rdev()) as u32,
                nix::sys::stat::minor(meta.rdev()) as u32,
            );
            // ext4's two encodings of a device number, as mke2fs writes them.
            if major < 256 && minor < 256 {
                put_u32(&mut inode, I_BLOCK, major * 256 + minor);
            } else {
                put_u32(
                    &mut inode,
                    I_BLOCK + 4,
                    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
                );
            }
        }
        self.stamp(&mut inode, meta);
        self.fs.write_inode(ino, &inode)?;
        Ok(ino)
    }

    /// Copies the extended attributes of `source` onto `ino`.
    fn xattrs(&mut self, ino: u32, source: &Path) -> Result<(), Ext4Error> {
        let mut attrs = Vec::new();
        let names = match xattr::list(source) {
            Ok(names) => names,
            // A source filesystem without extended attributes has none.
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => return Ok(()),
            Err(e) => return Err(io_at(source)(e).into()),
        };
        for name in names {
            let value = xattr::get(source, &name)
                .map_err(io_at(source))?
                .unwrap_or_default();
            let name = CString::new(name.as_bytes()).expect("xattr names have no NUL");
            attrs.push((name, value));
        }
        if attrs.is_empty() {
            return Ok(());
        }
        self.fs.set_xattrs(ino, &attrs).map_err(Ext4Error::from)
    }
}

/// The entry type of a device, fifo or socket.
fn special_type(meta: &Metadata) -> EntryType {
    let kind = meta.file_type();
    if kind.is_char_device() {
        EntryType::CharDevice
    } else if kind.is_block_device() {
        EntryType::BlockDevice
    } else if kind.is_fifo() {
        EntryType::Fifo
    } else {
        EntryType::Socket
    }
}

#[cfg(test)]
mod tests {
    use super::super::{uuid_from, write_image, Ext4Options};
    use std::collections::BTreeMap;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::path::Path;
    use std::process::Command;

    /// Image settings for a 64 MiB test image (1 KiB blocks).
    fn options(label: &str) -> Ext4Options {
        Ext4Options {
            size: 64 << 20,
            label: label.into(),
            uuid: uuid_from(&[1; 32]),
            hash_seed: uuid_from(&[2; 32]),
            epoch: 1_500_000_000,
        }
    }

    /// What a mounted image shows of one entry, and the names it shares
    /// its inode with.
    type Shown = BTreeMap<String, (String, Vec<String>)>;

    /// Every entry under `root`: mode, owner, size, mtime, links, device,
    /// extended attributes and link target or content digest.
    fn shown(root: &Path) -> Shown {
        let mut by_inode: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let mut seen = BTreeMap::new();
        for entry in walkdir::WalkDir::new(root).min_depth(0).sort_by_file_name() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(path).unwrap();
            let mut attrs: Vec<String> = xattr::list(path)
                .unwrap()
                .map(|n| {
                    let v = xattr::get(path, &n).unwrap().unwrap_or_default();
                    format!("{}={}", n.to_string_lossy(), hex::encode(v))
                })
                .collect();
            attrs.sort();
            let what = if meta.file_type().is_symlink() {
                std::fs::read_link(path).unwrap().display().to_string()
            } else if meta.is_file() {
                blake3::hash(&std::fs::read(path).unwrap())
                    .to_hex()
                    .to_string()
            } else {
                String::new()
            };
            if !meta.is_dir() {
                by_inode.entry(meta.ino()).or_default().push(rel.clone());
            }
            let size = if meta.is_dir() { 0 } else { meta.size() };
            let line = format!(
                "{:o} {}:{} size {size} mtime {}.{} links {} rdev {} [{}] {what}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.nlink(),
                meta.rdev(),
                attrs.join(" ")
            );
            seen.insert(rel, (line, meta.ino()));
        }
        seen.into_iter()
            .map(|(rel, (line, ino))| {
                let names = if line.contains(" links 1 ") || rel.is_empty() {
                    Vec::new()
                } else {
                    by_inode.get(&ino).cloned().unwrap_or_default()
                };
                (rel, (line, names))
            })
            .collect()
    }

    struct Mounted(std::path::PathBuf);

    impl Mounted {
        fn at(image: &Path, dir: &Path) -> Mounted {
            std::fs::create_dir_all(dir).unwrap();
            let ok = Command::new("mount")
                .args(["-o", "loop,ro", "-t", "ext4"])
                .arg(image)
                .arg(dir)
                .status()
                .unwrap();
            assert!(ok.success(), "mount {}", image.display());
            Mounted(dir.to_path_buf())
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    fn set_mtime(path: &Path, secs: i64, nanos: i64) {
        let t = nix::sys::time::TimeSpec::new(secs, nanos);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    /// A tree with every kind of entry and attribute an image can hold.
    fn every_kind(tree: &Path) {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        let dir = |p: &str| std::fs::create_dir_all(tree.join(p)).unwrap();
        let file = |p: &str, bytes: &[u8]| std::fs::write(tree.join(p), bytes).unwrap();
        for d in ["etc", "usr/bin", "data/sub", "dev", "many", "lost+found"] {
            dir(d);
        }
        file("etc/motd", b"hello\n");
        file("lost+found/kept", b"kept\n");
        file("usr/bin/tool", &[0x7f; 70_000]);
        std::fs::set_permissions(
            tree.join("usr/bin/tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        // The capability ping has: cap_net_raw, effective.
        let cap = [
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        xattr::set(tree.join("usr/bin/tool"), "security.capability", &cap).unwrap();
        xattr::set(tree.join("etc/motd"), "user.note", b"a value").unwrap();
        xattr::set(tree, "user.root", b"on the root").unwrap();
        // An access ACL: owner rw, user 1234 r, group r, mask r, other r.
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1234),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 4, u32::MAX),
        ] {
            acl.extend(tag.to_le_bytes());
            acl.extend(perm.to_le_bytes());
            acl.extend(id.to_le_bytes());
        }
        xattr::set(tree.join("etc/motd"), "system.posix_acl_access", &acl).unwrap();
        // Sparse: 12 islands of data 1 MiB apart (more extents than an
        // inode holds), and a file of zeros, and an empty one.
        let sparse = std::fs::File::create(tree.join("data/sparse")).unwrap();
        for i in 0..12u64 {
            use std::os::unix::fs::FileExt;
            sparse.write_all_at(&[i as u8 + 1; 8192], i << 20).unwrap();
        }
        sparse.set_len(13 << 20).unwrap();
        file("data/zeros", &[0; 65536]);
        let mut gap = vec![1u8; 3 * 1024];
        gap[1024..2048].fill(0);
        file("data/gap", &gap);
        file("data/empty", b"");
        file("data/linked", b"three names\n");
        std::fs::hard_link(tree.join("data/linked"), tree.join("data/also")).unwrap();
        std::fs::hard_link(tree.join("data/linked"), tree.join("data/sub/third")).unwrap();
        symlink("motd", tree.join("etc/short")).unwrap();
        symlink("x".repeat(200), tree.join("etc/long")).unwrap();
        let dev = |p: &str, kind, major, minor| {
            mknod(
                &tree.join(p),
                kind,
                Mode::from_bits_truncate(0o640),
                makedev(major, minor),
            )
            .unwrap()
        };
        dev("dev/null", SFlag::S_IFCHR, 1, 3);
        dev("dev/big", SFlag::S_IFCHR, 300, 70_000);
        dev("dev/sda", SFlag::S_IFBLK, 8, 0);
        dev("dev/fifo", SFlag::S_IFIFO, 0, 0);
        std::fs::hard_link(tree.join("dev/fifo"), tree.join("dev/fifo-too")).unwrap();
        drop(std::os::unix::net::UnixListener::bind(tree.join("dev/socket")).unwrap());
        for i in 0..600 {
            file(
                &format!("many/a-rather-long-file-name-to-fill-blocks-{i:04}"),
                b"",
            );
        }
        nix::unistd::chown(
            &tree.join("data/linked"),
            Some(100_000.into()),
            Some(200_000.into()),
        )
        .unwrap();
        for entry in walkdir::WalkDir::new(tree).contents_first(true) {
            let entry = entry.unwrap();
            set_mtime(entry.path(), 1_600_000_000 + entry.depth() as i64, 123);
        }
    }

    /// Copiers that fail drop the queue, so the walk's next hand-over fails
    /// rather than waiting forever for room in a queue no one reads.
    #[test]
    fn failed_copiers_stop_taking_work() {
        use super::{copy_data, Copy};
        use std::sync::mpsc::{sync_channel, TrySendError};
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("source");
        std::fs::write(&source, [7u8; 4096]).unwrap();
        let image = tmp.path().join("image");
        std::fs::write(&image, [0u8; 8192]).unwrap();
        // Opened read-only: every write into it fails.
        let out = std::fs::File::open(&image).unwrap();
        let (queue, taken) = sync_channel::<Copy>(4);
        let taken = std::sync::Mutex::new(Some(taken));
        std::thread::scope(|scope| {
            let copiers: Vec<_> = (0..2)
                .map(|_| scope.spawn(|| copy_data(&taken, 4096, &out, &image)))
                .collect();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let refused = loop {
                let copy = Copy {
                    source: source.clone(),
                    file: std::fs::File::open(&source).unwrap(),
                    size: 4096,
                    extents: vec![(0, 1, 1)],
                };
                match queue.try_send(copy) {
                    Err(TrySendError::Disconnected(_)) => break true,
                    _ if std::time::Instant::now() > deadline => break false,
                    Err(TrySendError::Full(_)) => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    Ok(()) => {}
                }
            };
            drop(queue);
            let failed = copiers
                .into_iter()
                .map(|c| c.join().expect("a copier panicked"))
                .filter(Result::is_err)
                .count();
            assert!(
                refused,
                "the queue still took work after the copiers failed"
            );
            assert!(failed >= 1);
        });
    }

    /// Needs root (a tmpfs): when the disk under the image fills up while
    /// file data is copied, writing the image fails with that error and
    /// leaves nothing behind.
    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn a_full_disk_fails_the_image_without_hanging() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        for i in 0..600 {
            std::fs::write(tree.join(format!("f{i:03}")), vec![i as u8 | 1; 64 << 10]).unwrap();
        }
        let small = tmp.path().join("small");
        std::fs::create_dir(&small).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=12m", "kiln-test"])
            .arg(&small)
            .status()
            .unwrap();
        assert!(mounted.success());
        let _unmount = Mounted(small.clone());
        let image = small.join("full.ext4");
        let options = options("full");
        let (done, result) = std::sync::mpsc::channel();
        let (tree_, image_) = (tree.clone(), image.clone());
        std::thread::spawn(move || {
            let _ = done.send(write_image(&tree_, &image_, &options, None, &mut |_, _| {}));
        });
        let written = result
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("writing the image hung");
        let err = written.expect_err("40 MB of data fit in a 12 MB tmpfs");
        assert!(err.to_string().contains("No space left"), "{err}");
        assert!(
            !err.to_string().contains("mkfs"),
            "the copy fails, not mkfs: {err}"
        );
        assert!(!image.exists() && !image.with_extension("ext4.partial").exists());
    }

    /// A list of the files to read found for another block size is not
    /// trusted: every file is read, and a block of zeros inside a file's
    /// data stays a hole. Trusted, a list that does not name the file gives
    /// it that block (the image differs), which is what the check prevents.
    #[test]
    fn files_to_read_found_for_another_block_size_are_not_trusted() {
        use super::ToRead;
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let mut gap = vec![b'x'; 1024];
        gap.extend([0u8; 1024]);
        gap.extend([b'y'; 1024]);
        std::fs::write(tree.join("gap"), &gap).unwrap();
        let options = options("records");
        let image = |name: &str, to_read: Option<&ToRead>| {
            let path = tmp.path().join(name);
            write_image(&tree, &path, &options, to_read, &mut |_, _| {}).unwrap();
            std::fs::read(path).unwrap()
        };
        let read_all = image("all.ext4", None);
        let none = std::collections::HashSet::new();
        let other_size = ToRead {
            block: 4096,
            files: none.clone(),
        };
        assert!(
            image("other.ext4", Some(&other_size)) == read_all,
            "a list for 4 KiB blocks changed a 1 KiB image"
        );
        let this_size = ToRead {
            block: 1024,
            files: none,
        };
        assert!(image("trusted.ext4", Some(&this_size)) != read_all);
    }

    /// Needs root (mknod, mounts): an image kiln writes shows what
    /// `mkfs.ext4 -d` of the same tree shows, entry for entry, and its
    /// atime and ctime equal the mtime.
    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn images_show_what_mkfs_d_gives() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        every_kind(&tree);
        let options = options("test");
        let ours = tmp.path().join("ours.ext4");
        write_image(&tree, &ours, &options, None, &mut |_, _| {}).unwrap();
        let theirs = tmp.path().join("theirs.ext4");
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&theirs)
            .arg("64M")
            .status()
            .unwrap();
        assert!(made.success());
        let a = Mounted::at(&ours, &tmp.path().join("a"));
        let b = Mounted::at(&theirs, &tmp.path().join("b"));
        let (ours_shown, theirs_shown) = (shown(&a.0), shown(&b.0));
        assert!(ours_shown.len() > 620, "{}", ours_shown.len());
        for (path, (line, names)) in &theirs_shown {
            if path.starts_with("dev/fifo") {
                // One fifo under two names: -d gives one inode, kiln two
                // (layers link regular files only).
                assert!(line.contains(" links 2 "), "{line}");
                assert_eq!(
                    ours_shown[path].0,
                    line.replace(" links 2 ", " links 1 "),
                    "{path}"
                );
                continue;
            }
            if path.is_empty() {
                // The root directory: only its extended attributes come from the tree.
                assert!(
                    ours_shown[path].0.contains("user.root="),
                    "{:?}",
                    ours_shown[path]
                );
                continue;
            }
            assert_eq!(
                ours_shown.get(path),
                Some(&(line.clone(), names.clone())),
                "{path}"
            );
        }
        assert_eq!(ours_shown.len(), theirs_shown.len());
        assert_eq!(
            ours_shown["data/linked"].1,
            ["data/also", "data/linked", "data/sub/third"]
        );
        for path in ["etc/motd", "dev/big", "data/sparse", "etc/long", "many"] {
            let meta = std::fs::symlink_metadata(a.0.join(path)).unwrap();
            assert_eq!(
                (meta.atime(), meta.ctime()),
                (meta.mtime(), meta.mtime()),
                "{path}"
            );
        }
        // The holes stay holes: 12 islands of 8 KiB and the block of the
        // extent tree (12 extents are more than an inode holds), as with -d.
        let blocks = |m: &Mounted, path| std::fs::metadata(m.0.join(path)).unwrap().blocks();
        assert_eq!(blocks(&a, "data/sparse") * 512, 12 * 8192 + 1024);
        // Zeros written out take no blocks either; a block of zeros between
        // data is a hole.
        assert_eq!(blocks(&a, "data/zeros"), 0);
        assert_eq!(blocks(&a, "data/gap") * 512, 2 * 1024);
        for path in ["data/sparse", "data/zeros", "data/gap"] {
            assert_eq!(blocks(&a, path), blocks(&b, path), "{path}");
        }
    }
}
