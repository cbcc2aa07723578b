//! Validated value types used in recipes: paths inside the image, file modes,
//! owners, sizes, identifiers. Each checks its input while the YAML is read, so
//! a bad value is reported at its own line and column.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Why a recipe value is refused; each message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("path `{0}` is relative; write it as an absolute path inside the image, e.g. `/{0}`")]
    RelativeImagePath(String),
    #[error("path `/` is the image root; name a file or directory below it")]
    ImageRoot,
    #[error("path `{0}` has an empty or `.` component; write it plainly")]
    EmptyComponent(String),
    #[error("path `{0}` uses `..` and could escape the image root; write the path without `..`")]
    EscapesImage(String),
    #[error("path `{0}` contains a NUL byte")]
    NulByte(String),
    #[error("`{0}` is absolute; give a path relative to the recipe file so the recipe works on any machine")]
    AbsoluteRecipePath(String),
    #[error("`{0}` uses `..`; keep the files a recipe reads next to it or below it")]
    EscapesRecipeDir(String),
    #[error("the path is empty; give a file path relative to the recipe")]
    EmptyRecipePath,
    #[error(
        "mode `{0}` is not an octal file mode; write it like \"0644\" or \"4755\" (at most 7777)"
    )]
    Mode(String),
    #[error(
        "owner `{0}` is not `user[:group]`; use names like `agent:agent` or ids like `1000:1000`"
    )]
    Owner(String),
    #[error("size `{0}` is not a size; write it like `2GiB`, `512MiB` or a number of bytes")]
    Size(String),
    #[error("timeout `{0}` is not a duration; write it like `90s`, `30m` or `2h`")]
    Timeout(String),
    #[error("timeout `{0}` must be between 1s and a week (168h)")]
    TimeoutRange(String),
    #[error(
        "package `{}` is not a Debian package name (lowercase letters, digits, `+`, `-`, `.`; \
         2 to 128 characters, starting with a letter or digit)",
        shorten(.0)
    )]
    PackageName(String),
    #[error(
        "`{}`: `{}` is not a Debian architecture such as `amd64`",
        shorten(spec),
        shorten(arch)
    )]
    Architecture { spec: String, arch: String },
    #[error(
        "`{}`: `{}` is not a Debian version such as `1.7.1-1`",
        shorten(spec),
        shorten(version)
    )]
    Version { spec: String, version: String },
    #[error("step id `{0}` is not valid; use lowercase letters, digits, `-` and `_` (at most 64)")]
    StepId(String),
}

/// The step kinds' recipe readers (`TryFrom` for serde, which wants only a
/// message) report in text.
impl From<FieldError> for String {
    fn from(e: FieldError) -> String {
        e.to_string()
    }
}

/// An absolute path inside the image, without `..`, `.` or empty components.
/// Stored without the leading slash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImagePath(String);

impl ImagePath {
    /// Checks `text` and builds the path.
    pub fn parse(text: &str) -> Result<ImagePath, FieldError> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(FieldError::RelativeImagePath(text.into()));
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() {
            return Err(FieldError::ImageRoot);
        }
        for part in rest.split('/') {
            match part {
                "" | "." => return Err(FieldError::EmptyComponent(text.into())),
                ".." => return Err(FieldError::EscapesImage(text.into())),
                _ if part.contains('\0') => return Err(FieldError::NulByte(text.into())),
                _ => {}
            }
        }
        Ok(ImagePath(rest.to_string()))
    }

    /// The path relative to the image root (no leading slash).
    pub fn relative(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for ImagePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0)
    }
}

/// Deserializes a string checked by `parse` inside the visitor, so that
/// serde_yaml reports a bad value at the value's own line and column.
pub(crate) fn checked_str<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, FieldError>,
) -> Result<T, D::Error> {
    struct Checked<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, FieldError>,
    }
    impl<T> Visitor<'_> for Checked<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(Checked { expecting, parse })
}

impl<'de> Deserialize<'de> for ImagePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "an absolute path inside the image", ImagePath::parse)
    }
}

/// A relative path to a file next to the recipe (never `..`-escaping, never absolute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeRelPath(String);

impl RecipeRelPath {
    /// The path as written, relative to the recipe's directory.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl RecipeRelPath {
    /// Checks a path relative to the recipe.
    pub fn parse(text: &str) -> Result<RecipeRelPath, FieldError> {
        if text.starts_with('/') {
            return Err(FieldError::AbsoluteRecipePath(text.into()));
        }
        if text.split('/').any(|p| p == "..") {
            return Err(FieldError::EscapesRecipeDir(text.into()));
        }
        if text.is_empty() {
            return Err(FieldError::EmptyRecipePath);
        }
        Ok(RecipeRelPath(text.to_string()))
    }
}

