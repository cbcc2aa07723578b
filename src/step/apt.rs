//! `apt`: installs Debian packages with apt-get inside the step's root.
//!
//! Recommends are off unless asked for; services are kept from starting with a
//! temporary `policy-rc.d`; extra `sources` lines go to
//! `/etc/apt/sources.list.d/kiln.list` and stay in the image. A step the lock
//! file pins (see `lock`) installs the pinned versions: apt preferences pin
//! each one for the run, and when the archive no longer has some of them the
//! package cache's copies are offered as a local source, checked by the
//! SHA-256 the lock gives.

use serde::{Deserialize, Serialize};

use super::{Kind, StepContext, StepError};
use crate::apt_lists;
use crate::checks::{Expect, Homes};
use crate::digest::KeyEncoder;
use crate::dpkg::Deb;
use crate::sandbox::{Action, Bind};

/// The `apt:` step fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "AptFields")]
pub struct Apt {
    pub packages: Vec<String>,
    pub install_recommends: bool,
    pub sources: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AptFields {
    packages: Vec<String>,
    #[serde(default)]
    install_recommends: bool,
    #[serde(default)]
    sources: Vec<String>,
}

impl TryFrom<AptFields> for Apt {
    type Error = String;
    fn try_from(f: AptFields) -> Result<Apt, String> {
        if f.packages.is_empty() {
            return Err("`packages` is empty; list at least one package".into());
        }
        for spec in &f.packages {
            crate::fields::check_package_spec(spec)?;
        }
        if let Some(bad) = f
            .sources
            .iter()
            .find(|s| s.contains('\n') || !s.starts_with("deb"))
        {
            return Err(format!("source `{bad}` is not a one-line `deb ...` entry"));
        }
        let mut packages = f.packages;
        packages.sort();
        packages.dedup();
        Ok(Apt {
            packages,
            install_recommends: f.install_recommends,
            sources: f.sources,
        })
    }
}

/// Where a delta run finds the lower layers' dpkg status (`base-status`)
/// and leaves its notes; bound from the host by the build.
pub const DELTA_DIR: &str = "/run/kiln-delta";

/// The exit status of a delta run that found it could not give what a clean
/// run gives; the build then runs the step clean.
pub const DELTA_REFUSED: i32 = 99;

/// Runs `script` with `/bin/sh` in the root.
fn shell(script: String) -> Action {
    Action::Chroot {
        argv: vec!["/bin/sh".into(), "-c".into(), script],
    }
}

impl Apt {
    /// Every parameter but the package list: steps that differ only in their
    /// packages are one family, and a run of one can be the base of a delta
    /// run of another (see `delta`).
    pub fn encode_family(&self, enc: &mut KeyEncoder) {
        enc.bool(self.install_recommends).strs(&self.sources);
    }

    fn recommends(&self) -> &'static str {
        if self.install_recommends {
            ""
        } else {
            " --no-install-recommends"
        }
    }

    /// The start of every run: services kept from starting, the extra
    /// sources written, the package lists fetched (starting from the lists
    /// kiln checked and offers at [`apt_lists::SEED_DIR`], if any).
    fn prologue(&self) -> String {
        let mut script = String::from(
            r#"set -eu
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d /etc/apt/preferences.d/kiln-lock /etc/apt/sources.list.d/kiln-lock.list' EXIT
"#,
        );
        if !self.sources.is_empty() {
            let lines: Vec<String> = self
                .sources
                .iter()
                .map(|s| {
                    shlex::try_quote(s)
                        .map(|q| q.into_owned())
                        .unwrap_or_default()
                })
                .collect();
            script.push_str(&format!(
                "printf '%s\\n' {} > /etc/apt/sources.list.d/kiln.list\n",
                lines.join(" ")
            ));
        }
        script.push_str(&format!(
            "cp -p {}/* /var/lib/apt/lists/ 2>/dev/null || true\n",
            apt_lists::SEED_DIR
        ));
        script.push_str("apt-get update -q -o Acquire::Languages=none\n");
        script
    }

