//! Shared caches through a directory remote: a second machine (an empty
//! cache) builds with no step executed; tampered, untrusted and unreachable
//! remotes fall back to local builds with a warning; concurrent pushes agree.

mod common;

use std::path::Path;

use common::sharing::{build, file_recipe, files_below, outcomes, pull_build, push_build};
use common::{kiln, repo, run, same_bytes, serial, signing_key_pair};

#[test]
#[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
fn a_second_machine_pulls_every_step_and_gets_the_same_image() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let shared = tmp.path().join("shared");
    // Machine A: the real minimal recipe (debootstrap, apt, file, run), pushed while it builds.
    let a = push_build(
        &repo("examples/minimal.yaml"),
        &repo("target/kiln-test-cache"),
        &tmp.path().join("a"),
        shared.as_os_str(),
        &secret,
    );
    a.expect_success();
    // `cache push` is idempotent and reports what it pushed.
    let mut push = kiln();
    push.args(["cache", "push"])
        .arg(repo("examples/minimal.yaml"))
        .arg("--cache")
        .arg(repo("target/kiln-test-cache"));
    push.arg("--remote")
        .arg(&shared)
        .arg("--signing-key")
        .arg(&secret);
    let pushed = run(push);
    pushed.expect_success();
    assert!(pushed.stderr().contains("pushed 4 of 4"), "{pushed}");
    // Machine B: an empty cache, the same remote, trusting A's key.
    let b = pull_build(
        &repo("examples/minimal.yaml"),
        &tmp.path().join("b-cache"),
        &tmp.path().join("b"),
        shared.as_os_str(),
        &public,
    );
    assert_eq!(outcomes(&b), ["pulled"; 4], "{b}");
    assert_eq!(b.json()["built"], 0);
    assert!(same_bytes(
        &tmp.path().join("a/minimal-rootfs.ext4"),
        &tmp.path().join("b/minimal-rootfs.ext4")
    ));
}

#[test]
#[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
fn tampered_untrusted_and_unreachable_remotes_mean_local_builds() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let (other, _) = signing_key_pair(tmp.path(), "stranger");
    let recipe = file_recipe(tmp.path(), "tamper-test");
    let shared = tmp.path().join("shared");
    push_build(
        &recipe,
        &tmp.path().join("a"),
        &tmp.path().join("a-out"),
        shared.as_os_str(),
        &secret,
    )
    .expect_success();
    let reference = tmp.path().join("a-out/rootfs.ext4");
    let trust: [&std::ffi::OsStr; 4] = [
        "--trusted-key".as_ref(),
        public.as_os_str(),
        "--no-push".as_ref(),
        "--remote".as_ref(),
    ];

    // 1. Corrupt every blob in the remote's storage.
    let tampered = tmp.path().join("tampered");
    let mut cp = std::process::Command::new("cp");
    cp.arg("-r").arg(&shared).arg(&tampered);
    run(cp).expect_success();
    for blob in files_below(&tampered.join("blobs")) {
        std::fs::write(&blob, b"not what it claims").unwrap();
    }
    let ran = build(
        &recipe,
        &tmp.path().join("c1"),
        &tmp.path().join("o1"),
        &[trust[0], trust[1], trust[2], trust[3], tampered.as_os_str()],
    );
    assert!(
        ran.stderr()
            .contains("does not match its digest (tampered)"),
        "{ran}"
    );
    assert_eq!(outcomes(&ran), ["built"; 3], "{ran}");
    assert!(
        same_bytes(&reference, &tmp.path().join("o1/rootfs.ext4")),
        "a wrong image"
    );

    // 2. Entries signed by a key this build does not trust.
    let strangers = tmp.path().join("strangers");
    push_build(
        &recipe,
        &tmp.path().join("s"),
        &tmp.path().join("s-out"),
        strangers.as_os_str(),
        &other,
    )
    .expect_success();
    let ran = build(
        &recipe,
        &tmp.path().join("c2"),
        &tmp.path().join("o2"),
        &[
            trust[0],
            trust[1],
            trust[2],
            trust[3],
            strangers.as_os_str(),
        ],
    );
    assert!(
        ran.stderr()
            .contains("signed by a key this build does not trust"),
        "{ran}"
    );
    assert_eq!(outcomes(&ran), ["built"; 3], "{ran}");

    // 3. A remote that fails (a dead mount: the path cannot be read at all).
    std::fs::write(tmp.path().join("dead"), b"").unwrap();
    let gone = tmp.path().join("dead/share");
    let ran = build(
        &recipe,
        &tmp.path().join("c3"),
        &tmp.path().join("o3"),
        &[trust[0], trust[1], trust[2], trust[3], gone.as_os_str()],
    );
    assert!(
        ran.stderr().contains("failed (") && ran.stderr().contains("building without it"),
        "{ran}"
    );
    assert_eq!(
        ran.stderr().matches("building without it").count(),
        1,
        "warns once: {ran}"
    );
    assert_eq!(outcomes(&ran), ["built"; 3], "{ran}");

    // And the intact remote is used.
    let ran = build(
        &recipe,
        &tmp.path().join("c4"),
        &tmp.path().join("o4"),
        &[trust[0], trust[1], trust[2], trust[3], shared.as_os_str()],
    );
    assert_eq!(outcomes(&ran), ["pulled"; 3], "{ran}");
}

