//! `kiln verify`: checks a finished image from the outside — without mounting
//! it and without root, by reading the ext4 with [`crate::image`].
//!
//! Checks come from the recipe itself (every apt package installed per dpkg's
//! status file, every user with its ids, home, shell, sudoers drop-in, keys and
//! lingering, every fetched file and link, every unit file and its enablement,
//! every `file` step's path, content, mode and owner) and from the recipe's
//! `verify:` section (path assertions, and command checks that run only with
//! `--exec`, as root, in a throwaway chroot of the image). Each prints one line,
//! `[PASS] …` or `[FAIL] …: reason`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::Digest as _;

use crate::checks::{CheckWhat, Expect, Homes, PathRules};
use crate::fields::Principal;
use crate::image::{FileType, Image, ImageError};
use crate::recipe::Recipe;
use crate::sandbox::{self, Action, Job, StepJob};
use crate::step::{root_env, StepContext, StepKind};

/// How long `--exec` lets the image's own programs run.
const EXEC_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    /// Not run (a command check without `--exec`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Why verification could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0}")]
    Other(String),
}

/// What to verify.
pub struct VerifyOptions<'a> {
    pub image: &'a Path,
    pub recipe: Option<&'a Recipe>,
    /// Run `command` checks (root) in a throwaway chroot.
    pub exec: bool,
    /// The public key the image was built with (`--ssh-key`), to check `authorized_keys`.
    pub ssh_key: Option<&'a Path>,
}

/// Runs every check; the results, in order.
pub fn verify(options: &VerifyOptions) -> Result<Vec<CheckResult>, VerifyError> {
    let image = Image::open(options.image)?;
    let mut expects = vec![
        Expect::Path {
            name: Some("the image has an init (/sbin/init)".into()),
            rules: PathRules {
                path: "/sbin/init".into(),
                exists: true,
                executable: true,
                ..PathRules::default()
            },
        },
        Expect::Path {
            name: None,
            rules: PathRules {
                path: "/etc/passwd".into(),
                exists: true,
                kind: Some(FileType::Regular),
                ..PathRules::default()
            },
        },
    ];
    if let Some(recipe) = options.recipe {
        // The homes the recipe's `user` steps give their accounts.
        let homes: BTreeMap<String, String> = recipe
            .steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::User(u) => Some((u.name.clone(), u.home.to_string())),
                _ => None,
            })
            .collect();
        for step in &recipe.steps {
            expects.extend(step_expectations(step, options.ssh_key, &homes)?);
        }
        for check in &recipe.verify {
            expects.push(match &check.what {
                CheckWhat::Path(rules) => Expect::Path {
                    name: check.name.clone(),
                    rules: rules.clone(),
                },
                CheckWhat::Command { command, matches } => Expect::Command {
                    name: check.name.clone(),
                    command: command.clone(),
                    matches: matches.clone(),
                },
            });
        }
    }
    let facts = Facts::read(&image)?;
    let mut results = Vec::new();
    for expect in &expects {
        results.push(match expect {
            Expect::Package(name) => check_package(&facts, name),
            Expect::Account {
                name,
                uid,
                gid,
                home,
                shell,
            } => check_account(&facts, name, *uid, *gid, home, shell),
            Expect::Path { name, rules } => check_path(&image, &facts, name.as_deref(), rules)?,
            Expect::Command {
                name,
                command,
                matches,
            } => {
                let name = name
                    .clone()
                    .unwrap_or_else(|| format!("`{command}` matches /{matches}/"));
                if options.exec {
                    check_command(options.image, name, command, matches)
                } else {
                    CheckResult {
                        name,
                        passed: true,
                        skipped: true,
                        detail: "command checks run with --exec".into(),
                    }
                }
            }
        });
    }
    Ok(results)
}

/// What every check may need from the image: dpkg's database and the accounts.
struct Facts {
    installed: BTreeMap<String, String>,
    passwd: String,
    group: String,
}

