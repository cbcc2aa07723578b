//! Reading a finished ext4 image without mounting it and without root, through
//! e2fsprogs' `debugfs` (read-only): one `debugfs` process answers a whole
//! batch of `stat`s or file reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors while reading an image.
#[derive(Debug, thiserror::Error)]
#[error("{image}: {message}")]
pub struct ImageError {
    pub image: PathBuf,
    pub message: String,
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

/// What `stat` says about one path (not following a final symlink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub kind: FileType,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// The target of a (fast) symlink.
    pub link: Option<String>,
}

/// An ext4 image opened for reading.
pub struct Image {
    path: PathBuf,
}

impl Image {
    /// Opens `path`, which must be a readable file.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        std::fs::File::open(path).map_err(|e| ImageError {
            image: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Image {
            path: path.to_path_buf(),
        })
    }

    fn error(&self, message: String) -> ImageError {
        ImageError {
            image: self.path.clone(),
            message,
        }
    }

    /// Runs a debugfs script; returns stdout split into one chunk per command.
    fn batch(&self, commands: &[String]) -> Result<Vec<String>, ImageError> {
        let dir = tempfile::tempdir().map_err(|e| self.error(e.to_string()))?;
        let script = dir.path().join("script");
        std::fs::write(&script, commands.join("\n") + "\n")
            .map_err(|e| self.error(e.to_string()))?;
        let out = Command::new("debugfs")
            .arg("-f")
            .arg(&script)
            .arg(&self.path)
            .output()
            .map_err(|e| self.error(format!("cannot run debugfs ({e}); install e2fsprogs")))?;
        if !out.status.success() {
            return Err(self.error(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut chunks: Vec<String> = Vec::new();
        for line in text.lines() {
            if line.starts_with("debugfs: ") {
                chunks.push(String::new());
            } else if let Some(last) = chunks.last_mut() {
                last.push_str(line);
                last.push('\n');
            }
        }
        if chunks.len() != commands.len() {
            return Err(self.error(format!(
                "debugfs answered {} of {} requests; is this an ext4 image?",
                chunks.len(),
                commands.len()
            )));
        }
        Ok(chunks)
    }

    /// `stat`s every path (absolute, in the image); `None` for missing ones.
    /// A path debugfs cannot resolve for another reason (a symlink loop, too
    /// many nested links, a damaged directory) is an error, never "missing".
    pub fn stat_all(&self, paths: &[&str]) -> Result<BTreeMap<String, Option<Stat>>, ImageError> {
        if let Some(bad) = paths.iter().find(|p| !quotable(p)) {
            return Err(self.error(format!(
                "cannot look up {bad:?}: debugfs takes no path with a quote or a line break"
            )));
        }
        let usable: Vec<&str> = paths.to_vec();
        let commands: Vec<String> = usable.iter().map(|p| format!("stat \"{p}\"")).collect();
        let chunks = if commands.is_empty() {
            Vec::new()
        } else {
            self.batch(&commands)?
        };
        let mut out: BTreeMap<String, Option<Stat>> =
            paths.iter().map(|p| (p.to_string(), None)).collect();
        for (path, chunk) in usable.iter().zip(chunks) {
            let stat = parse_stat(&chunk);
            if stat.is_none() {
                self.confirm_missing(path)?;
            }
            out.insert(path.to_string(), stat);
        }
        Ok(out)
    }

    /// Succeeds only if debugfs says `path` is not there (rather than failing
    /// to resolve it): its error for a missing name is ext2_lookup's.
    fn confirm_missing(&self, path: &str) -> Result<(), ImageError> {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat \"{path}\""))
            .arg(&self.path)
            .output()
            .map_err(|e| self.error(format!("cannot run debugfs ({e}); install e2fsprogs")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("File not found by ext2_lookup") {
            return Ok(());
        }
        let why = stderr
            .lines()
            .filter(|l| !l.starts_with("debugfs "))
            .collect::<Vec<_>>()
            .join("; ");
        Err(self.error(format!("cannot read {path}: {}", why.trim())))
    }

    /// `stat` of one path.
    pub fn stat(&self, path: &str) -> Result<Option<Stat>, ImageError> {
        Ok(self.stat_all(&[path])?.remove(path).flatten())
    }

    /// Follows symlinks (up to 16) from `path`; the final path and its stat.
    pub fn resolve(&self, path: &str) -> Result<(String, Option<Stat>), ImageError> {
        let mut current = path.to_string();
        for _ in 0..16 {
            let stat = self.stat(&current)?;
            match stat.as_ref().and_then(|s| s.link.clone()) {
                Some(target) => {
                    current = if target.starts_with('/') {
                        target
                    } else {
                        let parent = Path::new(&current).parent().unwrap_or(Path::new("/"));
                        normalize(&parent.join(target))
                    };
                }
                None => return Ok((current, stat)),
            }
        }
        Err(self.error(format!("cannot read {path}: more than 16 symbolic links")))
    }

    /// Reads every regular file in `paths`; `None` for missing ones.
    pub fn read_all(
        &self,
        paths: &[&str],
    ) -> Result<BTreeMap<String, Option<Vec<u8>>>, ImageError> {
        let dir = tempfile::tempdir().map_err(|e| self.error(e.to_string()))?;
        let usable: Vec<&str> = paths.iter().copied().filter(|p| quotable(p)).collect();
        let commands: Vec<String> = usable
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "dump \"{p}\" \"{}\"",
                    dir.path().join(i.to_string()).display()
                )
            })
            .collect();
        if !commands.is_empty() {
            self.batch(&commands)?;
        }
        let mut out: BTreeMap<String, Option<Vec<u8>>> =
            paths.iter().map(|p| (p.to_string(), None)).collect();
        for (i, p) in usable.iter().enumerate() {
            out.insert(
                p.to_string(),
                std::fs::read(dir.path().join(i.to_string())).ok(),
            );
        }
        Ok(out)
    }

    /// Reads one file.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>, ImageError> {
        Ok(self.read_all(&[path])?.remove(path).flatten())
    }
}

