//! The software bill of materials (`output.sbom`): an SPDX 2.3 JSON
//! document of every package in the image, read from the merged layers
//! before the image is written:
//!
//! - each package dpkg lists as installed (`/var/lib/dpkg/status`), with its
//!   version, architecture and source package, as a `pkg:deb` purl;
//! - each `fetch` step: an npm package with its pinned sha512, a URL with
//!   its pinned sha256;
//! - each npm package found in a `node_modules` directory of the image (its
//!   `package.json`), such as the ones npm itself bundles.
//!
//! The document describes the rootfs (its sha256; its blake3 as version) and says
//! it contains each package. It is a function of the image alone: its
//! creation time is the recipe's `output.epoch` and its namespace names the
//! rootfs digest, so two builds of one image give the same bytes.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::artifacts::Artifact;
use crate::dpkg;
use crate::layer::{Kind, Layer};
use crate::recipe::Recipe;
use crate::step::{Source, StepKind};
use crate::store::{Store, StoreError};

/// What the image holds, gathered before the image is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Contents {
    /// The distribution's `ID` from `/etc/os-release` (the purl namespace).
    distro: String,
    packages: Vec<Package>,
}

/// One package of the image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Package {
    /// `deb`, `npm` or `url`.
    ecosystem: &'static str,
    name: String,
    version: String,
    /// A deb's architecture.
    arch: Option<String>,
    /// A deb's source package and version.
    source: Option<String>,
    /// Where it came from (a fetched URL).
    location: Option<String>,
    /// (SPDX algorithm, lowercase hex).
    checksum: Option<(&'static str, String)>,
}

/// Reads the packages of the image `merged` (all layers merged) and `recipe`'s fetches.
pub fn contents(recipe: &Recipe, merged: &Layer, store: &Store) -> Result<Contents, StoreError> {
    let read = |path: &str| -> Result<Option<String>, StoreError> {
        match merged
            .entries
            .iter()
            .find(|e| e.path == path)
            .map(|e| &e.kind)
        {
            Some(Kind::File { blob, .. }) => Ok(Some(
                String::from_utf8_lossy(&store.read_blob(blob)?).into_owned(),
            )),
            _ => Ok(None),
        }
    };
    let distro = read("etc/os-release")?
        .or(read("usr/lib/os-release")?)
        .and_then(|text| os_release_id(&text))
        .unwrap_or_else(|| "unknown".to_string());
    let mut packages: Vec<Package> = read("var/lib/dpkg/status")?
        .map(|status| dpkg::installed(&status))
        .unwrap_or_default()
        .into_iter()
        .map(|p| Package {
            ecosystem: "deb",
            name: p.name,
            version: p.version,
            arch: p.arch,
            source: Some(p.source),
            location: None,
            checksum: None,
        })
        .collect();
    let fetched = fetched_packages(recipe);
    let mut node_modules = Vec::new();
    for entry in &merged.entries {
        if let (Some(dir), Kind::File { blob, .. }) = (npm_package_dir(&entry.path), &entry.kind) {
            let json: Option<Value> = serde_json::from_slice(&store.read_blob(blob)?).ok();
            let field = |k: &str| json.as_ref()?.get(k)?.as_str().map(str::to_string);
            if let (Some(name), Some(version)) = (field("name"), field("version")) {
                // Where a package is installed, its name is its directory's.
                if dir.ends_with(&format!("node_modules/{name}")) {
                    node_modules.push(npm_package(name, version, None));
                }
            }
        }
    }
    node_modules.retain(|p| {
        !fetched
            .iter()
            .any(|f| f.ecosystem == p.ecosystem && f.name == p.name && f.version == p.version)
    });
    packages.extend(fetched);
    packages.extend(node_modules);
    packages.sort();
    packages.dedup();
    Ok(Contents { distro, packages })
}

