//! What a recipe's `verify:` section asserts, parsed with the recipe:
//! assertions about a path of the image, or a command run in it whose
//! output must match. [`crate::verify`] checks them against an image.

use serde::Deserialize;

use crate::fields::{ImagePath, Mode, Owner};
use crate::image::FileType;

/// An extra assertion from a recipe's `verify:` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "CheckFields")]
pub struct RecipeCheck {
    pub name: Option<String>,
    pub what: CheckWhat,
}

/// What a `verify:` entry asserts.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckWhat {
    Path(PathRules),
    /// A command run in a chroot of the image (`--exec`); its output must match.
    Command {
        command: String,
        matches: String,
    },
}

/// Assertions about one path.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PathRules {
    pub path: String,
    pub exists: bool,
    pub executable: bool,
    pub kind: Option<FileType>,
    pub mode: Option<u32>,
    pub owner: Option<Owner>,
    pub contains: Option<String>,
    pub sha256: Option<String>,
    pub link: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckFields {
    name: Option<String>,
    path: Option<ImagePath>,
    exists: Option<bool>,
    #[serde(default)]
    executable: bool,
    mode: Option<Mode>,
    owner: Option<Owner>,
    contains: Option<String>,
    sha256: Option<String>,
    command: Option<String>,
    matches: Option<String>,
}

impl TryFrom<CheckFields> for RecipeCheck {
    type Error = String;
    fn try_from(f: CheckFields) -> Result<RecipeCheck, String> {
        let what = match (f.path, f.command) {
            (Some(path), None) => {
                if f.matches.is_some() {
                    return Err("`matches` goes with `command`, not `path`".into());
                }
                if let Some(d) = &f.sha256 {
                    if d.len() != 64 || !d.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(format!("sha256 `{d}` is not 64 hex digits"));
                    }
                }
                let exists = f.exists.unwrap_or(true);
                if !exists
                    && (f.executable
                        || f.mode.is_some()
                        || f.owner.is_some()
                        || f.contains.is_some()
                        || f.sha256.is_some())
                {
                    return Err("a path that must not exist can have no other assertions".into());
                }
                CheckWhat::Path(PathRules {
                    path: path.to_string(),
                    exists,
                    executable: f.executable,
                    mode: f.mode.map(|m| m.0),
                    owner: f.owner,
                    contains: f.contains,
                    sha256: f.sha256.map(|s| s.to_lowercase()),
                    ..PathRules::default()
                })
            }
            (None, Some(command)) => {
                let matches = f.matches.unwrap_or_else(|| ".*".into());
                regex::Regex::new(&matches)
                    .map_err(|e| format!("`matches` is not a regular expression: {e}"))?;
                if f.exists.is_some()
                    || f.executable
                    || f.mode.is_some()
                    || f.owner.is_some()
                    || f.contains.is_some()
                    || f.sha256.is_some()
                {
                    return Err("a `command` check takes only `matches` (and `name`)".into());
                }
                CheckWhat::Command { command, matches }
            }
            _ => return Err("a verify entry needs exactly one of `path` or `command`".into()),
        };
        Ok(RecipeCheck { name: f.name, what })
    }
}

/// One check planned against an image: what a step kind says it wrote
/// (see `StepKind::expectations`), or an entry of `verify:`.
pub enum Expect {
    /// The dpkg package is installed.
    Package(String),
    /// The account exists with these ids, home and shell.
    Account {
        name: String,
        uid: u32,
        gid: u32,
        home: String,
        shell: String,
    },
    Path {
        name: Option<String>,
        rules: PathRules,
    },
    /// Run with `kiln verify --exec`; the output must match.
    Command {
        name: Option<String>,
        command: String,
        matches: String,
    },
}

impl Expect {
    /// A path that must exist, with the rules `f` adds.
    pub fn path(path: String, f: &dyn Fn(&mut PathRules)) -> Expect {
        let mut rules = PathRules {
            path,
            exists: true,
            ..PathRules::default()
        };
        f(&mut rules);
        Expect::Path { name: None, rules }
    }
}

/// The homes the recipe's `user` steps give their accounts, by name.
pub type Homes = std::collections::BTreeMap<String, String>;

/// The home of `user`: the one a `user` step of the recipe gives it, else
/// where such a step would put it.
pub fn user_home(user: &str, homes: &Homes) -> String {
    match homes.get(user) {
        Some(home) => home.clone(),
        None if user == "root" => "/root".into(),
        None => format!("/home/{user}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_entries_are_checked() {
        let ok: RecipeCheck =
            serde_yaml::from_str("name: node\ncommand: node --version\nmatches: '^v22\\.'\n")
                .unwrap();
        assert!(matches!(ok.what, CheckWhat::Command { .. }));
        let p: RecipeCheck =
            serde_yaml::from_str("path: /usr/bin/git\nexecutable: true\nmode: '0755'\n").unwrap();
        let CheckWhat::Path(rules) = p.what else {
            panic!("a path check")
        };
        assert_eq!(
            (rules.path.as_str(), rules.executable, rules.mode),
            ("/usr/bin/git", true, Some(0o755))
        );
        for bad in [
            "path: /x\ncommand: y",
            "name: nothing",
            "command: x\nmatches: '('",
            "path: /x\nexists: false\nmode: '0644'",
            "path: /x\nsha256: abc",
            "path: x",
            "command: x\nmode: '0644'",
        ] {
            assert!(serde_yaml::from_str::<RecipeCheck>(bad).is_err(), "{bad}");
        }
    }
}
