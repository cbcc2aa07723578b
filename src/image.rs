//! Reading a finished ext4 image without mounting it and without root, with
//! the pure-Rust `ext4-view` reader: what a path is ([`Stat`]: kind, mode,
//! owner, size, link target), the bytes of a file, every path under a
//! directory ([`Image::walk`]), and a deterministic text listing of them
//! ([`Image::listing`]). The one place kiln reads images; `kiln verify` and
//! `kiln diff` both go through it.
//!
//! Paths are absolute, as inside the image, and symlinks on the way to the
//! last name are followed the way Linux follows them. A path is *missing*
//! only when a name on the way is not there; anything else that stops the
//! lookup (a symlink loop, a file where a directory should be, a damaged
//! directory) is an [`ImageError`], never "missing". Extended attributes are
//! not read.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use ext4_view::{Ext4, Ext4Error};

/// Why an image, or a path in it, could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{image}: not a readable ext4 image ({source})")]
    Open { image: PathBuf, source: Ext4Error },
    #[error("{image}: cannot read {path}: {source}")]
    Read {
        image: PathBuf,
        path: String,
        source: Ext4Error,
    },
    #[error("{image}: cannot read {path}: it is a {kind}, not a regular file")]
    NotAFile {
        image: PathBuf,
        path: String,
        kind: FileType,
    },
}

/// The type of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileType {
    fn of(kind: ext4_view::FileType) -> FileType {
        match kind {
            ext4_view::FileType::Regular => FileType::Regular,
            ext4_view::FileType::Directory => FileType::Directory,
            ext4_view::FileType::Symlink => FileType::Symlink,
            ext4_view::FileType::CharacterDevice => FileType::CharDevice,
            ext4_view::FileType::BlockDevice => FileType::BlockDevice,
            ext4_view::FileType::Fifo => FileType::Fifo,
            ext4_view::FileType::Socket => FileType::Socket,
        }
    }

    /// The word listings use: `file`, `dir`, `symlink`, `chardev`, ….
    pub fn name(self) -> &'static str {
        match self {
            FileType::Regular => "file",
            FileType::Directory => "dir",
            FileType::Symlink => "symlink",
            FileType::CharDevice => "chardev",
            FileType::BlockDevice => "blockdev",
            FileType::Fifo => "fifo",
            FileType::Socket => "socket",
        }
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `stat` says about one path (not following a final symlink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub kind: FileType,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// The target of a symlink (fast or slow), lossily UTF-8.
    pub link: Option<String>,
}

/// One path met by [`Image::walk`].
#[derive(Debug, Clone)]
pub struct Entry {
    /// The absolute path, lossily UTF-8 (a name need not be UTF-8).
    pub path: String,
    pub stat: Stat,
    /// The path's bytes as stored, to read the file back.
    raw: Vec<u8>,
}

/// An ext4 image opened for reading.
pub struct Image {
    path: PathBuf,
    fs: Ext4,
}

/// How many symlinks [`Image::resolve`] follows, as Linux does.
const MAX_LINKS: usize = 40;

