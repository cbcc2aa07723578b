//! Child processes that never outlive kiln, bounded commands, Ctrl-C.

use std::ffi::c_int;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::last_lines;

/// A child process that is killed (SIGKILL) and reaped when dropped, and
/// that the kernel kills if kiln dies first.
pub(super) struct Guarded {
    child: Child,
    status: Option<ExitStatus>,
}

impl Guarded {
    pub(super) fn spawn(mut cmd: Command, what: &str) -> Result<Guarded, String> {
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("cannot run {what}: {e}"))?;
        Ok(Guarded {
            child,
            status: None,
        })
    }

    /// The exit status, once it has exited.
    pub(super) fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub(super) fn kill(&mut self) {
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
pub(super) struct Ran {
    /// None when it ran out of time and was killed.
    pub(super) status: Option<ExitStatus>,
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) command: String,
}

impl Ran {
    pub(super) fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub(super) fn describe(&self) -> String {
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

    pub(super) fn expect_success(&self, what: &str) -> Result<(), String> {
        if self.success() {
            Ok(())
        } else {
            Err(format!("{what} failed: {}", self.describe()))
        }
    }
}

/// Runs `cmd` (stdin closed, output captured) for at most `limit`.
pub(super) fn run_bounded(mut cmd: Command, limit: Duration) -> Result<Ran, String> {
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

pub(super) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Catches SIGINT and SIGTERM while booting, so that the guards still run;
/// puts the old handlers back when dropped.
pub(super) struct SignalGuard {
    old: Vec<(Signal, SigAction)>,
}

impl SignalGuard {
    pub(super) fn install() -> SignalGuard {
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
