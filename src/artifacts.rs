//! What a build hands over next to the rootfs: the kernel and initrd taken
//! from the image's own `/boot` (so kernel and modules always match), and a
//! JSON manifest naming every artifact with its size, blake3 and sha256, the
//! recipe key, boot settings, and the body that registers the image with a
//! VM manager (`POST /api/images/pull`: `reference`, `kernelPath`, `rootfsPath`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::io_at::{io_at, IoAt};
use crate::kernel;
use crate::layer::{Kind, Layer};
use crate::measure::{self, Measured};
use crate::recipe::Output;
use crate::store::Store;

/// Why an artifact could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Io(#[from] IoAt),
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// One file the build wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifact {
    pub file: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub blake3: Digest,
    pub sha256: String,
}

impl Artifact {
    /// Measures the file at `path` (see [`crate::measure`]).
    pub fn of(path: &Path) -> Result<Artifact, ArtifactError> {
        let measured = measure::measure(path).map_err(io_at(path))?;
        Artifact::measured(path, measured)
    }

    /// The file at `path`, measured as `measured`.
    pub fn measured(path: &Path, measured: Measured) -> Result<Artifact, ArtifactError> {
        Ok(Artifact {
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: std::fs::canonicalize(path).map_err(io_at(path))?,
            bytes: measured.bytes,
            blake3: measured.blake3,
            sha256: measured.sha256,
        })
    }
}

/// The kernel and initrd a build wrote.
#[derive(Debug, Clone, Serialize)]
pub struct BootFiles {
    /// The kernel release, from `/boot/vmlinuz-<release>`.
    pub release: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
}

/// The newest `/boot/vmlinuz-<release>` in the image and its release.
fn find_kernel(tree: &Layer) -> Option<(&str, &Digest)> {
    tree.entries
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::File { blob, .. } => Some((e.path.strip_prefix("boot/vmlinuz-")?, blob)),
            _ => None,
        })
        .max_by(|a, b| version_cmp(a.0, b.0))
}

/// Compares kernel releases by their numeric parts, then as text.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let nums = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    nums(a).cmp(&nums(b)).then_with(|| a.cmp(b))
}

/// Writes `bytes` to `dest` atomically.
fn write_file(dest: &Path, bytes: &[u8]) -> Result<(), ArtifactError> {
    let partial = dest.with_extension("partial");
    std::fs::write(&partial, bytes).map_err(io_at(&partial))?;
    std::fs::rename(&partial, dest).map_err(io_at(dest))?;
    Ok(())
}

/// Writes the kernel (as an ELF vmlinux) and initrd the output asks for.
pub fn write_boot_files(
    store: &Store,
    tree: &Layer,
    output: &Output,
    out_dir: &Path,
) -> Result<Option<BootFiles>, ArtifactError> {
    let Some(kernel_name) = &output.kernel else {
        return Ok(None);
    };
    let (release, blob) = find_kernel(tree).ok_or_else(|| {
        ArtifactError::Missing(
            "output.kernel is set but the image has no /boot/vmlinuz-*; install the distribution's kernel package in a step"
                .into(),
        )
    })?;
    let read = |d: &Digest| store.read_blob(d);
    let kernel_path = out_dir.join(kernel_name);
    write_file(&kernel_path, &kernel::to_vmlinux(&read(blob)?)?)?;
    let initrd = match &output.initrd {
        None => None,
        Some(name) => {
            let wanted = format!("boot/initrd.img-{release}");
            let entry = tree.entries.iter().find(|e| e.path == wanted);
            let Some(Kind::File { blob, .. }) = entry.map(|e| &e.kind) else {
                return Err(ArtifactError::Missing(format!(
                    "output.initrd is set but the image has no /{wanted}; install initramfs-tools with the kernel"
                )));
            };
            let path = out_dir.join(name);
            write_file(&path, &read(blob)?)?;
            Some(path)
        }
    };
    Ok(Some(BootFiles {
        release: release.to_string(),
        kernel: kernel_path,
        initrd,
    }))
}

/// The manifest written next to the artifacts.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub name: String,
    pub reference: String,
    pub recipe_key: Digest,
    pub built_by: String,
    /// What wrote the image (`mke2fs 1.47.0 (5-Feb-2023), libext2fs 1.47.0`).
    pub written_by: String,
    pub rootfs: Artifact,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Artifact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<Artifact>,
    /// The SPDX software bill of materials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sbom: Option<Artifact>,
    pub boot: Boot,
    /// The registration body for `POST /api/images/pull`.
    pub register: Register,
    pub steps: Vec<ManifestStep>,
}

/// How to boot the image.
#[derive(Debug, Clone, Serialize)]
pub struct Boot {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    /// The kernel is an uncompressed ELF vmlinux, as Firecracker loads on x86_64.
    pub kernel_format: &'static str,
    /// Whether the kernel needs the initrd to find its root disk.
    pub initrd_required: bool,
    /// A kernel command line that boots the image on Firecracker.
    pub kernel_cmdline: &'static str,
}

/// `{"reference", "kernelPath", "rootfsPath"}`.
#[derive(Debug, Clone, Serialize)]
pub struct Register {
    pub reference: String,
    #[serde(rename = "kernelPath", skip_serializing_if = "Option::is_none")]
    pub kernel_path: Option<String>,
    #[serde(rename = "rootfsPath")]
    pub rootfs_path: String,
}

/// One step in the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestStep {
    pub id: String,
    pub kind: String,
    pub key: Digest,
    pub layer: Digest,
}

/// The kernel command line the manifest suggests.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw";

/// Where `file` will be on the VM host: `install_dir/file`, or where it is now.
pub fn install_path(output: &Output, artifact: &Artifact) -> String {
    match &output.install_dir {
        Some(dir) => format!("{}/{}", dir.trim_end_matches('/'), artifact.file),
        None => artifact.path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, LAYER_FORMAT};

    #[test]
    fn picks_the_newest_kernel() {
        let file = |path: &str| Entry {
            path: path.into(),
            kind: Kind::File {
                blob: Digest::of(path.as_bytes()),
                size: 1,
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Default::default(),
        };
        let tree = Layer {
            format: LAYER_FORMAT,
            entries: vec![
                file("boot/vmlinuz-6.9.0-1"),
                file("boot/vmlinuz-6.12.1-2"),
                file("boot/vmlinuz-6.10.0-9"),
            ],
        };
        assert_eq!(find_kernel(&tree).unwrap().0, "6.12.1-2");
        assert!(find_kernel(&Layer {
            format: LAYER_FORMAT,
            entries: vec![]
        })
        .is_none());
    }

    #[test]
    fn measures_files() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.bin");
        std::fs::write(&p, b"abc").unwrap();
        let a = Artifact::of(&p).unwrap();
        assert_eq!((a.file.as_str(), a.bytes), ("x.bin", 3));
        assert_eq!(
            a.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(a.blake3, Digest::of(b"abc"));

        // Several chunks, the last one short.
        let big: Vec<u8> = (0..(9u32 << 20) + 7)
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        std::fs::write(&p, &big).unwrap();
        let a = Artifact::of(&p).unwrap();
        assert_eq!(a.bytes, big.len() as u64);
        assert_eq!(a.blake3, Digest::of(&big));
        assert_eq!(
            a.sha256,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&big))
        );
    }
}
