//! Recipes: the YAML a team edits, read into typed, validated steps.
//!
//! ```yaml
//! name: minimal
//! output: { rootfs: minimal.ext4, size: 512MiB, label: rootfs }
//! steps:
//!   base:
//!     debootstrap: { suite: trixie }
//!   tools:
//!     needs: [base]
//!     apt: { packages: [less] }
//! ```
//!
//! [`parse`] is pure (text in, recipe out); [`load`] reads the file. Every
//! error names the file, line and column and says what to do. Checks that
//! span steps (unknown `needs`, cycles) live in [`crate::graph`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::fields::{check_step_id, suggest, Size};
use crate::step::{StepKind, KIND_NAMES};

/// The JSON Schema of recipe files (`kiln schema`; recipes name it in their
/// `yaml-language-server` comment).
pub const SCHEMA: &str = include_str!("../docs/recipe.schema.json");

/// A recipe error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeError {
    pub file: PathBuf,
    /// 1-based; 0 when the error is about the file as a whole.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

impl std::error::Error for RecipeError {}

/// A parsed recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub output: Output,
    /// In the order the recipe lists them.
    pub steps: Vec<Step>,
    /// The recipe file, as given.
    pub file: PathBuf,
    /// The recipe files it extends, the nearest first.
    pub extends: Vec<PathBuf>,
    /// Extra checks for `kiln verify` (the base recipe's first, when extending).
    pub verify: Vec<crate::checks::RecipeCheck>,
    /// How `kiln boot` logs in and what it checks (the base recipe's checks
    /// first, when extending).
    pub boot: crate::boot_checks::BootSection,
}

/// The `output:` section: what a build writes into the output directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// File name of the root filesystem image.
    pub rootfs: String,
    pub size: Size,
    pub label: String,
    /// Latest timestamp in the image (seconds since 1970), `SOURCE_DATE_EPOCH` style.
    pub epoch: i64,
    /// File name for the kernel (an uncompressed ELF vmlinux taken from the
    /// image's `/boot/vmlinuz-*`), if wanted.
    pub kernel: Option<String>,
    /// File name for the initrd (the image's `/boot/initrd.img-*` of that kernel), if wanted.
    pub initrd: Option<String>,
    /// File name for the JSON manifest (artifacts, digests, registration body), if wanted.
    pub manifest: Option<String>,
    /// File name for the SPDX 2.3 JSON software bill of materials, if wanted.
    pub sbom: Option<String>,
    /// The image reference other tools register it under, e.g. `bonfire-agent:local`.
    pub reference: String,
    /// Where the artifacts will live on the machine that runs the VMs (for the
    /// registration body); default: the output directory itself.
    pub install_dir: Option<String>,
}

fn default_rootfs() -> String {
    "rootfs.ext4".into()
}
fn default_size() -> Size {
    Size(2 << 30)
}
fn default_label() -> String {
    "rootfs".into()
}
/// 2024-01-01T00:00:00Z.
fn default_epoch() -> i64 {
    1_704_067_200
}

impl Output {
    /// The file names the build writes, with what they are.
    pub fn files(&self) -> Vec<(&'static str, &str)> {
        let mut files = vec![("output.rootfs", self.rootfs.as_str())];
        for (what, name) in [
            ("output.kernel", &self.kernel),
            ("output.initrd", &self.initrd),
            ("output.manifest", &self.manifest),
            ("output.sbom", &self.sbom),
        ] {
            if let Some(name) = name {
                files.push((what, name.as_str()));
            }
        }
        files
    }
}

/// One step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub needs: Vec<String>,
    pub kind: StepKind,
    /// How long the step may run (`timeout:`); not part of its key.
    pub timeout: Option<std::time::Duration>,
    /// Where the step is defined.
    pub origin: Origin,
    /// For a step that resolves packages: the packages the lock file pins
    /// for it (see `lock`), which enter its key; `None` when the lock has no
    /// current entries for it.
    pub pinned: Option<Vec<crate::dpkg::Deb>>,
}

/// How long a step may run when its recipe does not say.
pub const DEFAULT_STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

impl Step {
    /// How long the step may run before kiln stops it.
    pub fn time_limit(&self) -> std::time::Duration {
        self.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT)
    }
}

/// A place in a recipe file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl Origin {
    /// The directory that relative paths (`source:`, `keyring:`) in this file start from.
    pub fn dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new(""))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    extends: Option<crate::fields::RecipeRelPath>,
    name: Option<String>,
    #[serde(default)]
    output: RawOutput,
    steps: Option<Steps>,
    #[serde(default)]
    verify: Vec<crate::checks::RecipeCheck>,
    #[serde(default)]
    boot: crate::boot_checks::BootSection,
}

