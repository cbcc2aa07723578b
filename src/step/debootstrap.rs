//! `debootstrap`: builds a base root from nothing with the host's debootstrap.
//!
//! The mirror and keyring default to debootstrap's own for the suite, so the
//! recipe names no host. A `keyring` file (next to the recipe) is hashed into
//! the step key; signatures are always checked. `script` picks the
//! debootstrap script for a suite the host's debootstrap is too old to know.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::{check_words, Kind, StepContext, StepError};
use crate::checks::{Expect, Homes};
use crate::digest::KeyEncoder;
use crate::fields::RecipeRelPath;
use crate::sandbox::Action;

/// The `debootstrap:` step fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DebootstrapFields")]
pub struct Debootstrap {
    pub suite: String,
    pub variant: String,
    pub components: Vec<String>,
    pub packages: Vec<String>,
    pub mirror: Option<String>,
    pub keyring: Option<RecipeRelPath>,
    pub architecture: Option<String>,
    /// The debootstrap script to use when the host's debootstrap does not
    /// know the suite yet (e.g. `gutsy` for a new Ubuntu release).
    pub script: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DebootstrapFields {
    suite: String,
    #[serde(default = "minbase")]
    variant: String,
    #[serde(default = "main_component")]
    components: Vec<String>,
    #[serde(default)]
    packages: Vec<String>,
    mirror: Option<String>,
    keyring: Option<RecipeRelPath>,
    architecture: Option<String>,
    script: Option<String>,
}

fn minbase() -> String {
    "minbase".into()
}

fn main_component() -> Vec<String> {
    vec!["main".into()]
}

impl TryFrom<DebootstrapFields> for Debootstrap {
    type Error = String;
    fn try_from(f: DebootstrapFields) -> Result<Debootstrap, String> {
        let word = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-._".contains(c);
        let err = |e: serde::de::value::Error| e.to_string();
        check_words("suite", std::slice::from_ref(&f.suite), word).map_err(err)?;
        if !["minbase", "buildd", "default"].contains(&f.variant.as_str()) {
            return Err(format!(
                "variant `{}` is not one of `minbase`, `buildd`, `default`",
                f.variant
            ));
        }
        if f.components.is_empty() {
            return Err("`components` is empty; use at least `[main]`".into());
        }
        check_words("component", &f.components, word).map_err(err)?;
        for name in &f.packages {
            crate::fields::check_package_name(name)?;
        }
        if let Some(script) = &f.script {
            check_words("script", std::slice::from_ref(script), word).map_err(err)?;
        }
        if let Some(arch) = &f.architecture {
            check_words("architecture", std::slice::from_ref(arch), word).map_err(err)?;
        }
        if let Some(m) = &f.mirror {
            if !(m.starts_with("http://") || m.starts_with("https://") || m.starts_with("file:/"))
                || m.contains(char::is_whitespace)
            {
                return Err(format!("mirror `{m}` is not an http(s):// or file:/ URL"));
            }
        }
        Ok(Debootstrap {
            suite: f.suite,
            variant: f.variant,
            components: f.components,
            packages: f.packages,
            mirror: f.mirror,
            keyring: f.keyring,
            architecture: f.architecture,
            script: f.script,
        })
    }
}

/// The build host's Debian architecture (e.g. `amd64`).
fn host_architecture() -> Result<String, StepError> {
    static ARCH: OnceLock<Result<String, String>> = OnceLock::new();
    ARCH.get_or_init(|| {
        let out = Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .map_err(|e| format!("cannot run `dpkg --print-architecture` ({e}); set `architecture:` in the debootstrap step"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
    .clone()
    .map_err(StepError::Other)
}

impl Debootstrap {
    /// The architecture the root is for.
    pub fn architecture(&self) -> Result<String, StepError> {
        match &self.architecture {
            Some(a) => Ok(a.clone()),
            None => host_architecture(),
        }
    }

    /// A run from the local mirror `mirror` (see `debs::local_mirror`)
    /// instead of the archive: no signature to check (every file was checked
    /// against the lock's SHA-256), and afterwards the root's `sources.list`
    /// is `sources_list`, what the run that resolved the pins wrote.
    pub fn local_action(
        &self,
        ctx: &StepContext,
        mirror: &Path,
        sources_list: &str,
    ) -> Result<Action, StepError> {
        let local = format!("file://{}", mirror.display());
        let mut argv: Vec<String> = [
            "sh",
            "-c",
            r#"root=$1 sources=$2; shift 2
"$@" && printf '%s' "$sources" > "$root/etc/apt/sources.list""#,
            "kiln-debootstrap",
            Action::ROOT,
            sources_list,
        ]
        .into_iter()
        .map(String::from)
        .collect();
        argv.extend(self.argv(ctx, Some(&local))?);
        Ok(Action::Host { argv })
    }

    /// debootstrap's command line; `local` replaces the mirror (and the
    /// keyring) with a local mirror.
    fn argv(&self, ctx: &StepContext, local: Option<&str>) -> Result<Vec<String>, StepError> {
        let mut argv = vec!["debootstrap".to_string()];
        if self.variant != "default" {
            argv.push(format!("--variant={}", self.variant));
        }
        argv.push(format!("--components={}", self.components.join(",")));
        if !self.packages.is_empty() {
            argv.push(format!("--include={}", self.packages.join(",")));
        }
        argv.push(format!("--arch={}", self.architecture()?));
        if let Some(archives) = ctx.archives {
            argv.push(format!("--cache-dir={}", archives.display()));
        }
        match (&self.keyring, local) {
            (_, Some(_)) => argv.push("--no-check-gpg".into()),
            (Some(k), None) => argv.push(format!("--keyring={}", ctx.recipe_file(k)?.display())),
            (None, None) => {}
        }
        argv.push(self.suite.clone());
        argv.push(Action::ROOT.into());
        let mirror = local.map(String::from).or_else(|| self.mirror.clone());
        let scripts = Path::new("/usr/share/debootstrap/scripts");
        match &self.script {
            // An empty mirror makes debootstrap use the script's default one.
            Some(script) => {
                argv.push(mirror.unwrap_or_default());
                argv.push(scripts.join(script).display().to_string());
            }
            None => {
                if !scripts.join(&self.suite).exists() && scripts.exists() {
                    return Err(StepError::Other(format!(
                        "this machine's debootstrap does not know suite `{}`; update debootstrap, or set `script:` \
                         to the script of its family (`gutsy` for Ubuntu, `sid` for Debian)",
                        self.suite
                    )));
                }
                argv.extend(mirror);
            }
        }
        Ok(argv)
    }
}

impl Kind for Debootstrap {
    fn encode(&self, enc: &mut KeyEncoder, ctx: &StepContext) -> Result<(), StepError> {
        enc.str(&self.suite)
            .str(&self.variant)
            .strs(&self.components)
            .strs(&self.packages)
            .opt_str(self.mirror.as_deref())
            .opt_str(self.script.as_deref())
            .str(&self.architecture()?);
        match &self.keyring {
            Some(k) => {
                let path = ctx.recipe_file(k)?;
                let bytes =
                    std::fs::read(&path).map_err(|source| StepError::Io { path, source })?;
                enc.bool(true).bytes(&bytes);
            }
            None => {
                enc.bool(false);
            }
        }
        Ok(())
    }

    /// Its packages are installed.
    fn expectations(&self, _: &StepContext, _: &Homes) -> Result<Vec<Expect>, StepError> {
        Ok(self.packages.iter().cloned().map(Expect::Package).collect())
    }

    fn action(&self, ctx: &StepContext) -> Result<Action, StepError> {
        self.argv(ctx, None).map(|argv| Action::Host { argv })
    }

    fn is_base(&self) -> bool {
        true
    }

    fn runs_in_root(&self) -> bool {
        false
    }

    fn downloads_packages(&self) -> bool {
        true
    }

    /// debootstrap copies the build host's own files into the new root.
    fn extra_drops(&self) -> Vec<String> {
        vec!["etc/resolv.conf".into(), "etc/hostname".into()]
    }
}