impl Image {
    /// Opens the ext4 image at `path`.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let fs = Ext4::load_from_path(path).map_err(|source| ImageError::Open {
            image: path.to_path_buf(),
            source,
        })?;
        Ok(Image {
            path: path.to_path_buf(),
            fs,
        })
    }

    fn read_error(&self, path: &[u8], source: Ext4Error) -> ImageError {
        ImageError::Read {
            image: self.path.clone(),
            path: String::from_utf8_lossy(path).into_owned(),
            source,
        }
    }

    /// The stat of `path` (raw bytes), not following a final symlink.
    fn stat_raw(&self, path: &[u8]) -> Result<Option<Stat>, ImageError> {
        match self.fs.symlink_metadata(path) {
            Ok(meta) => self.stat_of(path, &meta).map(Some),
            Err(Ext4Error::NotFound) => Ok(None),
            Err(e) => Err(self.read_error(path, e)),
        }
    }

    /// The [`Stat`] of `path` from its inode's metadata.
    fn stat_of(&self, path: &[u8], meta: &ext4_view::Metadata) -> Result<Stat, ImageError> {
        let kind = FileType::of(meta.file_type());
        let link = match kind {
            FileType::Symlink => {
                let target = self
                    .fs
                    .read_link(path)
                    .map_err(|e| self.read_error(path, e))?;
                Some(String::from_utf8_lossy(target.as_ref()).into_owned())
            }
            _ => None,
        };
        Ok(Stat {
            kind,
            mode: u32::from(meta.mode()),
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.len(),
            link,
        })
    }

    /// `stat`s every path (absolute, in the image); `None` for missing ones.
    pub fn stat_all(&self, paths: &[&str]) -> Result<BTreeMap<String, Option<Stat>>, ImageError> {
        paths
            .iter()
            .map(|p| Ok((p.to_string(), self.stat(p)?)))
            .collect()
    }

    /// `stat` of one path; `None` if it is missing.
    pub fn stat(&self, path: &str) -> Result<Option<Stat>, ImageError> {
        self.stat_raw(path.as_bytes())
    }

    /// Follows symlinks (up to 40) from `path`; the final path and its stat
    /// (`None`: the last link dangles, and the path is where it points).
    pub fn resolve(&self, path: &str) -> Result<(String, Option<Stat>), ImageError> {
        let mut current = path.to_string();
        for _ in 0..MAX_LINKS {
            let stat = self.stat(&current)?;
            let Some(target) = stat.as_ref().and_then(|s| s.link.clone()) else {
                let real = match stat {
                    Some(_) => {
                        let real = self
                            .fs
                            .canonicalize(current.as_str())
                            .map_err(|e| self.read_error(current.as_bytes(), e))?;
                        String::from_utf8_lossy(real.as_ref()).into_owned()
                    }
                    None => normalize(&current),
                };
                return Ok((real, stat));
            };
            current = if target.starts_with('/') {
                target
            } else {
                // Relative to the link's directory, with its own links resolved.
                let parent = Path::new(&current)
                    .parent()
                    .and_then(Path::to_str)
                    .unwrap_or("/");
                let parent = self
                    .fs
                    .canonicalize(parent)
                    .map_err(|e| self.read_error(parent.as_bytes(), e))?;
                let parent = String::from_utf8_lossy(parent.as_ref()).into_owned();
                format!("{}/{target}", parent.trim_end_matches('/'))
            };
        }
        Err(self.read_error(path.as_bytes(), Ext4Error::TooManySymlinks))
    }

    /// Reads every regular file in `paths`; `None` for missing ones.
    pub fn read_all(
        &self,
        paths: &[&str],
    ) -> Result<BTreeMap<String, Option<Vec<u8>>>, ImageError> {
        paths
            .iter()
            .map(|p| Ok((p.to_string(), self.read(p)?)))
            .collect()
    }

    /// Reads one regular file; `None` if it is missing. A final symlink is
    /// not followed (read [`Image::resolve`]'s path instead): it, a directory
    /// or a special file is [`ImageError::NotAFile`].
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>, ImageError> {
        let Some(mut file) = self.open_file(path.as_bytes())? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| self.read_error(path.as_bytes(), Ext4Error::Io(Box::new(e))))?;
        Ok(Some(bytes))
    }

    /// Refuses anything at `path` (raw bytes) but a regular file.
    fn regular(&self, path: &[u8], kind: FileType) -> Result<(), ImageError> {
        match kind {
            FileType::Regular => Ok(()),
            kind => Err(ImageError::NotAFile {
                image: self.path.clone(),
                path: String::from_utf8_lossy(path).into_owned(),
                kind,
            }),
        }
    }

    /// Opens the regular file at `path` (raw bytes) for streaming.
    fn open_file(&self, path: &[u8]) -> Result<Option<ext4_view::File>, ImageError> {
        let Some(stat) = self.stat_raw(path)? else {
            return Ok(None);
        };
        self.regular(path, stat.kind)?;
        let file = self.fs.open(path).map_err(|e| self.read_error(path, e))?;
        Ok(Some(file))
    }

    /// A reader of the regular file `entry` names (its exact bytes: a name
    /// need not be UTF-8).
    pub fn open_entry(&self, entry: &Entry) -> Result<impl Read, ImageError> {
        self.regular(&entry.raw, entry.stat.kind)?;
        self.fs
            .open(entry.raw.as_slice())
            .map_err(|e| self.read_error(&entry.raw, e))
    }

    /// `top` (a directory) and every path under it, sorted by path, without
    /// following symlinks. A missing `top` is an error.
    pub fn walk(&self, top: &str) -> Result<Vec<Entry>, ImageError> {
        let top_raw = top.as_bytes().to_vec();
        let stat = self
            .stat_raw(&top_raw)?
            .ok_or_else(|| self.read_error(&top_raw, Ext4Error::NotFound))?;
        let mut out = Vec::new();
        let mut dirs = Vec::new();
        if stat.kind == FileType::Directory {
            dirs.push(top_raw.clone());
        }
        out.push(Entry {
            path: top.to_string(),
            stat,
            raw: top_raw,
        });
        while let Some(dir) = dirs.pop() {
            let entries = self
                .fs
                .read_dir(dir.as_slice())
                .map_err(|e| self.read_error(&dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| self.read_error(&dir, e))?;
                let name = entry.file_name();
                if name.as_ref() == b"." || name.as_ref() == b".." {
                    continue;
                }
                let raw: Vec<u8> = entry.path().as_ref().to_vec();
                let meta = entry.metadata().map_err(|e| self.read_error(&raw, e))?;
                let stat = self.stat_of(&raw, &meta)?;
                if stat.kind == FileType::Directory {
                    dirs.push(raw.clone());
                }
                out.push(Entry {
                    path: String::from_utf8_lossy(&raw).into_owned(),
                    stat,
                    raw,
                });
            }
        }
        out.sort_by(|a, b| a.raw.cmp(&b.raw));
        Ok(out)
    }

    /// A deterministic listing of `top` and every path under it, one line
    /// each, sorted: path, kind, mode, uid:gid, then a file's size and
    /// blake3 (first 16 hex digits) or a link's target. No times, no inode
    /// numbers: the same tree always lists the same.
    pub fn listing(&self, top: &str) -> Result<String, ImageError> {
        let mut out = String::new();
        for entry in self.walk(top)? {
            let s = &entry.stat;
            let what = match s.kind {
                FileType::Regular => {
                    let mut hasher = blake3::Hasher::new();
                    hasher
                        .update_reader(self.open_entry(&entry)?)
                        .map_err(|e| self.read_error(&entry.raw, Ext4Error::Io(Box::new(e))))?;
                    let hash = hasher.finalize().to_hex();
                    format!(" {} blake3:{}", s.size, &hash[..16])
                }
                FileType::Symlink => format!(" -> {}", s.link.as_deref().unwrap_or_default()),
                _ => String::new(),
            };
            out.push_str(&format!(
                "{} {} {:04o} {}:{}{what}\n",
                entry.path, s.kind, s.mode, s.uid, s.gid
            ));
        }
        Ok(out)
    }
}

