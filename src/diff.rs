//! `kiln diff A B`: what changed between two images, read straight from
//! their ext4 files with [`crate::image`] (no mount, no root): packages
//! with their versions, accounts, enabled units, and every path added,
//! removed or changed (kind, mode, owner, contents, link target), each with
//! the package that owns it by dpkg's file lists.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::digest::Digest;
use crate::dpkg;
use crate::image::{FileType, Image, ImageError};

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// A manifest that names no image kiln can find.
    #[error("{image}: {message}")]
    Manifest { image: PathBuf, message: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{image}: cannot read {path}: {source}")]
    Read {
        image: PathBuf,
        path: String,
        source: std::io::Error,
    },
}

/// One path of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: NodeKind,
    /// Permission bits with setuid, setgid and sticky.
    mode: u32,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NodeKind {
    Dir,
    File { size: u64, blake3: Digest },
    Symlink(String),
    Special(&'static str),
}

/// What `diff` needs of one image: every path (relative, `/`-separated) and
/// the text of the files that say what is installed.
pub struct Listing {
    nodes: BTreeMap<String, Node>,
    /// `etc/passwd`, `var/lib/dpkg/status` and `var/lib/dpkg/info/*.list`.
    texts: BTreeMap<String, String>,
}

/// Whether `diff` keeps the text of the file at `path`.
fn keeps_text(path: &str) -> bool {
    path == "etc/passwd"
        || path == "var/lib/dpkg/status"
        || (path.starts_with("var/lib/dpkg/info/") && path.ends_with(".list"))
}

/// The image `path` names: the file itself, or for a manifest kiln wrote
/// (`*.json`) its root filesystem, looked for beside the manifest first (an
/// `images/` folder copied elsewhere) and then where the build wrote it.
pub fn image_of(path: &Path) -> Result<PathBuf, DiffError> {
    if path.extension().is_none_or(|e| e != "json") {
        return Ok(path.to_path_buf());
    }
    let failed = |message: String| DiffError::Manifest {
        image: path.to_path_buf(),
        message,
    };
    #[derive(serde::Deserialize)]
    struct Manifest {
        rootfs: Rootfs,
    }
    #[derive(serde::Deserialize)]
    struct Rootfs {
        file: PathBuf,
        path: PathBuf,
    }
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| failed(format!("not a kiln manifest ({e})")))?;
    let beside = path
        .parent()
        .unwrap_or(Path::new("."))
        .join(&manifest.rootfs.file);
    match [beside, manifest.rootfs.path]
        .into_iter()
        .find(|p| p.is_file())
    {
        Some(image) => Ok(image),
        None => Err(failed(format!(
            "its image `{}` is neither beside it nor where it was built",
            manifest.rootfs.file.display()
        ))),
    }
}

/// Reads every path of the ext4 image at `image` (or of the image a
/// manifest names, see [`image_of`]), hashing file contents.
pub fn list(image: &Path) -> Result<Listing, DiffError> {
    let image = &image_of(image)?;
    let fs = Image::open(image)?;
    let mut listing = Listing {
        nodes: BTreeMap::new(),
        texts: BTreeMap::new(),
    };
    for entry in fs.walk("/")? {
        let rel = entry.path.trim_start_matches('/').to_string();
        if rel.is_empty() {
            continue;
        }
        let stat = &entry.stat;
        let failed = |e: std::io::Error| DiffError::Read {
            image: image.to_path_buf(),
            path: entry.path.clone(),
            source: e,
        };
        let kind = match stat.kind {
            FileType::Directory => NodeKind::Dir,
            FileType::Regular => {
                let mut file = fs.open_entry(&entry)?;
                let mut hasher = blake3::Hasher::new();
                if keeps_text(&rel) {
                    let mut bytes = Vec::new();
                    file.read_to_end(&mut bytes).map_err(failed)?;
                    hasher.update(&bytes);
                    listing
                        .texts
                        .insert(rel.clone(), String::from_utf8_lossy(&bytes).into_owned());
                } else {
                    hasher.update_reader(&mut file).map_err(failed)?;
                }
                NodeKind::File {
                    size: stat.size,
                    blake3: Digest::from_hash(hasher.finalize()),
                }
            }
            FileType::Symlink => NodeKind::Symlink(stat.link.clone().unwrap_or_default()),
            FileType::BlockDevice => NodeKind::Special("block device"),
            FileType::CharDevice => NodeKind::Special("character device"),
            FileType::Fifo => NodeKind::Special("fifo"),
            FileType::Socket => NodeKind::Special("socket"),
        };
        listing.nodes.insert(
            rel,
            Node {
                kind,
                mode: stat.mode,
                uid: stat.uid,
                gid: stat.gid,
            },
        );
    }
    Ok(listing)
}

