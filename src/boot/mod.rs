//! `kiln boot`: boots an image the way Firecracker would and proves, stage by
//! stage and each within a time limit, that it is usable:
//!
//! 1. the kernel mounts the rootfs and systemd reaches multi-user.target;
//! 2. sshd accepts a key login as the recipe's user;
//! 3. the checks of the recipe's `boot:` section pass, one sub-stage each
//!    (for the agent-ready image: sudo, Node.js 22, OpenCode and its user
//!    unit answering), see [`crate::boot_checks`];
//! 4. the VM powers off cleanly.
//!
//! The VM is qemu's `microvm` machine (virtio-mmio block and net devices found
//! through its ACPI tables, a serial console), under KVM when KVM works and
//! under software emulation (TCG) otherwise: KVM is tried first and must print
//! on the console within 10 s, since on some build machines KVM guests hang
//! without a word.
//!
//! The image itself is never written: the VM boots a sparse copy, into which
//! the login key (a fresh ed25519 pair) is written with `debugfs -w`
//! ([`KeyVia::Inject`]), or which receives it on the kernel command line
//! ([`KeyVia::Cmdline`]).
//!
//! On disk, everything lives in a private work dir,
//! `$TMPDIR/kiln-boot-<pid>-<unix time>/`: `rootfs.ext4` (the copy, always
//! deleted), `id_ed25519{,.pub}` (the key pair, always deleted), `ssh.sock`
//! (the SSH control socket), `console.log` (the serial console) and
//! `qemu.log` (qemu's own messages). The dir is deleted when every stage
//! passes and kept, with its logs, when one fails.
//!
//! No qemu outlives kiln: qemu and every ssh run under a guard that kills
//! and reaps them on drop (errors, panics), with `PR_SET_PDEATHSIG` so that
//! they die with kiln even when it is killed outright; SIGINT and SIGTERM are
//! caught while booting so that Ctrl-C still cleans up.
//!
//! This module runs the stages and reports them; `vm` starts qemu and holds
//! stages 1 and 4, `key` prepares the copy and its login key, `ssh` holds
//! stages 2 and 3 (running the recipe's checks), `console` reads the serial log, `process` keeps child
//! processes bounded and tied to kiln.

mod console;
mod key;
mod process;
mod ssh;
mod vm;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::host::{self, Tool};
use console::{strip_terminal_codes, Console};
use process::{Guarded, SignalGuard};
use vm::Qemu;

/// How the test key reaches the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyVia {
    /// Written into a throwaway copy of the image (any image).
    Inject,
    /// Passed on the kernel command line as `kiln.authorized_key=` (images
    /// whose `user` step has `keys_from: [cmdline]`).
    Cmdline,
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub image: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub key_via: KeyVia,
    /// The login user.
    pub user: String,
    /// Stage 3: the checks run once logged in.
    pub checks: Vec<crate::boot_checks::BootCheck>,
    /// Run only the first two stages (boot, SSH login).
    pub login_only: bool,
}

/// One stage's result.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: String,
    pub passed: bool,
    pub seconds: f64,
    pub detail: String,
}

/// Why booting could not even be tried, or a stage failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BootError(pub String);

/// The host programs `kiln boot` runs.
const BOOT_TOOLS: &[Tool] = &[
    Tool {
        program: "qemu-system-x86_64",
        package: "qemu-system-x86",
    },
    Tool {
        program: "ssh",
        package: "openssh-client",
    },
    Tool {
        program: "ssh-keygen",
        package: "openssh-client",
    },
    Tool {
        program: "debugfs",
        package: "e2fsprogs",
    },
];

/// How many console lines a failure shows.
const TAIL_LINES: usize = 30;

/// Boots the image and runs the stages; calls `report` as each stage ends.
pub fn boot(
    options: &BootOptions,
    report: &mut dyn FnMut(&Stage),
) -> Result<Vec<Stage>, BootError> {
    for (what, path) in [
        ("image", Some(&options.image)),
        ("kernel", Some(&options.kernel)),
    ]
    .into_iter()
    .chain([("initrd", options.initrd.as_ref())])
    {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(BootError(format!(
                    "{what} {}: no such file",
                    path.display()
                )));
            }
        }
    }
    host::ensure(BOOT_TOOLS).map_err(|e| BootError(e.to_string()))?;
    let _signals = SignalGuard::install();
    let mut work = WorkDir::create()?;
    let mut run = Run {
        options,
        work: &work,
        stage_started: Instant::now(),
        stages: Vec::new(),
        report,
        console: Console::new(work.path.join("console.log")),
        qemu: None,
        master: None,
        tsc_khz: None,
    };
    let result = run.stages();
    // Kill qemu and ssh before the work dir goes.
    drop(run.master.take());
    drop(run.qemu.take());
    let stages = std::mem::take(&mut run.stages);
    let console_exists = run.console.path.exists();
    drop(run);
    match result {
        Ok(()) => Ok(stages),
        Err(e) => {
            work.keep = console_exists;
            Err(e)
        }
    }
}

