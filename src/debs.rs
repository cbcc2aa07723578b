//! The package cache: the `.deb` files that `debootstrap` and `apt` steps
//! downloaded, kept in the store under `debs/` by the name apt gives them
//! (`NAME_VERSION_ARCH.deb`, a `:` written `%3a`), so that a step that runs
//! again downloads only what is new.
//!
//! A step never sees the store's directory itself: it gets a private archive
//! directory holding hard links to the cached files ([`stage`]), and the files
//! it downloaded are linked back afterwards ([`keep`]). A name is only a hint:
//! apt and debootstrap check every `.deb` against the size and SHA-256 of the
//! archive's signed index before using it, and download it again on a
//! mismatch. The archive directory is bound outside the step's layer (apt's) or
//! is volatile (debootstrap's), so the cache never changes an image.
//!
//! The `.deb`s a step's lock pins (see `lock`) also travel through the
//! remotes, as a *package set*: a layer of those files (`NAME_VER_ARCH.deb`
//! at its root) recorded under a key made of the pins alone ([`set_key`]).
//! A machine that must run a pinned step whose `.deb`s it lacks takes them
//! from there ([`unpack_set`]), so a locked build keeps working after the
//! archive dropped a pinned version as long as some cache holds it.
//!
//! A `debootstrap` step cannot be told versions, so with the package set it
//! keeps the archive's own index entries for its packages ([`ArchiveIndex`],
//! read from the index debootstrap downloaded). When the package cache holds
//! every pinned `.deb` and that index, a pinned base is bootstrapped from a
//! local mirror made of them alone ([`local_mirror`]): the same packages,
//! the same index fields (priorities decide what debootstrap picks), no
//! network, and no dependence on what the archive still has.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::capture;
use crate::digest::{Digest, KeyEncoder};
use crate::dpkg::Deb;
use crate::io_at::io_at;
use crate::layer::{Kind, Layer};
use crate::normalize::Normalizer;
use crate::store::{Store, StoreError};

/// Whether `name` is a plain `.deb` file name as apt and debootstrap write them.
fn is_deb_name(name: &str) -> bool {
    name.len() > 4
        && name.ends_with(".deb")
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+~%-".contains(c))
}

/// Creates `dir` (with apt's `partial/`) holding a hard link to every cached `.deb`.
pub fn stage(cache: &Path, dir: &Path) -> io::Result<usize> {
    fs::create_dir_all(dir.join("partial"))?;
    let mut linked = 0;
    for entry in fs::read_dir(cache)? {
        let entry = entry?;
        let name = entry.file_name();
        if !name.to_str().is_some_and(is_deb_name) || !entry.file_type()?.is_file() {
            continue;
        }
        fs::hard_link(entry.path(), dir.join(&name))?;
        linked += 1;
    }
    Ok(linked)
}

/// Links every `.deb` a step downloaded into `dir` into the cache: regular
/// files with a package file name that are not already cache files, made
/// root's and read-only for others. Returns how many were added.
pub fn keep(dir: &Path, cache: &Path) -> io::Result<usize> {
    let mut added = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let meta = fs::symlink_metadata(entry.path())?;
        if !name.to_str().is_some_and(is_deb_name) || !meta.is_file() || meta.nlink() != 1 {
            continue;
        }
        let path = entry.path();
        std::os::unix::fs::lchown(&path, Some(0), Some(0))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        match fs::hard_link(&path, cache.join(&name)) {
            Ok(()) => added += 1,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(added)
}

/// What a debootstrap run read from the archive, for bootstrapping the same
/// packages again from the package cache: the `sources.list` it wrote, and
/// per component the archive's index entries (`Packages` paragraphs, in the
/// archive's order) of the packages it installed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ArchiveIndex {
    pub sources_list: String,
    pub components: std::collections::BTreeMap<String, String>,
}

/// The file name of a package set's archive index in the package cache.
fn index_name(set: &Digest) -> String {
    format!("{}.index", set.to_hex())
}

