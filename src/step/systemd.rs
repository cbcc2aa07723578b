//! `systemd`: installs unit files and enables units without a running systemd.
//!
//! System units go to `/etc/systemd/system/`, user units of one account to
//! `~/.config/systemd/user/` (owned by that account). Enabling is what
//! `systemctl enable` does: a symlink in each `WantedBy=`/`RequiredBy=`
//! target's `.wants/`/`.requires/` directory — kiln makes those links itself
//! from the unit's `[Install]` section, so it works in any root. Units are
//! checked when the recipe is read: sections and `Key=Value` lines, an
//! absolute `ExecStart=` for services, and an `[Install]` target for units to
//! enable (template units need `DefaultInstance=`).

use serde::{Deserialize, Serialize};

use super::{Kind, StepContext, StepError};
use crate::checks::{user_home, Expect, Homes};
use crate::digest::KeyEncoder;
use crate::fields::RecipeRelPath;
use crate::image::FileType;
use crate::sandbox::Action;

/// The `systemd:` step fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SystemdFields")]
pub struct Systemd {
    /// System units to install.
    pub units: Vec<Unit>,
    /// The account whose user units these are.
    pub user: Option<String>,
    /// User units to install for `user`.
    pub user_units: Vec<Unit>,
    /// Units already in the image to enable (system units).
    pub enable: Vec<String>,
}

/// One unit file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    pub name: String,
    pub content: Option<String>,
    pub source: Option<RecipeRelPath>,
    #[serde(default)]
    pub enable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SystemdFields {
    #[serde(default)]
    units: Vec<Unit>,
    user: Option<String>,
    #[serde(default)]
    user_units: Vec<Unit>,
    #[serde(default)]
    enable: Vec<String>,
}

const UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".socket",
    ".target",
    ".timer",
    ".path",
    ".mount",
    ".automount",
    ".slice",
];

fn check_unit_name(name: &str) -> Result<(), String> {
    let ok = UNIT_SUFFIXES.iter().any(|s| name.ends_with(s))
        && !name.contains('/')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@-_.:\\".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a unit name (like `foo.service` or `foo@.service`)"
        ))
    }
}

impl TryFrom<SystemdFields> for Systemd {
    type Error = String;
    fn try_from(f: SystemdFields) -> Result<Systemd, String> {
        if f.units.is_empty() && f.user_units.is_empty() && f.enable.is_empty() {
            return Err(
                "the systemd step does nothing; give `units`, `user_units` or `enable`".into(),
            );
        }
        if !f.user_units.is_empty() && f.user.is_none() {
            return Err("`user_units` need `user:`, the account they belong to".into());
        }
        for name in &f.enable {
            check_unit_name(name)?;
        }
        for unit in f.units.iter().chain(&f.user_units) {
            check_unit_name(&unit.name)?;
            match (&unit.content, &unit.source) {
                (Some(text), None) => check_unit_text(&unit.name, text, unit.enable)?,
                (None, Some(_)) => {}
                _ => {
                    return Err(format!(
                        "unit `{}` needs exactly one of `content` or `source`",
                        unit.name
                    ))
                }
            }
        }
        Ok(Systemd {
            units: f.units,
            user: f.user,
            user_units: f.user_units,
            enable: f.enable,
        })
    }
}

/// The `Key=Value` pairs of a section of a unit file.
fn section<'a>(text: &'a str, wanted: &str) -> Vec<(&'a str, &'a str)> {
    let mut current = "";
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            current = &line[1..line.len() - 1];
        } else if current == wanted {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim(), v.trim()));
            }
        }
    }
    out
}

/// Why a unit file's text is refused (`line` counts from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("unit `{unit}` line {line}: unclosed section header `{text}`")]
    UnclosedSection {
        unit: String,
        line: usize,
        text: String,
    },
    #[error("unit `{unit}` line {line}: `{text}` comes before any [Section]")]
    BeforeSection {
        unit: String,
        line: usize,
        text: String,
    },
    #[error("unit `{unit}` line {line}: `{text}` is not `Key=Value`")]
    NotKeyValue {
        unit: String,
        line: usize,
        text: String,
    },
    #[error("unit `{unit}` has no ExecStart= in [Service]")]
    NoExecStart { unit: String },
    #[error("unit `{unit}`: ExecStart= must start with an absolute path, not `{command}`")]
    RelativeExecStart { unit: String, command: String },
    #[error("unit `{unit}` is to be enabled but has no WantedBy= or RequiredBy= in [Install]")]
    NoInstallTarget { unit: String },
    #[error("template unit `{unit}` can only be enabled with DefaultInstance= in [Install]")]
    TemplateWithoutInstance { unit: String },
}

