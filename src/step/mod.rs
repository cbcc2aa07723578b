//! Step kinds: what a recipe step does, how it is hashed, how it runs.
//!
//! Each kind lives in its own module: its recipe fields (a serde struct) and
//! its [`Kind`] implementation — its canonical key input, the [`Action`] the
//! sandbox performs for it and what it puts into the image as checks.
//! Adding a kind means adding that module and its line in the `step_kinds!`
//! registry; [`StepKind`] dispatches to the kinds it lists.

mod apt;
mod debootstrap;
mod fetch;
mod file;
mod run;
mod systemd;
mod user;

use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess};

use crate::checks::{Expect, Homes};
use crate::digest::KeyEncoder;
use crate::fields::RecipeRelPath;
use crate::sandbox::{Action, Bind};

pub use apt::{Apt, DELTA_DIR, DELTA_REFUSED};
pub use debootstrap::Debootstrap;
pub use fetch::DOWNLOAD_DIR;
pub use fetch::{Fetch, Pin, Source};
pub use file::FileStep;
pub use run::Run;
pub use systemd::{install_targets, Systemd, Unit};
pub use user::User;

/// Errors a step kind reports while hashing or preparing to run.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// What the recipe and machine provide to a step kind.
pub struct StepContext<'a> {
    /// The directory of the recipe file; `source:` paths are relative to it.
    pub recipe_dir: &'a Path,
    /// A private scratch directory for this step run (only while running).
    pub scratch: Option<&'a Path>,
    /// A public key file given on the command line (`--ssh-key`); it replaces
    /// the `authorized_keys` of `user` steps.
    pub ssh_key: Option<&'a Path>,
    /// This run's private package archive (see [`crate::debs`]), for kinds
    /// that download packages (only while running).
    pub archives: Option<&'a Path>,
    /// The package lists this run starts from (see [`crate::apt_lists`]),
    /// for kinds that update apt's lists (only while running).
    pub apt_lists: Option<&'a Path>,
    /// How long the step may run; downloads made while preparing it stop then.
    pub time_limit: Option<std::time::Duration>,
    /// Every file outside the image the step's kind read (its name in the
    /// recipe or on the command line, and where it is): what `kiln plan
    /// --explain` watches for changes.
    pub reads: std::sync::Mutex<Vec<(String, PathBuf)>>,
}

impl<'a> StepContext<'a> {
    /// A context outside a run, for reading a step's inputs (its key, what
    /// it is expected to write): no scratch space, package archive or time
    /// limit.
    pub fn reading(recipe_dir: &'a Path, ssh_key: Option<&'a Path>) -> StepContext<'a> {
        StepContext {
            recipe_dir,
            scratch: None,
            ssh_key,
            archives: None,
            apt_lists: None,
            time_limit: None,
            reads: Default::default(),
        }
    }

    /// The file `rel` names next to the recipe, resolved. It must stay inside
    /// the recipe's folder once symlinks are followed: a recipe shared with a
    /// team must not read `/etc/shadow` or a host key through a link.
    pub fn recipe_file(&self, rel: &RecipeRelPath) -> Result<PathBuf, StepError> {
        let path = self.recipe_dir.join(rel.as_str());
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StepError::Io { path, source }
        };
        let real = std::fs::canonicalize(&path).map_err(io(&path))?;
        let dir = match self.recipe_dir.as_os_str().is_empty() {
            true => Path::new("."),
            false => self.recipe_dir,
        };
        let folder = std::fs::canonicalize(dir).map_err(io(dir))?;
        if !real.starts_with(&folder) {
            return Err(StepError::Other(format!(
                "{}: leads out of the recipe's folder {} (to {}) through a symlink; \
                 copy the file into the recipe's folder",
                path.display(),
                folder.display(),
                real.display()
            )));
        }
        self.note_read(rel.as_str(), &real);
        Ok(real)
    }

    /// Notes that the step's kind read `path` (named `name`).
    pub fn note_read(&self, name: &str, path: &Path) {
        let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
        if !reads.iter().any(|(n, _)| n == name) {
            reads.push((name.to_string(), path.to_path_buf()));
        }
    }
}

