//! End to end: `kiln boot` on the agent-ready Debian image, for real, as
//! root, under qemu (TCG where KVM hangs: minutes per boot). One image is
//! built (cached in `target/kiln-agent-cache`, written to
//! `target/kiln-boot-images`), and the boots run one at a time.
//!
//! Each boot gets its own `TMPDIR`, so its work dir, image copy and qemu
//! command line are recognizable: after every boot no qemu may be left whose
//! command line names that dir.
// Needs root (builds run in mount namespaces): tests/run turns this on.
#![cfg(feature = "root-tests")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use common::{build_agent_image, image_cat, image_stat, kiln, kiln_run, repo, run, serial, Ran};

/// Where the image for these tests is built.
fn images() -> PathBuf {
    repo("target/kiln-boot-images")
}

struct Image {
    rootfs: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Builds recipes/agent-ready-debian.yaml (no `--ssh-key`: the boot brings
/// its own key), once per test run.
fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = images();
        let started = Instant::now();
        build_agent_image(&out);
        eprintln!("image built in {:.1}s", started.elapsed().as_secs_f64());
        Image {
            rootfs: out.join("agent-rootfs.ext4"),
            kernel: out.join("agent-kernel"),
            initrd: out.join("agent-initrd"),
        }
    })
}

/// A finished `kiln boot` and how long it took.
struct Booted {
    ran: Ran,
    seconds: f64,
}

/// `kiln boot IMAGE --kernel K --initrd I EXTRA...` with `TMPDIR=tmp`.
fn boot(tmp: &Path, rootfs: &Path, extra: &[&str]) -> Booted {
    let mut cmd = kiln();
    cmd.env("TMPDIR", tmp)
        .arg("boot")
        .arg(rootfs)
        .arg("--kernel")
        .arg(&image().kernel)
        .arg("--initrd")
        .arg(&image().initrd)
        // The login user and stage 3's checks come from the recipe.
        .arg("--recipe")
        .arg(repo("recipes/agent-ready-debian.yaml"))
        .args(extra);
    timed(cmd)
}

fn timed(cmd: Command) -> Booted {
    let started = Instant::now();
    let ran = run(cmd);
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("{}\n(took {seconds:.1}s)", ran.stderr());
    Booted { ran, seconds }
}

/// qemu processes whose command line mentions `dir` (the boot's TMPDIR).
fn qemus_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.contains("qemu-system"))
            && args.iter().any(|a| a.contains(&needle))
        {
            found.push(format!(
                "{}: {}",
                entry.file_name().to_string_lossy(),
                args.join(" ")
            ));
        }
    }
    found
}

fn assert_no_qemu_left(dir: &Path) {
    let left = qemus_under(dir);
    assert!(left.is_empty(), "qemu left running: {left:?}");
}

/// The `kiln-boot-*` work dirs in `dir`.
fn work_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kiln-boot-"))
        })
        .collect()
}

/// After a failed boot: one work dir is kept, with the console log, and
/// without the image copy or the private key.
fn kept_console_log(dir: &Path, stderr: &str) -> PathBuf {
    let kept = work_dirs(dir);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let log = kept[0].join("console.log");
    assert!(log.is_file(), "no {}", log.display());
    assert!(
        stderr.contains(&log.display().to_string()),
        "the error does not name {}:\n{stderr}",
        log.display()
    );
    for gone in ["rootfs.ext4", "id_ed25519"] {
        assert!(!kept[0].join(gone).exists(), "{gone} was left behind");
    }
    log
}

fn blake3_of(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(std::fs::File::open(path).unwrap())
        .unwrap();
    hasher.finalize().to_hex().to_string()
}

/// A sparse copy of the test image in `dir`, changed by `debugfs -w` requests.
fn broken_copy(dir: &Path, name: &str, requests: &str) -> PathBuf {
    let copy = dir.join(name);
    let mut cp = Command::new("cp");
    cp.arg("--sparse=always").arg(&image().rootfs).arg(&copy);
    run(cp).expect_success();
    let script = dir.join(format!("{name}.debugfs"));
    std::fs::write(&script, requests).unwrap();
    let mut cmd = Command::new("debugfs");
    cmd.arg("-w").arg("-f").arg(&script).arg(&copy);
    run(cmd).expect_success();
    copy
}

fn stages(booted: &Booted) -> Vec<serde_json::Value> {
    booted
        .ran
        .json()
        .as_array()
        .expect("a list of stages")
        .clone()
}