impl serde::Serialize for RecipeRelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RecipeRelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a path relative to the recipe", RecipeRelPath::parse)
    }
}

/// Permission bits, `0` to `0o7777`. Written as an octal string (`"0644"`,
/// `"4755"`) or as a YAML number whose digits are read as octal (`644`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl Mode {
    /// Parses octal digits.
    pub fn parse(text: &str) -> Result<Mode, FieldError> {
        let digits = text.strip_prefix("0o").unwrap_or(text);
        match u32::from_str_radix(digits, 8) {
            Ok(v) if v <= 0o7777 && !digits.is_empty() => Ok(Mode(v)),
            _ => Err(FieldError::Mode(text.into())),
        }
    }
}

/// As written in recipes: four octal digits.
impl serde::Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ModeVisitor;
        impl Visitor<'_> for ModeVisitor {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal file mode such as \"0644\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                Mode::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Mode, E> {
                Mode::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mode, E> {
                Mode::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(ModeVisitor)
    }
}

/// A user or group: a numeric id or a name looked up in the image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(untagged)]
pub enum Principal {
    Id(u32),
    Name(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Id(id) => write!(f, "{id}"),
            Principal::Name(name) => f.write_str(name),
        }
    }
}

/// `user[:group]`, e.g. `root`, `agent:agent`, `1000:1000`. Without a group,
/// the group has the user's name (or id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub user: Principal,
    pub group: Principal,
}

impl Owner {
    /// `root:root`.
    pub fn root() -> Owner {
        Owner {
            user: Principal::Id(0),
            group: Principal::Id(0),
        }
    }

    /// Parses `user[:group]`.
    pub fn parse(text: &str) -> Result<Owner, FieldError> {
        let (user, group) = text.split_once(':').unwrap_or((text, text));
        let principal = |p: &str| -> Result<Principal, FieldError> {
            if let Ok(id) = p.parse::<u32>() {
                return Ok(Principal::Id(id));
            }
            if is_account_name(p) {
                Ok(Principal::Name(p.to_string()))
            } else {
                Err(FieldError::Owner(text.into()))
            }
        };
        Ok(Owner {
            user: principal(user)?,
            group: principal(group)?,
        })
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.user, self.group)
    }
}

impl serde::Serialize for Owner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "an owner such as `agent:agent`", Owner::parse)
    }
}

/// A size in bytes, written as `2GiB`, `512MiB`, `1G` (binary units) or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    /// Parses a size with an optional binary unit.
    pub fn parse(text: &str) -> Result<Size, FieldError> {
        let bad = || FieldError::Size(text.into());
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: u64 = num.parse().map_err(|_| bad())?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            "T" | "TiB" => 40,
            _ => return Err(bad()),
        };
        num.checked_mul(1u64 << shift).map(Size).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"2GiB\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

/// How long a step may run, written as `90s`, `30m`, `2h` or a number of
/// seconds; between one second and a week.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub std::time::Duration);

impl Timeout {
    pub fn parse(text: &str) -> Result<Timeout, FieldError> {
        let bad = || FieldError::Timeout(text.into());
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: u64 = num.parse().map_err(|_| bad())?;
        let scale = match unit.trim() {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        let seconds = num.checked_mul(scale).ok_or_else(bad)?;
        if !(1..=7 * 86_400).contains(&seconds) {
            return Err(FieldError::TimeoutRange(text.into()));
        }
        Ok(Timeout(std::time::Duration::from_secs(seconds)))
    }
}

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TimeoutVisitor;
        impl Visitor<'_> for TimeoutVisitor {
            type Value = Timeout;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"30m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timeout, E> {
                Timeout::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Timeout, E> {
                Timeout::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(TimeoutVisitor)
    }
}

/// Whether `name` is a portable user or group name: lowercase letters, digits,
/// `_` and `-`, starting with a letter or `_`, at most 32 bytes.
pub fn is_account_name(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 32
}

/// Checks a Debian package name (Debian Policy 5.6.1): lowercase letters,
/// digits, `+`, `-` and `.`, starting with a letter or digit, at least two
/// characters; kiln also caps it at 128.
pub fn check_package_name(name: &str) -> Result<(), FieldError> {
    let ok = (2..=128).contains(&name.len())
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(FieldError::PackageName(name.into()))
    }
}

/// Checks what apt-get install takes: `NAME[:ARCH][=VERSION]`.
pub fn check_package_spec(spec: &str) -> Result<(), FieldError> {
    let (name_arch, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let (name, arch) = match name_arch.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (name_arch, None),
    };
    check_package_name(name)?;
    if let Some(arch) = arch {
        let ok = (1..=32).contains(&arch.len())
            && arch
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(FieldError::Architecture {
                spec: spec.into(),
                arch: arch.into(),
            });
        }
    }
    if let Some(version) = version {
        // Debian Policy 5.6.12: [epoch:]upstream[-revision].
        let ok = (1..=128).contains(&version.len())
            && version.starts_with(|c: char| c.is_ascii_digit())
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c));
        if !ok {
            return Err(FieldError::Version {
                spec: spec.into(),
                version: version.into(),
            });
        }
    }
    Ok(())
}