/// The recipe reader's `TryFrom` (for serde, which wants only a message)
/// reports in text.
impl From<UnitError> for String {
    fn from(e: UnitError) -> String {
        e.to_string()
    }
}

/// Checks a unit file's shape.
pub fn check_unit_text(name: &str, text: &str, enable: bool) -> Result<(), UnitError> {
    let unit = || name.to_string();
    let mut has_section = false;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            if !line.ends_with(']') {
                return Err(UnitError::UnclosedSection {
                    unit: unit(),
                    line: n + 1,
                    text: line.into(),
                });
            }
            has_section = true;
            continue;
        }
        if !has_section {
            return Err(UnitError::BeforeSection {
                unit: unit(),
                line: n + 1,
                text: line.into(),
            });
        }
        if !line.contains('=') && !raw.ends_with('\\') {
            return Err(UnitError::NotKeyValue {
                unit: unit(),
                line: n + 1,
                text: line.into(),
            });
        }
    }
    if name.ends_with(".service") {
        let exec = section(text, "Service");
        let start = exec
            .iter()
            .find(|(k, _)| *k == "ExecStart")
            .map(|(_, v)| *v);
        match start {
            None if !exec.iter().any(|(k, v)| *k == "Type" && *v == "oneshot") => {
                return Err(UnitError::NoExecStart { unit: unit() })
            }
            Some(cmd)
                if !cmd
                    .trim_start_matches(['@', '-', ':', '+', '!'])
                    .starts_with('/') =>
            {
                return Err(UnitError::RelativeExecStart {
                    unit: unit(),
                    command: cmd.into(),
                })
            }
            _ => {}
        }
    }
    if enable {
        let targets = install_targets(text);
        if targets.is_empty() {
            return Err(UnitError::NoInstallTarget { unit: unit() });
        }
        if name.contains("@.")
            && !section(text, "Install")
                .iter()
                .any(|(k, _)| *k == "DefaultInstance")
        {
            return Err(UnitError::TemplateWithoutInstance { unit: unit() });
        }
    }
    Ok(())
}

/// `(directory suffix, target)` pairs from `[Install]`: (`wants`, `multi-user.target`), …
pub fn install_targets(text: &str) -> Vec<(&'static str, String)> {
    section(text, "Install")
        .into_iter()
        .filter_map(|(k, v)| match k {
            "WantedBy" => Some(("wants", v)),
            "RequiredBy" => Some(("requires", v)),
            _ => None,
        })
        .flat_map(|(kind, v)| v.split_whitespace().map(move |t| (kind, t.to_string())))
        .collect()
}

impl Unit {
    /// The unit file's text (from `content`, or `source` next to the recipe).
    pub fn text(&self, ctx: &StepContext) -> Result<String, StepError> {
        match (&self.content, &self.source) {
            (Some(c), _) => Ok(c.clone()),
            (None, Some(s)) => {
                let path = ctx.recipe_file(s)?;
                let text = std::fs::read_to_string(&path).map_err(|source| StepError::Io {
                    path: path.clone(),
                    source,
                })?;
                check_unit_text(&self.name, &text, self.enable)
                    .map_err(|e| StepError::Other(format!("{}: {e}", path.display())))?;
                Ok(text)
            }
            (None, None) => Err(StepError::Other(format!(
                "unit `{}` has no content",
                self.name
            ))),
        }
    }
}

impl Kind for Systemd {
    fn encode(&self, enc: &mut KeyEncoder, ctx: &StepContext) -> Result<(), StepError> {
        for (label, units) in [("system", &self.units), ("user", &self.user_units)] {
            enc.str(label).u64(units.len() as u64);
            for unit in units {
                enc.str(&unit.name).str(&unit.text(ctx)?).bool(unit.enable);
            }
        }
        enc.opt_str(self.user.as_deref()).strs(&self.enable);
        Ok(())
    }