/// `output:` as written in one file; unset fields come from the recipe it
/// extends, or the defaults.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    rootfs: Option<String>,
    size: Option<Size>,
    label: Option<String>,
    epoch: Option<i64>,
    kernel: Option<String>,
    initrd: Option<String>,
    manifest: Option<String>,
    sbom: Option<String>,
    reference: Option<String>,
    install_dir: Option<String>,
}

impl RawOutput {
    fn over(self, base: Option<Output>, name: &str) -> Output {
        let base = base.unwrap_or_else(|| Output {
            rootfs: default_rootfs(),
            size: default_size(),
            label: default_label(),
            epoch: default_epoch(),
            kernel: None,
            initrd: None,
            manifest: None,
            sbom: None,
            reference: format!("{name}:local"),
            install_dir: None,
        });
        Output {
            rootfs: self.rootfs.unwrap_or(base.rootfs),
            size: self.size.unwrap_or(base.size),
            label: self.label.unwrap_or(base.label),
            epoch: self.epoch.unwrap_or(base.epoch),
            kernel: self.kernel.or(base.kernel),
            initrd: self.initrd.or(base.initrd),
            manifest: self.manifest.or(base.manifest),
            sbom: self.sbom.or(base.sbom),
            reference: self.reference.unwrap_or(base.reference),
            install_dir: self.install_dir.or(base.install_dir),
        }
    }
}

/// The step map, kept in recipe order.
struct Steps(Vec<Step>);

impl<'de> Deserialize<'de> for Steps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StepsVisitor;
        impl<'de> Visitor<'de> for StepsVisitor {
            type Value = Steps;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of step ids to steps")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Steps, A::Error> {
                let mut steps: Vec<Step> = Vec::new();
                while let Some(id) = map.next_key::<String>()? {
                    check_step_id(&id).map_err(de::Error::custom)?;
                    if steps.iter().any(|s| s.id == id) {
                        return Err(de::Error::custom(format!(
                            "step id `{id}` is used twice; give each step its own id"
                        )));
                    }
                    let StepBody {
                        needs,
                        kind,
                        timeout,
                    } = map.next_value_seed(StepSeed(&id))?;
                    steps.push(Step {
                        id,
                        needs,
                        kind,
                        timeout,
                        origin: Origin::default(),
                        pinned: None,
                    });
                }
                Ok(Steps(steps))
            }
        }
        d.deserialize_map(StepsVisitor)
    }
}

struct StepBody {
    needs: Vec<String>,
    kind: StepKind,
    timeout: Option<std::time::Duration>,
}

struct StepSeed<'a>(&'a str);

/// Reads a key of a step's map, refusing unknown kinds right at the key.
struct StepKeySeed<'a>(&'a str);

impl<'de> de::DeserializeSeed<'de> for StepKeySeed<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for StepKeySeed<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`needs`, `timeout` or a step kind")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        if key == "needs" || key == "timeout" || KIND_NAMES.contains(&key) {
            return Ok(key.to_string());
        }
        let hint = match suggest(key, KIND_NAMES.iter().copied().chain(["needs", "timeout"])) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("step kinds are: {}", KIND_NAMES.join(", ")),
        };
        Err(E::custom(format!(
            "step `{}`: unknown step kind `{key}`; {hint}",
            self.0
        )))
    }
}

impl<'de> de::DeserializeSeed<'de> for StepSeed<'_> {
    type Value = StepBody;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<StepBody, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for StepSeed<'_> {
    type Value = StepBody;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "step `{}` as a map with `needs` and one step kind",
            self.0
        )
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StepBody, A::Error> {
        let id = self.0;
        let mut needs: Option<Vec<String>> = None;
        let mut timeout: Option<crate::fields::Timeout> = None;
        let mut kind: Option<StepKind> = None;
        while let Some(key) = map.next_key_seed(StepKeySeed(id))? {
            if key == "needs" {
                if needs.is_some() {
                    return Err(de::Error::custom(format!("step `{id}` has `needs` twice")));
                }
                needs = Some(map.next_value()?);
                continue;
            }
            if key == "timeout" {
                if timeout.is_some() {
                    return Err(de::Error::custom(format!(
                        "step `{id}` has `timeout` twice"
                    )));
                }
                timeout = Some(map.next_value()?);
                continue;
            }
            let Some(k) = StepKind::read(&key, &mut map)? else {
                return Err(de::Error::custom(format!(
                    "step `{id}`: unknown step kind `{key}`"
                )));
            };
            if let Some(first) = &kind {
                return Err(de::Error::custom(format!(
                    "step `{id}` has two kinds, `{}` and `{key}`; split it into two steps",
                    first.name()
                )));
            }
            kind = Some(k);
        }
        let kind = kind.ok_or_else(|| {
            de::Error::custom(format!(
                "step `{id}` has no kind; add one of: {}",
                KIND_NAMES.join(", ")
            ))
        })?;
        Ok(StepBody {
            needs: needs.unwrap_or_default(),
            kind,
            timeout: timeout.map(|t| t.0),
        })
    }
}

