//! `debootstrap`: builds a base root from nothing, as debootstrap would, with
//! mmdebstrap (apt resolves and downloads, dpkg installs the essential set in
//! one call: a third of debootstrap's time for the agent image's base).
//!
//! The mirror and keyring default to debootstrap's own for the suite (read
//! from its suite script), so the recipe names no host and the root's
//! `sources.list` is debootstrap's one line. A `keyring` file (next to the
//! recipe) is hashed into the step key; signatures are always checked.
//! `script` picks the debootstrap script whose defaults apply to a suite the
//! host's debootstrap does not know yet.

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
    /// The debootstrap script whose default mirror and keyring apply when
    /// the host's debootstrap does not know the suite yet (e.g. `gutsy` for
    /// a new Ubuntu release).
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
        argv.extend(self.argv(ctx, Some(mirror))?);
        Ok(Action::Host { argv })
    }

    /// mmdebstrap's command line; `local` replaces the archive with a
    /// local mirror.
    fn argv(&self, ctx: &StepContext, local: Option<&Path>) -> Result<Vec<String>, StepError> {
        let variant = match self.variant.as_str() {
            // debootstrap's default: the required and important packages.
            "default" => "important",
            v => v,
        };
        let mut argv = vec![
            "mmdebstrap".to_string(),
            "--mode=root".into(),
            format!("--variant={variant}"),
            format!("--components={}", self.components.join(",")),
            format!("--architectures={}", self.architecture()?),
            // kiln reads the archive's index from them (see
            // `debs::ArchiveIndex`); no layer keeps them.
            "--skip=cleanup/apt/lists".into(),
        ];
        // debootstrap installs apt in every variant; mmdebstrap's take what
        // the archive marks required, which on Ubuntu leaves apt out.
        let mut include = vec!["apt".to_string()];
        include.extend(self.packages.iter().filter(|p| *p != "apt").cloned());
        argv.push(format!("--include={}", include.join(",")));
        let source = match local {
            Some(mirror) => {
                // The mirror's `Release` is unsigned: its files were checked.
                // apt's `copy:` copies what it takes into the root's archive
                // cache, where dpkg in the root finds it (no mount point is
                // left in the root).
                format!(
                    "deb [trusted=yes] copy://{} {} {}",
                    mirror.display(),
                    self.suite,
                    self.components.join(" ")
                )
            }
            None => {
                let defaults = self.debootstrap_defaults()?;
                let keyring = match &self.keyring {
                    Some(k) => Some(ctx.recipe_file(k)?),
                    None => defaults.keyring.filter(|k| k.exists()),
                };
                if let Some(k) = keyring {
                    argv.push(format!("--keyring={}", k.display()));
                }
                if let Some(archives) = ctx.archives {
                    // apt's archive cache is the run's private package
                    // archive: cached `.deb`s are used (apt checks each),
                    // new ones stay there for the package cache.
                    let dir = quoted(archives)?;
                    argv.push("--skip=download/empty,essential/unlink".into());
                    argv.push(format!(
                        r#"--setup-hook=mkdir -p "$1/{APT_ARCHIVES}" && mount --bind {dir} "$1/{APT_ARCHIVES}""#
                    ));
                    argv.push(format!(r#"--customize-hook=umount "$1/{APT_ARCHIVES}""#));
                }
                if let Some(lists) = ctx.apt_lists {
                    // apt starts from the checked lists (see `apt_lists`):
                    // it fetches the current `InRelease`, and only the
                    // indexes that changed.
                    let dir = quoted(lists)?;
                    argv.push(format!(
                        r#"--setup-hook=mkdir -p "$1/{APT_LISTS}" && cp -a {dir}/. "$1/{APT_LISTS}/""#
                    ));
                }
                self.mirror.clone().unwrap_or(defaults.mirror)
            }
        };
        argv.push(self.suite.clone());
        argv.push(Action::ROOT.into());
        argv.push(source);
        Ok(argv)
    }

    /// debootstrap's mirror and keyring for the suite: what its suite
    /// script (or `script`) sets, else its built-in mirror.
    fn debootstrap_defaults(&self) -> Result<Defaults, StepError> {
        let scripts = Path::new(DEBOOTSTRAP_SCRIPTS);
        let name = self.script.as_deref().unwrap_or(&self.suite);
        let script = scripts.join(name);
        if !script.exists() {
            return Err(StepError::Other(match &self.script {
                Some(s) => format!(
                    "this machine's debootstrap has no script `{s}` (in {DEBOOTSTRAP_SCRIPTS}); \
                     install debootstrap, or set `mirror:` and `keyring:`"
                ),
                None => format!(
                    "this machine's debootstrap does not know suite `{}`; update debootstrap, or set `script:` \
                     to the script of its family (`gutsy` for Ubuntu, `sid` for Debian)",
                    self.suite
                ),
            }));
        }
        read_defaults(&script, &self.architecture()?, &self.suite)
    }
}

/// What the debootstrap suite script `script` sets for `arch` and `suite`.
fn read_defaults(script: &Path, arch: &str, suite: &str) -> Result<Defaults, StepError> {
    let out = Command::new("bash")
        .args(["-c", READ_DEFAULTS, "kiln-debootstrap-defaults"])
        .arg(arch)
        .arg(suite)
        .arg(script)
        .output()
        .map_err(|source| StepError::Io {
            path: script.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let mirror = lines.next().unwrap_or_default().to_string();
    if !out.status.success() || mirror.is_empty() {
        return Err(StepError::Other(format!(
            "cannot read debootstrap's default mirror from {}; set `mirror:` in the step",
            script.display()
        )));
    }
    let keyring = lines
        .next()
        .filter(|k| !k.is_empty())
        .map(std::path::PathBuf::from);
    Ok(Defaults { mirror, keyring })
}

/// Where debootstrap keeps its suite scripts.
const DEBOOTSTRAP_SCRIPTS: &str = "/usr/share/debootstrap/scripts";

/// apt's archive cache in the root.
const APT_ARCHIVES: &str = "var/cache/apt/archives";

/// apt's package lists in the root.
const APT_LISTS: &str = "var/lib/apt/lists";

/// `path` quoted for a hook's shell.
fn quoted(path: &Path) -> Result<String, StepError> {
    shlex::try_quote(&path.display().to_string())
        .map(|q| q.into_owned())
        .map_err(|e| StepError::Other(e.to_string()))
}

/// Prints debootstrap's mirror and keyring for `$1` (architecture), `$2`
/// (suite) by sourcing the suite script `$3` with its directives caught:
/// the script's `default_mirror`, else debootstrap's `DEF_MIRROR`.
const READ_DEFAULTS: &str = r#"ARCH=$1 SUITE=$2
mirror=$(sed -n 's/^DEF_MIRROR="\(.*\)"$/\1/p' "$(command -v debootstrap)")
keyring_file=
default_mirror() { mirror=$1; }
keyring() { keyring_file=$1; }
doing_variant() { false; }
command_not_found_handle() { return 0; }
DEBOOTSTRAP_DIR=/usr/share/debootstrap
. "$3" >/dev/null 2>&1 </dev/null
printf '%s\n%s\n' "$mirror" "$keyring_file""#;

/// debootstrap's defaults for a suite.
struct Defaults {
    mirror: String,
    keyring: Option<std::path::PathBuf>,
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

    /// mmdebstrap's apt starts from the kept lists, and the lists it leaves
    /// are kept (the next apt step then fetches only `InRelease`).
    fn updates_apt_lists(&self) -> bool {
        true
    }

    /// mmdebstrap copies the build host's own files into the new root.
    fn extra_drops(&self) -> Vec<String> {
        vec!["etc/resolv.conf".into(), "etc/hostname".into()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A suite script shaped like debootstrap's (`gutsy`): directives inside
    /// `case`s, a variant test, and functions that must not run.
    const SCRIPT: &str = r#"case $ARCH in
  amd64|i386)
    case $SUITE in
      gutsy|hardy) default_mirror http://old.mirror.invalid/ubuntu ;;
      *) default_mirror http://archive.mirror.invalid/ubuntu ;;
    esac ;;
  *) default_mirror http://ports.mirror.invalid/ubuntu ;;
esac
mirror_style release
download_style apt
keyring /usr/share/keyrings/example-archive-keyring.gpg
if doing_variant fakechroot; then
  default_mirror http://fakechroot.mirror.invalid/
fi
work_out_debs () {
  exit 7
}
"#;

    #[test]
    fn reads_the_mirror_and_keyring_a_suite_script_sets() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("gutsy");
        std::fs::write(&script, SCRIPT).unwrap();
        let d = read_defaults(&script, "amd64", "noble").unwrap();
        assert_eq!(d.mirror, "http://archive.mirror.invalid/ubuntu");
        assert_eq!(
            d.keyring.as_deref(),
            Some(Path::new("/usr/share/keyrings/example-archive-keyring.gpg"))
        );
        let d = read_defaults(&script, "amd64", "hardy").unwrap();
        assert_eq!(d.mirror, "http://old.mirror.invalid/ubuntu");
        let d = read_defaults(&script, "arm64", "noble").unwrap();
        assert_eq!(d.mirror, "http://ports.mirror.invalid/ubuntu");
    }

    #[test]
    fn debians_scripts_give_its_archive_and_keyring() {
        // The real scripts (tests/run installs debootstrap): Debian's name no
        // mirror, so debootstrap's built-in one applies.
        let sid = Path::new(DEBOOTSTRAP_SCRIPTS).join("sid");
        assert!(sid.exists(), "debootstrap is not installed; run tests/run");
        let d = read_defaults(&sid, "amd64", "trixie").unwrap();
        assert!(d.mirror.starts_with("http"), "{}", d.mirror);
        assert!(
            d.keyring
                .as_deref()
                .is_some_and(|k| k.ends_with("debian-archive-keyring.gpg")),
            "{:?}",
            d.keyring.as_deref()
        );
    }

    fn step(yaml: &str) -> Debootstrap {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn an_archive_run_uses_the_run_s_package_archive_and_debootstraps_sources_line() {
        let dir = tempfile::tempdir().unwrap();
        let archives = dir.path().join("my debs");
        let lists = dir.path().join("lists");
        let ctx = StepContext {
            archives: Some(&archives),
            apt_lists: Some(&lists),
            ..StepContext::reading(dir.path(), None)
        };
        let base = step(
            "{suite: trixie, architecture: amd64, packages: [sudo, udev], mirror: 'http://m.invalid/debian'}",
        );
        let argv = base.argv(&ctx, None).unwrap();
        assert_eq!(argv[0], "mmdebstrap");
        for arg in [
            "--variant=minbase",
            "--components=main",
            "--architectures=amd64",
            "--include=apt,sudo,udev",
            "--skip=cleanup/apt/lists",
            "--skip=download/empty,essential/unlink",
        ] {
            assert!(argv.iter().any(|a| a == arg), "{arg} not in {argv:?}");
        }
        let setup = argv
            .iter()
            .find(|a| a.starts_with("--setup-hook="))
            .unwrap();
        assert!(
            setup.contains(&format!("mount --bind '{}'", archives.display())),
            "{setup}"
        );
        assert!(argv
            .iter()
            .any(|a| a == r#"--customize-hook=umount "$1/var/cache/apt/archives""#));
        let seed = format!(r#"cp -a {}/. "$1/var/lib/apt/lists/""#, lists.display());
        assert!(
            argv.iter()
                .any(|a| a.starts_with("--setup-hook=") && a.contains(&seed)),
            "{argv:?}"
        );
        assert!(argv
            .iter()
            .any(|a| a.ends_with("debian-archive-keyring.gpg") && a.starts_with("--keyring=")));
        assert_eq!(
            argv[argv.len() - 3..],
            ["trixie", Action::ROOT, "http://m.invalid/debian"]
        );
    }

    #[test]
    fn a_local_run_trusts_the_checked_mirror_and_maps_the_default_variant() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = StepContext::reading(dir.path(), None);
        let base = step("{suite: trixie, variant: default, components: [main, contrib]}");
        let argv = base.argv(&ctx, Some(Path::new("/w/mirror"))).unwrap();
        assert!(argv.iter().any(|a| a == "--variant=important"), "{argv:?}");
        assert!(!argv
            .iter()
            .any(|a| a.starts_with("--keyring") || a.starts_with("--hook") || a.contains("mount")));
        assert_eq!(
            argv.last().unwrap(),
            "deb [trusted=yes] copy:///w/mirror trixie main contrib"
        );
    }

    #[test]
    fn a_suite_debootstrap_does_not_know_needs_a_script() {
        let err = step("{suite: kiln-test-unknown-suite}")
            .debootstrap_defaults()
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`script:`"), "{err}");
    }
}
