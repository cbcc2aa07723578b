//! The lock file end to end, as root: a recipe whose `apt` step installs
//! packages from a mirror served on loopback (python3's http.server over a
//! directory of `.deb`s built here with dpkg-deb), and the mirror moving on
//! under it: version 1.0 of `kiln-demo` replaced by 2.0.
//!
//! - the first build writes the lock (every package of both steps, pinned);
//! - after the archive moved on, a `--locked` build on a machine whose cache
//!   holds the pinned `.deb`s (but not the step's layer) gives the same image;
//! - a build without `--locked` keeps the pinned image, and `kiln lock
//!   --update demo` shows the move as a lock change, which the next build
//!   follows, `kiln plan --explain` naming the moved pin;
//! - `--locked` refuses a missing lock and an edited step; a pin neither the
//!   archive nor the cache has fails with what to run.
// Needs root (builds run in mount namespaces): tests/run turns this on.
#![cfg(feature = "root-tests")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{build_command, image_cat, kiln, repo, run, step, Ran};
use sha2::Digest as _;

/// One package for the test mirror.
struct Package {
    name: &'static str,
    version: &'static str,
    depends: Option<&'static str>,
}

/// Builds `package` with dpkg-deb into `mirror`; its `Packages` stanza.
fn build_deb(mirror: &Path, package: &Package) -> String {
    let root = tempfile::tempdir().unwrap();
    let share = root.path().join("usr/share").join(package.name);
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("version"), format!("{}\n", package.version)).unwrap();
    std::fs::create_dir(root.path().join("DEBIAN")).unwrap();
    let mut control = format!(
        "Package: {}\nVersion: {}\nArchitecture: all\nMaintainer: kiln tests <tests@kiln.invalid>\n\
         Priority: optional\nSection: misc\n",
        package.name, package.version
    );
    if let Some(dep) = package.depends {
        control.push_str(&format!("Depends: {dep}\n"));
    }
    control.push_str("Description: a package for kiln's lock file tests\n");
    std::fs::write(root.path().join("DEBIAN/control"), &control).unwrap();
    let file = format!("{}_{}_all.deb", package.name, package.version);
    let mut cmd = Command::new("dpkg-deb");
    cmd.args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(root.path())
        .arg(mirror.join(&file))
        .env("SOURCE_DATE_EPOCH", "1700000000");
    run(cmd).expect_success();
    let bytes = std::fs::read(mirror.join(&file)).unwrap();
    format!(
        "{control}Filename: ./{file}\nSize: {}\nSHA256: {}\n\n",
        bytes.len(),
        hex::encode(sha2::Sha256::digest(&bytes))
    )
}

/// Makes `mirror` a flat apt repository of exactly `packages`.
fn publish(mirror: &Path, packages: &[Package]) {
    for entry in std::fs::read_dir(mirror).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let index: String = packages.iter().map(|p| build_deb(mirror, p)).collect();
    std::fs::write(mirror.join("Packages"), index).unwrap();
}

/// python3's http.server serving `dir` on a free loopback port, stopped on drop.
struct Mirror {
    child: Child,
    port: u16,
}

