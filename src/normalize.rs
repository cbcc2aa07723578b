//! What kiln leaves out of a captured layer, and how it pins timestamps.
//!
//! A step's output should depend on what the step did, not on when or where it
//! ran. Capture therefore:
//!
//! * drops the **contents** of volatile directories (the directories themselves
//!   stay, so packages that expect them still find them):
//!   `tmp/`, `var/tmp/`, `run/`, `var/log/` (files only; its sub-directories
//!   stay), `var/cache/apt/`, `var/lib/apt/lists/`, `var/cache/debconf/*-old`,
//!   `var/lib/dpkg/*-old`, `var/cache/ldconfig/aux-cache`, `root/.bash_history`,
//!   and the `etc/passwd-`-style backups of the account databases;
//! * drops identity files that must be unique per machine: `etc/machine-id`,
//!   `var/lib/dbus/machine-id` (systemd creates one on first boot), and the
//!   SSH host keys `etc/ssh/ssh_host_*` that openssh-server's install
//!   generates — private keys never reach a layer, so never a cache or a
//!   registry (an image makes its own at first boot);
//! * drops the build host's own files that tools copy into a root: the
//!   `etc/resolv.conf` and `etc/hostname` that debootstrap copies from the host,
//!   and the `etc/resolv.conf` mount point kiln itself provides during a step;
//! * clamps every mtime to the recipe's epoch (`SOURCE_DATE_EPOCH` semantics:
//!   a time later than the epoch becomes the epoch, earlier ones — such as the
//!   times shipped inside .deb packages — stay).
//!
//! Whiteouts are kept as they are, except under the dropped paths.
//!
//! Any other file that *is* a private key (it begins as a PEM or OpenSSH
//! private key, or a PuTTY key file, does; [`is_private_key`]) is dropped
//! too, and kiln says so on its output: a package's install script may make
//! one (ssl-cert's snake-oil key), and no key may reach a cache or registry.

/// How a private key file begins (the first line of a PEM block, an
/// OpenSSH key or a PuTTY key file).
const PRIVATE_KEY_STARTS: &[&[u8]] = &[b"-----BEGIN ", b"PuTTY-User-Key-File-"];

/// The longest first line [`is_private_key`] needs to see.
pub const PRIVATE_KEY_HEAD: usize = 64;

/// Whether a file beginning with `head` is a private key. Programs that
/// merely mention the marker (ssh, libraries) do not begin with it.
pub fn is_private_key(head: &[u8]) -> bool {
    let first_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    match PRIVATE_KEY_STARTS
        .iter()
        .find(|s| first_line.starts_with(s))
    {
        Some(start) if start.starts_with(b"PuTTY") => true,
        Some(_) => first_line
            .windows(b"PRIVATE KEY-----".len())
            .any(|w| w == b"PRIVATE KEY-----"),
        None => false,
    }
}

/// Directories whose whole contents are dropped.
const VOLATILE_DIRS: &[&str] = &[
    "tmp",
    "var/tmp",
    "run",
    "var/cache/apt",
    "var/lib/apt/lists",
];

/// Directories whose files (not sub-directories) are dropped.
const VOLATILE_FILE_DIRS: &[&str] = &["var/log"];

/// Single files that are dropped.
const VOLATILE_FILES: &[&str] = &[
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "var/cache/ldconfig/aux-cache",
    "root/.bash_history",
    // Backups that shadow's tools write next to the account databases.
    "etc/passwd-",
    "etc/group-",
    "etc/shadow-",
    "etc/gshadow-",
    "etc/subuid-",
    "etc/subgid-",
];

/// Files in these directories whose names start so are dropped (host keys).
const IDENTITY_PREFIXES: &[(&str, &str)] = &[("etc/ssh", "ssh_host_")];

/// Directories in which names ending in `-old` are dropped (backup copies).
const OLD_BACKUP_DIRS: &[&str] = &["var/cache/debconf", "var/lib/dpkg"];

/// The normalization applied to one step's captured output.
#[derive(Debug, Clone)]
pub struct Normalizer {
    /// Latest mtime kept, in seconds since 1970.
    pub epoch: i64,
    /// Extra paths this step's kind asks to drop (e.g. host copies).
    pub extra_drops: Vec<String>,
}

impl Normalizer {
    /// A normalizer clamping to `epoch` with no step-specific drops.
    pub fn new(epoch: i64) -> Normalizer {
        Normalizer {
            epoch,
            extra_drops: Vec::new(),
        }
    }

    /// Whether the entry at `path` (relative, `/`-separated) stays in the layer.
    pub fn keeps(&self, path: &str, is_dir: bool) -> bool {
        let under = |dir: &str| {
            path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
        };
        if VOLATILE_DIRS.iter().any(|d| under(d)) {
            return false;
        }
        if !is_dir && VOLATILE_FILE_DIRS.iter().any(|d| under(d)) {
            return false;
        }
        if VOLATILE_FILES.contains(&path) || self.extra_drops.iter().any(|p| p == path) {
            return false;
        }
        if let Some((dir, name)) = path.rsplit_once('/') {
            if OLD_BACKUP_DIRS.contains(&dir) && name.ends_with("-old") {
                return false;
            }
            let identity = IDENTITY_PREFIXES
                .iter()
                .any(|&(d, prefix)| d == dir && name.starts_with(prefix));
            if identity && !is_dir {
                return false;
            }
        }
        true
    }

    /// The mtime recorded for a file whose real mtime is `mtime`.
    pub fn mtime(&self, mtime: i64) -> i64 {
        mtime.min(self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_volatile_paths_and_keeps_the_rest() {
        let n = Normalizer {
            epoch: 100,
            extra_drops: vec!["etc/hostname".into()],
        };
        let cases = [
            ("tmp", true, true),
            ("tmp/x", false, false),
            ("tmpfoo", false, true),
            ("var/lib/apt/lists", true, true),
            ("var/lib/apt/lists/partial", true, false),
            ("var/lib/apt/lists/deb_InRelease", false, false),
            ("var/log/apt", true, true),
            ("var/log/apt/history.log", false, false),
            ("var/log/dpkg.log", false, false),
            ("etc/machine-id", false, false),
            ("etc/ssh/ssh_host_ed25519_key", false, false),
            ("etc/ssh/ssh_host_rsa_key.pub", false, false),
            ("etc/ssh/sshd_config", false, true),
            ("etc/ssh/sshd_config.d/ssh_host_x", false, true),
            ("etc/hostname", false, false),
            ("etc/hosts", false, true),
            ("var/lib/dpkg/status", false, true),
            ("var/lib/dpkg/status-old", false, false),
            ("var/cache/debconf/config.dat-old", false, false),
            ("usr/bin/old-thing-old", false, true),
        ];
        for (path, is_dir, kept) in cases {
            assert_eq!(n.keeps(path, is_dir), kept, "{path}");
        }
    }

    #[test]
    fn clamps_mtimes() {
        let n = Normalizer::new(100);
        assert_eq!(n.mtime(50), 50);
        assert_eq!(n.mtime(100), 100);
        assert_eq!(n.mtime(5000), 100);
    }
}
