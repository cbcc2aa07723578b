//! Faults, as root: builds killed at several moments, `kiln cache gc`
//! started beside a build, a disk that fills up during a step and during
//! assembly. After each: no mount is left, `kiln cache fsck` finds the cache
//! clean, and the next build succeeds with the image an undisturbed build
//! gives.
// Needs root (builds run in mount namespaces): tests/run turns this on.
#![cfg(feature = "root-tests")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{build_command, kiln_run, mounts_under, repo, serial, Ran};

/// The cache the building tests share (the base is debootstrapped once).
fn shared_cache() -> PathBuf {
    repo("target/kiln-test-cache")
}

fn build(recipe: &Path, cache: &Path, out: &Path) -> Ran {
    common::run(build_command(recipe, cache, out))
}

fn build_ok(recipe: &Path, cache: &Path, out: &Path) -> Value {
    let ran = build(recipe, cache, out);
    ran.expect_success();
    ran.json()
}

/// Starts a build and waits until its progress output shows `moment`.
fn build_until(recipe: &Path, cache: &Path, out: &Path, moment: &str) -> Child {
    let mut cmd = build_command(recipe, cache, out);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kiln starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = moment.to_string();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(&wanted) {
                let _ = tx.send(Ok(()));
            }
        }
        let _ = tx.send(Err(seen));
    });
    match rx.recv_timeout(Duration::from_secs(600)) {
        Ok(Ok(())) => child,
        Ok(Err(seen)) => panic!("the build ended before `{moment}`:\n{seen}"),
        Err(_) => panic!("no `{moment}` within 10 minutes"),
    }
}

/// Processes whose command line mentions `path` (a sandbox left running).
fn processes_under(path: &Path) -> Vec<String> {
    let path = path.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&path) && entry.file_name() != std::process::id().to_string().as_str() {
            found.push(cmdline);
        }
    }
    found
}

/// Waits (up to 10 s) until no mount and no process mentions `path`.
fn assert_nothing_left(path: &Path, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mounts, procs) = (mounts_under(path), processes_under(path));
        if mounts.is_empty() && procs.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("{when}: left behind\nmounts: {mounts:#?}\nprocesses: {procs:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_fsck_clean(cache: &Path, when: &str) {
    let ran = kiln_run([
        "cache".as_ref(),
        "fsck".as_ref(),
        "--cache".as_ref(),
        cache.as_os_str(),
    ]);
    assert!(ran.success(), "{when}: the cache is not clean:\n{ran}");
}

fn kill(child: &mut Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the killed build succeeded");
}

/// `kiln plan RECIPE --cache CACHE --json`
fn plan(recipe: &Path, cache: &Path) -> Ran {
    kiln_run([
        "plan".as_ref(),
        recipe.as_os_str(),
        "--cache".as_ref(),
        cache.as_os_str(),
        "--json".as_ref(),
    ])
}

/// The shared cache, with the base of examples/minimal.yaml in it.
fn cache_with_base(dir: &Path) -> PathBuf {
    let shared = shared_cache();
    let plan = plan(&repo("tests/recipes/slow.yaml"), &shared);
    let base_cached = plan.success()
        && plan.stdout().contains("\"id\": \"base\"")
        && plan.json()[0]["status"] == "cached";
    if !base_cached {
        build_ok(
            &repo("examples/minimal.yaml"),
            &shared,
            &dir.join("minimal"),
        );
    }
    // Start from a clean cache (a developer's may hold an older kiln's blobs).
    kiln_run([
        "cache".as_ref(),
        "fsck".as_ref(),
        "--repair".as_ref(),
        "--cache".as_ref(),
        shared.as_os_str(),
    ])
    .expect_success();
    shared
}

