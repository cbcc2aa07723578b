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
    /// The directory `source:` paths are relative to.
    pub dir: PathBuf,
    /// Where each step's id appears (line, column), for later errors.
    pub(crate) locations: Vec<(usize, usize)>,
}

/// The `output:` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// File name of the root filesystem image.
    #[serde(default = "default_rootfs")]
    pub rootfs: String,
    #[serde(default = "default_size")]
    pub size: Size,
    #[serde(default = "default_label")]
    pub label: String,
    /// Latest timestamp in the image (seconds since 1970), `SOURCE_DATE_EPOCH` style.
    #[serde(default = "default_epoch")]
    pub epoch: i64,
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

impl Default for Output {
    fn default() -> Self {
        Output {
            rootfs: default_rootfs(),
            size: default_size(),
            label: default_label(),
            epoch: default_epoch(),
        }
    }
}

/// One step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub needs: Vec<String>,
    pub kind: StepKind,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: String,
    #[serde(default)]
    output: Output,
    steps: Steps,
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
                    let StepBody { needs, kind } = map.next_value_seed(StepSeed(&id))?;
                    steps.push(Step { id, needs, kind });
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
}

struct StepSeed<'a>(&'a str);

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
        let mut kind: Option<StepKind> = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "needs" {
                if needs.is_some() {
                    return Err(de::Error::custom(format!("step `{id}` has `needs` twice")));
                }
                needs = Some(map.next_value()?);
                continue;
            }
            let Some(k) = StepKind::read(&key, &mut map)? else {
                let hint = match suggest(&key, KIND_NAMES.iter().copied().chain(["needs"])) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("step kinds are: {}", KIND_NAMES.join(", ")),
                };
                return Err(de::Error::custom(format!(
                    "step `{id}`: unknown step kind `{key}`; {hint}"
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
        })
    }
}

/// Reads and parses the recipe at `path`.
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|e| RecipeError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message: format!("cannot read the recipe: {e}"),
    })?;
    parse(&text, path)
}

/// Parses recipe text; `file` names it in errors and anchors `source:` paths.
pub fn parse(text: &str, file: &Path) -> Result<Recipe, RecipeError> {
    let raw: RawRecipe = serde_yaml::from_str(text).map_err(|e| yaml_error(&e, text, file))?;
    let at = |message: String| RecipeError {
        file: file.to_path_buf(),
        line: 0,
        column: 0,
        message,
    };
    if raw.name.trim().is_empty() {
        return Err(at("`name` is empty; give the recipe a name".into()));
    }
    let out = &raw.output;
    if out.rootfs.is_empty() || out.rootfs.contains('/') || out.rootfs.starts_with('.') {
        return Err(at(format!(
            "output.rootfs `{}` must be a plain file name such as `rootfs.ext4`",
            out.rootfs
        )));
    }
    if out.size.0 < 16 << 20 {
        return Err(at(format!(
            "output.size {} bytes is too small; use at least 16MiB",
            out.size.0
        )));
    }
    if out.label.len() > 16 {
        return Err(at(format!(
            "output.label `{}` is longer than ext4's 16 bytes",
            out.label
        )));
    }
    if out.epoch < 0 {
        return Err(at("output.epoch must not be negative".into()));
    }
    let steps = raw.steps.0;
    if steps.is_empty() {
        return Err(at(
            "the recipe has no steps; add a `debootstrap` step to start from".into(),
        ));
    }
    let locations = steps.iter().map(|s| locate_step(text, &s.id, 1)).collect();
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    Ok(Recipe {
        name: raw.name,
        output: raw.output,
        steps,
        file: file.to_path_buf(),
        dir,
        locations,
    })
}

impl Recipe {
    /// An error located at step number `index`.
    pub fn error_at_step(&self, index: usize, message: String) -> RecipeError {
        let (line, column) = self.locations[index];
        RecipeError {
            file: self.file.clone(),
            line,
            column,
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
        assert_eq!(r.dir, Path::new("recipes"));
        assert_eq!(r.locations[2], (12, 3));
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
                "name: t\nsteps:\n  a:\n    run: x\n    apt: {packages: [y]}\n",
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
        ];
        for (text, line, needle) in cases {
            let e = err(text);
            assert_eq!(e.line, *line, "{text}\n=> {e}");
            assert!(e.to_string().contains(needle), "{text}\n=> {e}");
            assert!(e.to_string().starts_with("r.yaml:"), "{e}");
        }
    }
}
