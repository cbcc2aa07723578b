//! What dpkg's status file (`/var/lib/dpkg/status`) says is installed, read
//! from an image for the SBOM and `kiln diff`; and [`Deb`], one package file
//! as a lock pins it.

use std::collections::BTreeMap;

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Installed {
    pub name: String,
    pub version: String,
    pub arch: Option<String>,
    /// The source package and its version (`openssh 1:9.6p1-3`); the
    /// package's own name and version when the status names none.
    pub source: String,
}

/// The packages `status` lists as installed, in its order.
pub fn installed(status: &str) -> Vec<Installed> {
    let mut packages = Vec::new();
    for paragraph in status.split("\n\n") {
        let mut fields = BTreeMap::new();
        for line in paragraph.lines() {
            if line.starts_with([' ', '\t']) {
                continue; // a continuation line (descriptions, conffiles)
            }
            if let Some((key, value)) = line.split_once(':') {
                fields.insert(key, value.trim());
            }
        }
        let installed = fields
            .get("Status")
            .is_some_and(|s| s.ends_with(" installed"));
        let (Some(name), Some(version)) = (fields.get("Package"), fields.get("Version")) else {
            continue;
        };
        if !installed {
            continue;
        }
        // `Source: NAME` or `Source: NAME (VERSION)`.
        let source = match fields.get("Source") {
            Some(s) => match s.split_once(' ') {
                Some((src, v)) => format!("{src} {}", v.trim_matches(['(', ')'])),
                None => format!("{s} {version}"),
            },
            None => format!("{name} {version}"),
        };
        packages.push(Installed {
            name: name.to_string(),
            version: version.to_string(),
            arch: fields.get("Architecture").map(|a| a.to_string()),
            source,
        });
    }
    packages
}

/// One pinned package file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Deb {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// 64 lowercase hex digits.
    pub sha256: String,
}

impl Deb {
    /// The file names apt and debootstrap give the package in their archive
    /// (`NAME_VERSION_ARCH.deb`, the epoch's `:` written `%3a`): apt quotes
    /// every `:`, debootstrap the first.
    pub fn file_names(&self) -> [String; 2] {
        let name = |v: String| format!("{}_{v}_{}.deb", self.name, self.arch);
        [
            name(self.version.replace(':', "%3a")),
            name(self.version.replacen(':', "%3a", 1)),
        ]
    }

    /// `NAME=VERSION`, as apt takes it on the command line.
    pub fn spec(&self) -> String {
        format!("{}={}", self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_packages_with_their_sources() {
        let status = "Package: openssh-server\nStatus: install ok installed\nArchitecture: amd64\n\
                      Source: openssh (1:9.6p1-3)\nVersion: 1:9.6p1-3+b1\nDescription: x\n more\n\n\
                      Package: git\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:2.43.0-1\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n\n\
                      Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nSource: glibc\nVersion: 2.39-0ubuntu8\n";
        let got: Vec<(String, String, String)> = installed(status)
            .into_iter()
            .map(|p| (p.name, p.version, p.source))
            .collect();
        let want = [
            ("openssh-server", "1:9.6p1-3+b1", "openssh 1:9.6p1-3"),
            ("git", "1:2.43.0-1", "git 1:2.43.0-1"),
            ("libc6", "2.39-0ubuntu8", "glibc 2.39-0ubuntu8"),
        ];
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        assert_eq!(got, want);
    }
}