#[test]
fn agent_ready_debian_boots_and_passes_every_stage() {
    let _serial = serial();
    let image = image();
    let tmp = tempfile::tempdir().unwrap();
    let before = blake3_of(&image.rootfs);

    let booted = boot(tmp.path(), &image.rootfs, &["--json"]);
    let stages = stages(&booted);
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    for (prefix, what) in [
        ("1.", "multi-user.target"),
        ("2.", "key login as agent"),
        ("3a.", "sudo"),
        ("3b.", "node"),
        ("3c.", "opencode --version"),
        ("3d.", "healthy"),
        ("4.", "powers off"),
    ] {
        let stage = stages
            .iter()
            .find(|s| s["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no stage {prefix} in {names:?}"));
        assert!(stage["name"].as_str().unwrap().contains(what), "{stage}");
        assert_eq!(stage["passed"], true, "{stage}");
        assert!(stage["seconds"].as_f64().unwrap() >= 0.0, "{stage}");
        // Printed as it passed.
        assert!(
            booted
                .ran
                .stderr()
                .contains(&format!("[PASS] {}", stage["name"].as_str().unwrap())),
            "{}",
            booted.ran
        );
    }
    assert_eq!(stages.len(), 7, "{names:?}");
    assert!(
        booted.ran.stderr().contains("boot: 7 stages passed in "),
        "{}",
        booted.ran
    );
    let detail = |prefix: &str| {
        stages
            .iter()
            .find(|s| s["name"].as_str().unwrap().starts_with(prefix))
            .map(|s| s["detail"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert!(detail("3b.").starts_with("v22."), "{}", detail("3b."));
    assert!(
        detail("3d.").contains("\"healthy\":true"),
        "{}",
        detail("3d.")
    );
    assert!(detail("4.").contains("qemu exited 0"), "{}", detail("4."));

    assert_no_qemu_left(tmp.path());
    assert!(
        work_dirs(tmp.path()).is_empty(),
        "the work dir outlived a passing boot: {:?}",
        work_dirs(tmp.path())
    );
    assert_eq!(
        blake3_of(&image.rootfs),
        before,
        "kiln boot changed the image it booted"
    );
}

#[test]
fn a_broken_fstab_fails_at_boot_not_hangs() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let fstab = tmp.path().join("fstab");
    // A mount that is not `nofail` and cannot succeed: local-fs.target
    // fails and systemd enters emergency mode.
    std::fs::write(
        &fstab,
        "/dev/vda / ext4 defaults,noatime 0 1\nnone /srv/kiln-broken nosuchfs defaults 0 0\n",
    )
    .unwrap();
    let copy = broken_copy(
        tmp.path(),
        "broken-fstab.ext4",
        &format!("rm /etc/fstab\nwrite {} /etc/fstab\n", fstab.display()),
    );
    assert!(image_cat(&copy, "/etc/fstab").contains("nosuchfs"));

    let booted = boot(tmp.path(), &copy, &["--login-only"]);
    assert!(!booted.ran.success(), "{}", booted.ran);
    let err = booted.ran.stderr();
    assert!(
        err.contains("stage 1. systemd reached multi-user.target failed"),
        "{err}"
    );
    assert!(err.contains("[FAIL] 1."), "{err}");
    assert!(
        err.to_lowercase().contains("emergency mode"),
        "the reason should be emergency mode:\n{err}"
    );
    assert!(err.contains("last 30 lines of the console"), "{err}");
    assert!(
        booted.seconds < 400.0,
        "took {:.0}s: it waited for the time limit instead of failing fast",
        booted.seconds
    );
    kept_console_log(tmp.path(), &err);
    assert_no_qemu_left(tmp.path());
}

#[test]
fn a_missing_sshd_fails_at_login() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let copy = broken_copy(tmp.path(), "no-sshd.ext4", "rm /usr/sbin/sshd\n");
    assert_eq!(image_stat(&copy, "/usr/sbin/sshd"), None);

    let booted = boot(tmp.path(), &copy, &["--login-only", "--json"]);
    assert!(!booted.ran.success(), "{}", booted.ran);
    let err = booted.ran.stderr();
    assert!(
        err.contains("[PASS] 1. systemd reached multi-user.target"),
        "{err}"
    );
    // --json still lists the stages: the first passed, the second did not.
    let stages: serde_json::Value = serde_json::from_str(&booted.ran.stdout()).unwrap();
    assert_eq!(stages[0]["passed"], true, "{stages}");
    assert_eq!(stages[1]["passed"], false, "{stages}");
    assert!(stages[1]["detail"]
        .as_str()
        .unwrap()
        .contains("ssh.service"));
    assert!(
        err.contains("stage 2. sshd accepts a key login as agent failed"),
        "{err}"
    );
    assert!(err.contains("sshd did not start"), "{err}");
    kept_console_log(tmp.path(), &err);
    assert_no_qemu_left(tmp.path());
}

#[test]
fn key_via_cmdline_logs_in() {
    let _serial = serial();
    let image = image();
    // No key is baked in: the login works only if the first-boot unit of
    // `keys_from: [cmdline]` installs the one on the kernel command line.
    assert_eq!(
        image_stat(&image.rootfs, "/home/agent/.ssh/authorized_keys"),
        None
    );
    assert_eq!(
        image_stat(
            &image.rootfs,
            "/etc/systemd/system/kiln-authorized-keys.service"
        )
        .map(|s| s.kind),
        Some(kiln::image::FileType::Regular)
    );
    let tmp = tempfile::tempdir().unwrap();
    let before = blake3_of(&image.rootfs);
    let mut cmd = kiln();
    cmd.env("TMPDIR", tmp.path())
        .arg("boot")
        .arg("--recipe")
        .arg(repo("recipes/agent-ready-debian.yaml"))
        .arg("-o")
        .arg(images())
        .args(["--key-via", "cmdline", "--login-only", "--json"]);
    let booted = timed(cmd);
    let stages = stages(&booted);
    assert_eq!(stages.len(), 2, "--login-only stops after the login");
    assert!(stages.iter().all(|s| s["passed"] == true), "{stages:?}");
    assert!(stages[1]["name"]
        .as_str()
        .unwrap()
        .starts_with("2. sshd accepts a key login as agent"));
    assert_no_qemu_left(tmp.path());
    assert!(work_dirs(tmp.path()).is_empty());
    assert_eq!(blake3_of(&image.rootfs), before);
}

#[test]
fn boot_refuses_missing_inputs_before_starting_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let ran = kiln_run(["boot"]);
    assert!(!ran.success());
    assert!(ran.stderr().contains("give an IMAGE and --kernel"), "{ran}");

    let missing = tmp.path().join("missing.ext4");
    let kernel = tmp.path().join("vmlinux");
    std::fs::write(&kernel, b"not really").unwrap();
    // Without a recipe, nothing says whom to log in as.
    let mut cmd = kiln();
    cmd.env("TMPDIR", tmp.path())
        .arg("boot")
        .arg(&missing)
        .arg("--kernel")
        .arg(&kernel);
    let ran = run(cmd);
    assert!(!ran.success());
    assert!(ran.stderr().contains("give --user"), "{ran}");

    let mut cmd = kiln();
    cmd.env("TMPDIR", tmp.path())
        .arg("boot")
        .arg(&missing)
        .arg("--kernel")
        .arg(&kernel)
        .args(["--user", "agent"]);
    let ran = run(cmd);
    assert!(!ran.success());
    assert!(
        ran.stderr()
            .contains(&format!("image {}: no such file", missing.display())),
        "{ran}"
    );
    assert!(work_dirs(tmp.path()).is_empty());
}