#[test]
fn killed_builds_leave_a_cache_the_next_build_trusts() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_with_base(tmp.path());
    let recipe = repo("tests/recipes/slow.yaml");
    // The step must run in every round: remove its cache entry first.
    let forget_slow = || forget_step(&recipe, &cache, 1);

    // SIGKILL, SIGTERM and SIGINT of a build in the middle of a step.
    for signal in [
        nix::sys::signal::SIGKILL,
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGINT,
    ] {
        forget_slow();
        let out = tmp.path().join(format!("{signal}"));
        let mut child = build_until(&recipe, &cache, &out, "running (key");
        std::thread::sleep(Duration::from_secs(2));
        kill(&mut child, signal);
        let when = format!("{signal} mid-step");
        assert_nothing_left(&cache, &when);
        assert_fsck_clean(&cache, &when);
        assert!(!out.join("slow.ext4").exists(), "{when}: an image appeared");
    }

    // An undisturbed build.
    forget_slow();
    let first = build_ok(&recipe, &cache, &tmp.path().join("first"));

    // SIGKILL, SIGTERM or SIGINT in the middle of assembly: no image under
    // its final name, and the next build into the same directory gives the
    // undisturbed image.
    use nix::sys::signal::{SIGINT, SIGKILL, SIGTERM};
    for signal in [SIGKILL, SIGTERM, SIGINT] {
        let when = format!("{signal} mid-assembly");
        let out = tmp.path().join(format!("assembly-{signal}"));
        let mut child = build_until(&recipe, &cache, &out, "assembling");
        std::thread::sleep(Duration::from_millis(500));
        kill(&mut child, signal);
        assert_nothing_left(&cache, &when);
        assert_nothing_left(&out, &when);
        assert_fsck_clean(&cache, &when);
        assert!(!out.join("slow.ext4").exists(), "{when}: an image appeared");
        let again = build_ok(&recipe, &cache, &out);
        assert_eq!(again["image_blake3"], first["image_blake3"], "{when}");
        assert_eq!(again["built"], 0, "{when}: nothing was left to build");
    }
}

/// Removes the action entry of step `index` of `recipe` (so it runs again).
fn forget_step(recipe: &Path, cache: &Path, index: usize) {
    let plan = plan(recipe, cache);
    let key = plan.json()[index]["key"].as_str().unwrap().to_string();
    let path = cache
        .join("actions")
        .join(&key[..2])
        .join(format!("{key}.json"));
    let _ = std::fs::remove_file(path);
}

#[test]
fn builds_killed_mid_debootstrap_and_mid_apt_and_two_recipes_at_once_leave_a_sound_cache() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_with_base(tmp.path());
    let minimal = repo("examples/minimal.yaml");
    let slow = repo("tests/recipes/slow.yaml");
    let undisturbed_minimal = build_ok(&minimal, &cache, &tmp.path().join("minimal"));
    let undisturbed_slow = build_ok(&slow, &cache, &tmp.path().join("slow"));

    // SIGKILL while debootstrap builds the base: debootstrap and everything
    // it started go with kiln, and the base built again is the same layer.
    let base_layer = undisturbed_slow["steps"][0]["layer"].clone();
    forget_step(&slow, &cache, 0);
    let mut child = build_until(
        &slow,
        &cache,
        &tmp.path().join("killed-base"),
        "running (key",
    );
    std::thread::sleep(Duration::from_secs(5));
    kill(&mut child, nix::sys::signal::SIGKILL);
    assert_nothing_left(&cache, "SIGKILL mid-debootstrap");
    assert_fsck_clean(&cache, "SIGKILL mid-debootstrap");
    let again = build_ok(&slow, &cache, &tmp.path().join("after-debootstrap"));
    assert_eq!(again["steps"][0]["outcome"], "built");
    assert_eq!(again["steps"][0]["layer"], base_layer);
    assert_eq!(again["image_blake3"], undisturbed_slow["image_blake3"]);

    // SIGKILL while apt installs `less` (examples/minimal.yaml's `tools`).
    forget_step(&minimal, &cache, 1);
    let mut child = build_until(&minimal, &cache, &tmp.path().join("killed"), "running (key");
    std::thread::sleep(Duration::from_millis(1500));
    kill(&mut child, nix::sys::signal::SIGKILL);
    assert_nothing_left(&cache, "SIGKILL mid-apt");
    assert_fsck_clean(&cache, "SIGKILL mid-apt");
    let again = build_ok(&minimal, &cache, &tmp.path().join("after-apt"));
    assert_eq!(again["image_blake3"], undisturbed_minimal["image_blake3"]);

    // Two different recipes building on one cache at once, each with a step to run.
    forget_step(&minimal, &cache, 1);
    forget_step(&slow, &cache, 1);
    let spawn = |recipe: &Path, out: &str| {
        let mut cmd = build_command(recipe, &cache, &tmp.path().join(out));
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let (a, b) = (spawn(&minimal, "both-minimal"), spawn(&slow, "both-slow"));
    for (child, undisturbed) in [(a, &undisturbed_minimal), (b, &undisturbed_slow)] {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["image_blake3"], undisturbed["image_blake3"],
            "{stderr}"
        );
        assert!(report["built"].as_u64().unwrap() >= 1, "{stderr}");
    }
    assert_nothing_left(&cache, "two recipes at once");
    assert_fsck_clean(&cache, "two recipes at once");
}