/// What every step kind provides. [`StepKind`] calls these for the kind a
/// step has.
pub trait Kind: serde::Serialize {
    /// Feeds the kind's canonical parameters into a step key (after the
    /// kind's name, which [`StepKind::encode`] writes). Every field is
    /// encoded explicitly: a derive must never change a key.
    fn encode(&self, enc: &mut KeyEncoder, ctx: &StepContext) -> Result<(), StepError>;

    /// What the sandbox does to run this step.
    fn action(&self, ctx: &StepContext) -> Result<Action, StepError>;

    /// Whether the kind runs programs inside the root (so it needs a base
    /// below it).
    fn runs_in_root(&self) -> bool;

    /// What a step of this kind puts into the image, as checks `kiln verify`
    /// runs; `homes` are the homes the recipe's `user` steps give.
    fn expectations(&self, _ctx: &StepContext, _homes: &Homes) -> Result<Vec<Expect>, StepError> {
        Ok(Vec::new())
    }

    /// The kind's parameters as a JSON object of fields (what `kiln plan
    /// --explain` compares between builds).
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("step parameters serialize")
    }

    /// Whether the kind builds a root from nothing (and so takes no `needs`).
    fn is_base(&self) -> bool {
        false
    }

    /// Whether the kind downloads Debian packages, and so runs with a
    /// private archive from the package cache ([`StepContext::archives`]).
    fn downloads_packages(&self) -> bool {
        false
    }

    /// Whether the kind runs `apt-get update` for the root (apt steps, and a
    /// base through mmdebstrap): the lists a run that ended well leaves are
    /// kept, and the next run starts from the store's checked copies
    /// ([`StepContext::apt_lists`]).
    fn updates_apt_lists(&self) -> bool {
        false
    }

    /// Host directories the kind's run shows inside the root.
    fn binds(&self, _ctx: &StepContext) -> Vec<Bind> {
        Vec::new()
    }

    /// Paths this kind's output never keeps, on top of the usual normalization.
    fn extra_drops(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The registry of step kinds: from one line per kind (variant, fields
/// type, name in recipes) it makes [`StepKind`], [`KIND_NAMES`],
/// [`StepKind::name`], the recipe reader, and a `StepKind` method for each
/// [`Kind`] method that calls it on the step's kind.
macro_rules! step_kinds {
    ($($variant:ident($fields:ty) = $name:literal,)*) => {
        /// One step's kind and its parameters.
        #[derive(Debug, Clone, PartialEq)]
        pub enum StepKind {
            $($variant($fields),)*
        }

        /// The names a step kind can have in a recipe.
        pub const KIND_NAMES: &[&str] = &[$($name,)*];

        impl StepKind {
            /// The kind's name as written in recipes.
            pub fn name(&self) -> &'static str {
                match self {
                    $(StepKind::$variant(_) => $name,)*
                }
            }

            /// The kind's parameters as a JSON object of fields.
            pub fn params(&self) -> serde_json::Value {
                match self {
                    $(StepKind::$variant(k) => Kind::params(k),)*
                }
            }

            /// Whether the kind builds a root from nothing (and so takes no `needs`).
            pub fn is_base(&self) -> bool {
                match self {
                    $(StepKind::$variant(k) => Kind::is_base(k),)*
                }
            }

            /// Whether the kind runs programs inside the root.
            pub fn runs_in_root(&self) -> bool {
                match self {
                    $(StepKind::$variant(k) => Kind::runs_in_root(k),)*
                }
            }

            /// What the sandbox does to run this step.
            pub fn action(&self, ctx: &StepContext) -> Result<Action, StepError> {
                match self {
                    $(StepKind::$variant(k) => Kind::action(k, ctx),)*
                }
            }

            /// Whether the kind downloads Debian packages.
            pub fn downloads_packages(&self) -> bool {
                match self {
                    $(StepKind::$variant(k) => Kind::downloads_packages(k),)*
                }
            }

            /// Whether the kind runs `apt-get update` in the root.
            pub fn updates_apt_lists(&self) -> bool {
                match self {
                    $(StepKind::$variant(k) => Kind::updates_apt_lists(k),)*
                }
            }

            /// Host directories the kind's run shows inside the root.
            pub fn binds(&self, ctx: &StepContext) -> Vec<Bind> {
                match self {
                    $(StepKind::$variant(k) => Kind::binds(k, ctx),)*
                }
            }

            /// What a step of this kind puts into the image, as checks.
            pub fn expectations(&self, ctx: &StepContext, homes: &Homes) -> Result<Vec<Expect>, StepError> {
                match self {
                    $(StepKind::$variant(k) => Kind::expectations(k, ctx, homes),)*
                }
            }

            /// Paths this kind's output never keeps.
            pub fn extra_drops(&self) -> Vec<String> {
                match self {
                    $(StepKind::$variant(k) => Kind::extra_drops(k),)*
                }
            }

            /// Feeds the kind's name and canonical parameters into a step key.
            pub fn encode(&self, enc: &mut KeyEncoder, ctx: &StepContext) -> Result<(), StepError> {
                enc.str(self.name());
                match self {
                    $(StepKind::$variant(k) => Kind::encode(k, enc, ctx),)*
                }
            }

            /// Reads the value of the recipe key `name` as that kind, or
            /// `None` when `name` is no kind.
            pub(crate) fn read<'de, A: MapAccess<'de>>(
                name: &str,
                map: &mut A,
            ) -> Result<Option<StepKind>, A::Error> {
                Ok(Some(match name {
                    $($name => StepKind::$variant(map.next_value()?),)*
                    _ => return Ok(None),
                }))
            }
        }
    };
}

step_kinds! {
    Debootstrap(Debootstrap) = "debootstrap",
    Apt(Apt) = "apt",
    File(FileStep) = "file",
    Run(Run) = "run",
    User(User) = "user",
    Fetch(Fetch) = "fetch",
    Systemd(Systemd) = "systemd",
}

/// The environment every program run inside a root starts with.
pub fn root_env(epoch: i64) -> Vec<(String, String)> {
    [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", "/root"),
        ("LANG", "C.UTF-8"),
        ("DEBIAN_FRONTEND", "noninteractive"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([("SOURCE_DATE_EPOCH".to_string(), epoch.to_string())])
    .collect()
}

/// Rejects list items that would need quoting to be safe as program arguments.
pub(crate) fn check_words<E: de::Error>(
    what: &str,
    words: &[String],
    allowed: fn(char) -> bool,
) -> Result<(), E> {
    for w in words {
        if w.is_empty() || !w.chars().all(allowed) {
            return Err(E::custom(format!(
                "{what} `{w}` has characters that are not allowed there"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_files_stay_inside_the_recipe_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("recipes");
        std::fs::create_dir_all(dir.join("files")).unwrap();
        std::fs::write(dir.join("files/motd"), "hi\n").unwrap();
        std::fs::write(tmp.path().join("secret"), "key\n").unwrap();
        std::os::unix::fs::symlink("motd", dir.join("files/inside")).unwrap();
        std::os::unix::fs::symlink("../../secret", dir.join("files/outside")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("files/absolute")).unwrap();
        let ctx = StepContext::reading(&dir, None);
        let file = |p: &str| ctx.recipe_file(&RecipeRelPath::parse(p).unwrap());
        assert!(file("files/motd").unwrap().ends_with("recipes/files/motd"));
        assert!(file("files/inside")
            .unwrap()
            .ends_with("recipes/files/motd"));
        for bad in ["files/outside", "files/absolute"] {
            let err = file(bad).unwrap_err().to_string();
            assert!(
                err.contains("leads out of the recipe's folder"),
                "{bad}: {err}"
            );
        }
    }
}