/// The SPDX 2.3 JSON document of an image with `contents`, whose rootfs is `rootfs`.
pub fn document(recipe: &Recipe, contents: &Contents, rootfs: &Artifact) -> String {
    let image_id = "SPDXRef-Image";
    let mut packages = vec![json!({
        "SPDXID": image_id,
        "name": recipe.name,
        "versionInfo": rootfs.blake3.to_hex(),
        "packageFileName": rootfs.file,
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        // Only sha256: SPDX tools read BLAKE3 as needing 256 hex digits
        // (its blake3 is the version).
        "checksums": [{"algorithm": "SHA256", "checksumValue": rootfs.sha256}],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    for (index, package) in contents.packages.iter().enumerate() {
        let id = format!(
            "SPDXRef-{}-{}-{}",
            package.ecosystem,
            index + 1,
            spdx_id_part(&package.name)
        );
        let mut fields = BTreeMap::from([
            ("SPDXID", json!(id)),
            ("name", json!(package.name)),
            ("versionInfo", json!(package.version)),
            (
                "downloadLocation",
                json!(package.location.as_deref().unwrap_or("NOASSERTION")),
            ),
            ("filesAnalyzed", json!(false)),
            ("licenseConcluded", json!("NOASSERTION")),
            ("licenseDeclared", json!("NOASSERTION")),
            ("copyrightText", json!("NOASSERTION")),
        ]);
        if let Some(purl) = purl(package, &contents.distro) {
            fields.insert(
                "externalRefs",
                json!([{
                    "referenceCategory": "PACKAGE-MANAGER",
                    "referenceType": "purl",
                    "referenceLocator": purl,
                }]),
            );
        }
        if let Some(source) = &package.source {
            fields.insert("sourceInfo", json!(format!("built from {source}")));
        }
        if let Some((algorithm, value)) = &package.checksum {
            fields.insert(
                "checksums",
                json!([{"algorithm": algorithm, "checksumValue": value}]),
            );
        }
        packages.push(json!(fields));
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    let document = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{} ({})", recipe.name, rootfs.file),
        "documentNamespace": format!("urn:kiln:sbom:{}:{}", spdx_id_part(&recipe.name), rootfs.blake3.to_hex()),
        "creationInfo": {
            "created": iso8601(recipe.output.epoch),
            "creators": [format!("Tool: kiln-{}", env!("CARGO_PKG_VERSION"))],
        },
        "documentDescribes": [image_id],
        "packages": packages,
        "relationships": relationships,
    });
    serde_json::to_string_pretty(&document).expect("documents serialize") + "\n"
}

/// The `ID=` of an os-release file.
fn os_release_id(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("ID="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// The packages the recipe's `fetch` steps put into the image.
fn fetched_packages(recipe: &Recipe) -> Vec<Package> {
    let mut packages = Vec::new();
    for step in &recipe.steps {
        let StepKind::Fetch(fetch) = &step.kind else {
            continue;
        };
        let pin = fetch.source.pin();
        match &fetch.source {
            Source::Npm { spec, .. } => {
                // `name@version` or `@scope/name@version`.
                let (name, version) = spec.rsplit_once('@').unwrap_or((spec, ""));
                packages.push(npm_package(
                    name.to_string(),
                    version.to_string(),
                    Some(("SHA512", pin.to_hex())),
                ));
            }
            Source::Url { url, .. } => {
                let file = url
                    .split(['?', '#'])
                    .next()
                    .and_then(|u| u.rsplit('/').next())
                    .unwrap_or(url);
                packages.push(Package {
                    ecosystem: "url",
                    name: file.to_string(),
                    version: "NOASSERTION".into(),
                    arch: None,
                    source: None,
                    location: Some(url.clone()),
                    checksum: Some(("SHA256", pin.to_hex())),
                });
            }
        }
    }
    packages
}

fn npm_package(name: String, version: String, checksum: Option<(&'static str, String)>) -> Package {
    Package {
        ecosystem: "npm",
        name,
        version,
        arch: None,
        source: None,
        location: None,
        checksum,
    }
}

/// The directory of an installed npm package whose `package.json` is at
/// `path`: `…/node_modules/NAME` or `…/node_modules/@SCOPE/NAME`.
fn npm_package_dir(path: &str) -> Option<&str> {
    let dir = path.strip_suffix("/package.json")?;
    let (parent, _) = dir.rsplit_once('/')?;
    let in_node_modules = parent.ends_with("node_modules")
        || parent.rsplit_once('/').is_some_and(|(above, scope)| {
            scope.starts_with('@') && above.ends_with("node_modules")
        });
    in_node_modules.then_some(dir)
}

/// The package URL (purl) of a package, when it has one.
fn purl(package: &Package, distro: &str) -> Option<String> {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' | b'+' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    match package.ecosystem {
        "deb" => Some(format!(
            "pkg:deb/{}/{}@{}{}",
            encode(distro),
            encode(&package.name),
            encode(&package.version),
            package
                .arch
                .as_deref()
                .map(|a| format!("?arch={}", encode(a)))
                .unwrap_or_default()
        )),
        "npm" => {
            let name = match package.name.strip_prefix('@') {
                Some(scoped) => match scoped.split_once('/') {
                    Some((scope, name)) => format!("%40{}/{}", encode(scope), encode(name)),
                    None => encode(&package.name),
                },
                None => encode(&package.name),
            };
            Some(format!("pkg:npm/{name}@{}", encode(&package.version)))
        }
        _ => None,
    }
}

/// A name as the letters, digits, `.` and `-` an SPDX id may hold.
fn spdx_id_part(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' => c,
            _ => '-',
        })
        .collect()
}

/// `seconds` since 1970 as `YYYY-MM-DDTHH:MM:SSZ`.
fn iso8601(seconds: i64) -> String {
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debs_get_purls_with_escaped_versions() {
        let deb = Package {
            ecosystem: "deb",
            name: "openssh-server".into(),
            version: "1:9.6p1-3+b1".into(),
            arch: Some("amd64".into()),
            source: None,
            location: None,
            checksum: None,
        };
        assert_eq!(
            purl(&deb, "ubuntu").unwrap(),
            "pkg:deb/ubuntu/openssh-server@1%3A9.6p1-3+b1?arch=amd64"
        );
    }

    #[test]
    fn fetches_carry_their_pins_and_debs_their_source() {
        let sha256 = "ab".repeat(32);
        let text = format!(
            "name: s\nsteps:\n  tool:\n    fetch: {{url: \"https://example.org/dl/tool.tar.gz?v=2\", \
             sha256: \"{sha256}\", dest: /opt/tool}}\n"
        );
        let recipe = crate::recipe::parse(&text, std::path::Path::new("s.yaml")).unwrap();
        let mut packages = fetched_packages(&recipe);
        packages.push(Package {
            ecosystem: "deb",
            name: "libssl3t64".into(),
            version: "3.0.13-0ubuntu3".into(),
            arch: Some("amd64".into()),
            source: Some("openssl (3.0.13-0ubuntu3)".into()),
            location: None,
            checksum: None,
        });
        let contents = Contents {
            distro: "ubuntu".into(),
            packages,
        };
        let rootfs = Artifact {
            file: "r.ext4".into(),
            path: "/images/r.ext4".into(),
            bytes: 1,
            blake3: crate::digest::Digest::of(b"r"),
            sha256: "cd".repeat(32),
        };
        let doc: serde_json::Value =
            serde_json::from_str(&document(&recipe, &contents, &rootfs)).unwrap();
        let package = |name: &str| {
            doc["packages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("no {name} in {doc}"))
                .clone()
        };
        let tool = package("tool.tar.gz");
        assert_eq!(
            tool["checksums"],
            json!([{"algorithm": "SHA256", "checksumValue": sha256}])
        );
        assert_eq!(
            tool["downloadLocation"],
            "https://example.org/dl/tool.tar.gz?v=2"
        );
        let ssl = package("libssl3t64");
        assert_eq!(ssl["sourceInfo"], "built from openssl (3.0.13-0ubuntu3)");
        assert_eq!(
            ssl["externalRefs"][0]["referenceLocator"],
            "pkg:deb/ubuntu/libssl3t64@3.0.13-0ubuntu3?arch=amd64"
        );
    }

    #[test]
    fn npm_packages_are_found_where_node_installs_them() {
        assert_eq!(
            npm_package_dir("usr/local/lib/node_modules/pnpm/package.json"),
            Some("usr/local/lib/node_modules/pnpm")
        );
        assert_eq!(
            npm_package_dir("a/node_modules/@scope/x/package.json"),
            Some("a/node_modules/@scope/x")
        );
        assert_eq!(npm_package_dir("usr/local/lib/nodejs/package.json"), None);
        assert_eq!(
            npm_package_dir("a/node_modules/x/lib/package.json"),
            None,
            "a file inside a package is not a package"
        );
        let scoped = npm_package("@pnpm/exe".into(), "10.0.0".into(), None);
        assert_eq!(
            purl(&scoped, "debian").unwrap(),
            "pkg:npm/%40pnpm/exe@10.0.0"
        );
    }

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_704_067_200), "2024-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400 + 3_723), "2000-02-29T01:02:03Z");
    }
}