#[test]
fn gc_beside_a_build_waits_its_turn() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_with_base(tmp.path());
    let recipe = repo("tests/recipes/slow.yaml");
    let undisturbed = build_ok(&recipe, &cache, &tmp.path().join("first"));

    // The `slow` step must run: a new output directory alone would not make it.
    let key = undisturbed["steps"][1]["key"].as_str().unwrap().to_string();
    std::fs::remove_file(
        cache
            .join("actions")
            .join(&key[..2])
            .join(format!("{key}.json")),
    )
    .unwrap();
    let out = tmp.path().join("second");
    let child = build_until(&recipe, &cache, &out, "running");
    let gc = kiln_run([
        "cache".as_ref(),
        "gc".as_ref(),
        "--cache".as_ref(),
        cache.as_os_str(),
    ]);
    assert!(
        !gc.success() && gc.stderr().contains("a build is using this cache"),
        "gc ran beside a build:\n{gc}"
    );
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "the build beside gc failed");
    let again = build_ok(&recipe, &cache, &out);
    assert_eq!(again["image_blake3"], undisturbed["image_blake3"]);
    assert_fsck_clean(&cache, "gc beside a build");
}

/// A tmpfs of `size` at `dir`, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let ran = common::run({
            let mut cmd = std::process::Command::new("mount");
            cmd.args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir);
            cmd
        });
        ran.expect_success();
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A file-only recipe in `dir` whose step copies `big` (a file in `dir`).
fn big_file_recipe(dir: &Path, big_bytes: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    // Not zeros: those could become holes.
    let big: Vec<u8> = (0..big_bytes).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("big"), big).unwrap();
    let recipe = dir.join("disk.yaml");
    std::fs::write(
        &recipe,
        "name: disk\noutput:\n  rootfs: disk.ext4\n  size: 64MiB\nsteps:\n  small:\n    file:\n      path: /etc/small\n      content: \"small\\n\"\n  big:\n    needs: [small]\n    file:\n      path: /srv/big\n      source: big\n",
    )
    .unwrap();
    recipe
}

#[test]
fn a_full_disk_fails_the_build_clearly_and_breaks_nothing() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();

    // During a step: the cache lives on a 24 MiB disk, the step writes 40 MiB.
    let cache_disk = SmallDisk::mount(&tmp.path().join("cache-disk"), "24m");
    let cache = cache_disk.0.join("cache");
    let recipe = big_file_recipe(&tmp.path().join("r1"), 40 << 20);
    let ran = build(&recipe, &cache, &tmp.path().join("out1"));
    assert!(!ran.success(), "the build fit on a full disk:\n{ran}");
    assert!(
        ran.stderr().contains("No space left on device"),
        "the error does not say the disk is full:\n{ran}"
    );
    assert_nothing_left(&cache, "full disk during a step");
    assert_fsck_clean(&cache, "full disk during a step");
    // With room again (a smaller file), the same cache builds.
    let recipe = big_file_recipe(&tmp.path().join("r2"), 1 << 20);
    let fits = build_ok(&recipe, &cache, &tmp.path().join("out2"));
    assert_fsck_clean(&cache, "after the full disk");

    // During assembly: the output directory is on a disk smaller than the image.
    let out_disk = SmallDisk::mount(&tmp.path().join("out-disk"), "1m");
    let ran = build(&recipe, &cache, &out_disk.0);
    assert!(!ran.success(), "the image fit on a full disk:\n{ran}");
    assert!(
        ran.stderr().contains("No space left on device")
            || ran.stderr().contains("Could not allocate block"),
        "the error does not say the disk is full:\n{ran}"
    );
    assert!(
        !out_disk.0.join("disk.ext4.partial").exists(),
        "the partial image was left behind"
    );
    assert!(
        !out_disk.0.join("disk.ext4").exists(),
        "a partial image under its final name"
    );
    assert_nothing_left(&cache, "full disk during assembly");
    assert_fsck_clean(&cache, "full disk during assembly");
    let again = build_ok(&recipe, &cache, &tmp.path().join("out3"));
    assert_eq!(again["image_blake3"], fits["image_blake3"]);
}

#[test]
fn a_step_reading_from_a_server_that_stops_answering_stops_at_its_timeout() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_with_base(tmp.path());

    // A mirror that accepts connections and then never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let recipe = tmp.path().join("hang.yaml");
    std::fs::write(
        &recipe,
        format!(
            "name: hang\noutput:\n  rootfs: hang.ext4\n  size: 512MiB\nsteps:\n  base:\n    debootstrap:\n      suite: trixie\n  download:\n    needs: [base]\n    timeout: 5s\n    run: |\n      bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}; printf \"GET /x.deb HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3 >/srv/x.deb'\n"
        ),
    )
    .unwrap();

    let started = Instant::now();
    let ran = build(&recipe, &cache, &tmp.path().join("out"));
    let took = started.elapsed();
    assert!(
        !ran.success(),
        "the step never ended, yet the build succeeded:\n{ran}"
    );
    assert!(
        ran.stderr().contains("download") && ran.stderr().contains("time limit"),
        "the error does not name the step and its time limit:\n{ran}"
    );
    assert!(took < Duration::from_secs(60), "the build took {took:?}");
    let plan = plan(&recipe, &cache);
    assert_eq!(
        plan.json()[1]["status"],
        "build",
        "the step was cached:\n{plan}"
    );
    assert_nothing_left(&cache, "a step stopped at its time limit");
    assert_fsck_clean(&cache, "a step stopped at its time limit");
}

