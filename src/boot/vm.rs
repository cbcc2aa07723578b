//! The VM: qemu's microvm machine, KVM or TCG, and stages 1 (boot) and 4 (poweroff).

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::console::Console;
use super::process::{interrupted, Guarded};
use super::{BootError, Run};

/// The network part of the command line: a static address on qemu's user
/// network (guest 10.0.2.15, gateway 10.0.2.2, DNS 10.0.2.3), which the
/// image's systemd-network-generator turns into a networkd configuration.
pub(super) const NETWORK_CMDLINE: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3";

/// Added for the test only. systemd stops printing its own status lines on
/// the console once a getty runs there (serial-getty@ttyS0 starts before
/// multi-user.target), so `Reached target multi-user.target` would never
/// show; journald's copy of every log line does, and also tells why a unit
/// (sshd, say) failed.
pub(super) const TEST_CMDLINE: &str = "systemd.journald.forward_to_console=1";

/// How long KVM gets to print its first console line before TCG takes over.
const KVM_PROBE: Duration = Duration::from_secs(10);
/// Stage 1 limits: ~100 s were measured under TCG on a busy 2-core machine.
const BOOT_LIMIT_TCG: Duration = Duration::from_secs(600);
const BOOT_LIMIT_KVM: Duration = Duration::from_secs(120);

/// qemu's minimal firmware for microvm, as qemu installs it.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// From `systemctl poweroff` to qemu's exit.
const POWEROFF_LIMIT: Duration = Duration::from_secs(120);

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
pub(super) enum Accel {
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

/// A running qemu and how it was started.
pub(super) struct Qemu {
    pub(super) child: Guarded,
    pub(super) accel: Accel,
    pub(super) port: u16,
    pub(super) started: Instant,
}

impl Run<'_> {
    /// Stage 1: prepares the copy and the key, starts qemu (KVM, else TCG)
    /// and watches the console for multi-user.target.
    pub(super) fn stage_boot(&mut self) -> Result<String, BootError> {
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
        // One vCPU under TCG: with two, multi-threaded TCG lets a vCPU run
        // code the other has just re-patched (the kernel's int3-based text
        // poking), and the guest dies early with `Oops: int3` (seen here
        // about once in fifteen boots).
        let cpus = if accel == Accel::Kvm { "2" } else { "1" };
        cmd.args(["-m", "1024", "-smp", cpus]);
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        // qemu's own minimal firmware, where it ships it. Debian's qemu 7.2
        // makes it microvm's default; newer packages take SeaBIOS's microvm
        // build instead, whose ACPI tables come out corrupt once the machine
        // has two virtio devices (`ACPI Error: AE_NO_ACPI_TABLES`): the guest
        // then finds no disk and reboots from its initramfs (seen with qemu
        // 10.0 and SeaBIOS 1.16.3).
        if Path::new(QBOOT).is_file() {
            cmd.args(["-bios", QBOOT]);
        }
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

    /// Stage 4: `systemctl poweroff`, then qemu must exit by itself.
    pub(super) fn stage_poweroff(&mut self) -> Result<String, BootError> {
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

/// `KEY=VALUE` for a qemu option whose value is a path (commas doubled).
fn qemu_opts(prefix: &str, path: &OsStr) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path.to_string_lossy().replace(',', ",,"));
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_option_paths_double_commas() {
        assert_eq!(
            qemu_opts("file=", OsStr::new("/tmp/a,b/c")),
            OsString::from("file=/tmp/a,,b/c")
        );
    }
}
