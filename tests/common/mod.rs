//! Helpers shared by the integration tests: running the real `kiln` binary
//! and looking inside the ext4 images it writes (with [`kiln::image`]).

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

pub mod contract;
pub mod sharing;

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln::image::{Image, Stat};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the tests of one file that take it one at a time (builds share a
/// cache and the machine); a failed test does not block the others.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

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

/// `debugfs -R REQUEST IMAGE` (read only); returns stdout and stderr
/// together. Only for what [`kiln::image`] does not read: inode numbers and
/// link counts, device numbers, extended attributes.
pub fn debugfs(image: &Path, request: &str) -> String {
    let mut cmd = Command::new("debugfs");
    cmd.arg("-R").arg(request).arg(image);
    let ran = run(cmd);
    assert!(ran.success(), "debugfs failed:\n{ran}");
    format!("{}{}", ran.stdout(), ran.stderr())
}

/// The image at `image`, opened for reading.
pub fn open_image(image: &Path) -> Image {
    Image::open(image).unwrap_or_else(|e| panic!("{e}"))
}

/// What a path inside the image is (a final symlink not followed); `None`
/// if it is missing.
pub fn image_stat(image: &Path, path: &str) -> Option<Stat> {
    open_image(image)
        .stat(path)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The contents of a file inside the image, which must be there.
pub fn image_cat(image: &Path, path: &str) -> String {
    let bytes = open_image(image)
        .read(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("{}: no {path}", image.display()));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// [`Image::listing`] of each of `paths` (a directory with everything
/// under it), one after the other: what the snapshots pin.
pub fn image_listing(image: &Path, paths: &[&str]) -> String {
    let image = open_image(image);
    paths
        .iter()
        .map(|p| image.listing(p).unwrap_or_else(|e| panic!("{e}")))
        .collect()
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

/// Runs `cmd` to completion like [`run`], watching its peak resident set
/// (`VmHWM`, the process itself, not its children); returns it in MiB.
pub fn run_measuring_memory(mut cmd: Command) -> (Ran, u64) {
    use std::process::Stdio;
    let command = describe(&cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).unwrap();
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            let hwm = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let output = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    (Ran { command, output }, peak_kib / 1024)
}

/// The size of the file [`big_blob_recipe`] puts into its image.
pub const BIG_FILE_MIB: u64 = 160;

/// A recipe of one `file` step whose source is a [`BIG_FILE_MIB`] MiB file
/// (no two MiB alike); returns the recipe and the file's blake3.
pub fn big_blob_recipe(dir: &Path) -> (PathBuf, String) {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::io::BufWriter::new(File::create(dir.join("big.bin")).unwrap());
    let mut chunk = vec![0u8; 1 << 20];
    for mib in 0..BIG_FILE_MIB {
        for (i, byte) in chunk.iter_mut().enumerate() {
            *byte = (i as u64).wrapping_mul(mib * 2 + 1).wrapping_shr(3) as u8;
        }
        std::io::Write::write_all(&mut file, &chunk).unwrap();
        hasher.update(&chunk);
    }
    std::io::Write::flush(&mut file).unwrap();
    let recipe = dir.join("big.yaml");
    std::fs::write(
        &recipe,
        "name: big\noutput: {size: 320MiB}\nsteps:\n  big:\n    file: {path: /opt/big.bin, source: big.bin}\n",
    )
    .unwrap();
    (recipe, hasher.finalize().to_hex().to_string())
}

/// Pushes [`big_blob_recipe`]'s step to `remote` (signed with `secret`),
/// then pulls it into an empty cache with `kiln cache pull` (trusting
/// `public`): the blob arrives intact, and neither kiln held it in memory.
pub fn big_blob_round_trip(dir: &Path, remote: &str, secret: &Path, public: &Path) {
    let (recipe, blake3) = big_blob_recipe(dir);
    let mut push = build_command(&recipe, &dir.join("a"), &dir.join("a-out"));
    push.arg("--remote")
        .arg(remote)
        .arg("--signing-key")
        .arg(secret);
    let (pushed, push_mib) = run_measuring_memory(push);
    assert_eq!(pushed.json()["steps"][0]["outcome"], "built", "{pushed}");
    assert!(!pushed.stderr().contains("warning"), "{pushed}");

    let cache = dir.join("b");
    let mut pull = kiln();
    pull.args(["cache", "pull"])
        .arg(&recipe)
        .arg("--cache")
        .arg(&cache)
        .arg("--remote")
        .arg(remote)
        .arg("--trusted-key")
        .arg(public);
    let (pulled, pull_mib) = run_measuring_memory(pull);
    assert!(
        pulled.stderr().contains("1 pulled, 0 already here"),
        "{pulled}"
    );
    let blob = cache.join("blobs").join(&blake3[..2]).join(&blake3);
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut File::open(&blob).unwrap(), &mut hasher).unwrap();
    assert_eq!(hasher.finalize().to_hex().to_string(), blake3);
    // Half the blob's size: a kiln that buffered it would need all of it.
    for (what, mib) in [("push", push_mib), ("pull", pull_mib)] {
        assert!(
            mib < BIG_FILE_MIB / 2,
            "the {what} took {mib} MiB of memory for a {BIG_FILE_MIB} MiB blob"
        );
    }
    eprintln!("peak RSS: push {push_mib} MiB, pull {pull_mib} MiB");
}

/// Step `id` of a `--json` build (or lock) report.
pub fn step<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {report}"))
}