#[test]
#[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
fn concurrent_pushes_leave_a_consistent_remote() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let recipe = file_recipe(tmp.path(), "concurrent");
    let shared = tmp.path().join("shared");
    let spawn = |name: &str| {
        let mut cmd = kiln();
        cmd.arg("build")
            .arg(&recipe)
            .arg("--cache")
            .arg(tmp.path().join(name))
            .arg("-o")
            .arg(tmp.path().join(format!("{name}-out")));
        cmd.arg("--remote")
            .arg(&shared)
            .arg("--signing-key")
            .arg(&secret);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    let (x, y) = (spawn("x"), spawn("y"));
    for child in [x, y] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        files_below(&shared.join("tmp")).is_empty(),
        "no half-written objects left"
    );
    let ran = pull_build(
        &recipe,
        &tmp.path().join("z"),
        &tmp.path().join("z-out"),
        shared.as_os_str(),
        &public,
    );
    assert_eq!(outcomes(&ran), ["pulled"; 3], "{ran}");
    assert!(same_bytes(
        &tmp.path().join("x-out/rootfs.ext4"),
        &tmp.path().join("z-out/rootfs.ext4")
    ));
}

#[test]
#[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
fn cache_pull_stats_and_gc() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let recipe = file_recipe(tmp.path(), "gc-test");
    let shared = tmp.path().join("shared");
    let cache = tmp.path().join("cache");
    let remote_args = |cmd: &mut std::process::Command| {
        cmd.arg("--cache")
            .arg(&cache)
            .arg("--remote")
            .arg(&shared)
            .arg("--trusted-key")
            .arg(&public);
    };
    push_build(
        &recipe,
        &tmp.path().join("a"),
        &tmp.path().join("a-out"),
        shared.as_os_str(),
        &secret,
    )
    .expect_success();

    let mut pull = kiln();
    pull.args(["cache", "pull"]).arg(&recipe);
    remote_args(&mut pull);
    let ran = run(pull);
    assert!(
        ran.stderr()
            .contains("3 pulled, 0 already here, 0 not available"),
        "{ran}"
    );

    let ran = build(
        &recipe,
        &cache,
        &tmp.path().join("b-out"),
        &["--no-push".as_ref()],
    );
    assert_eq!(outcomes(&ran), ["cached"; 3], "{ran}");
    let stats = |cache: &Path| {
        let mut cmd = kiln();
        cmd.args(["cache", "stats", "--json", "--cache"]).arg(cache);
        run(cmd).json()
    };
    let s = stats(&cache);
    assert_eq!(s["store"]["actions"]["count"], 3, "{s}");
    assert_eq!(s["last_build"]["cached"], 3, "{s}");

    let gc = |extra: &[&std::ffi::OsStr]| {
        let mut cmd = kiln();
        cmd.args(["cache", "gc", "--cache"]).arg(&cache).args(extra);
        run(cmd)
    };
    gc(&["--keep".as_ref(), recipe.as_os_str()]).expect_success();
    assert_eq!(
        stats(&cache)["store"]["actions"]["count"],
        3,
        "kept by --keep"
    );
    gc(&["--max-age-days".as_ref(), "1".as_ref()]).expect_success();
    assert_eq!(stats(&cache)["store"]["actions"]["count"], 3, "used today");
    let ran = gc(&[]);
    assert!(
        ran.stderr()
            .contains("removed 3 action entries, 3 layers, 3 blobs"),
        "{ran}"
    );
    let s = stats(&cache);
    assert_eq!(
        (
            s["store"]["actions"]["count"].as_u64(),
            s["store"]["blobs"]["count"].as_u64()
        ),
        (Some(0), Some(0)),
        "{s}"
    );
}

#[test]
#[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
fn a_big_blob_streams_through_a_directory_without_filling_memory() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let shared = tmp.path().join("shared");
    common::big_blob_round_trip(tmp.path(), shared.to_str().unwrap(), &secret, &public);
}

#[test]
fn the_directory_and_memory_remotes_keep_the_remote_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    common::contract::check(
        &kiln::remote::DirRemote::new(&shared),
        &tmp.path().join("dir"),
    );
    common::contract::check(&kiln::remote::MemRemote::new(), &tmp.path().join("mem"));
}
