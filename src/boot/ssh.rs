//! Stages 2 and 3: the SSH session into the VM and the recipe's boot checks
//! run through it.

use std::fs::{self, File};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::process::{interrupted, run_bounded, Guarded, Ran};
use super::{last_lines, BootError, Run};
use crate::boot_checks::{self as checks, Tried};

/// Stage 2: from multi-user.target to a successful key login.
const LOGIN_LIMIT: Duration = Duration::from_secs(180);
/// One SSH connection attempt (ConnectTimeout covers only the TCP part).
const LOGIN_ATTEMPT: Duration = Duration::from_secs(45);
/// Once the console says sshd failed to start (and nothing since says it
/// started), how long logins may still try.
const SSHD_FAILED_GRACE: Duration = Duration::from_secs(15);
/// One command over SSH (TCG makes `opencode --version` take ~30 s).
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// Console lines that say sshd did not start, or did.
const SSHD_FAILURES: &[&str] = &[
    "Failed to start ssh.service",
    "Failed to start sshd.service",
];
const SSHD_STARTED: &[&str] = &["Started ssh.service", "Started sshd.service"];

impl Run<'_> {
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
    pub(super) fn remote(&mut self, script: &str, limit: Duration) -> Result<Ran, String> {
        let port = self.qemu.as_ref().map(|q| q.port).unwrap_or(0);
        let mut cmd = self.ssh(port, &["-o", "ControlMaster=no"]);
        cmd.args(["--", script]);
        let mut ran = run_bounded(cmd, limit)?;
        ran.command = format!("ssh {}@127.0.0.1 -- {script}", self.options.user);
        Ok(ran)
    }

    /// Stage 2: opens the SSH session (a control master, reused by the
    /// later stages), retrying while sshd comes up.
    pub(super) fn stage_login(&mut self) -> Result<String, BootError> {
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

    /// Stage 3: the recipe's boot checks, one sub-stage each, in order.
    pub(super) fn stage_checks(&mut self) -> Result<(), BootError> {
        let options = self.options;
        for (index, check) in options.checks.iter().enumerate() {
            let name = checks::stage_name(index, check);
            let mut remote = |command: &str| {
                if interrupted() {
                    return Err("interrupted".to_string());
                }
                self.remote(command, COMMAND_LIMIT).map(|ran| Tried {
                    success: ran.success(),
                    describe: ran.describe(),
                    stdout: ran.stdout,
                })
            };
            match checks::run_check(check, &mut remote, checks::RETRY_PAUSE) {
                Ok(detail) => self.pass(&name, detail),
                Err(failed) => return Err(self.fail(&name, failed.to_string())),
            }
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