#[test]
fn a_build_killed_while_capturing_a_step_leaves_a_sound_cache() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_with_base(tmp.path());
    let recipe = repo("tests/recipes/big-capture.yaml");
    let undisturbed = build_ok(&recipe, &cache, &tmp.path().join("first"));
    let key = undisturbed["steps"][1]["key"].as_str().unwrap().to_string();
    let log = cache.join("logs").join(format!("{key}.log"));

    forget_step(&recipe, &cache, 1);
    let _ = std::fs::remove_file(&log);
    let mut cmd = build_command(&recipe, &cache, &tmp.path().join("killed"));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    // The step's log says "ran in" once the step is done and capture begins.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("kiln: ran in")) {
        assert!(Instant::now() < deadline, "the step never finished");
        assert!(child.try_wait().unwrap().is_none(), "the build ended first");
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(&mut child, nix::sys::signal::SIGKILL);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("kiln: captured"),
        "killed too late, capture had ended:\n{text}"
    );
    assert_nothing_left(&cache, "SIGKILL mid-capture");
    assert_fsck_clean(&cache, "SIGKILL mid-capture");
    let again = build_ok(&recipe, &cache, &tmp.path().join("again"));
    assert_eq!(again["steps"][1]["outcome"], "built");
    assert_eq!(again["image_blake3"], undisturbed["image_blake3"]);
}

#[test]
fn a_build_killed_while_pushing_leaves_a_remote_others_can_use() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_with_base(tmp.path());
    let recipe = repo("tests/recipes/slow.yaml");
    let undisturbed = build_ok(&recipe, &cache, &tmp.path().join("first"));
    let (secret, public) = common::signing_key_pair(tmp.path(), "ci");
    let remote = tmp.path().join("remote");
    let pushing = |out: &str| {
        let mut cmd = build_command(&recipe, &cache, &tmp.path().join(out));
        cmd.arg("--remote")
            .arg(&remote)
            .arg("--signing-key")
            .arg(&secret);
        cmd
    };

    // The base (~7,000 blobs) is pushed while `slow` runs; kill the build then.
    forget_step(&recipe, &cache, 1);
    let mut cmd = pushing("killed");
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    // Drain the progress output so the build never blocks on it.
    std::thread::spawn(move || BufReader::new(stderr).lines().for_each(drop));
    // Kill as soon as the first blob lands in the remote.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_dir(remote.join("blobs")).is_ok_and(|mut d| d.next().is_some()) {
        assert!(Instant::now() < deadline, "nothing was pushed");
        std::thread::sleep(Duration::from_millis(2));
    }
    kill(&mut child, nix::sys::signal::SIGKILL);
    assert_nothing_left(&cache, "SIGKILL mid-push");
    assert_fsck_clean(&cache, "SIGKILL mid-push");
    // The base's push had begun and not ended: its entry is not in the remote.
    let base_key = undisturbed["steps"][0]["key"].as_str().unwrap().to_string();
    assert!(
        !remote
            .join("actions")
            .join(&base_key[..2])
            .join(format!("{base_key}.json"))
            .exists(),
        "the push had finished before the kill"
    );

    // A second machine reading the half-pushed remote: whatever it pulls is
    // whole, the rest it builds, and the image is the undisturbed one.
    let pull = |name: &str| {
        let mut cmd = build_command(
            &recipe,
            &tmp.path().join(name),
            &tmp.path().join(format!("{name}-out")),
        );
        cmd.arg("--remote")
            .arg(&remote)
            .arg("--trusted-key")
            .arg(&public)
            .arg("--no-push");
        let ran = common::run(cmd);
        ran.expect_success();
        ran.json()
    };
    let second = pull("second");
    assert_eq!(second["image_blake3"], undisturbed["image_blake3"]);

    // The next pushing build completes the remote: a third machine pulls all.
    common::run(pushing("again")).expect_success();
    let third = pull("third");
    assert_eq!(third["image_blake3"], undisturbed["image_blake3"]);
    assert_eq!(third["pulled"], 2, "the remote is not complete");
}