/// Reads and parses the recipe at `path` (and the recipes it extends).
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    parse_with(path, &|p: &Path| std::fs::read_to_string(p))
}

/// Parses recipe text; `file` names it in errors and anchors relative paths.
/// A recipe that `extends` another cannot be parsed alone: use [`load`].
pub fn parse(text: &str, file: &Path) -> Result<Recipe, RecipeError> {
    let text = text.to_string();
    let file_owned = file.to_path_buf();
    parse_with(file, &move |p: &Path| {
        if p == file_owned {
            Ok(text.clone())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "parse() reads no other file",
            ))
        }
    })
}

/// The largest `output.size` kiln accepts (the image is sparse, but mkfs lays
/// out metadata for all of it, and the staging tmpfs is sized by it).
const MAX_IMAGE_SIZE: u64 = 1 << 40;

/// How deep `extends` chains may go.
const MAX_EXTENDS: usize = 8;

/// Parses the recipe at `file`, reading it and any recipe it extends with `read`.
pub fn parse_with(
    file: &Path,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Recipe, RecipeError> {
    let mut chain: Vec<PathBuf> = Vec::new();
    let recipe = parse_file(file, read, &mut chain)?;
    let whole = |message: String| RecipeError {
        file: file.to_path_buf(),
        line: 0,
        column: 0,
        message,
    };
    let out = &recipe.output;
    let files = out.files();
    for (i, (what, name)) in files.iter().enumerate() {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(whole(format!(
                "{what} `{name}` must be a plain file name such as `rootfs.ext4`"
            )));
        }
        if let Some((other, _)) = files[..i].iter().find(|(_, n)| n == name) {
            return Err(whole(format!(
                "{what} and {other} are both `{name}`; give them different names"
            )));
        }
    }
    if out.initrd.is_some() && out.kernel.is_none() {
        return Err(whole("output.initrd needs output.kernel too".into()));
    }
    if let Some(dir) = &out.install_dir {
        if !dir.starts_with('/') {
            return Err(whole(format!(
                "output.install_dir `{dir}` must be an absolute path"
            )));
        }
    }
    if out.size.0 < 16 << 20 {
        return Err(whole(format!(
            "output.size {} bytes is too small; use at least 16MiB",
            out.size.0
        )));
    }
    if out.size.0 > MAX_IMAGE_SIZE {
        return Err(whole(format!(
            "output.size {} bytes is larger than kiln's limit of 1TiB for a root filesystem",
            out.size.0
        )));
    }
    if out.label.len() > 16 {
        return Err(whole(format!(
            "output.label `{}` is longer than ext4's 16 bytes",
            out.label
        )));
    }
    if out.epoch < 0 {
        return Err(whole("output.epoch must not be negative".into()));
    }
    if recipe.steps.is_empty() {
        return Err(whole(
            "the recipe has no steps; add a `debootstrap` step to start from".into(),
        ));
    }
    Ok(recipe)
}