    /// Each unit file by its sha256, in the system's unit folder or the
    /// user's (in the home `homes` gives the user), and the links that
    /// enable it.
    fn expectations(&self, ctx: &StepContext, homes: &Homes) -> Result<Vec<Expect>, StepError> {
        use sha2::Digest as _;
        let mut out = Vec::new();
        for (units, dir) in [
            (&self.units, Some("/etc/systemd/system".to_string())),
            (
                &self.user_units,
                self.user
                    .as_ref()
                    .map(|user| format!("{}/.config/systemd/user", user_home(user, homes))),
            ),
        ] {
            let Some(dir) = dir else { continue };
            for unit in units {
                let text = unit.text(ctx)?;
                let unit_path = format!("{dir}/{}", unit.name);
                let digest = hex::encode(sha2::Sha256::digest(text.as_bytes()));
                out.push(Expect::path(unit_path.clone(), &|r| {
                    r.kind = Some(FileType::Regular);
                    r.sha256 = Some(digest.clone());
                }));
                if unit.enable {
                    for (kind, target) in install_targets(&text) {
                        out.push(Expect::path(
                            format!("{dir}/{target}.{kind}/{}", unit.name),
                            &|r| r.link = Some(unit_path.clone()),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    fn action(&self, ctx: &StepContext) -> Result<Action, StepError> {
        let q = |s: &str| {
            shlex::try_quote(s)
                .map(|c| c.into_owned())
                .unwrap_or_default()
        };
        let mut script = String::from("set -eu\n");
        let install = |script: &mut String,
                       dir: &str,
                       unit: &Unit,
                       owner: Option<&str>|
         -> Result<(), StepError> {
            // `dir` is a shell expression (it may use $home); names are quoted.
            let text = unit.text(ctx)?;
            let path = format!("{dir}/{}", q(&unit.name));
            script.push_str(&format!(
                "mkdir -p {dir}\nprintf '%s' {} > {path}\nchmod 0644 {path}\n",
                q(&text),
            ));
            if unit.enable {
                for (kind, target) in install_targets(&text) {
                    let wants = format!("{dir}/{}", q(&format!("{target}.{kind}")));
                    script.push_str(&format!(
                        "mkdir -p {wants}\nln -sfn {path} {wants}/{}\n",
                        q(&unit.name)
                    ));
                }
            }
            if let Some(owner) = owner {
                script.push_str(&format!("chown -hR {owner}: \"$home/.config\"\n"));
            }
            Ok(())
        };
        for unit in &self.units {
            install(&mut script, "/etc/systemd/system", unit, None)?;
        }
        if let Some(user) = &self.user {
            script.push_str(&format!(
                "home=$(getent passwd {user} | cut -d: -f6)\n\
                 [ -n \"$home\" ] || {{ echo 'user {user} is not in the image: make this step need the step that creates it' >&2; exit 1; }}\n\
                 install -d -o {user} -g \"$(id -g {user})\" \"$home/.config\" \"$home/.config/systemd\" \"$home/.config/systemd/user\"\n"
            ));
            for unit in &self.user_units {
                install(
                    &mut script,
                    "\"$home/.config/systemd/user\"",
                    unit,
                    Some(user),
                )?;
            }
        }
        for name in &self.enable {
            script.push_str(&format!(
                "command -v systemctl >/dev/null || {{ echo 'enabling {name} needs systemd in the image' >&2; exit 1; }}\n\
                 systemctl enable {}\n",
                q(name)
            ));
        }
        Ok(Action::Chroot {
            argv: vec!["/bin/sh".into(), "-c".into(), script],
        })
    }

    fn runs_in_root(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENCODE: &str = "[Unit]\nDescription=x\n\n[Service]\nExecStart=/home/agent/.local/bin/opencode serve\n\n[Install]\nWantedBy=default.target\n";

    #[test]
    fn units_are_checked() {
        assert!(check_unit_text("a.service", OPENCODE, true).is_ok());
        let cases = [
            ("a.service", "ExecStart=/bin/true\n", "before any"),
            ("a.service", "[Service]\nExecStart=true\n", "absolute path"),
            ("a.service", "[Service]\nUser=x\n", "no ExecStart"),
            (
                "a.service",
                "[Service]\nExecStart=/bin/true\n",
                "no WantedBy",
            ),
            ("a@.service", OPENCODE, "DefaultInstance"),
            ("a.service", "[Service\nExecStart=/bin/true\n", "unclosed"),
            ("a.service", "[Service]\nExecStart /bin/true\n", "Key=Value"),
        ];
        for (name, text, needle) in cases {
            let e = check_unit_text(name, text, true).unwrap_err().to_string();
            assert!(e.contains(needle), "{name}: {e}");
        }
        assert_eq!(
            install_targets("[Install]\nWantedBy=a.target b.target\nRequiredBy=c.target\n").len(),
            3
        );
    }

    #[test]
    fn recipe_fields_are_checked() {
        let ok: Systemd = serde_yaml::from_str("user: agent\nuser_units:\n  - name: opencode@.service\n    content: \"[Service]\\nExecStart=/bin/true\\n\"\nenable: [ssh.service]\n").unwrap();
        assert_eq!(ok.user_units.len(), 1);
        for bad in [
            "{}",
            "user_units: [{name: a.service, content: x}]",
            "enable: [ssh]",
            "units: [{name: a.service}]",
        ] {
            assert!(serde_yaml::from_str::<Systemd>(bad).is_err(), "{bad}");
        }
    }
}