impl Facts {
    fn read(image: &Image) -> Result<Facts, VerifyError> {
        let files = image.read_all(&["/var/lib/dpkg/status", "/etc/passwd", "/etc/group"])?;
        let text =
            |p: &str| String::from_utf8_lossy(files[p].as_deref().unwrap_or_default()).into_owned();
        let mut installed = BTreeMap::new();
        for stanza in text("/var/lib/dpkg/status").split("\n\n") {
            let field = |f: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(f))
                    .map(str::trim)
            };
            if let (Some(pkg), Some(status)) = (field("Package:"), field("Status:")) {
                installed.insert(pkg.to_string(), status.to_string());
            }
        }
        Ok(Facts {
            installed,
            passwd: text("/etc/passwd"),
            group: text("/etc/group"),
        })
    }

    fn id(&self, db: &str, p: &Principal) -> Option<u32> {
        match p {
            Principal::Id(id) => Some(*id),
            Principal::Name(name) => {
                let text = if db == "passwd" {
                    &self.passwd
                } else {
                    &self.group
                };
                text.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.first() == Some(&name.as_str()))
                        .then(|| f.get(2)?.parse().ok())
                        .flatten()
                })
            }
        }
    }
}

fn pass(name: String) -> CheckResult {
    CheckResult {
        name,
        passed: true,
        skipped: false,
        detail: String::new(),
    }
}

fn fail(name: String, detail: String) -> CheckResult {
    CheckResult {
        name,
        passed: false,
        skipped: false,
        detail,
    }
}

/// The checks a step implies.
fn step_expectations(
    step: &crate::recipe::Step,
    ssh_key: Option<&Path>,
    homes: &Homes,
) -> Result<Vec<Expect>, VerifyError> {
    let ctx = StepContext::reading(step.origin.dir(), ssh_key);
    step.kind
        .expectations(&ctx, homes)
        .map_err(|e| VerifyError::Other(format!("step `{}`: {e}", step.id)))
}

fn check_package(facts: &Facts, name: &str) -> CheckResult {
    let label = format!("package {name} is installed");
    match facts.installed.get(name) {
        Some(status) if status == "install ok installed" => pass(label),
        Some(status) => fail(label, format!("dpkg status is `{status}`")),
        None => fail(label, "not in /var/lib/dpkg/status".into()),
    }
}

fn check_account(
    facts: &Facts,
    name: &str,
    uid: u32,
    gid: u32,
    home: &str,
    shell: &str,
) -> CheckResult {
    let label = format!("user {name} (uid {uid}, gid {gid}, {home}, {shell})");
    let Some(line) = facts
        .passwd
        .lines()
        .find(|l| l.split(':').next() == Some(name))
    else {
        return fail(label, "not in /etc/passwd".into());
    };
    let f: Vec<&str> = line.split(':').collect();
    let want = [
        uid.to_string(),
        gid.to_string(),
        home.to_string(),
        shell.to_string(),
    ];
    let have = [f.get(2), f.get(3), f.get(5), f.get(6)]
        .map(|v| v.copied().unwrap_or_default().to_string());
    if want == have {
        pass(label)
    } else {
        fail(label, format!("/etc/passwd has `{line}`"))
    }
}

