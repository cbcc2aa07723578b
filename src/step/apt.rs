//! `apt`: installs Debian packages with apt-get inside the step's root.
//!
//! Recommends are off unless asked for; services are kept from starting with a
//! temporary `policy-rc.d`; extra `sources` lines go to
//! `/etc/apt/sources.list.d/kiln.list` and stay in the image.

use serde::Deserialize;

use super::check_words;
use crate::digest::KeyEncoder;
use crate::sandbox::Action;

/// The `apt:` step fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
        check_words::<serde::de::value::Error>("package", &f.packages, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.=:~".contains(c)
        })
        .map_err(|e| e.to_string())?;
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

impl Apt {
    pub(super) fn encode(&self, enc: &mut KeyEncoder) {
        enc.strs(&self.packages)
            .bool(self.install_recommends)
            .strs(&self.sources);
    }

    pub(super) fn action(&self) -> Action {
        let mut script = String::from(
            "set -eu\n\
             printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d\n\
             chmod 0755 /usr/sbin/policy-rc.d\n\
             trap 'rm -f /usr/sbin/policy-rc.d' EXIT\n",
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
        let recommends = if self.install_recommends {
            ""
        } else {
            " --no-install-recommends"
        };
        script.push_str(&format!(
            "apt-get update -q\napt-get install -y -q{recommends} {}\napt-get clean\n",
            self.packages.join(" ")
        ));
        Action::Chroot {
            argv: vec!["/bin/sh".into(), "-c".into(), script],
        }
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
            "sources: ['x']\npackages: [a]",
        ] {
            assert!(serde_yaml::from_str::<Apt>(bad).is_err(), "{bad}");
        }
    }
}
