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

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

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