fn check_path(
    image: &Image,
    facts: &Facts,
    name: Option<&str>,
    r: &PathRules,
) -> Result<CheckResult, VerifyError> {
    let mut parts = Vec::new();
    if r.executable {
        parts.push("executable".to_string())
    }
    if let Some(m) = r.mode {
        parts.push(format!("mode {m:04o}"))
    }
    if let Some(o) = &r.owner {
        parts.push(format!("owner {o}"))
    }
    if let Some(c) = &r.contains {
        parts.push(format!(
            "contains {:?}",
            c.chars().take(40).collect::<String>()
        ))
    }
    if r.sha256.is_some() {
        parts.push("content as built".into())
    }
    if let Some(l) = &r.link {
        parts.push(format!("-> {l}"))
    }
    let label = name
        .map(str::to_string)
        .unwrap_or_else(|| match (r.exists, parts.is_empty()) {
            (false, _) => format!("{} is absent", r.path),
            (true, true) => format!("{} exists", r.path),
            (true, false) => format!("{}: {}", r.path, parts.join(", ")),
        });
    // A path the image won't resolve is a failure, whatever the check expects.
    let stat = match image.stat(&r.path) {
        Ok(stat) => stat,
        Err(e) => return Ok(fail(label, e.to_string())),
    };
    let Some(stat) = stat else {
        return Ok(if r.exists {
            fail(label, format!("{} does not exist", r.path))
        } else {
            pass(label)
        });
    };
    if !r.exists {
        return Ok(fail(label, format!("{} exists", r.path)));
    }
    if let Some(target) = &r.link {
        return Ok(match &stat.link {
            Some(l) if l == target => pass(label),
            Some(l) => fail(label, format!("links to {l}")),
            None => fail(label, "is not a symlink".into()),
        });
    }
    // Rules about the file itself look through symlinks.
    let (real, stat) = match stat.kind {
        FileType::Symlink => match image.resolve(&r.path) {
            Ok((real, Some(s))) => (real, s),
            Ok((real, None)) => return Ok(fail(label, format!("dangling symlink (to {real})"))),
            Err(e) => return Ok(fail(label, e.to_string())),
        },
        _ => (r.path.clone(), stat),
    };
    if let Some(kind) = r.kind {
        if stat.kind != kind {
            return Ok(fail(label, format!("is a {:?}, not a {kind:?}", stat.kind)));
        }
    }
    if r.executable && (stat.kind != FileType::Regular || stat.mode & 0o111 == 0) {
        return Ok(fail(
            label,
            format!("{real} is not an executable file (mode {:04o})", stat.mode),
        ));
    }
    if let Some(mode) = r.mode {
        if stat.mode != mode {
            return Ok(fail(label, format!("mode is {:04o}", stat.mode)));
        }
    }
    if let Some(owner) = &r.owner {
        let (uid, gid) = (
            facts.id("passwd", &owner.user),
            facts.id("group", &owner.group),
        );
        if (Some(stat.uid), Some(stat.gid)) != (uid, gid) {
            return Ok(fail(label, format!("owner is {}:{}", stat.uid, stat.gid)));
        }
    }
    if r.contains.is_some() || r.sha256.is_some() {
        let bytes = match image.read(&real) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(e) => return Ok(fail(label, e.to_string())),
        };
        if let Some(needle) = &r.contains {
            if !String::from_utf8_lossy(&bytes).contains(needle.as_str()) {
                return Ok(fail(label, format!("does not contain {needle:?}")));
            }
        }
        if let Some(want) = &r.sha256 {
            let have = hex::encode(sha2::Sha256::digest(&bytes));
            if &have != want {
                return Ok(fail(
                    label,
                    format!("content differs (sha256 {have}, expected {want})"),
                ));
            }
        }
    }
    Ok(pass(label))
}