/// Stopping `kiln boot` while qemu runs leaves no qemu behind: SIGTERM (as
/// Ctrl-C or a CI time-out would send) makes kiln stop qemu and fail saying
/// so; SIGKILL gives kiln no chance, and the kernel kills qemu with it.
#[test]
fn stopping_kiln_boot_leaves_no_qemu() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::process::Stdio;
    use std::time::Duration;

    let _serial = serial();
    let image = image();
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let tmp = tempfile::tempdir().unwrap();
        let stderr_path = tmp.path().join("stderr");
        let mut cmd = kiln();
        cmd.env("TMPDIR", tmp.path())
            .arg("boot")
            .arg(&image.rootfs)
            .arg("--kernel")
            .arg(&image.kernel)
            .arg("--initrd")
            .arg(&image.initrd)
            .args(["--user", "agent"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

        // The copy and the key come first; then qemu starts.
        let deadline = Instant::now() + Duration::from_secs(180);
        while qemus_under(tmp.path()).is_empty() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "kiln boot exited before qemu started:\n{}",
                stderr()
            );
            assert!(Instant::now() < deadline, "qemu never started");
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(2));
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();

        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "kiln boot still runs 30 s after {signal}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(!status.success(), "{signal}: {status}");
        // A killed qemu is gone once its parent has reaped it, or init has.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !qemus_under(tmp.path()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_no_qemu_left(tmp.path());
        if signal == Signal::SIGTERM {
            assert!(stderr().contains("interrupted"), "{}", stderr());
        }
    }
}