impl Mirror {
    fn serve(dir: &Path) -> Mirror {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Mirror { child, port };
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the test mirror did not start on port {port}");
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn demo(version: &'static str) -> [Package; 2] {
    [
        Package {
            name: "kiln-demo",
            version,
            depends: Some("kiln-demo-lib (>= 1.0)"),
        },
        Package {
            name: "kiln-demo-lib",
            version: "1.0",
            depends: None,
        },
    ]
}

/// The recipe: the tests' usual trixie base, then `packages` from the mirror.
fn write_recipe(dir: &Path, port: u16, packages: &str) -> PathBuf {
    write_recipe_over(dir, port, packages, "base", "")
}

/// The recipe with `demo` over the step `below`, and `extra` steps.
fn write_recipe_over(dir: &Path, port: u16, packages: &str, below: &str, extra: &str) -> PathBuf {
    let recipe = dir.join("locked.yaml");
    std::fs::write(
        &recipe,
        format!(
            "name: locked\noutput: {{size: 512MiB}}\nsteps:\n  base:\n    debootstrap:\n      suite: trixie\n  \
             demo:\n    needs: [{below}]\n    apt:\n      \
             sources: [\"deb [trusted=yes] http://127.0.0.1:{port}/ ./\"]\n      packages: [{packages}]\n{extra}"
        ),
    )
    .unwrap();
    recipe
}

fn build(recipe: &Path, cache: &Path, out: &Path, extra: &[&str]) -> Ran {
    let mut cmd = build_command(recipe, cache, out);
    cmd.args(extra);
    run(cmd)
}

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Removes the action entry of `key` from `cache` (the step's layer is then
/// no longer a hit there).
fn forget_step(cache: &Path, key: &str) {
    let path = cache
        .join("actions")
        .join(&key[..2])
        .join(format!("{key}.json"));
    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn copy_cache(from: &Path, to: &Path) {
    let mut cmd = Command::new("cp");
    cmd.arg("-a").arg(from).arg(to);
    run(cmd).expect_success();
}

#[test]
fn a_lock_keeps_the_image_while_the_archive_moves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mirror_dir = dir.join("mirror");
    std::fs::create_dir(&mirror_dir).unwrap();
    publish(&mirror_dir, &demo("1.0"));
    let mirror = Mirror::serve(&mirror_dir);
    let recipe = write_recipe(dir, mirror.port, "kiln-demo");
    let lock_file = dir.join("locked.lock");
    // The base comes from the cache tests/build.rs shares, when it has it.
    let cache = dir.join("cache");
    let shared = repo("target/kiln-test-cache");
    if shared.join("debs").is_dir() {
        std::fs::create_dir(&cache).unwrap();
        for sub in ["blobs", "layers", "actions", "debs"] {
            copy_cache(&shared.join(sub), &cache.join(sub));
        }
    }

    // --locked needs a lock.
    let refused = build(&recipe, &cache, &dir.join("none"), &["--locked"]);
    assert!(!refused.success(), "{refused}");
    assert!(
        refused.stderr().contains("locked.lock does not exist")
            && refused.stderr().contains("kiln lock"),
        "{refused}"
    );

    // 1. The first build pins what it installed, and pushes the pinned
    // .debs to a shared cache as the step's package set.
    let remote = dir.join("remote");
    let (secret, public) = common::signing_key_pair(dir, "team");
    let push = [
        "--remote".to_string(),
        remote.display().to_string(),
        "--signing-key".into(),
        secret.display().to_string(),
    ];
    let push: Vec<&str> = push.iter().map(String::as_str).collect();
    let first = build(&recipe, &cache, &dir.join("one"), &push);
    let report = first.json();
    let changes = report["lock_changes"].to_string();
    assert!(changes.contains("demo: pinned 2 packages"), "{first}");
    // ... and says so as it writes the lock.
    assert!(
        first.stderr().contains("lock: demo: pinned 2 packages")
            && first
                .stderr()
                .contains(&format!("lock: wrote {}", lock_file.display())),
        "{first}"
    );
    let lock_v1 = std::fs::read_to_string(&lock_file).unwrap();
    let demo_line = lock_v1
        .lines()
        .find(|l| l.starts_with("demo deb kiln-demo "))
        .unwrap_or_else(|| panic!("no kiln-demo pin in\n{lock_v1}"));
    let sha = hex::encode(sha2::Sha256::digest(
        std::fs::read(cache.join("debs/kiln-demo_1.0_all.deb")).unwrap(),
    ));
    assert_eq!(
        demo_line,
        format!("demo deb kiln-demo 1.0 all sha256:{sha}")
    );
    assert!(
        lock_v1.lines().any(|l| l.starts_with("base deb libc6 ")),
        "the base's packages are pinned too:\n{lock_v1}"
    );
    let image_v1 = dir.join("one/rootfs.ext4");
    assert_eq!(
        image_cat(&image_v1, "/usr/share/kiln-demo/version"),
        "1.0\n"
    );
    let sha_v1 = sha256_file(&image_v1);
    let demo_key = step(&report, "demo")["key"].as_str().unwrap().to_string();

    // Nothing to do once locked: plan and a second build find every step.
    let again = build(&recipe, &cache, &dir.join("one"), &[]).json();
    assert_eq!(again["built"], 0, "{again}");
    assert!(again.get("lock_changes").is_none(), "{again}");

    // 2. The archive moves on: 1.0 is gone, 2.0 is there.
    publish(&mirror_dir, &demo("2.0"));

    // A machine whose cache has the pinned .debs but not the demo layer.
    let other = dir.join("other");
    copy_cache(&cache, &other);
    forget_step(&other, &demo_key);
    let locked = build(&recipe, &other, &dir.join("two"), &["--locked"]);
    let report = locked.json();
    assert_eq!(step(&report, "demo")["outcome"], "built", "{locked}");
    assert!(
        locked
            .stderr()
            .contains("offering the package cache's copies")
            || std::fs::read_to_string(other.join("logs").join(format!("{demo_key}.log")))
                .unwrap_or_default()
                .contains("offering the package cache's copies"),
        "the run took the pinned .debs from the cache: {locked}"
    );
    assert_eq!(
        sha256_file(&dir.join("two/rootfs.ext4")),
        sha_v1,
        "the locked build gives the same image after the archive moved on"
    );
    assert_eq!(std::fs::read_to_string(&lock_file).unwrap(), lock_v1);

    // Without --locked the pinned image stays too: not a stale layer, a pin.
    let unlocked = build(&recipe, &cache, &dir.join("three"), &[]).json();
    assert_eq!(unlocked["built"], 0, "{unlocked}");
    assert_eq!(sha256_file(&dir.join("three/rootfs.ext4")), sha_v1);

    // 3. `kiln lock --update demo` shows the move as a lock change.
    let mut update = kiln();
    update
        .arg("lock")
        .arg(&recipe)
        .args(["--cache"])
        .arg(&cache)
        .args(["--json", "--update", "demo"]);
    let updated = run(update);
    let changes = updated.json()["changes"].to_string();
    assert!(changes.contains("demo: kiln-demo 1.0 -> 2.0"), "{updated}");
    assert!(!changes.contains("base"), "only demo moved: {updated}");
    let lock_v2 = std::fs::read_to_string(&lock_file).unwrap();
    let moved: Vec<&str> = lock_v2
        .lines()
        .filter(|l| !lock_v1.lines().any(|o| o == *l))
        .collect();
    assert_eq!(moved.len(), 1, "one line moved in the lock:\n{lock_v2}");
    assert!(moved[0].starts_with("demo deb kiln-demo 2.0 all sha256:"));

    // `kiln lock --update` with no step names resolves every step again.
    let mut update_all = kiln();
    update_all
        .arg("lock")
        .arg(&recipe)
        .args(["--cache"])
        .arg(&cache)
        .args(["--json", "--update"]);
    let all = run(update_all);
    let report = all.json();
    for id in ["base", "demo"] {
        assert_eq!(step(&report, id)["outcome"], "built", "{id}: {all}");
    }
    assert!(
        !report["changes"].to_string().contains("demo"),
        "the archive did not move again: {all}"
    );
    let lock_v2 = std::fs::read_to_string(&lock_file).unwrap();
    assert!(
        lock_v2
            .lines()
            .any(|l| l.starts_with("demo deb kiln-demo 2.0 all sha256:")),
        "{lock_v2}"
    );

    // On the machine that still has the 1.0 layer, the plan names the pin.
    let mut plan = kiln();
    plan.arg("plan")
        .arg(&recipe)
        .arg("--cache")
        .arg(&other)
        .arg("--explain");
    let explained = run(plan);
    let text = explained.expect_success();
    assert!(
        text.contains("lock: + kiln-demo=2.0; - kiln-demo=1.0"),
        "{explained}"
    );

    let next = build(&recipe, &cache, &dir.join("four"), &[]).json();
    assert_eq!(next["built"], 0, "kiln lock already built it: {next}");
    assert_eq!(
        image_cat(
            &dir.join("four/rootfs.ext4"),
            "/usr/share/kiln-demo/version"
        ),
        "2.0\n"
    );

    // 4. --locked refuses a step edited since the lock was written.
    let edited = write_recipe(dir, mirror.port, "kiln-demo, kiln-demo-lib");
    let refused = build(&edited, &cache, &dir.join("five"), &["--locked"]);
    assert!(!refused.success(), "{refused}");
    assert!(
        refused
            .stderr()
            .contains("step `demo`: its entries were resolved for other fields of the step"),
        "{refused}"
    );
    write_recipe(dir, mirror.port, "kiln-demo");

    // 5. A pin neither the archive nor the cache has: a clear failure.
    std::fs::write(&lock_file, &lock_v1).unwrap();
    let bare = dir.join("bare");
    copy_cache(&cache, &bare);
    for deb in std::fs::read_dir(bare.join("debs")).unwrap() {
        std::fs::remove_file(deb.unwrap().path()).unwrap();
    }
    let v1_key = demo_key;
    if bare
        .join("actions")
        .join(&v1_key[..2])
        .join(format!("{v1_key}.json"))
        .exists()
    {
        forget_step(&bare, &v1_key);
    }
    let failed = build(&recipe, &bare, &dir.join("six"), &[]);
    assert!(!failed.success(), "{failed}");
    assert!(
        failed.stderr().contains("kiln lock --update demo"),
        "{failed}"
    );
    assert_eq!(std::fs::read_to_string(&lock_file).unwrap(), lock_v1);

    // 6. The same, with a shared cache that has the package set: a machine
    // with no .debs must run `demo` (a step below it is new), and takes the
    // pinned .debs from the remote although the archive dropped them.
    write_recipe_over(
        dir,
        mirror.port,
        "kiln-demo",
        "motd",
        "  motd:\n    needs: [base]\n    file: {path: /etc/motd, content: \"locked\\n\"}\n",
    );
    // (The failed build above downloaded what the archive has now.)
    for deb in std::fs::read_dir(bare.join("debs")).unwrap() {
        std::fs::remove_file(deb.unwrap().path()).unwrap();
    }
    let trust = [
        "--remote".to_string(),
        remote.display().to_string(),
        "--trusted-key".into(),
        public.display().to_string(),
        "--locked".into(),
    ];
    let trust: Vec<&str> = trust.iter().map(String::as_str).collect();
    let shared_debs = build(&recipe, &bare, &dir.join("seven"), &trust);
    let report = shared_debs.json();
    assert_eq!(step(&report, "demo")["outcome"], "built", "{shared_debs}");
    assert!(
        shared_debs
            .stderr()
            .contains("took 2 pinned packages from a remote's package set"),
        "{shared_debs}"
    );
    let image = dir.join("seven/rootfs.ext4");
    assert_eq!(image_cat(&image, "/usr/share/kiln-demo/version"), "1.0\n");
    assert_eq!(image_cat(&image, "/etc/motd"), "locked\n");
}

/// `kiln lock RECIPE --cache CACHE --json`: its report.
fn lock_steps(recipe: &Path, cache: &Path) -> (Ran, serde_json::Value) {
    let mut cmd = kiln();
    cmd.arg("lock")
        .arg(recipe)
        .arg("--cache")
        .arg(cache)
        .arg("--json");
    let ran = run(cmd);
    let report = ran.json();
    (ran, report)
}

#[test]
fn a_pinned_base_bootstraps_from_the_package_cache_into_the_same_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let recipe = dir.join("base.yaml");
    std::fs::write(
        &recipe,
        "name: base\nsteps:\n  base:\n    debootstrap: {suite: trixie, packages: [jq]}\n",
    )
    .unwrap();
    // From the archive: pins, .debs and the archive's index for them.
    let cache = dir.join("cache");
    let (ran, report) = lock_steps(&recipe, &cache);
    let first = step(&report, "base").clone();
    assert_eq!(first["outcome"], "built", "{ran}");
    let lock = std::fs::read_to_string(dir.join("base.lock")).unwrap();
    assert!(lock.contains("\nbase deb jq "), "{lock}");

    // A cache with the .debs but not the layer: bootstrapped from them alone.
    let other = dir.join("other");
    copy_cache(&cache, &other);
    let key = first["key"].as_str().unwrap();
    forget_step(&other, key);
    let (ran, report) = lock_steps(&recipe, &other);
    let again = step(&report, "base");
    assert_eq!(again["outcome"], "built", "{ran}");
    assert_eq!(again["key"], first["key"], "{ran}");
    let log = std::fs::read_to_string(other.join("logs").join(format!("{key}.log"))).unwrap();
    assert!(
        log.contains("bootstrapping the pinned packages from the package cache"),
        "{log}"
    );
    assert_eq!(
        again["layer"], first["layer"],
        "the same layer as from the archive, byte for byte: {ran}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("base.lock")).unwrap(),
        lock
    );
}
