//! Helpers shared by the integration tests: running the real `kiln` binary
//! and looking inside the ext4 images it writes with e2fsprogs.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The kiln binary cargo built for these tests.
pub fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// A path inside the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A finished command, kept with its command line for failure messages.
pub struct Ran {
    pub command: String,
    pub output: Output,
}

impl Ran {
    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Panics (showing stderr) unless the command succeeded; returns stdout.
    pub fn expect_success(&self) -> String {
        assert!(self.success(), "expected success:\n{self}");
        self.stdout()
    }

    /// Parses stdout as JSON, panicking with the whole run on failure.
    pub fn json(&self) -> serde_json::Value {
        let stdout = self.expect_success();
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
}

impl fmt::Display for Ran {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.output.status,
            self.stdout(),
            self.stderr()
        )
    }
}

/// Describes a command the way a shell would show it.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion, capturing its output.
pub fn run(mut cmd: Command) -> Ran {
    let command = describe(&cmd);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    Ran { command, output }
}

/// `kiln ARGS...`
pub fn kiln_run<I, S>(args: I) -> Ran
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = kiln();
    cmd.args(args);
    run(cmd)
}

/// `debugfs -R REQUEST IMAGE` (read only); returns stdout and stderr together.
pub fn debugfs(image: &Path, request: &str) -> String {
    let mut cmd = Command::new("debugfs");
    cmd.arg("-R").arg(request).arg(image);
    let ran = run(cmd);
    assert!(ran.success(), "debugfs failed:\n{ran}");
    format!("{}{}", ran.stdout(), ran.stderr())
}

/// The contents of a file inside the image.
pub fn image_cat(image: &Path, path: &str) -> String {
    let mut cmd = Command::new("debugfs");
    cmd.arg("-R").arg(format!("cat {path}")).arg(image);
    let ran = run(cmd);
    assert!(ran.success(), "debugfs failed:\n{ran}");
    ran.stdout()
}

/// Asserts `e2fsck -fn IMAGE` finds the image clean.
pub fn assert_fsck_clean(image: &Path) {
    let mut cmd = Command::new("e2fsck");
    cmd.arg("-fn").arg(image);
    let ran = run(cmd);
    assert!(ran.success(), "e2fsck reports problems:\n{ran}");
}

/// Whether two files have the same bytes (streamed: images are large).
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        if n != m || ba[..n] != bb[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]).expect("read") {
            0 => break,
            n => filled += n,
        }
    }
    filled
}

/// Builds recipes/agent-ready-debian.yaml into `out` with the cache the
/// agent-ready tests share (`target/kiln-agent-cache`).
pub fn build_agent_image(out: &Path) {
    kiln_run([
        "build".as_ref(),
        repo("recipes/agent-ready-debian.yaml").as_os_str(),
        "--cache".as_ref(),
        repo("target/kiln-agent-cache").as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ])
    .expect_success();
}

/// `kiln build RECIPE --cache CACHE -o OUT --json`, to run.
pub fn build_command(recipe: &Path, cache: &Path, out: &Path) -> Command {
    let mut cmd = kiln();
    cmd.arg("build")
        .arg(recipe)
        .arg("--cache")
        .arg(cache)
        .arg("-o")
        .arg(out)
        .arg("--json");
    cmd
}

/// A signing key pair from `kiln key generate DIR/NAME`: (secret, public).
pub fn signing_key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let prefix = dir.join(name);
    kiln_run(["key".as_ref(), "generate".as_ref(), prefix.as_os_str()]).expect_success();
    (prefix.with_extension("key"), prefix.with_extension("pub"))
}

/// The lines of this process's mount table that mention `path`.
pub fn mounts_under(path: &Path) -> Vec<String> {
    let path = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&path))
        .map(String::from)
        .collect()
}
