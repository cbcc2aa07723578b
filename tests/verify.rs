//! `kiln verify` on a real agent-ready image (Debian trixie): passes as a
//! non-root user on a read-only file, passes `--exec` as root, and fails —
//! naming the check — on copies broken with `debugfs -w`. What the recipe's
//! own steps wrote is pinned by a listing snapshot.
// Needs root (builds run in mount namespaces): tests/run turns this on.
#![cfg(feature = "root-tests")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{build_agent_image, image_cat, image_listing, kiln_run, repo, run, serial, Ran};

/// Builds recipes/agent-ready-debian.yaml into `out` (shared cache with tests/agent_ready.rs).
fn built_image(out: &Path) -> PathBuf {
    build_agent_image(out);
    out.join("agent-rootfs.ext4")
}

fn verify(image: &Path, extra: &[&str]) -> Ran {
    let mut args: Vec<std::ffi::OsString> = vec![
        "verify".into(),
        image.into(),
        "--recipe".into(),
        repo("recipes/agent-ready-debian.yaml").into(),
    ];
    args.extend(extra.iter().map(Into::into));
    kiln_run(args)
}

/// A copy of `image` changed by `debugfs -w` requests.
fn broken_copy(image: &Path, dir: &Path, name: &str, requests: &[&str]) -> PathBuf {
    let copy = dir.join(name);
    let mut cp = Command::new("cp");
    cp.arg("--sparse=always").arg(image).arg(&copy);
    run(cp).expect_success();
    for request in requests {
        let mut cmd = Command::new("debugfs");
        cmd.args(["-w", "-R", request]).arg(&copy);
        run(cmd).expect_success();
    }
    copy
}

#[test]
fn verify_passes_unprivileged_on_a_read_only_image() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let image = built_image(&tmp.path().join("out"));
    // A world-readable place the unprivileged user can reach: the binary,
    // the recipes it reads, and a read-only image.
    let public = tmp.path().join("public");
    std::fs::create_dir(&public).unwrap();
    for dir in [tmp.path(), public.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let kiln = public.join("kiln");
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &kiln).unwrap();
    let mut cp = Command::new("cp");
    cp.arg("-r")
        .arg(repo("recipes"))
        .arg(public.join("recipes"));
    run(cp).expect_success();
    let ro = public.join("ro.ext4");
    let mut cp = Command::new("cp");
    cp.arg("--sparse=always").arg(&image).arg(&ro);
    run(cp).expect_success();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&kiln)
        .arg("verify")
        .arg(&ro)
        .arg("--recipe")
        .arg(public.join("recipes/agent-ready-debian.yaml"))
        .arg("--json")
        .env("HOME", "/nonexistent");
    let ran = run(cmd);
    let report = ran.json();
    assert_eq!(report["failed"], 0, "{ran}");
    assert!(report["passed"].as_u64().unwrap() > 40, "{ran}");
    assert!(
        report["skipped"].as_u64().unwrap() >= 1,
        "command checks need --exec: {ran}"
    );
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for expected in [
        "SSH server (sshd) is installed",
        "Git is installed",
        "Node.js is installed",
        "OpenCode binary is installed",
        "Agent user exists in /etc/passwd",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    // What the recipe's file, user and systemd steps wrote, never a
    // package's files (their bytes follow the mirror).
    insta::assert_snapshot!(
        "agent_ready_kiln_written",
        image_listing(
            &image,
            &[
                "/etc/fstab",
                "/etc/hostname",
                "/etc/hosts",
                "/etc/initramfs-tools/modules",
                "/etc/locale.conf",
                "/etc/ssh/sshd_config.d/10-kiln.conf",
                "/etc/sudoers.d/agent",
                "/etc/systemd/network/80-kiln-vm.network",
                "/etc/systemd/system/kiln-authorized-keys.service",
                "/etc/systemd/system/kiln-ssh-hostkeys.service",
                "/etc/systemd/system/multi-user.target.wants/kiln-authorized-keys.service",
                "/etc/systemd/system/multi-user.target.wants/kiln-ssh-hostkeys.service",
                "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
                "/home/agent/.config",
                "/var/lib/systemd/linger/agent",
            ]
        )
    );
}

#[test]
fn verify_exec_runs_the_recipes_commands_in_a_chroot() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let image = built_image(&tmp.path().join("out"));
    let before = std::fs::read(&image).unwrap();
    let ran = verify(&image, &["--exec"]);
    let out = ran.expect_success();
    for line in [
        "[PASS] node --version is v22",
        "[PASS] sshd accepts its configuration",
        "[PASS] visudo accepts the sudoers files",
        "[PASS] systemd accepts opencode@.service",
    ] {
        assert!(out.contains(line), "missing `{line}`:\n{ran}");
    }
    assert!(out.contains(" 0 failed, 0 skipped"), "{ran}");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "verify --exec changed the image"
    );
}

#[test]
fn verify_names_what_is_missing_in_broken_images() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let image = built_image(&tmp.path().join("out"));

    // dpkg no longer knows git: drop its stanza from the status file.
    let status = tmp.path().join("status");
    let text = image_cat(&image, "/var/lib/dpkg/status");
    let kept: Vec<&str> = text
        .split("\n\n")
        .filter(|s| !s.starts_with("Package: git\n"))
        .collect();
    assert!(
        kept.len() < text.split("\n\n").count(),
        "git is in the status file"
    );
    std::fs::write(&status, kept.join("\n\n")).unwrap();
    let write = format!("write {} /var/lib/dpkg/status", status.display());

    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "no-git.ext4",
            vec!["rm /var/lib/dpkg/status", &write],
            "[FAIL] package git is installed",
        ),
        (
            "no-sudoers.ext4",
            vec!["rm /etc/sudoers.d/agent"],
            "[FAIL] /etc/sudoers.d/agent",
        ),
        (
            "no-unit.ext4",
            vec!["rm /home/agent/.config/systemd/user/opencode@.service"],
            "[FAIL] OpenCode service template is installed",
        ),
    ];
    for (name, requests, expected) in cases {
        let copy = broken_copy(&image, tmp.path(), name, &requests);
        let ran = verify(&copy, &[]);
        assert!(!ran.success(), "{name}: verify passed:\n{ran}");
        assert!(
            ran.stdout().contains(expected),
            "{name}: no `{expected}`:\n{ran}"
        );
        assert!(
            ran.stdout()
                .lines()
                .filter(|l| l.starts_with("[FAIL]"))
                .count()
                <= 3,
            "{name}: too many failures:\n{ran}"
        );
        std::fs::remove_file(&copy).unwrap();
    }
}