/// `text`, cut to its first 40 characters for an error message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((i, _)) => format!("{}… ({} bytes)", &text[..i], text.len()),
        None => text.to_string(),
    }
}

/// Checks a step id: lowercase letters, digits, `-` and `_`, starting with a letter or digit.
pub fn check_step_id(id: &str) -> Result<(), FieldError> {
    let ok = id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && id.len() <= 64;
    if ok {
        Ok(())
    } else {
        Err(FieldError::StepId(id.into()))
    }
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths() {
        assert_eq!(
            ImagePath::parse("/etc/motd").unwrap().relative(),
            "etc/motd"
        );
        assert_eq!(ImagePath::parse("/etc/").unwrap().relative(), "etc");
        let refused = |text: &str| ImagePath::parse(text).unwrap_err();
        assert!(matches!(
            refused("etc/motd"),
            FieldError::RelativeImagePath(_)
        ));
        assert_eq!(refused("/"), FieldError::ImageRoot);
        assert!(matches!(
            refused("/etc/../../x"),
            FieldError::EscapesImage(_)
        ));
        assert!(matches!(refused("/a//b"), FieldError::EmptyComponent(_)));
        assert!(matches!(refused("/a/./b"), FieldError::EmptyComponent(_)));
        assert_eq!(
            refused("etc/motd").to_string(),
            "path `etc/motd` is relative; write it as an absolute path inside the image, e.g. `/etc/motd`"
        );
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::parse("0644").unwrap(), Mode(0o644));
        assert_eq!(Mode::parse("4755").unwrap(), Mode(0o4755));
        for bad in ["", "0999", "17777", "rw"] {
            assert_eq!(Mode::parse(bad), Err(FieldError::Mode(bad.into())));
        }
        let m: Mode = serde_yaml::from_str("644").unwrap();
        assert_eq!(m, Mode(0o644));
    }

    #[test]
    fn owners() {
        assert_eq!(Owner::parse("root").unwrap().to_string(), "root:root");
        assert_eq!(Owner::parse("1000:100").unwrap().group, Principal::Id(100));
        assert_eq!(
            Owner::parse("agent:agent").unwrap().user,
            Principal::Name("agent".into())
        );
        for bad in ["", "Root", "a b", "agent:", ":x"] {
            assert_eq!(Owner::parse(bad), Err(FieldError::Owner(bad.into())));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("2GiB").unwrap(), Size(2 << 30));
        assert_eq!(Size::parse("512M").unwrap(), Size(512 << 20));
        assert_eq!(Size::parse("4096").unwrap(), Size(4096));
        for bad in ["", "2 GB", "x", "1.5G", "99999999999999999999T"] {
            assert_eq!(Size::parse(bad), Err(FieldError::Size(bad.into())));
        }
    }

    #[test]
    fn timeouts() {
        assert_eq!(
            Timeout::parse("30m").unwrap().0,
            std::time::Duration::from_secs(1800)
        );
        assert_eq!(Timeout::parse("1x"), Err(FieldError::Timeout("1x".into())));
        assert_eq!(
            Timeout::parse("0s"),
            Err(FieldError::TimeoutRange("0s".into()))
        );
    }

    #[test]
    fn package_specs_and_step_ids() {
        assert_eq!(check_package_spec("jq:amd64=1.7.1-1"), Ok(()));
        let e = check_package_spec("Jq").unwrap_err();
        assert_eq!(e, FieldError::PackageName("Jq".into()));
        assert_eq!(
            e.to_string(),
            "package `Jq` is not a Debian package name (lowercase letters, digits, `+`, `-`, `.`; \
             2 to 128 characters, starting with a letter or digit)"
        );
        assert!(matches!(
            check_package_spec("jq:AMD64"),
            Err(FieldError::Architecture { .. })
        ));
        assert!(matches!(
            check_package_spec("jq=latest"),
            Err(FieldError::Version { .. })
        ));
        let long = format!("jq={}", "v".repeat(50));
        assert!(check_package_spec(&long)
            .unwrap_err()
            .to_string()
            .contains("… (50 bytes)"));
        assert_eq!(
            check_step_id("Base"),
            Err(FieldError::StepId("Base".into()))
        );
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("aptt", ["debootstrap", "apt", "file", "run"]),
            Some("apt")
        );
        assert_eq!(
            suggest("pakages", ["packages", "sources"]),
            Some("packages")
        );
        assert_eq!(suggest("zzzzzz", ["apt", "run"]), None);
    }
}
