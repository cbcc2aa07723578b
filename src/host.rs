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
        program: "debugfs",
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

/// Makes sure every tool is present, installing missing packages with apt-get.
pub fn ensure(tools: &[Tool]) -> Result<(), String> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|t| !has(t.program))
        .map(|t| t.package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !has("apt-get") {
        return Err(format!(
            "missing host packages: {list}; install them with your package manager"
        ));
    }
    eprintln!("kiln: installing missing host packages: {list}");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if install() {
        return Ok(());
    }
    let _ = Command::new("apt-get").args(["update", "-q"]).status();
    if install() {
        Ok(())
    } else {
        Err(format!(
            "could not install {list} with apt-get; install them by hand"
        ))
    }
}
