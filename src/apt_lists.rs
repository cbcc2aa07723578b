//! apt's package lists, kept in the store between apt runs so that the next
//! run's `apt-get update` downloads only what changed in the archive.
//!
//! A kept list reaches a run only after kiln checked it against the
//! `InRelease` file it was kept with: its size and SHA-256 must be the ones
//! that file gives for it ([`seed`]). The `InRelease` goes in dated 1970, so
//! apt always downloads the archive's current one and checks its signature;
//! apt then keeps a list only where the current, signed `InRelease` gives the
//! same hash as the kept one. A list changed after apt checked it (by an
//! install script of the run that left it, say) is therefore never used, and
//! a run sees the lists a run from empty lists would download. The lists
//! never reach a layer (see [`crate::normalize`]).
//!
//! Layout: `apt-lists/<apt's file name>` in the store, the last run's copy of
//! each ([`keep`] replaces them one by one). A run gets them at [`SEED_DIR`].

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use crate::measure;

/// Where an apt run finds the checked lists to start from (bound from the
/// host; the run copies them into its own `/var/lib/apt/lists`).
pub const SEED_DIR: &str = "/run/kiln-apt-lists";

/// What an `InRelease` file gives for one of its index files.
#[derive(Debug, PartialEq, Eq)]
struct Listed {
    size: u64,
    sha256: String,
}

/// The SHA256 section of an `InRelease` (or `Release`) file: each index
/// file's path in the archive, its size and digest.
fn listed(release: &str) -> BTreeMap<String, Listed> {
    let mut out = BTreeMap::new();
    let mut in_section = false;
    for line in release.lines() {
        if !line.starts_with(' ') {
            in_section = line.trim_end() == "SHA256:";
            continue;
        }
        if !in_section {
            continue;
        }
        let mut fields = line.split_whitespace();
        if let (Some(sha256), Some(size), Some(path), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        {
            if let Ok(size) = size.parse() {
                let sha256 = sha256.to_ascii_lowercase();
                out.insert(path.to_string(), Listed { size, sha256 });
            }
        }
    }
    out
}

/// The `InRelease` files in `dir`, by name, with what each lists under the
/// file name apt gives that index (the `InRelease` file's name up to
/// `InRelease`, then the index's path with `/` as `_`).
fn releases(dir: &Path) -> io::Result<Vec<(String, BTreeMap<String, Listed>)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(prefix) = name.strip_suffix("InRelease") else {
            continue;
        };
        if !entry.file_type()?.is_file() {
            continue;
        }
        let text = fs::read_to_string(entry.path())?;
        let indexes = listed(&text)
            .into_iter()
            .map(|(path, listed)| (format!("{prefix}{}", path.replace('/', "_")), listed))
            .collect();
        out.push((name, indexes));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A regular file's size, if `path` is one.
fn file_size(path: &Path) -> Option<u64> {
    fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| m.len())
}

/// After an apt run that ended well: keeps from its `lists` directory each
/// `InRelease` file and the index files it lists (those of the listed size)
/// in the store's `pool`, replacing older copies. Returns how many files.
pub fn keep(lists: &Path, pool: &Path) -> io::Result<usize> {
    fs::create_dir_all(pool)?;
    let mut kept = 0;
    for (release, indexes) in releases(lists)? {
        let mut names = vec![release];
        names.extend(
            indexes
                .into_iter()
                .filter(|(name, listed)| file_size(&lists.join(name)) == Some(listed.size))
                .map(|(name, _)| name),
        );
        for name in names {
            let tmp = pool.join(format!(".{name}.{}", std::process::id()));
            let _ = fs::remove_file(&tmp);
            // The run is over: nothing writes its files any more.
            if fs::hard_link(lists.join(&name), &tmp).is_err() {
                fs::copy(lists.join(&name), &tmp)?;
            }
            fs::rename(&tmp, pool.join(&name))?;
            kept += 1;
        }
    }
    Ok(kept)
}

