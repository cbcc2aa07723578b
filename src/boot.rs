//! `kiln boot`: boots an image the way Firecracker would and proves, stage by
//! stage and each within a time limit, that it is usable:
//!
//! 1. the kernel mounts the rootfs and systemd reaches multi-user.target;
//! 2. sshd accepts a key login as the agent user;
//! 3. the agent's tools work (sudo, Node.js 22, OpenCode and its user unit);
//! 4. the VM powers off cleanly.
//!
//! The VM is qemu's `microvm` machine (virtio-mmio block and net devices found
//! through its ACPI tables, a serial console), under KVM when KVM works and
//! under software emulation (TCG) otherwise: KVM is tried first and must print
//! on the console within [`KVM_PROBE`], since on some build machines KVM
//! guests hang without a word.
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

use std::ffi::{c_int, OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use serde::Serialize;

use crate::host::{self, Tool};

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
    /// The login user (default `agent`).
    pub user: String,
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
pub const BOOT_TOOLS: &[Tool] = &[
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

/// The kernel command line a Firecracker VM gets, with a static address on
/// qemu's user network (guest 10.0.2.15, gateway 10.0.2.2), which the
/// image's systemd-network-generator turns into a networkd configuration.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw \
                                  ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off";

/// Added for the test only. systemd stops printing its own status lines on
/// the console once a getty runs there (serial-getty@ttyS0 starts before
/// multi-user.target), so `Reached target multi-user.target` would never
/// show; journald's copy of every log line does, and also tells why a unit
/// (sshd, say) failed.
const TEST_CMDLINE: &str = "systemd.journald.forward_to_console=1";

/// How long KVM gets to print its first console line before TCG takes over.
pub const KVM_PROBE: Duration = Duration::from_secs(10);
/// Stage 1 limits: ~100 s were measured under TCG on a busy 2-core machine.
const BOOT_LIMIT_TCG: Duration = Duration::from_secs(600);
const BOOT_LIMIT_KVM: Duration = Duration::from_secs(120);
/// Stage 2: from multi-user.target to a successful key login.
const LOGIN_LIMIT: Duration = Duration::from_secs(180);
/// One SSH connection attempt (ConnectTimeout covers only the TCP part).
const LOGIN_ATTEMPT: Duration = Duration::from_secs(45);
/// Once the console says sshd failed to start (and nothing since says it
/// started), how long logins may still try.
const SSHD_FAILED_GRACE: Duration = Duration::from_secs(15);
/// One command over SSH (TCG makes `opencode --version` take ~30 s).
const COMMAND_LIMIT: Duration = Duration::from_secs(120);
/// From starting opencode@test to a healthy answer (measured under TCG with
/// a busy host: ~65 s, most of it Bun starting up in emulation).
const HEALTH_LIMIT_KVM: Duration = Duration::from_secs(120);
const HEALTH_LIMIT_TCG: Duration = Duration::from_secs(180);
/// From `systemctl poweroff` to qemu's exit.
const POWEROFF_LIMIT: Duration = Duration::from_secs(120);
/// How many console lines a failure shows.
const TAIL_LINES: usize = 30;
/// The OpenCode session the tool stage starts.
const SESSION: &str = "test";
/// Where opencode@.service listens (its `--port`).
const OPENCODE_HEALTH: &str = "http://localhost:4096/global/health";

/// Console lines that mean the boot has failed, whatever the time limit.
const BOOT_FAILURES: &[&str] = &[
    "Kernel panic",
    "emergency mode",
    "Emergency Mode",
    "Give root password for maintenance",
    "Cannot open access to console, the root account is locked",
    "Failed to mount /",
    "Gave up waiting for root",
    "Unable to mount root fs",
    "VFS: Cannot open root device",
    "Dropping to a shell",
];

/// Under TCG on a loaded host the guest kernel can fail to calibrate its TSC
/// against the PIT and then hang (seen here: nothing after `tsc: Marking TSC
/// unstable due to could not calculate TSC khz`); before the root is mounted
/// nothing has touched the disk, so qemu simply starts again.
const EARLY_STALLS: &[&str] = &[
    "tsc: Unable to calibrate against PIT",
    "could not calculate TSC khz",
];
/// Console silence that counts as a stall before the root is mounted.
const EARLY_SILENCE: Duration = Duration::from_secs(60);
/// How many times an early stall may start qemu again.
const EARLY_RESTARTS: usize = 4;
/// The kernel's line once the root filesystem is mounted.
const ROOT_MOUNTED: &str = "EXT4-fs (vda): mounted filesystem";

/// Console lines that say systemd reached multi-user.target.
const MULTI_USER: &[&str] = &[
    "Reached target multi-user.target",
    "Reached target Multi-User System",
];

/// Console lines that say sshd did not start, or did.
const SSHD_FAILURES: &[&str] = &[
    "Failed to start ssh.service",
    "Failed to start sshd.service",
];
const SSHD_STARTED: &[&str] = &["Started ssh.service", "Started sshd.service"];

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
    host::ensure(BOOT_TOOLS).map_err(BootError)?;
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
        home: String::new(),
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

/// What the console said during stage 1.
enum Seen {
    /// multi-user.target.
    Up,
    /// The boot failed (why).
    Failed(String),
    /// The kernel stalled before mounting the root (how).
    Stalled(String),
}

/// How qemu runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
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
    /// The user's home directory, from the image's /etc/passwd.
    home: String,
    /// The host's TSC rate, which a TCG guest's TSC runs at.
    tsc_khz: Option<u64>,
}

/// A running qemu and how it was started.
struct Qemu {
    child: Guarded,
    accel: Accel,
    port: u16,
    started: Instant,
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
        self.stage_tools()?;
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

    /// Stage 1: prepares the copy and the key, starts qemu (KVM, else TCG)
    /// and watches the console for multi-user.target.
    fn stage_boot(&mut self) -> Result<String, BootError> {
        const NAME: &str = "1. systemd reached multi-user.target";
        let prepared = self.prepare();
        let cmdline = match prepared {
            Ok(cmdline) => cmdline,
            Err(reason) => return Err(self.fail(NAME, reason)),
        };
        let mut probe_note = String::new();
        if kvm_usable() {
            match self.try_kvm(&cmdline) {
                Ok(()) => {}
                Err(note) => probe_note = note,
            }
        } else {
            probe_note = "no usable /dev/kvm".into();
        }
        if self.qemu.is_none() {
            self.tsc_khz = host_tsc_khz();
            match self.start_qemu(Accel::Tcg, &cmdline) {
                Ok(q) => self.qemu = Some(q),
                Err(reason) => return Err(self.fail(NAME, reason)),
            }
        }
        let (accel, first_started) = {
            let q = self.qemu()?;
            (q.accel, q.started)
        };
        let limit = match accel {
            Accel::Kvm => BOOT_LIMIT_KVM,
            Accel::Tcg => BOOT_LIMIT_TCG,
        };
        let mut restarts: Vec<String> = Vec::new();
        let mut root_mounted = false;
        let mut last_output = (0u64, Instant::now());
        loop {
            if interrupted() {
                return Err(self.fail(NAME, "interrupted".into()));
            }
            let fresh = self.console.refresh();
            let mut found = None;
            for line in fresh.lines() {
                if BOOT_FAILURES.iter().any(|bad| line.contains(bad)) {
                    found = Some(Seen::Failed(format!("the console shows `{}`", line.trim())));
                    break;
                }
                if MULTI_USER.iter().any(|m| line.contains(m)) {
                    found = Some(Seen::Up);
                    break;
                }
                if line.contains(ROOT_MOUNTED) {
                    root_mounted = true;
                }
                if !root_mounted && EARLY_STALLS.iter().any(|s| line.contains(s)) {
                    found = Some(Seen::Stalled(format!("`{}`", line.trim())));
                    break;
                }
            }
            let size = self.console.offset;
            if size != last_output.0 {
                last_output = (size, Instant::now());
            }
            if found.is_none() && !root_mounted && last_output.1.elapsed() > EARLY_SILENCE {
                found = Some(Seen::Stalled(format!(
                    "the kernel printed nothing for {} s before mounting the root",
                    EARLY_SILENCE.as_secs()
                )));
            }
            match found {
                Some(Seen::Up) => break,
                Some(Seen::Failed(reason)) => return Err(self.fail(NAME, reason)),
                Some(Seen::Stalled(why)) => {
                    if restarts.len() >= EARLY_RESTARTS {
                        let reason = format!(
                            "the kernel stalled before mounting the root {} times; last: {why}",
                            restarts.len() + 1
                        );
                        return Err(self.fail(NAME, reason));
                    }
                    // Nothing has touched the disk yet: boot again.
                    restarts.push(why);
                    if let Some(mut q) = self.qemu.take() {
                        q.child.kill();
                    }
                    self.forget_attempt();
                    match self.start_qemu(accel, &cmdline) {
                        Ok(q) => self.qemu = Some(q),
                        Err(reason) => return Err(self.fail(NAME, reason)),
                    }
                    last_output = (0, Instant::now());
                    continue;
                }
                None => {}
            }
            if let Some(status) = self.qemu()?.child.try_wait() {
                return Err(self.fail(
                    NAME,
                    format!("qemu exited ({status}) before multi-user.target"),
                ));
            }
            if first_started.elapsed() > limit {
                return Err(self.fail(
                    NAME,
                    format!(
                        "no `Reached target multi-user.target` on the console within {} s under {}",
                        limit.as_secs(),
                        accel.name().to_uppercase()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let qemu_started = self.qemu()?.started;
        let mut detail = format!(
            "multi-user.target {:.1} s after qemu started, under {}",
            qemu_started.elapsed().as_secs_f64(),
            accel.name().to_uppercase()
        );
        if let (Accel::Tcg, Some(khz)) = (accel, self.tsc_khz) {
            detail.push_str(&format!(" with tsc_early_khz={khz}"));
        }
        if !probe_note.is_empty() {
            detail.push_str(&format!("; KVM not used: {probe_note}"));
        }
        if !restarts.is_empty() {
            detail.push_str(&format!(
                "; booted again {} time{} after an early stall ({})",
                restarts.len(),
                if restarts.len() == 1 { "" } else { "s" },
                restarts.join("; ")
            ));
        }
        Ok(detail)
    }

    /// Copies the image, makes the key pair and puts the public key where
    /// `key_via` says; returns the kernel command line.
    fn prepare(&mut self) -> Result<String, String> {
        let copy = self.work.copy();
        let mut cp = Command::new("cp");
        cp.arg("--sparse=always")
            .arg(&self.options.image)
            .arg(&copy);
        let ran = run_bounded(cp, Duration::from_secs(600))?;
        ran.expect_success("copying the image")?;

        let key = self.work.key();
        let mut keygen = Command::new("ssh-keygen");
        keygen
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-boot", "-f"])
            .arg(&key);
        run_bounded(keygen, Duration::from_secs(60))?.expect_success("ssh-keygen")?;
        let public = fs::read_to_string(key.with_extension("pub"))
            .map_err(|e| format!("{}: {e}", key.with_extension("pub").display()))?;
        let public = public.trim().to_string();

        let account = Account::find(&copy, &self.options.user)?;
        self.home = account.home.clone();
        let mut cmdline = format!("{KERNEL_CMDLINE} {TEST_CMDLINE}");
        match self.options.key_via {
            KeyVia::Inject => inject_key(&copy, &account, &key.with_extension("pub"), &public)?,
            KeyVia::Cmdline => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(&public);
                cmdline.push_str(&format!(" kiln.authorized_key={encoded}"));
            }
        }
        Ok(cmdline)
    }

    /// Starts qemu under KVM and keeps it if the console speaks within
    /// [`KVM_PROBE`]; otherwise kills it and says why.
    fn try_kvm(&mut self, cmdline: &str) -> Result<(), String> {
        let mut qemu = self.start_qemu(Accel::Kvm, cmdline)?;
        loop {
            if self.console.has_output() {
                self.qemu = Some(qemu);
                return Ok(());
            }
            if let Some(status) = qemu.child.try_wait() {
                let said = fs::read_to_string(self.work.path.join("qemu.log")).unwrap_or_default();
                let said = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                self.forget_attempt();
                return Err(format!("qemu -accel kvm exited ({status}): {said}"));
            }
            if qemu.started.elapsed() > KVM_PROBE || interrupted() {
                qemu.child.kill();
                self.forget_attempt();
                return Err(format!(
                    "no console output within {} s, so KVM guests hang here; fell back to TCG",
                    KVM_PROBE.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clears the logs of a qemu that was given up on.
    fn forget_attempt(&mut self) {
        let _ = fs::remove_file(&self.console.path);
        let _ = fs::remove_file(self.work.path.join("qemu.log"));
        self.console = Console::new(self.console.path.clone());
    }

    fn start_qemu(&self, accel: Accel, cmdline: &str) -> Result<Qemu, String> {
        let port = free_port()?;
        let log = File::create(self.work.path.join("qemu.log"))
            .map_err(|e| format!("{}: {e}", self.work.path.join("qemu.log").display()))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "microvm", "-accel", accel.name()]);
        // `host` is what Firecracker gives a guest; TCG emulates everything.
        cmd.args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }]);
        cmd.args(["-m", "1024", "-smp", "2"]);
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        cmd.arg("-kernel").arg(&self.options.kernel);
        if let Some(initrd) = &self.options.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        let mut append = cmdline.to_string();
        if let (Accel::Tcg, Some(khz)) = (accel, self.tsc_khz) {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        cmd.args(["-append", &append]);
        cmd.arg("-drive").arg(qemu_opts(
            "id=root,format=raw,if=none,file=",
            self.work.copy().as_os_str(),
        ));
        cmd.args(["-device", "virtio-blk-device,drive=root"]);
        cmd.arg("-netdev")
            .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"));
        cmd.args(["-device", "virtio-net-device,netdev=n0"]);
        cmd.arg("-chardev").arg(qemu_opts(
            "file,id=console,path=",
            self.console.path.as_os_str(),
        ));
        cmd.args(["-serial", "chardev:console"]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = Guarded::spawn(cmd, "qemu-system-x86_64")?;
        Ok(Qemu {
            child,
            accel,
            port,
            started: Instant::now(),
        })
    }

    /// The ssh command line for the VM (through the control socket once
    /// the login stage has opened it).
    fn ssh(&self, port: u16, extra: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-i").arg(self.work.key());
        cmd.args(["-p", &port.to_string()]);
        cmd.args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
        ]);
        cmd.arg("-S").arg(self.work.socket());
        cmd.args(extra);
        cmd.arg(format!("{}@127.0.0.1", self.options.user));
        cmd
    }

    /// Runs `script` in the VM over the SSH session.
    fn remote(&mut self, script: &str, limit: Duration) -> Result<Ran, String> {
        let port = self.qemu.as_ref().map(|q| q.port).unwrap_or(0);
        let mut cmd = self.ssh(port, &["-o", "ControlMaster=no"]);
        cmd.args(["--", script]);
        let mut ran = run_bounded(cmd, limit)?;
        ran.command = format!("ssh {}@127.0.0.1 -- {script}", self.options.user);
        Ok(ran)
    }

    /// Stage 2: opens the SSH session (a control master, reused by the
    /// later stages), retrying while sshd comes up.
    fn stage_login(&mut self) -> Result<String, BootError> {
        let name = format!("2. sshd accepts a key login as {}", self.options.user);
        let port = self.qemu()?.port;
        let deadline = Instant::now() + LOGIN_LIMIT;
        let mut attempts = 0;
        let mut last_error = String::from("no attempt finished");
        let mut sshd_failed: Option<(Instant, String)> = None;
        let master_log = self.work.path.join("ssh-master.log");
        loop {
            attempts += 1;
            let _ = fs::remove_file(self.work.socket());
            let mut cmd = self.ssh(port, &["-M", "-N", "-o", "ControlPersist=no"]);
            let log = File::create(&master_log)
                .map_err(|e| BootError(format!("{}: {e}", master_log.display())))?;
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log));
            let mut master = match Guarded::spawn(cmd, "ssh") {
                Ok(m) => m,
                Err(reason) => return Err(self.fail(&name, reason)),
            };
            let attempt_started = Instant::now();
            // The master makes its control socket only once it has logged in.
            let outcome = loop {
                if interrupted() {
                    return Err(self.fail(&name, "interrupted".into()));
                }
                if self.work.socket().exists() {
                    break Ok(());
                }
                if let Some(status) = master.try_wait() {
                    let said = fs::read_to_string(&master_log).unwrap_or_default();
                    break Err(describe_ssh_failure(&said, status));
                }
                if attempt_started.elapsed() > LOGIN_ATTEMPT {
                    master.kill();
                    break Err(format!(
                        "ssh did not finish logging in within {} s",
                        LOGIN_ATTEMPT.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if outcome.is_ok() {
                self.master = Some(master);
                let user = self.options.user.clone();
                let ran = self.remote("id -un", COMMAND_LIMIT);
                match ran {
                    Ok(ran) if ran.success() && ran.stdout.trim() == user => {
                        return Ok(format!(
                            "port {port} after {attempts} attempt{}",
                            if attempts == 1 { "" } else { "s" }
                        ));
                    }
                    Ok(ran) => {
                        let reason = format!(
                            "logged in, but `id -un` said {:?} ({})",
                            ran.stdout.trim(),
                            ran.describe()
                        );
                        return Err(self.fail(&name, reason));
                    }
                    Err(reason) => return Err(self.fail(&name, reason)),
                }
            }
            if let Err(e) = outcome {
                last_error = e;
            }
            drop(master);
            if let Some(status) = self.qemu()?.child.try_wait() {
                let reason = format!("qemu exited ({status}); last ssh error: {last_error}");
                return Err(self.fail(&name, reason));
            }
            self.console.refresh();
            // ssh.service restarts on failure and prints `Failed to start`
            // each time: what counts is its latest word.
            let latest = self
                .console
                .text
                .lines()
                .rfind(|l| {
                    SSHD_FAILURES
                        .iter()
                        .chain(SSHD_STARTED)
                        .any(|f| l.contains(f))
                })
                .map(|l| l.trim().to_string());
            match latest {
                Some(line) if SSHD_FAILURES.iter().any(|f| line.contains(f)) => {
                    if sshd_failed.is_none() {
                        sshd_failed = Some((Instant::now(), line));
                    }
                }
                _ => sshd_failed = None,
            }
            if let Some((seen, line)) = &sshd_failed {
                if seen.elapsed() > SSHD_FAILED_GRACE {
                    let reason = format!(
                        "sshd did not start: the console shows `{line}`; last ssh error: {last_error}"
                    );
                    return Err(self.fail(&name, reason));
                }
            }
            if Instant::now() > deadline {
                let reason = format!(
                    "no key login within {} s after multi-user.target ({attempts} attempts); last ssh error: {last_error}",
                    LOGIN_LIMIT.as_secs()
                );
                return Err(self.fail(&name, reason));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Stage 3, one sub-stage per tool.
    fn stage_tools(&mut self) -> Result<(), BootError> {
        const SUDO: &str = "3a. agent tools work: sudo -n true";
        let ran = self.remote("sudo -n true", COMMAND_LIMIT);
        match ran {
            Ok(r) if r.success() => self.pass(SUDO, "passwordless sudo".into()),
            Ok(r) => return Err(self.fail(SUDO, r.describe())),
            Err(reason) => return Err(self.fail(SUDO, reason)),
        }

        // A non-login SSH command's PATH has /usr/local/bin, where the image
        // links node.
        const NODE: &str = "3b. agent tools work: node --version is v22";
        match self.remote("node --version", COMMAND_LIMIT) {
            Ok(r) if r.success() && r.stdout.trim().starts_with("v22.") => {
                self.pass(NODE, r.stdout.trim().to_string())
            }
            Ok(r) => return Err(self.fail(NODE, r.describe())),
            Err(reason) => return Err(self.fail(NODE, reason)),
        }

        const OPENCODE: &str = "3c. agent tools work: opencode --version";
        let opencode = format!("{}/.local/bin/opencode", self.home);
        match self.remote(
            &format!("{} --version", shell_quote(&opencode)),
            COMMAND_LIMIT,
        ) {
            Ok(r) if r.success() => self.pass(
                OPENCODE,
                format!("{opencode} {}", last_lines(r.stdout.trim(), 1)),
            ),
            Ok(r) => return Err(self.fail(OPENCODE, r.describe())),
            Err(reason) => return Err(self.fail(OPENCODE, reason)),
        }

        let health = format!("3d. agent tools work: opencode@{SESSION} answers healthy");
        match self.stage_health() {
            Ok(detail) => self.pass(&health, detail),
            Err(reason) => {
                let status = self
                    .remote(
                        &format!(
                            "systemctl --user status opencode@{SESSION} --no-pager -n 15 2>&1 | tail -n 20"
                        ),
                        COMMAND_LIMIT,
                    )
                    .map(|r| r.stdout)
                    .unwrap_or_default();
                return Err(self.fail(
                    &health,
                    format!("{reason}\nsystemctl --user status opencode@{SESSION}:\n{status}"),
                ));
            }
        }
        Ok(())
    }

    /// Starts opencode@SESSION and polls its health endpoint.
    fn stage_health(&mut self) -> Result<String, String> {
        // XDG_RUNTIME_DIR comes from pam_systemd in the SSH session, and the
        // user manager runs because the user lingers.
        let started = self.remote(
            &format!("systemctl --user start opencode@{SESSION}"),
            COMMAND_LIMIT,
        )?;
        if !started.success() {
            return Err(format!(
                "`systemctl --user start opencode@{SESSION}` failed: {}",
                started.describe()
            ));
        }
        let limit = match self.qemu.as_ref().map(|q| q.accel) {
            Some(Accel::Kvm) => HEALTH_LIMIT_KVM,
            _ => HEALTH_LIMIT_TCG,
        };
        let deadline = Instant::now() + limit;
        // opencode@.service sets OPENCODE_SERVER_PASSWORD=%i, and with a
        // password set `opencode serve` answers every request, /global/health
        // included, with 401 unless it carries HTTP basic auth as user
        // `opencode`: so the first 401 switches to `-u opencode:SESSION`
        // (measured: 401 without, 200 {"healthy":true,...} with).
        let mut auth = false;
        loop {
            if interrupted() {
                return Err("interrupted".into());
            }
            // --max-time: a request made while the server starts can hang.
            let script = format!(
                "curl -s --max-time 10 {} -w '\\n%{{http_code}}' {OPENCODE_HEALTH}",
                if auth {
                    format!("-u opencode:{SESSION}")
                } else {
                    String::new()
                }
            );
            let ran = self.remote(&script, Duration::from_secs(30))?;
            let (body, code) = ran
                .stdout
                .rsplit_once('\n')
                .map(|(b, c)| (b.to_string(), c.trim().to_string()))
                .unwrap_or_else(|| (String::new(), ran.stdout.trim().to_string()));
            if code == "200" && body.contains("\"healthy\":true") {
                return Ok(format!(
                    "{} {}",
                    if auth {
                        format!("with basic auth opencode:{SESSION}:")
                    } else {
                        "without auth:".to_string()
                    },
                    body.trim()
                ));
            }
            if code == "401" && !auth {
                auth = true;
                continue;
            }
            let last = format!("HTTP {code} {}", body.trim());
            if Instant::now() > deadline {
                return Err(format!(
                    "{OPENCODE_HEALTH} did not answer healthy within {} s (last: {last})",
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_secs(3));
        }
    }

    /// Stage 4: `systemctl poweroff`, then qemu must exit by itself.
    fn stage_poweroff(&mut self) -> Result<String, BootError> {
        const NAME: &str = "4. VM powers off cleanly";
        self.console.refresh();
        let before = self.console.text.len();
        // The session drops as the VM goes down: ssh's own status says
        // nothing, but sudo's refusal would.
        let ran = match self.remote("sudo -n systemctl poweroff", Duration::from_secs(60)) {
            Ok(r) => r,
            Err(reason) => return Err(self.fail(NAME, reason)),
        };
        if ran
            .status
            .and_then(|s| s.code())
            .is_some_and(|c| c != 0 && c != 255)
        {
            let reason = format!("`sudo -n systemctl poweroff` failed: {}", ran.describe());
            return Err(self.fail(NAME, reason));
        }
        let asked = Instant::now();
        let status = loop {
            if interrupted() {
                return Err(self.fail(NAME, "interrupted".into()));
            }
            if let Some(status) = self.qemu()?.child.try_wait() {
                break status;
            }
            if asked.elapsed() > POWEROFF_LIMIT {
                return Err(self.fail(
                    NAME,
                    format!(
                        "qemu still runs {} s after `systemctl poweroff`",
                        POWEROFF_LIMIT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        self.console.refresh();
        let after = self.console.text.get(before..).unwrap_or("").to_string();
        if let Some(line) = after.lines().find(|l| l.contains("Kernel panic")) {
            return Err(self.fail(NAME, format!("the console shows `{}`", line.trim())));
        }
        if !after.contains("reboot: Power down") {
            return Err(self.fail(
                NAME,
                format!("qemu exited ({status}) without the kernel's `reboot: Power down`"),
            ));
        }
        if !status.success() {
            return Err(self.fail(NAME, format!("qemu exited with {status}")));
        }
        Ok(format!(
            "qemu exited 0 {:.1} s after `systemctl poweroff`",
            asked.elapsed().as_secs_f64()
        ))
    }
}

/// A user's entry in the image's /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Account {
    uid: u32,
    gid: u32,
    home: String,
}

impl Account {
    fn find(image: &Path, user: &str) -> Result<Account, String> {
        let mut cmd = Command::new("debugfs");
        cmd.arg("-R").arg("cat /etc/passwd").arg(image);
        let ran = run_bounded(cmd, Duration::from_secs(60))?;
        ran.expect_success("reading /etc/passwd with debugfs")?;
        Account::parse(&ran.stdout, user)
            .ok_or_else(|| format!("the image's /etc/passwd has no user `{user}`"))
    }

    fn parse(passwd: &str, user: &str) -> Option<Account> {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0] != user {
                return None;
            }
            Some(Account {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
    }
}

/// Writes `public` as the user's only authorized key into the copy, owned
/// by the user, with sshd's modes (debugfs: no mount, no root needed).
fn inject_key(
    copy: &Path,
    account: &Account,
    public_file: &Path,
    public: &str,
) -> Result<(), String> {
    let home = account.home.trim_end_matches('/');
    let ssh_dir = format!("{home}/.ssh");
    let keys = format!("{ssh_dir}/authorized_keys");
    for p in [&ssh_dir, &keys] {
        if !p.starts_with('/') || p.contains(['"', '\n', ' ', '\t']) {
            return Err(format!("cannot write the key to `{p}` with debugfs"));
        }
    }
    let host_file = public_file
        .to_str()
        .filter(|p| !p.contains(['"', '\n']))
        .ok_or_else(|| format!("{}: not a path debugfs can read", public_file.display()))?;
    let exists = |path: &str| -> Result<bool, String> {
        let mut cmd = Command::new("debugfs");
        cmd.arg("-R").arg(format!("stat \"{path}\"")).arg(copy);
        let ran = run_bounded(cmd, Duration::from_secs(60))?;
        Ok(ran.stdout.contains("Inode:"))
    };
    let mut script = String::new();
    if !exists(&ssh_dir)? {
        script.push_str(&format!("mkdir \"{ssh_dir}\"\n"));
    }
    if exists(&keys)? {
        script.push_str(&format!("rm \"{keys}\"\n"));
    }
    script.push_str(&format!("write \"{host_file}\" \"{keys}\"\n"));
    for (path, mode) in [(&ssh_dir, "040700"), (&keys, "0100600")] {
        script.push_str(&format!(
            "sif \"{path}\" uid {uid}\nsif \"{path}\" gid {gid}\nsif \"{path}\" mode {mode}\n",
            uid = account.uid,
            gid = account.gid
        ));
    }
    let script_file = public_file.with_extension("debugfs");
    fs::write(&script_file, &script).map_err(|e| format!("{}: {e}", script_file.display()))?;
    let mut cmd = Command::new("debugfs");
    cmd.arg("-w").arg("-f").arg(&script_file).arg(copy);
    let ran = run_bounded(cmd, Duration::from_secs(60))?;
    let _ = fs::remove_file(&script_file);
    ran.expect_success("writing the key with debugfs -w")?;
    // debugfs reports its errors but exits 0: read the result back.
    let mut check = Command::new("debugfs");
    check.arg("-R").arg(format!("cat \"{keys}\"")).arg(copy);
    let written = run_bounded(check, Duration::from_secs(60))?;
    if written.stdout.trim() != public {
        return Err(format!(
            "writing {keys} into the copy with debugfs failed:\n{}",
            ran.stderr.trim()
        ));
    }
    Ok(())
}

/// Says why an ssh login attempt failed, from ssh's stderr.
fn describe_ssh_failure(stderr: &str, status: ExitStatus) -> String {
    let said = stderr.trim();
    let hint = if said.contains("Connection refused") {
        "nothing listens on the forwarded port"
    } else if said.contains("Permission denied") {
        "sshd refused the key"
    } else if said.contains("Connection closed")
        || said.contains("Connection reset")
        || said.contains("kex_exchange_identification")
    {
        "nothing answered on the guest's port 22 yet"
    } else if said.contains("timed out") {
        "the connection timed out"
    } else {
        "ssh failed"
    };
    if said.is_empty() {
        format!("{hint} (ssh {status})")
    } else {
        format!("{hint}: {}", last_lines(said, 2).replace('\n', " / "))
    }
}

/// The serial console log, read as it grows.
struct Console {
    path: PathBuf,
    /// Bytes read so far (always up to a line end).
    offset: u64,
    /// The log so far, without terminal codes.
    text: String,
}

impl Console {
    fn new(path: PathBuf) -> Console {
        Console {
            path,
            offset: 0,
            text: String::new(),
        }
    }

    fn has_output(&self) -> bool {
        fs::metadata(&self.path).is_ok_and(|m| m.len() > 0)
    }

    /// Reads the complete lines written since the last call; returns them.
    fn refresh(&mut self) -> String {
        let Ok(mut file) = File::open(&self.path) else {
            return String::new();
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return String::new();
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return String::new();
        }
        let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
            return String::new();
        };
        self.offset += end as u64 + 1;
        let fresh = strip_terminal_codes(&bytes[..=end]);
        self.text.push_str(&fresh);
        fresh
    }
}

/// The console's text without ANSI escape sequences and control characters
/// (systemd colors its status lines; getty queries the terminal).
pub fn strip_terminal_codes(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates, then one final byte.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            chars.next();
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn round(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// `KEY=VALUE` for a qemu option whose value is a path (commas doubled).
fn qemu_opts(prefix: &str, path: &OsStr) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path.to_string_lossy().replace(',', ",,"));
    s
}

/// Single-quotes a word for the remote shell.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The host's TSC rate in kHz, measured against the monotonic clock.
///
/// Under TCG, qemu gives the guest the host's own TSC (it reads it with
/// `rdtsc`), but the guest kernel has to calibrate its rate against the
/// emulated PIT, which fails when the host is busy (`tsc: Unable to
/// calibrate against PIT`), and the kernel then hangs in early boot. Passing
/// the rate as `tsc_early_khz=` skips that calibration. Only on x86_64 hosts
/// whose TSC runs at a constant rate.
#[cfg(target_arch = "x86_64")]
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    if !flags.split_whitespace().any(|f| f == "constant_tsc") {
        return None;
    }
    // SAFETY: every x86_64 CPU has rdtsc, and it reads a counter only.
    let rdtsc = || unsafe { std::arch::x86_64::_rdtsc() };
    // Three samples; the median shrugs off one that was preempted between
    // reading the two clocks.
    let mut samples: Vec<f64> = (0..3)
        .map(|_| {
            let start = Instant::now();
            let c0 = rdtsc();
            std::thread::sleep(Duration::from_millis(100));
            let c1 = rdtsc();
            c1.wrapping_sub(c0) as f64 / start.elapsed().as_secs_f64() / 1000.0
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    let khz = samples[1].round() as u64;
    (100_000..=10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn host_tsc_khz() -> Option<u64> {
    None
}

/// Whether KVM can be asked for at all.
fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A loopback port that is free now (qemu binds it right after).
fn free_port() -> Result<u16, String> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
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

/// A child process that is killed (SIGKILL) and reaped when dropped, and
/// that the kernel kills if kiln dies first.
struct Guarded {
    child: Child,
    status: Option<ExitStatus>,
}

impl Guarded {
    fn spawn(mut cmd: Command, what: &str) -> Result<Guarded, String> {
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("cannot run {what}: {e}"))?;
        Ok(Guarded {
            child,
            status: None,
        })
    }

    /// The exit status, once it has exited.
    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes the kernel SIGKILL the child when kiln (the spawning thread) dies.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// A finished command.
struct Ran {
    /// None when it ran out of time and was killed.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
    command: String,
}

impl Ran {
    fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    fn describe(&self) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "killed: out of time".into(),
        };
        let mut text = format!("`{}` ({status})", self.command);
        for out in [&self.stdout, &self.stderr] {
            if !out.trim().is_empty() {
                text.push_str(&format!("\n{}", last_lines(out.trim(), 15)));
            }
        }
        text
    }

    fn expect_success(&self, what: &str) -> Result<(), String> {
        if self.success() {
            Ok(())
        } else {
            Err(format!("{what} failed: {}", self.describe()))
        }
    }
}

/// Runs `cmd` (stdin closed, output captured) for at most `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<Ran, String> {
    let command = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Guarded::spawn(cmd, &command)?;
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let out = pipe(child.child.stdout.take().map(|s| Box::new(s) as _));
    let err = pipe(child.child.stderr.take().map(|s| Box::new(s) as _));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait() {
            break Some(status);
        }
        if started.elapsed() > limit || interrupted() {
            child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Ran {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        command,
    })
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Catches SIGINT and SIGTERM while booting, so that the guards still run;
/// puts the old handlers back when dropped.
struct SignalGuard {
    old: Vec<(Signal, SigAction)>,
}

impl SignalGuard {
    fn install() -> SignalGuard {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        let mut old = Vec::new();
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores to an atomic.
            if let Ok(previous) = unsafe { signal::sigaction(sig, &action) } {
                old.push((sig, previous));
            }
        }
        SignalGuard { old }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, previous) in &self.old {
            // SAFETY: puts back the handler that was there before.
            let _ = unsafe { signal::sigaction(*sig, previous) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_codes_are_stripped() {
        let raw = b"[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User System.\r\n\
                    \x1b[!p\x1b]104\x07\x1b[?7h\x1b[6n\x1b[32766;32766H\x1b[6nDebian\n";
        let text = strip_terminal_codes(raw);
        assert_eq!(
            text,
            "[  OK  ] Reached target multi-user.target - Multi-User System.\nDebian\n"
        );
        assert!(MULTI_USER.iter().any(|m| text.contains(m)));
    }

    #[test]
    fn passwd_entries_give_uid_gid_and_home() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      agentx:x:1:1::/nope:/bin/sh\n\
                      agent:x:1000:1001::/home/agent:/bin/bash\n";
        assert_eq!(
            Account::parse(passwd, "agent"),
            Some(Account {
                uid: 1000,
                gid: 1001,
                home: "/home/agent".into()
            })
        );
        assert_eq!(Account::parse(passwd, "nobody"), None);
        assert_eq!(
            Account::parse("agent:x:oops:1::/h:/bin/sh\n", "agent"),
            None
        );
    }

    #[test]
    fn qemu_option_paths_double_commas() {
        assert_eq!(
            qemu_opts("file=", OsStr::new("/tmp/a,b/c")),
            OsString::from("file=/tmp/a,,b/c")
        );
    }

    #[test]
    fn ssh_failures_are_explained() {
        let status = std::process::Command::new("false").status().unwrap();
        for (stderr, hint) in [
            (
                "ssh: connect to host 127.0.0.1 port 2222: Connection refused",
                "nothing listens",
            ),
            (
                "kex_exchange_identification: read: Connection reset by peer",
                "port 22 yet",
            ),
            (
                "agent@127.0.0.1: Permission denied (publickey).",
                "refused the key",
            ),
            ("", "ssh failed"),
        ] {
            let said = describe_ssh_failure(stderr, status);
            assert!(said.contains(hint), "{said}");
        }
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn a_bounded_command_is_killed_at_its_limit() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let started = Instant::now();
        let ran = run_bounded(cmd, Duration::from_millis(300)).unwrap();
        assert!(ran.status.is_none());
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let ran = run_bounded(cmd, Duration::from_secs(30)).unwrap();
        assert_eq!(ran.status.and_then(|s| s.code()), Some(3));
        assert_eq!(
            (ran.stdout.as_str(), ran.stderr.as_str()),
            ("out\n", "err\n")
        );
    }
}