/// One file of an `extends` chain, merged over the recipe it extends.
fn parse_file(
    file: &Path,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
    chain: &mut Vec<PathBuf>,
) -> Result<Recipe, RecipeError> {
    let at = |message: String| RecipeError {
        file: file.to_path_buf(),
        line: 0,
        column: 0,
        message,
    };
    let text = read(file).map_err(|e| at(format!("cannot read the recipe: {e}")))?;
    crate::yaml_limits::check(&text).map_err(|e| at(e.to_string()))?;
    let raw: RawRecipe = serde_yaml::from_str(&text).map_err(|e| yaml_error(&e, &text, file))?;
    let mut steps = raw.steps.map(|s| s.0).unwrap_or_default();
    for step in &mut steps {
        let (line, column) = locate_step(&text, &step.id, 1);
        step.origin = Origin {
            file: file.to_path_buf(),
            line,
            column,
        };
    }
    chain.push(file.to_path_buf());
    let mut verify = raw.verify;
    let mut boot = raw.boot;
    let mut extends = Vec::new();
    let (name, output, steps) = match raw.extends {
        None => {
            let name = raw
                .name
                .ok_or_else(|| at("the recipe has no `name`; add `name: <image name>`".into()))?;
            let output = raw.output.over(None, &name);
            (name, output, steps)
        }
        Some(parent) => {
            let dir = Origin {
                file: file.to_path_buf(),
                line: 0,
                column: 0,
            };
            let parent_file = dir.dir().join(parent.as_str());
            if chain.contains(&parent_file) {
                return Err(at(format!(
                    "`extends: {}` makes a loop of recipes",
                    parent.as_str()
                )));
            }
            if chain.len() > MAX_EXTENDS {
                return Err(at(format!(
                    "`extends` goes deeper than {MAX_EXTENDS} recipes"
                )));
            }
            let base = parse_file(&parent_file, read, chain)?;
            verify = base.verify.into_iter().chain(verify).collect();
            boot = boot.over(base.boot);
            extends = std::iter::once(parent_file).chain(base.extends).collect();
            // A step with an id the base has replaces it in place; new steps follow.
            let mut merged = base.steps;
            for step in steps {
                match merged.iter_mut().find(|s| s.id == step.id) {
                    Some(slot) => *slot = step,
                    None => merged.push(step),
                }
            }
            let name = raw.name.unwrap_or(base.name);
            (name, raw.output.over(Some(base.output), ""), merged)
        }
    };
    if name.trim().is_empty() {
        return Err(at("`name` is empty; give the recipe a name".into()));
    }
    Ok(Recipe {
        name,
        output,
        steps,
        file: file.to_path_buf(),
        extends,
        verify,
        boot,
    })
}

impl Recipe {
    /// The account `kiln boot` logs in as: the `boot:` section's `user`,
    /// or else the recipe's only `user` step.
    pub fn boot_user(&self) -> Option<String> {
        if let Some(user) = &self.boot.user {
            return Some(user.clone());
        }
        let mut users = self.steps.iter().filter_map(|s| match &s.kind {
            crate::step::StepKind::User(u) => Some(u.name.clone()),
            _ => None,
        });
        match (users.next(), users.next()) {
            (Some(only), None) => Some(only),
            _ => None,
        }
    }

    /// An error located at step number `index`.
    pub fn error_at_step(&self, index: usize, message: String) -> RecipeError {
        let origin = &self.steps[index].origin;
        RecipeError {
            file: origin.file.clone(),
            line: origin.line,
            column: origin.column,
            message,
        }
    }

    /// The index of the step with this id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }
}