impl ArchiveIndex {
    /// Reads what debootstrap left in the root `root` (its downloaded
    /// `Packages` files and `sources.list`), keeping the paragraphs of the
    /// packages dpkg lists as installed there. `None` when any part is missing.
    pub fn of_root(root: &Path, suite: &str, arch: &str) -> Option<ArchiveIndex> {
        let sources_list = fs::read_to_string(root.join("etc/apt/sources.list")).ok()?;
        let status = fs::read_to_string(root.join("var/lib/dpkg/status")).ok()?;
        let installed: std::collections::BTreeSet<(String, String)> =
            crate::dpkg::installed(&status)
                .into_iter()
                .map(|p| (p.name, p.version))
                .collect();
        let middle = format!("_dists_{suite}_");
        let tail = format!("_binary-{arch}_Packages");
        let mut components = std::collections::BTreeMap::new();
        for entry in fs::read_dir(root.join("var/lib/apt/lists")).ok()? {
            let name = entry.ok()?.file_name().to_string_lossy().into_owned();
            let Some(component) = name
                .strip_suffix(&tail)
                .and_then(|n| n.split_once(&middle))
                .map(|(_, c)| c.to_string())
            else {
                continue;
            };
            let text = fs::read_to_string(root.join("var/lib/apt/lists").join(&name)).ok()?;
            let kept: String = text
                .split("\n\n")
                .filter(|para| {
                    let field = |f: &str| {
                        para.lines()
                            .find_map(|l| l.strip_prefix(f))
                            .map(|v| v.trim().to_string())
                    };
                    match (field("Package:"), field("Version:")) {
                        (Some(p), Some(v)) => installed.contains(&(p, v)),
                        _ => false,
                    }
                })
                .map(|para| format!("{}\n\n", para.trim_end()))
                .collect();
            components.insert(component, kept);
        }
        (!components.is_empty()).then_some(ArchiveIndex {
            sources_list,
            components,
        })
    }