/// Runs `command` in a throwaway chroot of the image (a read-only loop mount
/// under a scratch overlay) and matches its output.
fn check_command(image: &Path, name: String, command: &str, matches: &str) -> CheckResult {
    let run = || -> Result<String, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let sub = |n: &str| -> Result<PathBuf, String> {
            let p = dir.path().join(n);
            std::fs::create_dir(&p).map_err(|e| e.to_string())?;
            Ok(p)
        };
        let image = std::path::absolute(image).map_err(|e| e.to_string())?;
        let job = Job::Step(StepJob {
            lowers: Vec::new(),
            empty: sub("lower")?,
            upper: sub("upper")?,
            work: sub("work")?,
            merged: sub("merged")?,
            action: Action::Chroot {
                argv: vec!["/bin/sh".into(), "-c".into(), command.to_string()],
            },
            env: root_env(0),
            resolv_conf: None,
            image: Some(image),
            binds: Vec::new(),
        });
        let log = dir.path().join("log");
        let result = sandbox::run(
            &job,
            &dir.path().join("job.json"),
            &log,
            Some(EXEC_TIME_LIMIT),
        );
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        result
            .map(|()| output.clone())
            .map_err(|e| format!("{e}: {}", output.trim()))
    };
    match run() {
        Err(e) => fail(name, e),
        Ok(output) => {
            let re = regex::Regex::new(matches).expect("checked when the recipe was read");
            let trimmed = output.trim();
            if re.is_match(trimmed) {
                pass(name)
            } else {
                fail(
                    name,
                    format!("output {trimmed:?} does not match /{matches}/"),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ext4 image made with `mkfs.ext4 -d` from a folder holding
    /// `files` (path, contents, mode), every inode owned by root. Needs no
    /// root: debugfs sets the owners in the image file.
    fn small_image(dir: &Path, files: &[(&str, &str, u32)]) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let tree = dir.join("tree");
        for (path, contents, mode) in files {
            let file = tree.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, contents).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        let image = dir.join("small.ext4");
        crate::image::image_of_tree(&tree, &image);
        let mut script = String::new();
        for entry in walkdir::WalkDir::new(&tree).min_depth(1) {
            let rel = entry
                .unwrap()
                .path()
                .strip_prefix(&tree)
                .unwrap()
                .to_owned();
            for field in ["uid", "gid"] {
                script.push_str(&format!("sif /{} {field} 0\n", rel.display()));
            }
        }
        let script_file = dir.join("owners.debugfs");
        std::fs::write(&script_file, script).unwrap();
        let set = std::process::Command::new("debugfs")
            .args(["-w", "-f"])
            .arg(&script_file)
            .arg(&image)
            .output()
            .unwrap();
        assert!(set.status.success(), "{set:?}");
        image
    }

    #[test]
    fn a_small_image_verifies_against_its_recipe_and_a_changed_file_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let recipe = crate::recipe::parse(
            "name: small\nsteps:\n  motd:\n    file: {path: /etc/motd, content: \"hi\\n\", mode: \"0644\"}\n\
             verify:\n  - name: motd is not executable\n    path: /etc/motd\n    mode: \"0644\"\n",
            Path::new("small.yaml"),
        )
        .unwrap();
        let base = [
            ("sbin/init", "#!/bin/sh\n", 0o755),
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
        ];
        let verify_image = |dir: &str, motd: &str| {
            let dir = tmp.path().join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mut files = base.to_vec();
            files.push(("etc/motd", motd, 0o644));
            let image = small_image(&dir, &files);
            verify(&VerifyOptions {
                image: &image,
                recipe: Some(&recipe),
                exec: false,
                ssh_key: None,
            })
            .unwrap()
        };
        let good = verify_image("good", "hi\n");
        assert!(good.len() >= 4, "{good:?}");
        assert!(good.iter().all(|r| r.passed), "{good:?}");
        assert!(
            good.iter().any(|r| r.name == "motd is not executable"),
            "{good:?}"
        );

        let changed = verify_image("changed", "bye\n");
        let failed: Vec<&CheckResult> = changed.iter().filter(|r| !r.passed).collect();
        assert_eq!(failed.len(), 1, "{changed:?}");
        assert!(failed[0].name.contains("/etc/motd"), "{failed:?}");
    }

    #[test]
    fn user_units_are_expected_in_the_home_the_user_step_gives() {
        let recipe = crate::recipe::parse(
            "name: t\nsteps:\n  base:\n    debootstrap: {suite: trixie}\n  svc:\n    needs: [base]\n    user: {name: svc, uid: 1001, home: /srv/svc}\n  unit:\n    needs: [svc]\n    systemd:\n      user: svc\n      user_units:\n        - name: x.service\n          content: \"[Service]\\nExecStart=/bin/true\\n\"\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let homes = BTreeMap::from([("svc".to_string(), "/srv/svc".to_string())]);
        let unit = recipe.steps.iter().find(|s| s.id == "unit").unwrap();
        let paths: Vec<String> = step_expectations(unit, None, &homes)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                Expect::Path { rules, .. } => Some(rules.path),
                _ => None,
            })
            .collect();
        assert_eq!(paths, ["/srv/svc/.config/systemd/user/x.service"]);
    }
}