    /// The install itself, without fsync (the image, written at the end, is
    /// what must be durable), and apt's record of automatically installed
    /// packages sorted, so it does not depend on the order packages came in.
    fn install(&self) -> String {
        format!(
            r#"apt-get install -y -q{} -o Dpkg::Options::=--force-unsafe-io {}
f=/var/lib/apt/extended_states
if [ -s "$f" ]; then
  awk 'BEGIN{{RS=""}} {{gsub(/\n/, "\001"); print}}' "$f" | LC_ALL=C sort \
    | awk '{{gsub(/\001/, "\n"); print $0 "\n"}}' > "$f.kiln"
  mv "$f.kiln" "$f"
fi
"#,
            self.recommends(),
            self.packages.join(" ")
        )
    }

    /// A run that installs the `pinned` versions (see [`Apt::pins`]).
    pub fn locked_action(&self, pinned: &[Deb]) -> Action {
        shell(self.prologue() + &self.pins(pinned) + &self.install())
    }

    /// Pins each package at its locked version for this run (apt
    /// preferences, removed on exit). When apt cannot find every pinned
    /// version in the archive, the pinned `.deb`s in the run's package
    /// archive (from the package cache) whose SHA-256 is the lock's are
    /// offered as a trusted local source: the lock's digest is the trust.
    fn pins(&self, pinned: &[Deb]) -> String {
        let mut prefs = String::new();
        for d in pinned {
            prefs.push_str(&format!(
                "Package: {}\nPin: version {}\nPin-Priority: 1001\n\n",
                d.name, d.version
            ));
        }
        let specs: Vec<String> = pinned.iter().map(Deb::spec).collect();
        let files: Vec<String> = pinned
            .iter()
            .map(|d| format!("{}:{}", d.file_names()[0], d.sha256))
            .collect();
        format!(
            r#"cat > /etc/apt/preferences.d/kiln-lock <<'KILN_LOCK'
{prefs}KILN_LOCK
if ! apt-get install -s -q{flags} {specs} > /dev/null 2>&1; then
  echo "kiln: the archive lacks some pinned versions; offering the package cache's copies"
  a=/var/cache/apt/archives
  : > $a/Packages
  for pair in {files}; do
    f=${{pair%%:*}} sum=${{pair##*:}}
    [ -f "$a/$f" ] && [ "$(sha256sum < "$a/$f" | cut -d' ' -f1)" = "$sum" ] || continue
    dpkg-deb -f "$a/$f" >> $a/Packages
    printf 'Filename: ./%s
Size: %s
SHA256: %s

' "$f" "$(stat -c %s "$a/$f")" "$sum" >> $a/Packages
  done
  echo "deb [trusted=yes] file:$a ./" > /etc/apt/sources.list.d/kiln-lock.list
  apt-get update -q -o Acquire::Languages=none
fi
"#,
            flags = self.recommends(),
            specs = specs.join(" "),
            files = files.join(" "),
        )
    }

    /// A delta run: on top of a cached run of this step's family (a subset
    /// of the packages over the same lower layers), installs the rest, and
    /// then checks with apt's own plan that the result is what a clean run
    /// gives: apt's solution for the whole list over the lower layers alone
    /// (their dpkg status at `DELTA_DIR/base-status`) must be exactly what the
    /// cached run installed plus what this run added, at the same versions,
    /// and the run must have removed or changed none of the cached run's
    /// packages. Otherwise it exits with [`DELTA_REFUSED`] and the build
    /// discards what it did. (Checking after the install spares a second
    /// plan, over the cached run's status, of about a second.)
    pub fn delta_action(&self) -> Action {
        let status = "/var/lib/dpkg/status";
        shell(
            self.prologue()
                + &self.delta_plan(DELTA_DIR, status)
                + &self.install()
                + &Self::delta_verify(DELTA_DIR, status),
        )
    }

    /// Before a delta run installs anything (see [`Apt::delta_action`]):
    /// apt's plan for the whole list over the lower layers alone, from
    /// `dir/base-status` (with a package cache of its own, so that apt's
    /// cache of the real status stays valid for the install), and the
    /// packages the cached run installed, from `status`. Both go into `dir`.
    fn delta_plan(&self, dir: &str, status: &str) -> String {
        let packages = self.packages.join(" ");
        let flags = self.recommends();
        format!(
            r#"d={dir}
refuse() {{ echo "kiln: delta refused: $*"; exit {DELTA_REFUSED}; }}
installed() {{
  awk '/^Package: /{{p=$2}} /^Version: /{{v=$2}} /^Status: .* installed$/{{s=1}}
       /^$/{{if (s) print p " " v; p=""; v=""; s=0}} END{{if (s) print p " " v}}' "$1" | LC_ALL=C sort
}}
planned() {{ sed -n 's/^Inst \([^ ]*\) \(\[[^]]*\] \)\{{0,1\}}(\([^ ]*\) .*/\1 \3/p' "$1" | LC_ALL=C sort; }}
apt-get -s -q{flags} -o Dir::State::status=$d/base-status -o Dir::Cache::pkgcache=$d/base-pkgcache.bin \
  install {packages} > $d/clean.sim || refuse "apt cannot plan the whole list over the lower layers"
if grep -q '^Remv ' $d/clean.sim; then refuse "a clean run would remove packages"; fi
installed $d/base-status > $d/base.list
installed {status} > $d/cached.list
LC_ALL=C comm -13 $d/base.list $d/cached.list > $d/cached-run.list
planned $d/clean.sim > $d/clean.list
"#
        )
    }

    /// After a delta run installed (see [`Apt::delta_action`]): what it added
    /// to the cached run's packages (`status` now, against `dir/cached.list`)
    /// plus the cached run's must be apt's clean plan, and it must have
    /// removed or changed none of them.
    fn delta_verify(dir: &str, status: &str) -> String {
        format!(
            r#"installed {status} > {dir}/after.list
if [ -n "$(LC_ALL=C comm -23 {dir}/cached.list {dir}/after.list)" ]; then
  refuse "the added packages removed or changed what the cached run installed"
fi
LC_ALL=C comm -13 {dir}/cached.list {dir}/after.list > {dir}/delta.list
LC_ALL=C sort -u {dir}/cached-run.list {dir}/delta.list > {dir}/both.list
if ! cmp -s {dir}/both.list {dir}/clean.list; then
  diff {dir}/clean.list {dir}/both.list || true
  refuse "a clean run would install other packages or versions (has the archive moved on?)"
fi
echo "kiln: delta: added $(wc -l < {dir}/delta.list) packages to the $(wc -l < {dir}/cached-run.list) of the cached run"
"#
        )
    }
}

impl Kind for Apt {
    fn encode(&self, enc: &mut KeyEncoder, _: &StepContext) -> Result<(), StepError> {
        enc.strs(&self.packages);
        self.encode_family(enc);
        Ok(())
    }

    /// Its packages (without a `=VERSION`) are installed.
    fn expectations(&self, _: &StepContext, _: &Homes) -> Result<Vec<Expect>, StepError> {
        Ok(self
            .packages
            .iter()
            .map(|p| Expect::Package(p.split('=').next().unwrap_or(p).to_string()))
            .collect())
    }

    fn action(&self, _: &StepContext) -> Result<Action, StepError> {
        Ok(shell(self.prologue() + &self.install()))
    }

    fn runs_in_root(&self) -> bool {
        true
    }

    fn downloads_packages(&self) -> bool {
        true
    }

    fn updates_apt_lists(&self) -> bool {
        true
    }

    /// The run's private package archive is apt's archive cache; the lists
    /// it starts from are offered at [`apt_lists::SEED_DIR`].
    fn binds(&self, ctx: &StepContext) -> Vec<Bind> {
        let archives = ctx.archives.map(|archives| Bind {
            host: archives.to_path_buf(),
            inside: "/var/cache/apt/archives".into(),
        });
        let lists = ctx.apt_lists.map(|lists| Bind {
            host: lists.to_path_buf(),
            inside: apt_lists::SEED_DIR.into(),
        });
        archives.into_iter().chain(lists).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_checked_and_sorted() {
        let apt: Apt = serde_yaml::from_str("packages: [vim, less, vim]").unwrap();
        assert_eq!(apt.packages, ["less", "vim"]);
        assert!(!apt.install_recommends);
        for bad in [
            "packages: []",
            "packages: ['a;rm -rf /']",
            "packages: [Less]",
            "sources: ['x']\npackages: [aa]",
        ] {
            assert!(serde_yaml::from_str::<Apt>(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod delta_check_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    const BASE: &str = "Package: aa\nStatus: install ok installed\nVersion: 1\n\n\
                        Package: gone\nStatus: deinstall ok config-files\nVersion: 9\n";
    const CACHED: &str = "Package: aa\nStatus: install ok installed\nVersion: 1\n\n\
                          Package: bb\nStatus: install ok installed\nVersion: 2\n\n\
                          Package: cc\nStatus: install ok installed\nVersion: 3\n";

    /// Runs a delta run's checks with a stand-in `apt-get -s` printing
    /// `clean`, and the install standing in as the status becoming `after`:
    /// (exit code, output).
    fn check(clean: &str, after: &str) -> (i32, String) {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("base-status"), BASE).unwrap();
        let status = d.join("status");
        std::fs::write(&status, CACHED).unwrap();
        std::fs::write(d.join("clean.out"), clean).unwrap();
        std::fs::write(d.join("after"), after).unwrap();
        let bin = d.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fake = bin.join("apt-get");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\ncase \"$*\" in *Dir::State::status=*) cat {0}/clean.out ;; *) exit 1 ;; esac\n",
                d.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let apt: Apt = serde_yaml::from_str("packages: [bb, cc, jq]").unwrap();
        let (dir, status) = (d.display().to_string(), status.display().to_string());
        let script = apt.delta_plan(&dir, &status)
            + &format!("cp {dir}/after {status}\n")
            + &Apt::delta_verify(&dir, &status);
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.code().unwrap(), text)
    }

    const CLEAN: &str = "NOTE: simulation\nInst bb (2 Debian:13/stable [amd64])\n\
                         Inst cc (3 Debian:13/stable [amd64])\nInst libonig5 (6.9 Debian:13/stable [amd64])\n\
                         Inst jq (1.7 Debian:13/stable [amd64])\nConf bb (2 Debian:13/stable [amd64])\n";
    const ADDED: &str = "\nPackage: jq\nStatus: install ok installed\nVersion: 1.7\n\n\
                         Package: libonig5\nStatus: install ok installed\nVersion: 6.9\n";

    #[test]
    fn accepts_exactly_the_cached_run_plus_the_added_closure() {
        let (code, out) = check(CLEAN, &format!("{CACHED}{ADDED}"));
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains("added 2 packages to the 2 of the cached run"),
            "{out}"
        );
    }

    #[test]
    fn refuses_what_a_clean_run_would_do_differently() {
        let after = format!("{CACHED}{ADDED}");
        let cases = [
            (
                CLEAN.replace("Inst cc (3", "Inst cc (4"),
                after.clone(),
                "other packages or versions",
            ),
            (
                format!("{CLEAN}Remv aa [1]\n"),
                after.clone(),
                "a clean run would remove packages",
            ),
            (
                CLEAN.to_string(),
                after.replace("Package: aa\n", "Package: aa-gone\n"),
                "removed or changed what the cached run installed",
            ),
            (
                CLEAN.to_string(),
                after.replace("Version: 3\n", "Version: 4\n"),
                "removed or changed what the cached run installed",
            ),
            (
                CLEAN.to_string(),
                format!("{CACHED}\nPackage: jq\nStatus: install ok installed\nVersion: 1.7\n"),
                "other packages or versions",
            ),
        ];
        for (clean, after, why) in cases {
            let (code, out) = check(&clean, &after);
            assert_eq!(code, DELTA_REFUSED, "{why}: {out}");
            assert!(out.contains(why), "{why}: {out}");
        }
    }
}