    /// Keeps the index with the package cache, beside the set `set`'s `.deb`s.
    pub fn save(&self, cache: &Path, set: &Digest) -> io::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(cache)?;
        serde_json::to_writer(&mut tmp, self)?;
        tmp.persist(cache.join(index_name(set)))?;
        Ok(())
    }

    /// The index kept for the set `set`, if any.
    pub fn load(cache: &Path, set: &Digest) -> Option<ArchiveIndex> {
        let bytes = fs::read(cache.join(index_name(set))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Makes `dir` a mirror debootstrap can bootstrap `suite` from: the pinned
/// `.deb`s (hard links into the package cache, each checked against its
/// pin's SHA-256 first) where the archive's index entries for them put them,
/// those entries as they are, and an unsigned `Release` naming their
/// digests. `None` when the cache lacks a pinned file or holds another one.
pub fn local_mirror(
    cache: &Path,
    pins: &[Deb],
    index: &ArchiveIndex,
    suite: &str,
    arch: &str,
    dir: &Path,
) -> io::Result<Option<()>> {
    use sha2::Digest as _;
    // Where the index puts each file, by the file's SHA-256.
    let mut places = std::collections::BTreeMap::new();
    for para in index.components.values().flat_map(|p| p.split("\n\n")) {
        let field = |f: &str| para.lines().find_map(|l| l.strip_prefix(f)).map(str::trim);
        if let (Some(path), Some(sum)) = (field("Filename:"), field("SHA256:")) {
            if path.split('/').any(|c| c.is_empty() || c == "..") {
                return Ok(None);
            }
            places.insert(sum.to_string(), path.to_string());
        }
    }
    for deb in pins {
        let (Some(file), Some(place)) = (cached(cache, deb), places.get(&deb.sha256)) else {
            return Ok(None);
        };
        if crate::measure::sha256_of(&file)? != deb.sha256 {
            return Ok(None);
        }
        let dest = dir.join(place);
        fs::create_dir_all(dest.parent().expect("a parent"))?;
        fs::hard_link(&file, dest)?;
    }
    let mut release =
        format!(
        "Origin: kiln package cache\nSuite: {suite}\nCodename: {suite}\nArchitectures: {arch}\n\
         Components: {}\nSHA256:\n",
        index.components.keys().cloned().collect::<Vec<_>>().join(" ")
    );
    for (component, text) in &index.components {
        let rel = format!("{component}/binary-{arch}/Packages");
        let path = dir.join("dists").join(suite).join(&rel);
        fs::create_dir_all(path.parent().expect("a parent"))?;
        fs::write(&path, text)?;
        let sum = hex::encode(sha2::Sha256::digest(text.as_bytes()));
        release.push_str(&format!(" {sum} {} {rel}\n", text.len()));
    }
    fs::write(dir.join("dists").join(suite).join("Release"), release)?;
    Ok(Some(()))
}

/// The key a step's package set is recorded under: its pins alone.
pub fn set_key(pins: &[Deb]) -> Digest {
    let mut enc = KeyEncoder::new("kiln package set");
    enc.u64(pins.len() as u64);
    for d in pins {
        enc.str(&d.name).str(&d.version).str(&d.arch).str(&d.sha256);
    }
    enc.finish()
}

/// The cached file of `deb`, if the package cache has it.
pub fn cached(cache: &Path, deb: &Deb) -> Option<std::path::PathBuf> {
    deb.file_names()
        .into_iter()
        .map(|n| cache.join(n))
        .find(|f| f.is_file())
}

/// Stores the pinned `.deb`s of the package cache as a layer: the package
/// set to push. `None` when the cache lacks one of them.
pub fn capture_set(store: &Store, pins: &[Deb]) -> Result<Option<Layer>, StoreError> {
    let work = store.work_dir()?;
    let dir = work.path().join("set");
    fs::create_dir(&dir).map_err(io_at(&dir))?;
    for deb in pins {
        let Some(file) = cached(&store.debs_dir(), deb) else {
            return Ok(None);
        };
        let name = file.file_name().expect("a cached file has a name");
        fs::hard_link(&file, dir.join(name)).map_err(io_at(&file))?;
    }
    let index = store.debs_dir().join(index_name(&set_key(pins)));
    if index.is_file() {
        fs::hard_link(&index, dir.join(SET_INDEX)).map_err(io_at(&index))?;
    }
    capture::capture(&dir, store, &Normalizer::new(0))
        .map(Some)
        .map_err(|e| io_at(&dir)(io::Error::other(e.to_string())).into())
}

/// The name of the archive index in a package set's layer.
const SET_INDEX: &str = "index.json";

/// Copies the files of the package set `layer` of the pins `pins` into the
/// package cache (those it lacks); how many `.deb`s.
pub fn unpack_set(store: &Store, layer: &Layer, pins: &[Deb]) -> Result<usize, StoreError> {
    let cache = store.debs_dir();
    let mut added = 0;
    for entry in &layer.entries {
        let Kind::File { blob, .. } = &entry.kind else {
            continue;
        };
        let name = match entry.path.as_str() {
            SET_INDEX => index_name(&set_key(pins)),
            deb if is_deb_name(deb) => deb.to_string(),
            _ => continue,
        };
        let dest = cache.join(&name);
        if dest.exists() {
            continue;
        }
        let mut reader = store.open_blob(blob)?;
        let io_err = |source| io_at(&dest)(source);
        let mut tmp = tempfile::NamedTempFile::new_in(&cache).map_err(io_err)?;
        io::copy(&mut reader, &mut tmp).map_err(io_err)?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(io_err)?;
        match tmp.persist_noclobber(&dest) {
            Ok(_) => added += usize::from(name != index_name(&set_key(pins))),
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(e.error).into()),
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_local_mirror_holds_only_files_that_match_their_pins() {
        use sha2::Digest as _;
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("debs");
        fs::create_dir(&cache).unwrap();
        fs::write(cache.join("jq_1.7_amd64.deb"), b"jq").unwrap();
        let sum = hex::encode(sha2::Sha256::digest(b"jq"));
        let pin = Deb {
            name: "jq".into(),
            version: "1.7".into(),
            arch: "amd64".into(),
            sha256: sum.clone(),
        };
        let index = |filename: &str| {
            ArchiveIndex {
            sources_list: "deb http://mirror.invalid/debian trixie main\n".into(),
            components: [(
                "main".to_string(),
                format!("Package: jq\nVersion: 1.7\nPriority: optional\nFilename: {filename}\nSHA256: {sum}\n\n"),
            )]
            .into(),
        }
        };
        let dir = tmp.path().join("mirror");
        let made = local_mirror(
            &cache,
            std::slice::from_ref(&pin),
            &index("pool/main/j/jq/jq_1.7_amd64.deb"),
            "trixie",
            "amd64",
            &dir,
        );
        assert_eq!(made.unwrap(), Some(()));
        assert_eq!(
            fs::read(dir.join("pool/main/j/jq/jq_1.7_amd64.deb")).unwrap(),
            b"jq"
        );
        let packages =
            fs::read_to_string(dir.join("dists/trixie/main/binary-amd64/Packages")).unwrap();
        assert!(packages.contains("Priority: optional"), "{packages}");
        let release = fs::read_to_string(dir.join("dists/trixie/Release")).unwrap();
        let line = format!(
            " {} {} main/binary-amd64/Packages",
            hex::encode(sha2::Sha256::digest(packages.as_bytes())),
            packages.len()
        );
        assert!(
            release.contains(&line) && release.contains("Suite: trixie"),
            "{release}"
        );
        // A path out of the mirror, another file under the pinned name: no mirror.
        let out = tmp.path().join("out");
        assert_eq!(
            local_mirror(
                &cache,
                std::slice::from_ref(&pin),
                &index("../../x.deb"),
                "trixie",
                "amd64",
                &out
            )
            .unwrap(),
            None
        );
        fs::write(cache.join("jq_1.7_amd64.deb"), b"not jq").unwrap();
        let other = tmp.path().join("other");
        assert_eq!(
            local_mirror(
                &cache,
                &[pin],
                &index("pool/jq.deb"),
                "trixie",
                "amd64",
                &other
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn names_are_plain_package_files() {
        for ok in [
            "jq_1.7.1-3_amd64.deb",
            "libc6_2.41-12_amd64.deb",
            "sudo_1%3a1.9_amd64.deb",
        ] {
            assert!(is_deb_name(ok), "{ok}");
        }
        for bad in [
            ".deb",
            ".hidden.deb",
            "a/b.deb",
            "lock",
            "x.deb.partial",
            "a b.deb",
            "..deb",
        ] {
            assert!(!is_deb_name(bad), "{bad}");
        }
    }

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn downloads_go_back_to_the_cache_and_nothing_else_does() {
        let tmp = tempfile::tempdir().unwrap();
        let (cache, first, second) = (
            tmp.path().join("cache"),
            tmp.path().join("one"),
            tmp.path().join("two"),
        );
        fs::create_dir(&cache).unwrap();
        fs::write(cache.join("old_1_amd64.deb"), b"old").unwrap();
        assert_eq!(stage(&cache, &first).unwrap(), 1);
        assert!(first.join("partial").is_dir());
        assert_eq!(
            fs::metadata(first.join("old_1_amd64.deb")).unwrap().ino(),
            fs::metadata(cache.join("old_1_amd64.deb")).unwrap().ino()
        );
        // What a step leaves: a download, a partial one, a link and a lock.
        fs::write(first.join("new_2_amd64.deb"), b"new").unwrap();
        fs::set_permissions(
            first.join("new_2_amd64.deb"),
            fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        fs::write(first.join("partial/half_3_amd64.deb"), b"ha").unwrap();
        symlink("/etc/shadow", first.join("evil_1_amd64.deb")).unwrap();
        fs::write(first.join("lock"), b"").unwrap();
        assert_eq!(keep(&first, &cache).unwrap(), 1);
        let mut names: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["new_2_amd64.deb", "old_1_amd64.deb"]);
        let kept = fs::metadata(cache.join("new_2_amd64.deb")).unwrap();
        assert_eq!((kept.mode() & 0o7777, kept.uid()), (0o644, 0));
        // The next step sees both; keeping again adds nothing.
        assert_eq!(stage(&cache, &second).unwrap(), 2);
        assert_eq!(keep(&second, &cache).unwrap(), 0);
    }
}
