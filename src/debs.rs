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

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::digest::{Digest, KeyEncoder};
use crate::layer::{self, Kind, Layer};
use crate::lock::Deb;
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
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    fs::create_dir(&dir).map_err(io(&dir))?;
    for deb in pins {
        let Some(file) = cached(&store.debs_dir(), deb) else {
            return Ok(None);
        };
        let name = file.file_name().expect("a cached file has a name");
        fs::hard_link(&file, dir.join(name)).map_err(io(&file))?;
    }
    layer::capture(&dir, store, &Normalizer::new(0))
        .map(Some)
        .map_err(|e| StoreError::Io {
            path: dir.clone(),
            source: io::Error::other(e.to_string()),
        })
}

/// Copies the files of the package set `layer` into the package cache (those
/// it lacks); how many.
pub fn unpack_set(store: &Store, layer: &Layer) -> Result<usize, StoreError> {
    let cache = store.debs_dir();
    let mut added = 0;
    for entry in &layer.entries {
        let Kind::File { blob, .. } = &entry.kind else {
            continue;
        };
        if !is_deb_name(&entry.path) || cache.join(&entry.path).exists() {
            continue;
        }
        let mut reader = store.open_blob(blob)?;
        let dest = cache.join(&entry.path);
        let io_err = |source| StoreError::Io {
            path: dest.clone(),
            source,
        };
        let mut tmp = tempfile::NamedTempFile::new_in(&cache).map_err(io_err)?;
        io::copy(&mut reader, &mut tmp).map_err(io_err)?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(io_err)?;
        match tmp.persist_noclobber(&dest) {
            Ok(_) => added += 1,
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(e.error)),
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

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
