//! The build host's tools: finds the programs a build needs and, when one is
//! missing on a Debian-family host and kiln runs as root, installs its package
//! with the host's own apt configuration.

use std::path::Path;
use std::process::Command;

/// A program kiln runs on the host and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

/// Programs every build needs (to write and check the image).
pub const IMAGE_TOOLS: &[Tool] = &[
    Tool {
        program: "mkfs.ext4",
        package: "e2fsprogs",
    },
    Tool {
        program: "e2fsck",
        package: "e2fsprogs",
    },
];

/// Whether `program` is on the PATH kiln's sandboxes use.
pub fn has(program: &str) -> bool {
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .any(|dir| Path::new(dir).join(program).is_file())
}

/// Why a host tool is missing after [`ensure`]; each says what to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// No apt-get to install them with.
    #[error("missing host packages: {}; install them with your package manager", .0.join(" "))]
    Missing(Vec<String>),
    #[error(
        "could not install {} with apt-get; install them by hand (`{}`)",
        .0.join(" "),
        by_hand(.0)
    )]
    InstallFailed(Vec<String>),
    /// apt would have to remove host packages, so nothing was installed.
    #[error(
        "installing {} would remove {} from this machine, so kiln installed nothing; \
         decide for yourself and run `{}` by hand",
        packages.join(" "),
        removals.join(" "),
        by_hand(packages)
    )]
    WouldRemove {
        packages: Vec<String>,
        removals: Vec<String>,
    },
}

/// The command that installs `packages` by hand.
fn by_hand(packages: &[String]) -> String {
    format!(
        "apt-get install --no-install-recommends {}",
        packages.join(" ")
    )
}

/// Makes sure every tool is present, installing missing packages with apt-get.
pub fn ensure(tools: &[Tool]) -> Result<(), HostError> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|t| !has(t.program))
        .map(|t| t.package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !has("apt-get") {
        return Err(HostError::Missing(
            missing.iter().map(|p| p.to_string()).collect(),
        ));
    }
    eprintln!(
        "kiln: installing missing host packages: {}",
        missing.join(" ")
    );
    install(Path::new("apt-get"), &missing)
}

/// Installs `packages` with `apt_get`, never removing a package of the host's:
/// when apt would have to remove one, nothing is installed and the error
/// names what would go and the command to run by hand.
fn install(apt_get: &Path, packages: &[&str]) -> Result<(), HostError> {
    let install = || {
        Command::new(apt_get)
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "--no-remove",
            ])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if install() {
        return Ok(());
    }
    let _ = Command::new(apt_get).args(["update", "-q"]).status();
    if install() {
        return Ok(());
    }
    let removals = would_remove(apt_get, packages);
    let packages = packages.iter().map(|p| p.to_string()).collect();
    if removals.is_empty() {
        Err(HostError::InstallFailed(packages))
    } else {
        Err(HostError::WouldRemove { packages, removals })
    }
}

/// The packages apt would remove to install `packages` (from a simulated run).
fn would_remove(apt_get: &Path, packages: &[&str]) -> Vec<String> {
    let simulated = Command::new(apt_get)
        .args(["install", "-s", "-q", "--no-install-recommends"])
        .args(packages)
        .output();
    let Ok(simulated) = simulated else {
        return Vec::new();
    };
    // One line per removal: `Remv NAME [VERSION]`.
    String::from_utf8_lossy(&simulated.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix("Remv "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in apt-get that behaves like the real one when installing a
    /// package conflicts with an installed one: it removes `qemu-utils`
    /// unless told `--no-remove`. Every call is logged to `calls`.
    fn conflicting_apt_get(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("apt-get");
        let script = format!(
            r#"#!/bin/sh
echo "$*" >> {calls}
case " $* " in
  *" -s "*) echo "Remv qemu-utils [1:7.2]"; echo "Inst qemu-system-x86 (1:7.2)"; exit 0 ;;
  *" update "*) exit 0 ;;
  *" --no-remove "*) echo "E: Packages need to be removed but remove is disabled." >&2; exit 100 ;;
  *) echo "REMOVED qemu-utils" >> {calls}; exit 0 ;;
esac
"#,
            calls = dir.join("calls").display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn installing_a_host_package_never_removes_one() {
        let tmp = tempfile::tempdir().unwrap();
        let apt_get = conflicting_apt_get(tmp.path());
        let err = install(&apt_get, &["qemu-system-x86"]).unwrap_err();
        assert_eq!(
            err,
            HostError::WouldRemove {
                packages: vec!["qemu-system-x86".into()],
                removals: vec!["qemu-utils".into()],
            }
        );
        let err = err.to_string();
        let calls = std::fs::read_to_string(tmp.path().join("calls")).unwrap();
        assert!(
            !calls.contains("REMOVED"),
            "a host package was removed:\n{calls}"
        );
        assert!(
            err.contains("would remove qemu-utils")
                && err.contains("`apt-get install --no-install-recommends qemu-system-x86`"),
            "{err}"
        );
    }

    #[test]
    fn a_clean_install_succeeds() {
        let tmp = tempfile::tempdir().unwrap();
        let apt_get = tmp.path().join("apt-get");
        std::fs::write(&apt_get, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&apt_get, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(install(&apt_get, &["e2fsprogs"]), Ok(()));
    }
}