/// Before an apt run: puts into `dest` (new) the kept lists of `pool` that
/// match the `InRelease` they were kept with, and those `InRelease` files,
/// dated 1970. Returns how many index files.
pub fn seed(pool: &Path, dest: &Path) -> io::Result<usize> {
    fs::create_dir(dest)?;
    if !pool.is_dir() {
        return Ok(0);
    }
    let mut seeded = 0;
    for (release, indexes) in releases(pool)? {
        let mut matching = 0;
        for (name, listed) in indexes {
            let from = pool.join(&name);
            if file_size(&from) != Some(listed.size) {
                continue;
            }
            let to = dest.join(&name);
            fs::copy(&from, &to)?;
            // The copy is what the run gets: check that one.
            if measure::sha256_of(&to)? == listed.sha256 {
                matching += 1;
            } else {
                fs::remove_file(&to)?;
            }
        }
        if matching > 0 {
            let to = dest.join(&release);
            fs::copy(pool.join(&release), &to)?;
            let epoch = std::time::SystemTime::UNIX_EPOCH;
            fs::File::options()
                .write(true)
                .open(&to)?
                .set_times(fs::FileTimes::new().set_accessed(epoch).set_modified(epoch))?;
            seeded += matching;
        }
    }
    Ok(seeded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    const NAME: &str = "deb.example_debian_dists_trixie_InRelease";
    const INDEX: &str = "deb.example_debian_dists_trixie_main_binary-amd64_Packages";

    fn release_for(index: &[u8]) -> String {
        let sha = hex::encode(sha2::Sha256::digest(index));
        format!(
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nOrigin: Debian\nSuite: trixie\n\
             MD5Sum:\n 00000000000000000000000000000000 {len} main/binary-amd64/Packages\n\
             SHA256:\n {sha} {len} main/binary-amd64/Packages\n \
             {sha} 99 main/binary-i386/Packages\n\
             -----BEGIN PGP SIGNATURE-----\n\nxyz\n-----END PGP SIGNATURE-----\n",
            len = index.len()
        )
    }

    #[test]
    fn reads_the_sha256_section_only() {
        let text = release_for(b"Package: a\n");
        let got = listed(&text);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["main/binary-amd64/Packages"].size, 11);
        assert_eq!(
            got["main/binary-amd64/Packages"].sha256,
            hex::encode(sha2::Sha256::digest(b"Package: a\n"))
        );
    }

    /// A run's lists, kept and seeded again: what matches goes in, the
    /// `InRelease` dated 1970; a list changed after apt checked it, or one
    /// no `InRelease` names, does not.
    #[test]
    fn seeds_only_lists_that_match_their_inrelease() {
        let tmp = tempfile::tempdir().unwrap();
        let (lists, pool) = (tmp.path().join("lists"), tmp.path().join("pool"));
        fs::create_dir_all(lists.join("partial")).unwrap();
        let index = b"Package: a\nVersion: 1\n\n";
        fs::write(lists.join(NAME), release_for(index)).unwrap();
        fs::write(lists.join(INDEX), index).unwrap();
        fs::write(lists.join("lock"), "").unwrap();
        fs::write(lists.join("other_Packages"), "x").unwrap();
        assert_eq!(keep(&lists, &pool).unwrap(), 2);
        let mut names: Vec<String> = fs::read_dir(&pool)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [NAME, INDEX]);

        let seeded = tmp.path().join("seed1");
        assert_eq!(seed(&pool, &seeded).unwrap(), 1);
        assert_eq!(fs::read(seeded.join(INDEX)).unwrap(), index);
        let modified = fs::metadata(seeded.join(NAME)).unwrap().modified().unwrap();
        assert_eq!(modified, std::time::SystemTime::UNIX_EPOCH);

        // The same size, another content: not handed out, and neither is
        // its InRelease.
        fs::write(pool.join(INDEX), b"Package: b\nVersion: 1\n\n").unwrap();
        let seeded = tmp.path().join("seed2");
        assert_eq!(seed(&pool, &seeded).unwrap(), 0);
        assert_eq!(fs::read_dir(&seeded).unwrap().count(), 0);

        // No pool yet: nothing, and no error.
        let seeded = tmp.path().join("seed3");
        assert_eq!(seed(&tmp.path().join("none"), &seeded).unwrap(), 0);
    }
}