/// Turns a serde_yaml error into a located error with a hint where possible.
fn yaml_error(e: &serde_yaml::Error, text: &str, file: &Path) -> RecipeError {
    let (mut line, mut column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let mut message = e.to_string();
    if let Some(pos) = message.find(" at line ") {
        message.truncate(pos);
    }
    // serde_yaml places errors from a map visitor at the map's start; point a
    // duplicate id at its second definition instead.
    if let Some(id) = message
        .split("step id `")
        .nth(1)
        .and_then(|r| r.split('`').next())
    {
        if message.contains("used twice") {
            (line, column) = locate_step(text, id, 2);
        }
    }
    // serde says: "unknown field `x`, expected `a` or `b`" / "expected one of `a`, `b`".
    if let Some(rest) = message.split("unknown field `").nth(1) {
        let words: Vec<&str> = rest.split('`').step_by(2).collect();
        if let Some((unknown, candidates)) = words.split_first() {
            if let Some(s) = suggest(unknown, candidates.iter().copied()) {
                message.push_str(&format!("; did you mean `{s}`?"));
            }
        }
    }
    RecipeError {
        file: file.to_path_buf(),
        line,
        column,
        message,
    }
}

/// Finds where step `id` is defined: the `nth` key `id:` below a top-level `steps:`.
fn locate_step(text: &str, id: &str, nth: usize) -> (usize, usize) {
    let mut in_steps = false;
    let mut fallback = (0, 0);
    let mut seen = 0;
    for (n, line) in text.lines().enumerate() {
        if !line.starts_with([' ', '\t', '#']) && !line.is_empty() {
            in_steps = line.starts_with("steps:");
            if in_steps {
                fallback = (n + 1, 1);
            }
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let key = trimmed.trim_start_matches("- ");
        if in_steps
            && (key.starts_with(&format!("{id}:"))
                || key.starts_with(&format!("\"{id}\":"))
                || key.starts_with(&format!("'{id}':")))
        {
            seen += 1;
            if seen == nth {
                return (n + 1, indent + 1);
            }
        }
    }
    fallback
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_user_is_named_or_the_only_user_step() {
        let recipe = |tail: &str| {
            let text = format!(
                "name: t\nsteps:\n  base:\n    debootstrap: {{suite: trixie}}\n  a:\n    needs: [base]\n    user: {{name: agent, uid: 1000}}\n{tail}"
            );
            parse(&text, Path::new("t.yaml")).unwrap()
        };
        assert_eq!(recipe("").boot_user().as_deref(), Some("agent"));
        let two = "  b:\n    needs: [base]\n    user: {name: builder, uid: 1001}\n";
        assert_eq!(recipe(two).boot_user(), None);
        let named = format!("{two}boot: {{user: builder}}\n");
        assert_eq!(recipe(&named).boot_user().as_deref(), Some("builder"));
    }

    const GOOD: &str = "\
name: t
output:
  size: 64MiB
steps:
  base:
    debootstrap:
      suite: trixie
  tools:
    needs: [base]
    apt:
      packages: [less]
  motd:
    needs: [base]
    file:
      path: /etc/motd
      content: hi
      mode: \"0600\"
";

    fn err(text: &str) -> RecipeError {
        parse(text, Path::new("r.yaml")).unwrap_err()
    }

    #[test]
    fn parses_steps_in_order() {
        let r = parse(GOOD, Path::new("recipes/x.yaml")).unwrap();
        let ids: Vec<&str> = r.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["base", "tools", "motd"]);
        assert_eq!(r.steps[1].needs, ["base"]);
        assert_eq!(r.output.size, Size(64 << 20));
        assert_eq!(r.output.label, "rootfs");
        assert_eq!(r.steps[2].origin.dir(), Path::new("recipes"));
        assert_eq!((r.steps[2].origin.line, r.steps[2].origin.column), (12, 3));
    }

    /// Each bad recipe gives an error at a line, with a message naming the problem.
    #[test]
    fn errors_are_located_and_actionable() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "name: t\nsteps:\n  a:\n    debootstrap: {suite: trixie}\n  b: [\n",
                5,
                "",
            ),
            (
                "name: t\nsteps:\n  a:\n    aptt:\n      packages: [x]\n",
                4,
                "did you mean `apt`?",
            ),
            (
                "name: t\nsteps:\n  a:\n    apt:\n      pakages: [x]\n",
                5,
                "did you mean `packages`?",
            ),
            (
                "name: t\nstep:\n  a:\n    run: x\n",
                2,
                "did you mean `steps`?",
            ),
            (
                "name: t\nsteps:\n  a:\n    run: x\n  a:\n    run: y\n",
                5,
                "used twice",
            ),
            (
                "name: t\nsteps:\n  a:\n    file: {path: etc/x, content: y}\n",
                4,
                "relative",
            ),
            (
                "name: t\nsteps:\n  a:\n    file: {path: /etc/../../x, content: y}\n",
                4,
                "`..`",
            ),
            (
                "name: t\nsteps:\n  a:\n    file: {path: /x, content: y, mode: \"999\"}\n",
                4,
                "octal",
            ),
            (
                "name: t\nsteps:\n  a:\n    file: {path: /x, content: y, owner: \"Bad Owner\"}\n",
                4,
                "user[:group]",
            ),
            (
                "name: t\noutput:\n  size: 2 GB\nsteps:\n  a:\n    run: x\n",
                3,
                "not a size",
            ),
            ("name: t\nsteps:\n  a:\n    needs: [b]\n", 4, "has no kind"),
            (
                "name: t\nsteps:\n  a:\n    timeout: 5x\n    run: x\n",
                4,
                "not a duration",
            ),
            (
                "name: t\nsteps:\n  a:\n    timeout: 8d\n    run: x\n",
                4,
                "not a duration",
            ),
            (
                "name: t\nsteps:\n  a:\n    timeout: 0s\n    run: x\n",
                4,
                "between 1s and a week",
            ),
            (
                "name: t\nsteps:\n  a:\n    run: x\n    apt: {packages: [yy]}\n",
                4,
                "two kinds",
            ),
            ("name: t\nsteps:\n  A:\n    run: x\n", 3, "step id `A`"),
            (
                "name: t\nsteps:\n  a:\n    debootstrap: {suite: trixie, variant: tiny}\n",
                4,
                "variant",
            ),
            (
                "name: t\nsteps:\n  a:\n    file: {path: /x, source: ../secret}\n",
                4,
                "`..`",
            ),
            ("name: 3\nsteps: {}\n", 0, "no steps"),
            (
                "name: t\nsteps:\n  a:\n    debootstrap: {suite: trixie}\n  b:\n    apt: {packages: [Jq]}\n",
                6,
                "package `Jq` is not a Debian package name",
            ),
            (
                "name: t\nsteps:\n  a:\n    debootstrap: {suite: trixie, packages: [sudo=1.9]}\n",
                4,
                "package `sudo=1.9` is not a Debian package name",
            ),
            (
                "name: t\nsteps:\n  a:\n    apt: {packages: [jq=latest]}\n",
                4,
                "not a Debian version",
            ),
            (
                "name: t\noutput:\n  size: 2TiB\nsteps:\n  a:\n    run: x\n",
                0,
                "larger than kiln's limit",
            ),
        ];
        for (text, line, needle) in cases {
            let e = err(text);
            assert_eq!(e.line, *line, "{text}\n=> {e}");
            assert!(e.to_string().contains(needle), "{text}\n=> {e}");
            assert!(e.to_string().starts_with("r.yaml:"), "{e}");
        }
    }

    #[test]
    fn package_specs_follow_debian_grammar() {
        let long = "a".repeat(100_000);
        let e = err(&format!(
            "name: t\nsteps:\n  a:\n    apt: {{packages: [{long}]}}\n"
        ));
        assert_eq!(e.line, 4, "{e}");
        assert!(e.to_string().contains("2 to 128 characters"), "{e}");
        assert!(
            e.to_string().len() < 400,
            "the error repeats the whole name"
        );
        let good = "name: t\nsteps:\n  a:\n    apt: {packages: [libstdc++6, g++-14:amd64, python3.12, jq=1.7.1-3+b1, tzdata=2024a-1~deb12u1, xz-utils=1:2.0]}\n";
        assert!(parse(good, Path::new("r.yaml")).is_ok());
    }

    fn files(
        files: &'static [(&'static str, &'static str)],
    ) -> impl Fn(&Path) -> std::io::Result<String> {
        move |p: &Path| {
            files
                .iter()
                .find(|(name, _)| Path::new(name) == p)
                .map(|(_, text)| text.to_string())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
        }
    }

    #[test]
    fn extends_replaces_steps_by_id_and_overrides_output() {
        let read = files(&[
            ("r/base.yaml", GOOD),
            (
                "r/debian.yaml",
                "extends: base.yaml\nname: child\noutput: {label: kid}\nsteps:\n  base:\n    debootstrap: {suite: bookworm}\n  extra:\n    needs: [tools]\n    run: x\n",
            ),
        ]);
        let r = parse_with(Path::new("r/debian.yaml"), &read).unwrap();
        assert_eq!(r.name, "child");
        assert_eq!(
            (r.output.label.as_str(), r.output.size),
            ("kid", Size(64 << 20))
        );
        let ids: Vec<&str> = r.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["base", "tools", "motd", "extra"]);
        let StepKind::Debootstrap(d) = &r.steps[0].kind else {
            panic!("base is debootstrap")
        };
        assert_eq!(d.suite, "bookworm");
        assert_eq!(r.steps[0].origin.file, Path::new("r/debian.yaml"));
        assert_eq!(r.steps[1].origin.file, Path::new("r/base.yaml"));
    }

    #[test]
    fn extends_errors() {
        let read = files(&[
            ("a.yaml", "extends: b.yaml\n"),
            ("b.yaml", "extends: a.yaml\n"),
        ]);
        let e = parse_with(Path::new("a.yaml"), &read).unwrap_err();
        assert!(e.to_string().contains("loop"), "{e}");
        let read = files(&[("a.yaml", "extends: missing.yaml\n")]);
        let e = parse_with(Path::new("a.yaml"), &read).unwrap_err();
        assert!(
            e.to_string().starts_with("missing.yaml: cannot read"),
            "{e}"
        );
        let read = files(&[("a.yaml", "steps:\n  a:\n    run: x\n")]);
        let e = parse_with(Path::new("a.yaml"), &read).unwrap_err();
        assert!(e.to_string().contains("no `name`"), "{e}");
    }
}