/// One boot in progress.
struct Run<'a> {
    options: &'a BootOptions,
    work: &'a WorkDir,
    stage_started: Instant,
    stages: Vec<Stage>,
    report: &'a mut dyn FnMut(&Stage),
    console: Console,
    qemu: Option<Qemu>,
    master: Option<Guarded>,
    /// The host's TSC rate, which a TCG guest's TSC runs at.
    tsc_khz: Option<u64>,
}

impl Run<'_> {
    fn stages(&mut self) -> Result<(), BootError> {
        let user = self.options.user.clone();
        let boot_detail = self.stage_boot()?;
        self.pass("1. systemd reached multi-user.target", boot_detail);
        let login = self.stage_login()?;
        self.pass(&format!("2. sshd accepts a key login as {user}"), login);
        if self.options.login_only {
            return Ok(());
        }
        self.stage_checks()?;
        let off = self.stage_poweroff()?;
        self.pass("4. VM powers off cleanly", off);
        Ok(())
    }

    fn pass(&mut self, name: &str, detail: String) {
        let stage = Stage {
            name: name.to_string(),
            passed: true,
            seconds: round(self.stage_started.elapsed()),
            detail,
        };
        (self.report)(&stage);
        self.stages.push(stage);
        self.stage_started = Instant::now();
    }

    /// Reports the stage as failed and builds the error: the reason, the
    /// console's last lines and where the whole log is.
    fn fail(&mut self, name: &str, reason: String) -> BootError {
        let seconds = round(self.stage_started.elapsed());
        let stage = Stage {
            name: name.to_string(),
            passed: false,
            seconds,
            detail: reason.clone(),
        };
        (self.report)(&stage);
        self.stages.push(stage);
        let mut message = format!("stage {name} failed after {seconds:.1}s: {reason}");
        let qemu_log = self.work.path.join("qemu.log");
        let qemu_says = fs::read_to_string(&qemu_log).unwrap_or_default();
        if !qemu_says.trim().is_empty() {
            message.push_str(&format!(
                "\nqemu said ({}):\n{}",
                qemu_log.display(),
                last_lines(&qemu_says, 10)
            ));
        }
        if self.console.path.exists() {
            let text = strip_terminal_codes(&fs::read(&self.console.path).unwrap_or_default());
            message.push_str(&format!(
                "\n--- last {TAIL_LINES} lines of the console ---\n{}\n--- the whole console log: {} ---",
                last_lines(&text, TAIL_LINES),
                self.console.path.display()
            ));
        }
        BootError(message)
    }

    fn qemu(&mut self) -> Result<&mut Qemu, BootError> {
        self.qemu
            .as_mut()
            .ok_or_else(|| BootError("internal error: qemu is not running".into()))
    }
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn round(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// The private work dir (see the module docs).
struct WorkDir {
    path: PathBuf,
    /// Keep the logs (a stage failed).
    keep: bool,
}

impl WorkDir {
    fn create() -> Result<WorkDir, BootError> {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("kiln-boot-{}-{stamp}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| BootError(format!("{}: {e}", path.display())))?;
        let work = WorkDir { path, keep: false };
        // sun_path holds 108 bytes.
        if work.socket().as_os_str().len() > 100 {
            return Err(BootError(format!(
                "{}: too long a path for an SSH control socket; set TMPDIR to a shorter directory",
                work.socket().display()
            )));
        }
        Ok(work)
    }

    fn copy(&self) -> PathBuf {
        self.path.join("rootfs.ext4")
    }

    fn key(&self) -> PathBuf {
        self.path.join("id_ed25519")
    }

    fn socket(&self) -> PathBuf {
        self.path.join("ssh.sock")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            for p in [
                self.copy(),
                self.key(),
                self.key().with_extension("pub"),
                self.socket(),
            ] {
                let _ = fs::remove_file(p);
            }
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }
}