/// Whether debugfs can take the path inside double quotes.
fn quotable(path: &str) -> bool {
    !path.contains(['"', '\n'])
}

/// Collapses `.` and `..` in an absolute path.
fn normalize(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            std::path::Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            std::path::Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    format!("/{}", parts.join("/"))
}

/// Parses debugfs's `stat` output.
fn parse_stat(text: &str) -> Option<Stat> {
    let field = |name: &str| -> Option<&str> {
        let at = text.find(name)? + name.len();
        text[at..].split_whitespace().next()
    };
    let type_line = text.lines().find(|l| l.starts_with("Inode:"))?;
    let kind_text = type_line
        .split("Type:")
        .nth(1)?
        .split("Mode:")
        .next()?
        .trim();
    let kind = match kind_text {
        "regular" => FileType::Regular,
        "directory" => FileType::Directory,
        "symlink" => FileType::Symlink,
        "character special" => FileType::CharDevice,
        "block special" => FileType::BlockDevice,
        "FIFO" => FileType::Fifo,
        "socket" => FileType::Socket,
        _ => return None,
    };
    let link = text
        .lines()
        .find_map(|l| l.strip_prefix("Fast link dest: "))
        .map(|l| l.trim().trim_matches('"').to_string());
    Some(Stat {
        kind,
        mode: u32::from_str_radix(field("Mode:")?, 8).ok()? & 0o7777,
        uid: field("User:")?.parse().ok()?,
        gid: field("Group:")?.parse().ok()?,
        size: field("Size:")?.parse().ok()?,
        link,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_output() {
        let text = "Inode: 425   Type: regular    Mode:  04755   Flags: 0x80000\nGeneration: 0    Version: 0x0\nUser:     0   Group:    50   Project:     0   Size: 310552\n";
        let s = parse_stat(text).unwrap();
        assert_eq!(
            (s.kind, s.mode, s.uid, s.gid, s.size),
            (FileType::Regular, 0o4755, 0, 50, 310552)
        );
        let link = "Inode: 9   Type: symlink    Mode:  0777   Flags: 0x0\nUser:     0   Group:     0   Project:     0   Size: 7\nFast link dest: \"usr/bin\"\n";
        assert_eq!(parse_stat(link).unwrap().link.as_deref(), Some("usr/bin"));
        let dev = "Inode: 22   Type: character special    Mode:  0666   Flags: 0x0\nUser:     0   Group:     0   Project:     0   Size: 0\n";
        assert_eq!(parse_stat(dev).unwrap().kind, FileType::CharDevice);
        assert!(parse_stat("").is_none());
        assert_eq!(
            normalize(Path::new("/usr/local/bin/../lib/./x")),
            "/usr/local/lib/x"
        );
    }

    /// A tree with `etc/ssh` reached through a chain of ten directory symlinks
    /// (more than debugfs follows), written with mkfs.ext4 -d.
    fn image_with_hidden_key(dir: &Path) -> PathBuf {
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("etc/real")).unwrap();
        std::fs::write(root.join("etc/real/ssh_host_ed25519_key"), "secret\n").unwrap();
        std::os::unix::fs::symlink("real", root.join("etc/d9")).unwrap();
        for i in (0..9).rev() {
            std::os::unix::fs::symlink(format!("d{}", i + 1), root.join(format!("etc/d{i}")))
                .unwrap();
        }
        std::os::unix::fs::symlink("d0", root.join("etc/ssh")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("etc/loop")).unwrap();
        let image = dir.join("x.ext4");
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&root)
            .arg(&image)
            .arg("8M")
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfs.ext4 -d failed");
        image
    }

    #[test]
    fn an_unresolvable_path_is_an_error_not_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let image = Image::open(&image_with_hidden_key(tmp.path())).unwrap();
        assert!(image
            .stat("/etc/real/ssh_host_ed25519_key")
            .unwrap()
            .is_some());
        assert!(image.stat("/etc/nothing").unwrap().is_none());
        assert!(image.stat("/nothing/below").unwrap().is_none());
        let err = image.stat("/etc/ssh/ssh_host_ed25519_key").unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot read /etc/ssh/ssh_host_ed25519_key"),
            "{err}"
        );
        assert!(image.resolve("/etc/loop").is_err());
        assert!(image.stat("/etc/a\"b").is_err());
    }
}
