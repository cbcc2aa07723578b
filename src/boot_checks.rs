//! The recipe's `boot:` section: the account `kiln boot` logs in as, and the
//! checks its third stage runs over SSH in the booted VM. A check is a
//! command whose exit status must be 0 and whose output must match; a check
//! with `within:` is tried again until it passes or that time is up (a
//! service that takes a while to come up).

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::fields::{is_account_name, Timeout};

/// The most checks a `boot:` section lists: they are stages 3a to 3z.
pub const MAX_CHECKS: usize = 26;

/// How long to wait between two tries of a check with `within:`.
pub const RETRY_PAUSE: Duration = Duration::from_secs(3);

/// A recipe's `boot:` section.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(try_from = "SectionFields")]
pub struct BootSection {
    /// The account stage 2 logs in as (when unset: the recipe's only
    /// `user` step).
    pub user: Option<String>,
    /// Stage 3, in order.
    pub checks: Vec<BootCheck>,
}

/// One check of stage 3.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "CheckFields")]
pub struct BootCheck {
    /// What the check shows as its stage name.
    pub name: String,
    /// A shell command run over SSH as the login user.
    pub command: String,
    /// A regular expression the command's output (trimmed) must match.
    pub matches: String,
    /// Try again until the check passes or this much time has gone.
    pub within: Option<Duration>,
    /// A command whose output a failure report shows (e.g. a unit's status).
    pub on_failure: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SectionFields {
    user: Option<String>,
    #[serde(default)]
    checks: Vec<BootCheck>,
}

impl TryFrom<SectionFields> for BootSection {
    type Error = String;
    fn try_from(f: SectionFields) -> Result<BootSection, String> {
        if let Some(user) = &f.user {
            if !is_account_name(user) {
                return Err(format!(
                    "boot user `{user}` is not an account name (lowercase letters, digits, `_`, `-`)"
                ));
            }
        }
        if f.checks.len() > MAX_CHECKS {
            return Err(format!(
                "`boot:` lists {} checks; at most {MAX_CHECKS} (stages 3a to 3z)",
                f.checks.len()
            ));
        }
        Ok(BootSection {
            user: f.user,
            checks: f.checks,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckFields {
    name: String,
    command: String,
    matches: Option<String>,
    within: Option<Timeout>,
    on_failure: Option<String>,
}

impl TryFrom<CheckFields> for BootCheck {
    type Error = String;
    fn try_from(f: CheckFields) -> Result<BootCheck, String> {
        if f.name.trim().is_empty() || f.command.trim().is_empty() {
            return Err("a boot check needs a `name` and a `command`".into());
        }
        let matches = f.matches.unwrap_or_else(|| ".*".into());
        regex::Regex::new(&matches)
            .map_err(|e| format!("`matches` is not a regular expression: {e}"))?;
        Ok(BootCheck {
            name: f.name,
            command: f.command,
            matches,
            within: f.within.map(|t| t.0),
            on_failure: f.on_failure,
        })
    }
}

impl BootSection {
    /// This section over the one of the recipe it extends: its own user if
    /// it names one, the base's checks first.
    pub fn over(self, base: BootSection) -> BootSection {
        BootSection {
            user: self.user.or(base.user),
            checks: base.checks.into_iter().chain(self.checks).collect(),
        }
    }
}

/// The stage name of check number `index` (from 0): `3a. NAME`.
pub fn stage_name(index: usize, check: &BootCheck) -> String {
    let letter = (b'a' + (index % MAX_CHECKS) as u8) as char;
    format!("3{letter}. {}", check.name)
}

/// How one try of a command went.
pub struct Tried {
    pub success: bool,
    pub stdout: String,
    /// The command, its status and output, for a failure report.
    pub describe: String,
}

/// Why a check did not pass.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CheckFailed {
    /// The command could not be run at all (the SSH session broke, kiln was
    /// interrupted): the check is not tried again.
    #[error("{0}")]
    NotRun(String),
    /// It ran, and failed or said something else; `diagnosis` is the check's
    /// `on_failure` command and what it printed.
    #[error("{reason}{}", .diagnosis.as_ref().map(|(command, said)| format!("\n{command}:\n{said}")).unwrap_or_default())]
    Failed {
        reason: String,
        diagnosis: Option<(String, String)>,
    },
}

/// Runs `check` through `remote` (which runs a command in the VM, or says
/// why it could not) until it passes, or once when it has no `within:`.
/// Passing gives the output's last line; failing gives the reason, with the
/// output of the check's `on_failure` command.
pub fn run_check(
    check: &BootCheck,
    remote: &mut dyn FnMut(&str) -> Result<Tried, String>,
    pause: Duration,
) -> Result<String, CheckFailed> {
    let re = regex::Regex::new(&check.matches).expect("checked when the recipe was read");
    let deadline = Instant::now() + check.within.unwrap_or_default();
    let mut tries = 0;
    let reason = loop {
        tries += 1;
        let tried = remote(&check.command).map_err(CheckFailed::NotRun)?;
        let output = tried.stdout.trim();
        if tried.success && re.is_match(output) {
            let last = output.lines().last().unwrap_or("").trim();
            return Ok(match last.is_empty() {
                true => "exit 0".into(),
                false => last.to_string(),
            });
        }
        let reason = match tried.success {
            true => format!("output {output:?} does not match /{}/", check.matches),
            false => tried.describe,
        };
        if Instant::now() + pause > deadline {
            break match check.within {
                Some(within) => format!(
                    "did not pass within {} s ({tries} tries); last: {reason}",
                    within.as_secs()
                ),
                None => reason,
            };
        }
        std::thread::sleep(pause);
    };
    let diagnosis = check.on_failure.as_ref().map(|command| {
        let said = match remote(command) {
            Ok(tried) => tried.stdout,
            Err(e) => e,
        };
        (command.clone(), said.trim_end().to_string())
    });
    Err(CheckFailed::Failed { reason, diagnosis })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> Result<BootSection, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    fn check(yaml: &str) -> BootCheck {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn tried(success: bool, stdout: &str) -> Tried {
        Tried {
            success,
            stdout: stdout.into(),
            describe: format!("exit {}", if success { 0 } else { 1 }),
        }
    }

    #[test]
    fn reads_a_boot_section_and_refuses_what_it_cannot_run() {
        let s = section(
            "user: agent\nchecks:\n  - name: node is v22\n    command: node --version\n    matches: '^v22\\.'\n    within: 2m\n",
        )
        .unwrap();
        assert_eq!(s.user.as_deref(), Some("agent"));
        assert_eq!(s.checks[0].within, Some(Duration::from_secs(120)));
        assert_eq!(s.checks[0].matches, "^v22\\.");
        for (bad, says) in [
            ("user: Agent\n", "not an account name"),
            (
                "checks:\n  - name: x\n    command: true\n    matches: '('\n",
                "regular expression",
            ),
            ("checks:\n  - name: x\n", "missing field `command`"),
            (
                "checks:\n  - name: x\n    command: true\n    retry: 3\n",
                "unknown field `retry`",
            ),
            ("users: agent\n", "unknown field `users`"),
            (
                "checks:\n  - name: ''\n    command: true\n",
                "needs a `name`",
            ),
        ] {
            let err = section(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let many: String = (0..27)
            .map(|i| format!("  - name: c{i}\n    command: true\n"))
            .collect();
        let err = section(&format!("checks:\n{many}")).unwrap_err();
        assert!(err.contains("at most 26"), "{err}");
    }

    #[test]
    fn an_extending_section_keeps_the_base_checks_first() {
        let base = section("user: agent\nchecks:\n  - {name: a, command: 'true'}\n").unwrap();
        let own = section("checks:\n  - {name: b, command: 'true'}\n").unwrap();
        let merged = own.over(base);
        assert_eq!(merged.user.as_deref(), Some("agent"));
        let names: Vec<&str> = merged.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(stage_name(1, &merged.checks[1]), "3b. b");
    }

    #[test]
    fn a_check_passes_on_exit_0_and_a_matching_output() {
        let c = check("{name: n, command: node --version, matches: '^v22\\.'}");
        let mut ran = Vec::new();
        let mut remote = |cmd: &str| {
            ran.push(cmd.to_string());
            Ok(tried(true, "v22.1.0\n"))
        };
        assert_eq!(
            run_check(&c, &mut remote, Duration::ZERO),
            Ok("v22.1.0".into())
        );
        assert_eq!(ran, ["node --version"]);

        let mut remote = |_: &str| Ok(tried(true, "v20.0.0"));
        let err = run_check(&c, &mut remote, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"v20.0.0\" does not match /^v22\\./"),
            "{err}"
        );

        let mut remote = |_: &str| Ok(tried(false, "v22.1.0"));
        assert_eq!(
            run_check(&c, &mut remote, Duration::ZERO),
            Err(CheckFailed::Failed {
                reason: "exit 1".into(),
                diagnosis: None
            })
        );

        // A command that cannot be run at all stops the check at once.
        let mut tries = 0;
        let mut remote = |_: &str| {
            tries += 1;
            Err::<Tried, _>("ssh: connection closed".to_string())
        };
        let err = run_check(&c, &mut remote, Duration::ZERO).unwrap_err();
        assert_eq!(err, CheckFailed::NotRun("ssh: connection closed".into()));
        assert_eq!(tries, 1);
    }

    #[test]
    fn a_check_with_within_tries_again_until_it_passes_or_time_is_up() {
        let c = check(
            "{name: up, command: curl health, matches: healthy, within: 1s, on_failure: status}",
        );
        let mut answers =
            vec![tried(true, "401"), tried(false, ""), tried(true, "healthy")].into_iter();
        let mut remote = |_: &str| Ok(answers.next().unwrap());
        let pause = Duration::from_millis(10);
        assert_eq!(run_check(&c, &mut remote, pause), Ok("healthy".into()));

        let mut ran = Vec::new();
        let mut remote = |cmd: &str| {
            ran.push(cmd.to_string());
            Ok(tried(
                true,
                if cmd == "status" {
                    "unit failed"
                } else {
                    "starting"
                },
            ))
        };
        let failed = run_check(&c, &mut remote, Duration::from_millis(200)).unwrap_err();
        let CheckFailed::Failed { diagnosis, .. } = &failed else {
            panic!("{failed:?}")
        };
        assert_eq!(diagnosis, &Some(("status".into(), "unit failed".into())));
        let err = failed.to_string();
        assert!(err.starts_with("did not pass within 1 s ("), "{err}");
        assert!(
            err.contains("last: output \"starting\" does not match /healthy/"),
            "{err}"
        );
        assert!(err.ends_with("\nstatus:\nunit failed"), "{err}");
        let tries = ran.iter().filter(|c| *c == "curl health").count();
        assert!(
            (3..=6).contains(&tries),
            "{tries} tries in 1 s with 0.2 s pauses"
        );
        assert_eq!(ran.last().map(String::as_str), Some("status"));
    }
}
