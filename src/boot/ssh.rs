//! Stages 2 and 3: the SSH session into the VM and the agent's tools.

use std::fs::{self, File};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::process::{interrupted, run_bounded, Guarded, Ran};
use super::vm::Accel;
use super::{last_lines, BootError, Run};

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

/// The OpenCode session the tool stage starts.
const SESSION: &str = "test";
/// Where opencode@.service listens (its `--port`).
const OPENCODE_HEALTH: &str = "http://localhost:4096/global/health";

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

    /// Stage 3, one sub-stage per tool.
    pub(super) fn stage_tools(&mut self) -> Result<(), BootError> {
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

/// Single-quotes a word for the remote shell.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
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

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