/// What changed from image A to image B.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub packages: Vec<PackageChange>,
    pub users: Vec<UserChange>,
    pub units: Vec<UnitChange>,
    pub files: Vec<FileChange>,
}

/// A package installed, removed or at another version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageChange {
    pub name: String,
    /// `None`: not installed.
    pub before: Option<String>,
    pub after: Option<String>,
}

/// An account added, removed or changed (its `/etc/passwd` line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserChange {
    pub name: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// A unit enabled or disabled: a link in a `*.wants` or `*.requires` directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitChange {
    /// The link, e.g. `etc/systemd/system/multi-user.target.wants/ssh.service`.
    pub link: String,
    pub enabled: bool,
}

/// A path added, removed or changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    pub path: String,
    /// `added`, `removed` or `changed`.
    pub change: &'static str,
    /// What changed: `kind`, `mode`, `owner`, `content`, `target`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<&'static str>,
    /// The package whose file list names the path (in B, or in A when removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
}

/// Compares two listings.
pub fn diff(a: &Listing, b: &Listing) -> Diff {
    let versions = |l: &Listing| -> BTreeMap<String, String> {
        l.texts
            .get("var/lib/dpkg/status")
            .map(|s| dpkg::installed(s))
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name, p.version))
            .collect()
    };
    let packages = changes(&versions(a), &versions(b))
        .into_iter()
        .map(|(name, before, after)| PackageChange {
            name,
            before,
            after,
        })
        .collect();
    let accounts = |l: &Listing| -> BTreeMap<String, String> {
        l.texts
            .get("etc/passwd")
            .map(|text| {
                text.lines()
                    .filter_map(|line| {
                        Some((line.split(':').next()?.to_string(), line.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let users = changes(&accounts(a), &accounts(b))
        .into_iter()
        .map(|(name, before, after)| UserChange {
            name,
            before,
            after,
        })
        .collect();

    let (owners_a, owners_b) = (owners(a), owners(b));
    let mut files = Vec::new();
    let mut units = Vec::new();
    let paths: BTreeSet<&String> = a.nodes.keys().chain(b.nodes.keys()).collect();
    for path in paths {
        let (x, y) = (a.nodes.get(path), b.nodes.get(path));
        let (change, what) = match (x, y) {
            (None, Some(_)) => ("added", Vec::new()),
            (Some(_), None) => ("removed", Vec::new()),
            (Some(x), Some(y)) if x != y => ("changed", what_changed(x, y)),
            _ => continue,
        };
        if is_unit_link(path) && change != "changed" {
            units.push(UnitChange {
                link: path.clone(),
                enabled: change == "added",
            });
        }
        let owners = if change == "removed" {
            &owners_a
        } else {
            &owners_b
        };
        files.push(FileChange {
            path: path.clone(),
            change,
            what,
            package: owners.get(path.as_str()).cloned(),
        });
    }
    Diff {
        packages,
        users,
        units,
        files,
    }
}

/// Entries of two maps that differ: (key, before, after).
fn changes(
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) -> Vec<(String, Option<String>, Option<String>)> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), a.get(k).cloned(), b.get(k).cloned()))
        .collect()
}

/// Which package each path belongs to (relative): the paths its file list
/// names, and dpkg's own files about it (`var/lib/dpkg/info/NAME.*`).
fn owners(listing: &Listing) -> HashMap<&str, String> {
    let mut owners = HashMap::new();
    for path in listing.nodes.keys() {
        if let Some(file) = path.strip_prefix("var/lib/dpkg/info/") {
            // NAME[:ARCH].EXT; a package name may hold dots itself.
            let stem = file.rsplit_once('.').map_or(file, |(stem, _)| stem);
            let package = stem.split(':').next().unwrap_or(stem);
            owners.insert(path.as_str(), package.to_string());
        }
    }
    for (path, text) in &listing.texts {
        let Some(list) = path.strip_prefix("var/lib/dpkg/info/") else {
            continue;
        };
        let package = list.trim_end_matches(".list");
        let package = package.split(':').next().unwrap_or(package).to_string();
        for line in text.lines() {
            let file = line.trim_start_matches('/');
            if !file.is_empty() && file != "." {
                owners.insert(file, package.clone());
            }
        }
    }
    owners
}

fn what_changed(x: &Node, y: &Node) -> Vec<&'static str> {
    let mut what = Vec::new();
    if std::mem::discriminant(&x.kind) != std::mem::discriminant(&y.kind) {
        what.push("kind");
    } else {
        match (&x.kind, &y.kind) {
            (NodeKind::File { .. }, NodeKind::File { .. }) if x.kind != y.kind => {
                what.push("content")
            }
            (NodeKind::Symlink(_), NodeKind::Symlink(_)) if x.kind != y.kind => what.push("target"),
            _ => {}
        }
    }
    if x.mode != y.mode {
        what.push("mode");
    }
    if (x.uid, x.gid) != (y.uid, y.gid) {
        what.push("owner");
    }
    what
}

/// Whether `path` is a unit's enablement link.
fn is_unit_link(path: &str) -> bool {
    path.contains("/systemd/")
        && path
            .rsplit('/')
            .nth(1)
            .is_some_and(|dir| dir.ends_with(".wants") || dir.ends_with(".requires"))
}

/// The diff for people: packages, users and units, then files grouped by
/// the package that owns them.
pub fn render(diff: &Diff) -> String {
    let mut out = String::new();
    let version = |v: &Option<String>| v.clone().unwrap_or_default();
    out.push_str(&format!("packages: {}\n", count(diff.packages.len())));
    for p in &diff.packages {
        let line = match (&p.before, &p.after) {
            (None, after) => format!("  + {} {}", p.name, version(after)),
            (before, None) => format!("  - {} {}", p.name, version(before)),
            (before, after) => format!("  ~ {} {} -> {}", p.name, version(before), version(after)),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!("users: {}\n", count(diff.users.len())));
    for u in &diff.users {
        let line = match (&u.before, &u.after) {
            (None, Some(after)) => format!("  + {after}"),
            (Some(before), None) => format!("  - {before}"),
            (before, after) => format!("  ~ {} -> {}", version(before), version(after)),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!("units: {}\n", count(diff.units.len())));
    for u in &diff.units {
        let sign = if u.enabled { "+" } else { "-" };
        out.push_str(&format!("  {sign} /{}\n", u.link));
    }
    let tally = |change: &str| diff.files.iter().filter(|f| f.change == change).count();
    out.push_str(&format!(
        "files: {} added, {} removed, {} changed\n",
        tally("added"),
        tally("removed"),
        tally("changed")
    ));
    let mut by_package: BTreeMap<Option<&str>, Vec<&FileChange>> = BTreeMap::new();
    for f in &diff.files {
        by_package.entry(f.package.as_deref()).or_default().push(f);
    }
    for (package, files) in by_package {
        out.push_str(&format!(
            "  {}:\n",
            package.map_or("not in any package's file list".to_string(), |p| format!(
                "package {p}"
            ))
        ));
        for f in files {
            let sign = match f.change {
                "added" => "+",
                "removed" => "-",
                _ => "~",
            };
            let what = if f.what.is_empty() {
                String::new()
            } else {
                format!("  ({})", f.what.join(", "))
            };
            out.push_str(&format!("    {sign} /{}{what}\n", f.path));
        }
    }
    out
}

fn count(n: usize) -> String {
    match n {
        0 => "no change".into(),
        1 => "1 change".into(),
        n => format!("{n} changes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(kind: NodeKind, mode: u32) -> Node {
        Node {
            kind,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    fn file(bytes: &[u8]) -> NodeKind {
        NodeKind::File {
            size: bytes.len() as u64,
            blake3: Digest::of(bytes),
        }
    }

    #[test]
    fn lists_an_ext4_image_without_mounting_it() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::{symlink, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("var/lib/dpkg/status"), "Package: jq\n").unwrap();
        std::fs::write(root.join("var/lib/dpkg/info/jq.list"), "/usr/bin/jq\n").unwrap();
        std::fs::write(root.join("usr/bin/jq"), b"\x7fELF").unwrap();
        std::fs::set_permissions(
            root.join("usr/bin/jq"),
            std::fs::Permissions::from_mode(0o4751),
        )
        .unwrap();
        symlink("jq", root.join("usr/bin/jq-link")).unwrap();
        // A directory whose name is not UTF-8.
        let odd = root.join(std::ffi::OsStr::from_bytes(b"odd\xff"));
        std::fs::create_dir(&odd).unwrap();
        std::fs::write(odd.join("inside"), b"x").unwrap();
        std::fs::write(root.join("var/lib/dpkg/info/python3.11:amd64.md5sums"), b"").unwrap();
        let image = tmp.path().join("image.ext4");
        crate::image::image_of_tree(&root, &image);
        let listing = list(&image).unwrap();
        let jq = &listing.nodes["usr/bin/jq"];
        assert_eq!(jq.kind, file(b"\x7fELF"));
        assert_eq!(jq.mode, 0o4751);
        assert_eq!(
            listing.nodes["usr/bin/jq-link"].kind,
            NodeKind::Symlink("jq".into())
        );
        assert_eq!(listing.nodes["usr/bin"].kind, NodeKind::Dir);
        assert_eq!(listing.texts["var/lib/dpkg/status"], "Package: jq\n");
        assert!(listing.texts.contains_key("var/lib/dpkg/info/jq.list"));
        assert!(!listing.texts.contains_key("usr/bin/jq"));
        assert_eq!(listing.nodes["odd\u{fffd}/inside"].kind, file(b"x"));
        assert_eq!(
            owners(&listing)["var/lib/dpkg/info/python3.11:amd64.md5sums"],
            "python3.11"
        );
        let err = list(&tmp.path().join("root/usr/bin/jq")).err().unwrap();
        assert!(
            matches!(err, DiffError::Image(ImageError::Open { .. })),
            "{err}"
        );
    }

    #[test]
    fn names_packages_users_units_and_files_with_their_owners() {
        let status = |extra: &str| {
            format!("Package: git\nStatus: install ok installed\nVersion: 1\n\n{extra}")
        };
        let a = Listing {
            nodes: BTreeMap::from([
                ("etc".into(), node(NodeKind::Dir, 0o755)),
                ("etc/motd".into(), node(file(b"hi"), 0o644)),
                ("home".into(), node(NodeKind::Dir, 0o755)),
                ("usr/bin/old".into(), node(file(b"old"), 0o755)),
            ]),
            texts: BTreeMap::from([
                ("var/lib/dpkg/status".into(), status("")),
                ("etc/passwd".into(), "root:x:0:0::/root:/bin/bash\n".into()),
            ]),
        };
        let b = Listing {
            nodes: BTreeMap::from([
                ("etc".into(), node(NodeKind::Dir, 0o755)),
                ("etc/motd".into(), node(file(b"hello"), 0o600)),
                (
                    "home".into(),
                    Node {
                        gid: 1000,
                        ..node(NodeKind::Dir, 0o755)
                    },
                ),
                ("usr/bin/jq".into(), node(file(b"jq"), 0o755)),
                (
                    "etc/systemd/system/multi-user.target.wants/jq.service".into(),
                    node(NodeKind::Symlink("/lib/jq.service".into()), 0o777),
                ),
            ]),
            texts: BTreeMap::from([
                (
                    "var/lib/dpkg/status".into(),
                    status("Package: jq\nStatus: install ok installed\nVersion: 1.7\n"),
                ),
                (
                    "var/lib/dpkg/info/jq.list".into(),
                    "/.\n/usr\n/usr/bin/jq\n".into(),
                ),
                (
                    "etc/passwd".into(),
                    "root:x:0:0::/root:/bin/bash\nagent:x:1000:1000::/home/agent:/bin/bash\n"
                        .into(),
                ),
            ]),
        };
        let d = diff(&a, &b);
        assert_eq!(
            d.packages,
            [PackageChange {
                name: "jq".into(),
                before: None,
                after: Some("1.7".into())
            }]
        );
        assert_eq!(d.users.len(), 1);
        assert_eq!(d.users[0].name, "agent");
        assert_eq!(d.units.len(), 1);
        assert!(d.units[0].enabled);
        let files: Vec<(&str, &str, Vec<&str>, Option<&str>)> = d
            .files
            .iter()
            .map(|f| {
                (
                    f.path.as_str(),
                    f.change,
                    f.what.clone(),
                    f.package.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            files,
            [
                ("etc/motd", "changed", vec!["content", "mode"], None),
                (
                    "etc/systemd/system/multi-user.target.wants/jq.service",
                    "added",
                    vec![],
                    None
                ),
                ("home", "changed", vec!["owner"], None),
                ("usr/bin/jq", "added", vec![], Some("jq")),
                ("usr/bin/old", "removed", vec![], None),
            ]
        );
        let text = render(&d);
        assert!(text.contains("  + jq 1.7\n"), "{text}");
        assert!(
            text.contains("  package jq:\n    + /usr/bin/jq\n"),
            "{text}"
        );
        assert!(text.contains("~ /etc/motd  (content, mode)"), "{text}");
        assert!(
            text.contains("files: 2 added, 1 removed, 2 changed"),
            "{text}"
        );
    }
}