/// Collapses `.` and `..` in an absolute path by its names alone (for a
/// path that does not exist, to show).
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for name in path.split('/') {
        match name {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Writes an ext4 image of the folder `tree` with `mkfs.ext4 -d` (8 MiB,
/// the root directory owned by root): the small images unit tests read.
#[cfg(test)]
pub(crate) fn image_of_tree(tree: &Path, image: &Path) {
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg(image)
        .arg("8M")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("mkfs.ext4 (e2fsprogs) runs");
    assert!(made.success(), "mkfs.ext4 -d {} failed", tree.display());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// A directory name of 70 bytes: links through it are slow (a target
    /// longer than 60 bytes lives in a block, not in the inode).
    fn long_name() -> String {
        "x".repeat(70)
    }

    /// A small tree: a setuid file, a fast and a slow symlink, a chain of
    /// ten directory links, a loop, a dangling link, a sticky directory.
    fn small_image(dir: &Path) -> Image {
        let root = dir.join("root");
        let long = long_name();
        for d in ["etc/real", "usr/bin", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::create_dir_all(root.join("usr/lib").join(&long)).unwrap();
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        std::fs::write(root.join("etc/real/ssh_host_ed25519_key"), "secret\n").unwrap();
        std::fs::write(root.join("usr/lib").join(&long).join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            root.join("usr/lib").join(&long).join("tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        symlink(format!("../lib/{long}/tool"), root.join("usr/bin/slow")).unwrap();
        symlink("slow", root.join("usr/bin/fast")).unwrap();
        symlink("/usr/bin/gone", root.join("usr/bin/dangling")).unwrap();
        symlink("real", root.join("etc/d9")).unwrap();
        for i in (0..9).rev() {
            symlink(format!("d{}", i + 1), root.join(format!("etc/d{i}"))).unwrap();
        }
        symlink("d0", root.join("etc/ssh")).unwrap();
        symlink("loop", root.join("etc/loop")).unwrap();
        let image = dir.join("x.ext4");
        image_of_tree(&root, &image);
        Image::open(&image).unwrap()
    }

    #[test]
    fn stats_without_following_a_final_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let image = small_image(tmp.path());
        let long = long_name();
        let tool = image
            .stat(&format!("/usr/lib/{long}/tool"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (tool.kind, tool.mode, tool.uid, tool.gid, tool.size, tool.link),
            (FileType::Regular, 0o4755, 0, 0, 10, None)
        );
        let fast = image.stat("/usr/bin/fast").unwrap().unwrap();
        assert_eq!(
            (fast.kind, fast.link.as_deref()),
            (FileType::Symlink, Some("slow"))
        );
        let slow = image.stat("/usr/bin/slow").unwrap().unwrap();
        assert_eq!(slow.link, Some(format!("../lib/{long}/tool")));
        assert_eq!(
            image.stat("/tmp").unwrap().map(|s| (s.kind, s.mode)),
            Some((FileType::Directory, 0o1777))
        );
        // Links before the last name are followed, ten deep too.
        assert!(image
            .stat("/etc/ssh/ssh_host_ed25519_key")
            .unwrap()
            .is_some());
    }

    #[test]
    fn resolves_links_and_reads_only_regular_files() {
        let tmp = tempfile::tempdir().unwrap();
        let image = small_image(tmp.path());
        let long = long_name();
        let (real, stat) = image.resolve("/usr/bin/fast").unwrap();
        assert_eq!(real, format!("/usr/lib/{long}/tool"));
        assert_eq!(stat.unwrap().kind, FileType::Regular);
        assert_eq!(image.read(&real).unwrap().unwrap(), b"#!/bin/sh\n");
        assert_eq!(
            image.resolve("/usr/bin/dangling").unwrap(),
            ("/usr/bin/gone".to_string(), None)
        );
        assert_eq!(normalize("/usr/local/bin/../lib/./x"), "/usr/local/lib/x");
        let files = image
            .read_all(&["/etc/ssh/ssh_host_ed25519_key", "/etc/nothing"])
            .unwrap();
        assert_eq!(
            files["/etc/ssh/ssh_host_ed25519_key"].as_deref(),
            Some(&b"secret\n"[..])
        );
        assert_eq!(files["/etc/nothing"], None);
        for (path, kind) in [
            ("/usr/bin/fast", FileType::Symlink),
            ("/tmp", FileType::Directory),
        ] {
            let err = image.read(path).unwrap_err();
            assert!(
                matches!(&err, ImageError::NotAFile { kind: k, .. } if *k == kind),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_is_only_a_name_that_is_not_there() {
        let tmp = tempfile::tempdir().unwrap();
        let image = small_image(tmp.path());
        assert_eq!(image.stat("/etc/nothing").unwrap(), None);
        assert_eq!(image.stat("/nothing/below").unwrap(), None);
        assert_eq!(image.read("/etc/nothing").unwrap(), None);
        let err = image.stat("/etc/loop/x").unwrap_err();
        assert!(
            matches!(&err, ImageError::Read { path, source: Ext4Error::TooManySymlinks, .. }
                if path == "/etc/loop/x"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "{}: cannot read /etc/loop/x: too many levels of symbolic links",
                tmp.path().join("x.ext4").display()
            )
        );
        let err = image.stat("/etc/real/ssh_host_ed25519_key/x").unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Read {
                    source: Ext4Error::NotADirectory,
                    ..
                }
            ),
            "{err}"
        );
        let err = image.resolve("/etc/loop").unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Read {
                    source: Ext4Error::TooManySymlinks,
                    ..
                }
            ),
            "{err}"
        );
        let not_ext4 = tmp.path().join("root/etc/real/ssh_host_ed25519_key");
        let err = Image::open(&not_ext4).err().unwrap();
        assert!(matches!(err, ImageError::Open { .. }), "{err}");
    }

    #[test]
    fn lists_a_tree_deterministically() {
        let tmp = tempfile::tempdir().unwrap();
        let image = small_image(tmp.path());
        let listing = image.listing("/").unwrap();
        insta::assert_snapshot!(listing.replace(&long_name(), "x{70}"));
        let err = image.walk("/nothing").unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Read {
                    source: Ext4Error::NotFound,
                    ..
                }
            ),
            "{err}"
        );
    }
}
