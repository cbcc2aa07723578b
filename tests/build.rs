//! Real end-to-end builds, as root: debootstrap of Debian trixie from the
//! machine's configured mirrors, apt, run and file steps in the sandbox,
//! layers in a real cache, ext4 images checked with e2fsprogs.
//!
//! The tests share one cache, `target/kiln-test-cache`, so the base is
//! debootstrapped once (~30 s) and reused by every recipe whose first step has
//! the same parameters as examples/minimal.yaml's `base`. Tests that build
//! into it hold `common::serial()`, so they run one at a time; each writes its images into its
//! own temporary directory.
// Needs root (builds run in mount namespaces): tests/run turns this on.
#![cfg(feature = "root-tests")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use serde_json::Value;

use kiln::image::FileType;

use common::{
    assert_fsck_clean, build_command, debugfs, describe, image_cat, image_listing, image_stat,
    kiln_run, mounts_under, open_image, repo, same_bytes, serial, step, Ran,
};

/// The cache every test in this file shares.
fn shared_cache() -> PathBuf {
    repo("target/kiln-test-cache")
}

/// `kiln build RECIPE --cache CACHE -o OUT --json`
fn build(recipe: &Path, cache: &Path, out: &Path) -> Ran {
    common::run(build_command(recipe, cache, out))
}

/// A build that must succeed: its run (for messages) and its JSON report.
fn build_ok(recipe: &Path, cache: &Path, out: &Path) -> (Ran, Value) {
    let ran = build(recipe, cache, out);
    let report = ran.json();
    (ran, report)
}

/// Starts a build without waiting for it.
fn spawn_build(recipe: &Path, cache: &Path, out: &Path) -> (String, Child) {
    let mut cmd = build_command(recipe, cache, out);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let command = describe(&cmd);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    (command, child)
}

fn finish((command, child): (String, Child)) -> Ran {
    let output = child.wait_with_output().expect("waiting for kiln");
    Ran { command, output }
}

/// `kiln plan RECIPE --cache CACHE --json`, by step id.
fn plan(recipe: &Path, cache: &Path) -> (Ran, BTreeMap<String, Value>) {
    let ran = kiln_run([
        "plan".as_ref(),
        recipe.as_os_str(),
        "--cache".as_ref(),
        cache.as_os_str(),
        "--json".as_ref(),
    ]);
    let steps = ran
        .json()
        .as_array()
        .unwrap_or_else(|| panic!("plan is not a list:\n{ran}"))
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s.clone()))
        .collect();
    (ran, steps)
}

/// `(id, outcome)` of every step in a build report, in graph order.
fn outcomes(report: &Value) -> Vec<(String, String)> {
    report["steps"]
        .as_array()
        .expect("report has steps")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The image a report names, checked to be where `-o` said.
fn image_in(report: &Value, out: &Path, rootfs: &str) -> PathBuf {
    let expected = out.canonicalize().unwrap().join(rootfs);
    let image = PathBuf::from(report["image"].as_str().expect("report names the image"));
    assert_eq!(image, expected, "the image is not where -o put it");
    assert!(image.is_file(), "{} is missing", image.display());
    image
}

/// Number of files below `dir` (0 if it does not exist).
fn count_files(dir: &Path) -> usize {
    walk(dir).into_iter().filter(|p| p.is_file()).count()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

/// Runs `f` with this thread (and so the processes it starts) allowed on one
/// CPU only; restores the thread's affinity afterwards.
fn on_one_cpu<T>(f: impl FnOnce() -> T) -> T {
    let me = Pid::from_raw(0);
    let all = sched_getaffinity(me).expect("sched_getaffinity");
    let cpu = (0..CpuSet::count())
        .find(|&c| all.is_set(c).unwrap_or(false))
        .expect("this thread may run on some CPU");
    let mut one = CpuSet::new();
    one.set(cpu).unwrap();
    sched_setaffinity(me, &one).expect("sched_setaffinity");
    let result = f();
    sched_setaffinity(me, &all).expect("sched_setaffinity");
    result
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

#[test]
fn minimal_builds_twice_identically() {
    let _serial = serial();
    let cache = shared_cache();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = repo("examples/minimal.yaml");
    let (out1, out2) = (tmp.path().join("first"), tmp.path().join("second"));

    let (_, first) = build_ok(&recipe, &cache, &out1);
    // The second build starts with settings e2fsprogs would take from the
    // host: they must not change the image.
    let hostile = hostile_mkfs_settings(tmp.path());
    let mut second_build = build_command(&recipe, &cache, &out2);
    second_build.envs(hostile.iter().map(|(k, v)| (k, v)));
    let ran = common::run(second_build);
    let second = ran.json();
    assert_eq!(second["built"], 0, "the second build ran steps:\n{ran}");
    assert_eq!(second["cached"], 4, "{ran}");
    let all_cached: Vec<(String, String)> = ["base", "tools", "motd", "stamp"]
        .iter()
        .map(|id| (id.to_string(), "cached".to_string()))
        .collect();
    assert_eq!(outcomes(&second), all_cached, "{ran}");
    for id in ["base", "tools", "motd", "stamp"] {
        assert_eq!(step(&first, id)["key"], step(&second, id)["key"], "{id}");
        assert_eq!(
            step(&first, id)["layer"],
            step(&second, id)["layer"],
            "{id}"
        );
    }

    let image1 = image_in(&first, &out1, "minimal-rootfs.ext4");
    let image2 = image_in(&second, &out2, "minimal-rootfs.ext4");
    assert_eq!(first["image_blake3"], second["image_blake3"]);
    assert_eq!(first["image_bytes"], 512u64 << 20);
    assert!(same_bytes(&image1, &image2), "the two images differ");

    assert_fsck_clean(&image2);
    assert_eq!(image_cat(&image2, "/etc/motd"), "Built by kiln.\n");
    let stamp = image_cat(&image2, "/etc/kiln-stamp");
    assert!(stamp.contains("less"), "/etc/kiln-stamp is {stamp:?}");
}

/// The trees of every step in a build report, by step id.
fn trees_of(cache: &Path, report: &Value) -> BTreeMap<String, PathBuf> {
    report["steps"]
        .as_array()
        .expect("report has steps")
        .iter()
        .map(|s| {
            let layer = s["layer"].as_str().expect("steps name their layer");
            let tree = cache.join("trees").join(layer);
            (s["id"].as_str().unwrap().to_string(), tree)
        })
        .collect()
}

#[test]
fn images_from_the_trees_in_place_equal_images_from_a_copy() {
    let _serial = serial();
    let cache = shared_cache();
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo("tests/recipes/in-place.yaml")).unwrap();
    let recipe = tmp.path().join("in-place.yaml");
    std::fs::write(&recipe, text.replace("MARKER", &unique_suffix())).unwrap();
    let (out1, out2) = (tmp.path().join("in-place"), tmp.path().join("copy"));

    let (ran, first) = build_ok(&recipe, &cache, &out1);
    assert!(
        ran.stderr().contains("from the layers' trees in place"),
        "every step ran, so every tree is unpacked:\n{ran}"
    );
    // Without one layer's tree the image is written from a copy.
    let trees = trees_of(&cache, &first);
    std::fs::remove_dir_all(&trees["later"]).unwrap();
    let (ran, second) = build_ok(&recipe, &cache, &out2);
    assert!(ran.stderr().contains("from a copy"), "{ran}");
    assert_eq!(second["built"], 0, "{ran}");

    let (image1, image2) = (
        image_in(&first, &out1, "in-place.ext4"),
        image_in(&second, &out2, "in-place.ext4"),
    );
    assert!(same_bytes(&image1, &image2), "the two images differ");
    assert_fsck_clean(&image1);
    let passwd = image_cat(&image1, "/etc/passwd");
    assert!(
        passwd.contains("\nalice:") && passwd.contains("\nbob:"),
        "{passwd}"
    );
    assert_eq!(image_cat(&image1, "/srv/replaced"), "second\n");
    assert_eq!(image_cat(&image1, "/srv/replaced-link"), "first\n");
    assert_eq!(image_cat(&image1, "/srv/hidden/new"), "new\n");
    // (inode, link count) of a path.
    let links = |path: &str| {
        let stat = stat(&image1, path);
        let count = stat
            .split("Links: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next());
        (inode(&stat), count.unwrap_or_default().to_string())
    };
    let rewritten = links("/srv/rewritten");
    assert_eq!(
        rewritten,
        links("/srv/rewritten-link"),
        "one file, two names"
    );
    assert_eq!(rewritten.1, "2");
    assert_eq!(links("/srv/kept/file"), links("/srv/kept/link"));
    assert_eq!(links("/srv/replaced-link").1, "1");
    // 1 KiB blocks (a 256 MiB image): only the blocks with "data" and
    // "tail" in them take room, 2 KiB in 512-byte units.
    let zeros = stat(&image1, "/srv/zeros");
    assert!(zeros.contains("Size: 7176\n"), "{zeros}");
    assert!(zeros.contains("Blockcount: 4\n"), "{zeros}");
    assert!(
        image_cat(&image1, "/srv/zeros")
            == format!("{}data{}tail", "\0".repeat(3072), "\0".repeat(4096))
    );
    // The second build read the trees' records of which files hold zeros.
    for tree in trees.values().filter(|t| t.exists()) {
        let record = tree.with_extension("zeros");
        assert!(record.exists(), "no {}", record.display());
    }
    let listing = image_listing(&image1, &["/srv"]);
    assert!(!listing.contains("doomed"), "{listing}");
    assert!(listing.contains("/srv/hidden/new") && !listing.contains("/srv/hidden/old"));
}

/// Environment variables under which `mkfs.ext4` writes a different
/// filesystem on this host (checked here): a profile with 128-byte inodes,
/// 1 KiB blocks and no metadata checksums, and a 4 KiB sector size.
fn hostile_mkfs_settings(dir: &Path) -> Vec<(String, String)> {
    let profile = dir.join("hostile-mke2fs.conf");
    std::fs::write(
        &profile,
        "[defaults]\n\tblocksize = 1024\n\tinode_size = 128\n\n[fs_types]\n\text4 = {\n\t\tfeatures = has_journal,extent\n\t}\n",
    )
    .unwrap();
    let settings = vec![
        ("MKE2FS_CONFIG".to_string(), profile.display().to_string()),
        ("MKE2FS_DEVICE_SECTSIZE".to_string(), "4096".to_string()),
        ("SOURCE_DATE_EPOCH".to_string(), "1".to_string()),
    ];
    let probe = dir.join("probe.ext4");
    std::fs::File::create(&probe)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4"])
        .arg(&probe)
        .envs(settings.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let header = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&probe)
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&header.stdout);
    assert!(
        header
            .lines()
            .any(|l| l.starts_with("Inode size:") && l.ends_with(" 128")),
        "the hostile profile does not reach mkfs on this host:\n{header}"
    );
    settings
}

#[test]
fn unchanged_outputs_are_left_alone_until_touched_or_changed() {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    let _serial = serial();
    let cache = shared_cache();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = repo("examples/minimal.yaml");
    let out = tmp.path().join("out");
    let stamp = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec())
    };

    let (ran, first) = build_ok(&recipe, &cache, &out);
    assert_eq!(first["assembled"], true, "{ran}");
    let image = image_in(&first, &out, "minimal-rootfs.ext4");
    let written = stamp(&image);

    // Nothing changed: the image is not written again.
    let (ran, second) = build_ok(&recipe, &cache, &out);
    assert_eq!(second["built"], 0, "{ran}");
    assert_eq!(second["assembled"], false, "{ran}");
    assert!(ran.stderr().contains("outputs up to date"), "{ran}");
    assert_eq!(second["image_blake3"], first["image_blake3"], "{ran}");
    assert_eq!(stamp(&image), written, "the image was rewritten:\n{ran}");

    // The image changed in place (as a VM booted from it read-write would
    // change it): the next build writes it again, identical to the first.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    file.seek(SeekFrom::Start(1024)).unwrap();
    file.write_all(&[0u8; 4096]).unwrap();
    drop(file);
    let (ran, third) = build_ok(&recipe, &cache, &out);
    assert_eq!(third["assembled"], true, "{ran}");
    assert_eq!(third["image_blake3"], first["image_blake3"], "{ran}");
    assert_eq!(
        blake3::hash(&std::fs::read(&image).unwrap())
            .to_hex()
            .as_str(),
        first["image_blake3"].as_str().unwrap()
    );
    assert_fsck_clean(&image);

    // A changed step changes the layers: assembled again, with the change.
    let text = std::fs::read_to_string(&recipe).unwrap();
    let motd = format!("Up-to-date check, {}.", unique_suffix());
    let edited = text.replace(
        "content: \"Built by kiln.\\n\"",
        &format!("content: \"{motd}\\n\""),
    );
    assert_ne!(edited, text, "examples/minimal.yaml changed its motd line");
    let edited_recipe = tmp.path().join("minimal.yaml");
    std::fs::write(&edited_recipe, edited).unwrap();
    let (ran, fourth) = build_ok(&edited_recipe, &cache, &out);
    assert_eq!(fourth["assembled"], true, "{ran}");
    assert_eq!(image_cat(&image, "/etc/motd"), format!("{motd}\n"));
}

#[test]
fn editing_one_step_rebuilds_it_and_its_dependents() {
    let _serial = serial();
    let cache = shared_cache();
    let tmp = tempfile::tempdir().unwrap();
    let original = repo("examples/minimal.yaml");
    let text = std::fs::read_to_string(&original).unwrap();
    let motd = format!("Edited by the kiln tests, {}.", unique_suffix());
    let edited_text = text.replace(
        "content: \"Built by kiln.\\n\"",
        &format!("content: \"{motd}\\n\""),
    );
    assert_ne!(
        edited_text, text,
        "examples/minimal.yaml changed its motd line"
    );
    let edited = tmp.path().join("minimal.yaml");
    std::fs::write(&edited, edited_text).unwrap();

    let (_, before) = build_ok(&original, &cache, &tmp.path().join("original"));
    // The edited recipe keeps the original's lock, as an edit in a team's
    // repository does (without it, `tools` would resolve against the
    // archive of today, which may have moved on since the lock was written).
    std::fs::copy(
        original.with_extension("lock"),
        edited.with_extension("lock"),
    )
    .unwrap();

    let (ran, planned) = plan(&edited, &cache);
    let status = |id: &str| planned[id]["status"].as_str().unwrap().to_string();
    assert_eq!(status("base"), "cached", "{ran}");
    assert_eq!(status("tools"), "cached", "{ran}");
    assert_eq!(status("motd"), "build", "{ran}");
    assert_eq!(status("stamp"), "pending", "{ran}");
    assert_eq!(
        planned["stamp"]["waits_on"],
        serde_json::json!(["motd"]),
        "{ran}"
    );
    for id in ["base", "tools"] {
        assert_eq!(planned[id]["key"], step(&before, id)["key"], "{id}: {ran}");
        assert_eq!(
            planned[id]["layer"],
            step(&before, id)["layer"],
            "{id}: {ran}"
        );
    }
    assert_ne!(
        planned["motd"]["key"],
        step(&before, "motd")["key"],
        "{ran}"
    );

    let out = tmp.path().join("edited");
    let (ran, after) = build_ok(&edited, &cache, &out);
    let expected: Vec<(String, String)> = [
        ("base", "cached"),
        ("tools", "cached"),
        ("motd", "built"),
        ("stamp", "built"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(outcomes(&after), expected, "{ran}");
    assert_eq!(after["built"], 2, "{ran}");
    assert_eq!(step(&after, "motd")["key"], planned["motd"]["key"], "{ran}");

    let image = image_in(&after, &out, "minimal-rootfs.ext4");
    assert_eq!(image_cat(&image, "/etc/motd"), format!("{motd}\n"));
    assert!(image_cat(&image, "/etc/kiln-stamp").contains("less"));
    assert_fsck_clean(&image);
}

/// `debugfs -R "stat PATH"`, checked to have found the path: for the
/// inode number, link count and device number kiln::image does not read.
fn stat(image: &Path, path: &str) -> String {
    let text = debugfs(image, &format!("stat {path}"));
    assert!(text.contains("Inode: "), "stat {path}:\n{text}");
    text
}

/// The `Inode: N` of a debugfs stat.
fn inode(stat: &str) -> u64 {
    stat.split("Inode: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no inode number in:\n{stat}"))
}

#[test]
fn posix_metadata_survives_into_the_image() {
    let _serial = serial();
    let cache = shared_cache();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = repo("tests/recipes/posix.yaml");

    // Same base step as examples/minimal.yaml: one debootstrap for both.
    let (_, posix_plan) = plan(&recipe, &cache);
    let (_, minimal_plan) = plan(&repo("examples/minimal.yaml"), &cache);
    assert_eq!(posix_plan["base"]["key"], minimal_plan["base"]["key"]);

    let out = tmp.path().join("out");
    let (ran, report) = build_ok(&recipe, &cache, &out);
    let image = image_in(&report, &out, "posix.ext4");
    assert_fsck_clean(&image);
    let context = |what: &str, text: &str| format!("{what}:\n{text}\nbuild:\n{ran}");

    // A copy of the base's /bin/true: its bytes follow the mirror, so
    // only its metadata is pinned.
    let suid = image_stat(&image, "/usr/local/bin/suid");
    assert_eq!(
        suid.map(|s| (s.kind, s.mode, s.uid, s.gid)),
        Some((FileType::Regular, 0o4755, 0, 0)),
        "{}",
        context("setuid bit lost", "")
    );

    let caps = debugfs(&image, "ea_list /usr/local/bin/capped");
    // VFS_CAP_REVISION_2 | effective, permitted = 1 << CAP_NET_RAW (13).
    assert!(
        caps.contains("security.capability (20) = 01 00 00 02 00 20 00 00 "),
        "{}",
        context("capability xattr lost", &caps)
    );

    // Two hardlinked files, a symlink, a device, a fifo, a sticky empty dir.
    insta::assert_snapshot!("posix_opt", image_listing(&image, &["/opt"]));
    let (a, b) = (stat(&image, "/opt/a"), stat(&image, "/opt/b"));
    assert_eq!(inode(&a), inode(&b), "hardlinks split:\n{a}\n{b}");
    assert!(a.contains("Links: 2"), "{a}");
    let dev = stat(&image, "/opt/kilnnull");
    assert!(
        dev.contains("Device major/minor number: 01:03 "),
        "{}",
        context("character device", &dev)
    );

    // The whiteout from the `delete` step removes a file the base has.
    assert_eq!(
        image_stat(&image, "/etc/issue.net"),
        None,
        "{}",
        context("/etc/issue.net survived its deletion", "")
    );
    assert_eq!(
        image_stat(&image, "/etc/issue").map(|s| s.kind),
        Some(FileType::Regular)
    );
}

/// Puts the host's name and `vm.swappiness` back if a step changed them,
/// so a failing test does not leave the machine renamed.
struct HostState {
    hostname: String,
    swappiness: String,
}

impl HostState {
    fn read() -> HostState {
        let hostname = nix::unistd::gethostname().unwrap();
        HostState {
            hostname: hostname.to_string_lossy().into_owned(),
            swappiness: std::fs::read_to_string("/proc/sys/vm/swappiness").unwrap(),
        }
    }

    fn restore(&self) {
        nix::unistd::sethostname(&self.hostname).unwrap();
        std::fs::write("/proc/sys/vm/swappiness", &self.swappiness).unwrap();
    }
}

#[test]
fn steps_cannot_touch_the_host() {
    let _serial = serial();
    let cache = shared_cache();
    let tmp = tempfile::tempdir().unwrap();
    let before = HostState::read();
    let out = tmp.path().join("out");
    let (_, report) = build_ok(&repo("tests/recipes/escape.yaml"), &cache, &out);
    let after = HostState::read();
    before.restore();
    assert_eq!(after.hostname, before.hostname, "a step renamed the host");
    assert_eq!(
        after.swappiness, before.swappiness,
        "a step changed a host sysctl"
    );

    let probe = image_cat(&image_in(&report, &out, "escape.ext4"), "/probe.txt");
    let results: BTreeMap<&str, &str> = probe
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(what, result)| !what.contains('/') && !result.contains(' '))
        .collect();
    assert_eq!(results.get("hostname"), Some(&"kiln"), "{probe}");
    for what in ["sethostname", "sysctl", "proc1root", "device", "mount"] {
        assert_eq!(results.get(what), Some(&"refused"), "{what}:\n{probe}");
    }
}

/// overlayfs's mount options fit in one page, which absolute lower paths
/// filled at ~60 layers: the last of 200 chained steps has 199 lowers.
#[test]
fn a_200_step_recipe_builds() {
    let _serial = serial();
    let cache = shared_cache();
    let tmp = tempfile::tempdir().unwrap();
    let mut recipe = String::from(
        "name: many\noutput:\n  rootfs: many.ext4\n  size: 512MiB\nsteps:\n  base:\n    debootstrap:\n      suite: trixie\n",
    );
    let mut previous = "base".to_string();
    for i in 1..200 {
        let id = format!("f{i:03}");
        recipe.push_str(&format!(
            "  {id}:\n    needs: [{previous}]\n    file:\n      path: /opt/many/{i:03}\n      content: \"{i}\\n\"\n"
        ));
        previous = id;
    }
    let path = tmp.path().join("many.yaml");
    std::fs::write(&path, recipe).unwrap();
    let out = tmp.path().join("out");
    let (_, report) = build_ok(&path, &cache, &out);
    assert_eq!(outcomes(&report).len(), 200);
    let image = image_in(&report, &out, "many.ext4");
    assert_fsck_clean(&image);
    assert_eq!(image_cat(&image, "/opt/many/199"), "199\n");
    let files: Vec<String> = open_image(&image)
        .walk("/opt/many")
        .unwrap()
        .into_iter()
        .skip(1) // /opt/many itself
        .map(|e| e.path)
        .collect();
    assert_eq!(files.len(), 199, "{files:?}");
}

#[test]
fn failing_step_caches_nothing_and_leaves_no_mounts() {
    let _serial = serial();
    let cache = shared_cache();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = repo("tests/recipes/failing.yaml");

    // The base must be cached, so that the failing step is the only one to run.
    let (_, planned) = plan(&recipe, &cache);
    if planned["base"]["status"] != "cached" {
        build_ok(
            &repo("examples/minimal.yaml"),
            &cache,
            &tmp.path().join("minimal"),
        );
    }
    let (ran, planned) = plan(&recipe, &cache);
    assert_eq!(planned["base"]["status"], "cached", "{ran}");
    assert_eq!(planned["broken"]["status"], "build", "{ran}");

    let actions = cache.join("actions");
    let layers = cache.join("layers");
    let (actions_before, layers_before) = (count_files(&actions), count_files(&layers));
    let out = tmp.path().join("out");

    // The build's work directory must be gone by the time the process has
    // exited, however its threads are scheduled: the failure is repeated,
    // every other time with kiln confined to one CPU (as on a one-CPU VM),
    // where a cleanup that races the exit loses most often.
    const ATTEMPTS: usize = 8;
    for attempt in 1..=ATTEMPTS {
        let one_cpu = attempt % 2 == 0;
        let spawned = if one_cpu {
            on_one_cpu(|| spawn_build(&recipe, &cache, &out))
        } else {
            spawn_build(&recipe, &cache, &out)
        };
        let pid = spawned.1.id();
        let ran = finish(spawned);
        let stderr = ran.stderr();
        let at = format!(
            "attempt {attempt}/{ATTEMPTS}{}",
            if one_cpu { " (on one CPU)" } else { "" }
        );
        assert!(!ran.success(), "{at}: the build succeeded:\n{ran}");
        for needle in [
            "step `broken` failed",
            "exited with status 3",
            "--- last lines of its log ---",
            "kiln-test: giving up now",
        ] {
            assert!(
                stderr.contains(needle),
                "{at}: stderr lacks {needle:?}:\n{ran}"
            );
        }
        let log = stderr
            .split("--- full log: ")
            .nth(1)
            .and_then(|r| r.split(" ---").next())
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{at}: no log path in stderr:\n{ran}"));
        let log_text = std::fs::read_to_string(&log)
            .unwrap_or_else(|e| panic!("{at}: log {}: {e}\n{ran}", log.display()));
        assert!(log_text.contains("kiln-test: giving up now"), "{log_text}");

        assert_eq!(
            count_files(&actions),
            actions_before,
            "{at}: the action cache changed:\n{ran}"
        );
        assert_eq!(
            count_files(&layers),
            layers_before,
            "{at}: a layer was stored:\n{ran}"
        );
        for action in walk(&actions).into_iter().filter(|p| p.is_file()) {
            let text = std::fs::read_to_string(&action).unwrap();
            assert!(
                !text.contains("\"broken\""),
                "{at}: {} records the failed step",
                action.display()
            );
        }
        assert!(
            !out.join("failing.ext4").exists(),
            "{at}: an image was written"
        );

        let mut findmnt = Command::new("findmnt");
        findmnt.args(["-rn", "-o", "TARGET"]);
        let mounts = common::run(findmnt).expect_success();
        let cache_text = cache.display().to_string();
        let leaked: Vec<&str> = mounts
            .lines()
            .filter(|m| m.contains(&cache_text) || m.contains("kiln"))
            .collect();
        assert!(leaked.is_empty(), "{at}: mounts left behind: {leaked:?}");

        let tmp_entries: Vec<String> = std::fs::read_dir(cache.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let own: Vec<&String> = tmp_entries
            .iter()
            .filter(|n| n.starts_with(&format!("{pid}-")))
            .collect();
        assert!(
            own.is_empty(),
            "{at}: the failed build (pid {pid}) left {own:?} in {}/tmp \
             (all entries: {tmp_entries:?})\n{ran}",
            cache.display()
        );
    }
}

#[test]
fn unordered_steps_writing_one_path_conflict() {
    let _serial = serial();
    let cache = shared_cache();
    let tmp = tempfile::tempdir().unwrap();

    let out = tmp.path().join("unordered");
    let ran = build(&repo("tests/recipes/conflict.yaml"), &cache, &out);
    assert!(!ran.success(), "a conflicting recipe built:\n{ran}");
    let stderr = ran.stderr();
    for needle in [
        "error: steps `a` and `b` both change /etc/x differently",
        "neither needs the other",
        "add `needs: [a]` to `b`",
    ] {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}:\n{ran}");
    }
    assert!(!out.join("conflict.ext4").exists(), "an image was written");

    let out = tmp.path().join("ordered");
    let (ran, report) = build_ok(&repo("tests/recipes/conflict-ordered.yaml"), &cache, &out);
    let image = image_in(&report, &out, "conflict.ext4");
    assert_eq!(image_cat(&image, "/etc/x"), "b", "{ran}");
    assert_fsck_clean(&image);
}

#[test]
fn concurrent_builds_share_one_cache() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = repo("tests/recipes/concurrent.yaml");

    // A race shows in a few tries only: start the pair on many fresh caches,
    // every other time with both confined to one CPU (as on a one-CPU VM).
    const ROUNDS: usize = 20;
    let mut last = None;
    for round in 1..=ROUNDS {
        let dir = tmp.path().join(format!("round{round}"));
        let cache = dir.join("cache");
        let (out1, out2) = (dir.join("out1"), dir.join("out2"));
        let one_cpu = round % 2 == 0;
        let start = || {
            let first = spawn_build(&recipe, &cache, &out1);
            (first, spawn_build(&recipe, &cache, &out2))
        };
        let (first, second) = if one_cpu { on_one_cpu(start) } else { start() };
        let (first, second) = (finish(first), finish(second));
        let at = format!(
            "round {round}/{ROUNDS}{}",
            if one_cpu { " (on one CPU)" } else { "" }
        );
        assert!(
            first.success() && second.success(),
            "{at}: two builds on one fresh cache:\n\
             === first ===\n{first}\n=== second ===\n{second}"
        );
        let (r1, r2) = (first.json(), second.json());
        let image1 = image_in(&r1, &out1, "concurrent.ext4");
        let image2 = image_in(&r2, &out2, "concurrent.ext4");
        assert_eq!(r1["image_blake3"], r2["image_blake3"], "{at}");
        assert!(same_bytes(&image1, &image2), "{at}: images differ");
        last = Some((cache, image1));
    }

    let (cache, image) = last.unwrap();
    assert_fsck_clean(&image);
    assert_eq!(image_cat(&image, "/etc/one"), "one, replaced\n");
    assert_eq!(image_cat(&image, "/srv/three"), "3\n");
    let out3 = tmp.path().join("third");
    let (ran, third) = build_ok(&recipe, &cache, &out3);
    assert_eq!(third["built"], 0, "{ran}");
    assert!(outcomes(&third).iter().all(|(_, o)| o == "cached"), "{ran}");
    assert_eq!(third["cached"], 4, "{ran}");
    let image3 = image_in(&third, &out3, "concurrent.ext4");
    assert!(
        same_bytes(&image, &image3),
        "the cached build's image differs"
    );
}

/// `kiln cache fsck --cache CACHE [--repair]`
fn fsck_cache(cache: &Path, repair: bool) -> Ran {
    let mut args = vec![
        "cache".into(),
        "fsck".into(),
        "--cache".into(),
        cache.as_os_str().to_owned(),
    ];
    if repair {
        args.push("--repair".into());
    }
    kiln_run(args)
}

/// Flips the lowest bit of the byte at `at` in `path` (through a write, so
/// the file's mtime changes) and returns the mtime it had before.
fn flip_byte(path: &Path, at: usize) -> std::time::SystemTime {
    let before = std::fs::symlink_metadata(path).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 1;
    std::fs::write(path, bytes).unwrap();
    before
}

#[test]
fn one_flipped_byte_anywhere_in_the_cache_is_found_and_healed() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = repo("tests/recipes/concurrent.yaml");

    // Each case: build on a fresh cache, damage one thing, then `kiln cache
    // fsck` must name it, and the next build must succeed with the image an
    // undisturbed build gives (making anew what was damaged), after which
    // fsck finds the cache clean.
    let cases = [
        "blob, written",
        "blob, bit rot (mtime kept)",
        "layer manifest",
        "action entry",
        "tree file",
    ];
    for (n, case) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("case{n}"));
        let cache = dir.join("cache");
        let (_, first) = build_ok(&recipe, &cache, &dir.join("out0"));
        let ran = fsck_cache(&cache, false);
        assert!(ran.success(), "{case}: a fresh cache is not clean:\n{ran}");
        let three_layer = step(&first, "three")["layer"].as_str().unwrap().to_string();
        let three_key = step(&first, "three")["key"].as_str().unwrap().to_string();
        let one_layer = step(&first, "one")["layer"].as_str().unwrap().to_string();
        let sharded = |kind: &str, hex: &str, ext: &str| {
            cache.join(kind).join(&hex[..2]).join(format!("{hex}{ext}"))
        };

        let damaged = match *case {
            "blob, written" | "blob, bit rot (mtime kept)" => {
                // The blob of /srv/three ("3\n").
                let blob = walk(&cache.join("blobs"))
                    .into_iter()
                    .find(|p| p.is_file() && std::fs::read(p).unwrap() == b"3\n")
                    .expect("the blob of /srv/three");
                let mtime = flip_byte(&blob, 0);
                if case.contains("bit rot") {
                    let file = std::fs::File::open(&blob).unwrap();
                    file.set_modified(mtime).unwrap();
                    // Only a read finds bit rot. The image is written from
                    // the layers' trees while they are all unpacked; without
                    // `three`'s, the build reads its blob.
                    std::fs::remove_dir_all(cache.join("trees").join(&three_layer)).unwrap();
                }
                blob
            }
            "layer manifest" => {
                let path = sharded("layers", &three_layer, ".json");
                let len = std::fs::read(&path).unwrap().len();
                flip_byte(&path, len / 2);
                path
            }
            "action entry" => {
                let path = sharded("actions", &three_key, ".json");
                let text = std::fs::read_to_string(&path).unwrap();
                flip_byte(&path, text.find(&three_layer).unwrap());
                path
            }
            "tree file" => {
                let path = cache.join("trees").join(&one_layer).join("etc/one");
                flip_byte(&path, 0);
                // Make `three`, which is built on `one`'s tree, run again.
                std::fs::remove_file(sharded("actions", &three_key, ".json")).unwrap();
                path
            }
            _ => unreachable!(),
        };

        let ran = fsck_cache(&cache, false);
        assert!(!ran.success(), "{case}: fsck missed it:\n{ran}");
        let named = damaged.to_string_lossy().into_owned();
        let named_in_report = match *case {
            // The damaged action entry is gone; the tree case removed it.
            "tree file" => cache
                .join("trees")
                .join(&one_layer)
                .to_string_lossy()
                .into_owned(),
            _ => named.clone(),
        };
        assert!(
            ran.stderr().contains(&named_in_report),
            "{case}: fsck does not name {named_in_report}:\n{ran}"
        );

        let (ran, again) = build_ok(&recipe, &cache, &dir.join("out1"));
        assert_eq!(
            again["image_blake3"], first["image_blake3"],
            "{case}: the image differs from the undisturbed build's:\n{ran}"
        );
        match *case {
            "blob, bit rot (mtime kept)" => assert!(
                ran.stderr().contains("damaged blob was removed"),
                "{case}: no word of the damaged blob:\n{ran}"
            ),
            "tree file" => assert!(
                ran.stderr().contains("does not match its layer"),
                "{case}: the damaged tree was used without a word:\n{ran}"
            ),
            _ => assert_ne!(step(&again, "three")["outcome"], "cached", "{case}:\n{ran}"),
        }
        let ran = fsck_cache(&cache, false);
        assert!(
            ran.success(),
            "{case}: the cache is not clean after the build:\n{ran}"
        );
        assert_eq!(mounts_under(&dir), Vec::<String>::new(), "{case}");
    }

    // `--repair` removes what is damaged, and the cache then builds the same image.
    let dir = tmp.path().join("repair");
    let cache = dir.join("cache");
    let (_, first) = build_ok(&recipe, &cache, &dir.join("out0"));
    let blob = walk(&cache.join("blobs"))
        .into_iter()
        .find(|p| p.is_file() && std::fs::read(p).unwrap() == b"1\n")
        .expect("the blob of /etc/one");
    flip_byte(&blob, 0);
    let ran = fsck_cache(&cache, true);
    assert!(ran.success() && ran.stderr().contains("repaired"), "{ran}");
    assert!(!blob.exists(), "--repair left the damaged blob");
    let ran = fsck_cache(&cache, false);
    assert!(ran.success(), "not clean after --repair:\n{ran}");
    let (ran, again) = build_ok(&recipe, &cache, &dir.join("out1"));
    assert_eq!(again["image_blake3"], first["image_blake3"], "{ran}");
}

#[test]
fn plan_explain_and_build_say_why_a_step_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    let recipe = dir.join("why.yaml");
    let write_recipe = |motd: &str, mode: &str| {
        std::fs::write(
            &recipe,
            format!(
                "name: why\noutput: {{size: 32MiB}}\nsteps:\n  hosts:\n    file: {{path: /etc/hosts, source: hosts}}\n  \
                 motd:\n    needs: [hosts]\n    file: {{path: /etc/motd, content: \"{motd}\", mode: \"{mode}\"}}\n"
            ),
        )
        .unwrap();
    };
    write_recipe("hello", "0644");
    let cache = dir.join("cache");
    let (_, planned) = plan(&recipe, &cache);
    assert_eq!(
        planned["hosts"]["why"],
        serde_json::json!(["no earlier build of this step in this cache"])
    );
    build_ok(&recipe, &cache, &dir.join("out"));

    // Edit the file a step reads and a field of the step above it.
    std::fs::write(dir.join("hosts"), "127.0.0.1 localhost agent\n").unwrap();
    write_recipe("hello", "0600");
    let ran = kiln_run([
        "plan".as_ref(),
        recipe.as_os_str(),
        "--cache".as_ref(),
        cache.as_os_str(),
        "--explain".as_ref(),
    ]);
    let text = ran.expect_success();
    assert!(text.contains("why: file `hosts` changed"), "{ran}");
    assert!(text.contains("why: mode: 0644 -> 0600"), "{ran}");
    // ... and, on the line naming the step below, that step's own reason.
    assert!(
        text.contains(
            "why: step `hosts` below it runs first (this one is reused if `hosts` gives \
             its old layer back); `hosts`: file `hosts` changed"
        ),
        "{ran}"
    );

    // The build says the same as it runs each step, and in its report.
    let (ran, report) = build_ok(&recipe, &cache, &dir.join("out"));
    let why = |id: &str| {
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s["why"].clone())
            .unwrap()
    };
    assert_eq!(why("hosts"), serde_json::json!(["file `hosts` changed"]));
    let motd = why("motd");
    assert_eq!(motd[0], "mode: 0644 -> 0600", "{report}");
    let below = motd[1].as_str().unwrap();
    assert!(
        below.starts_with("the layer of step `hosts` below it changed")
            && below.ends_with("; `hosts`: file `hosts` changed"),
        "{report}"
    );
    assert!(ran.stderr().contains("why: mode: 0644 -> 0600"), "{ran}");
    // Not a terminal: plain lines only, no status line or escape codes.
    assert!(!ran.stderr().contains('\x1b'), "{ran}");
    assert!(!ran.stderr().contains("running: "), "{ran}");
    // Nothing changed since: nothing to explain.
    let (_, planned) = plan(&recipe, &cache);
    assert!(
        planned.values().all(|s| s.get("why").is_none()),
        "{planned:?}"
    );
}

#[test]
fn timings_page_shows_every_step_offline_in_a_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let recipe = dir.join("timed.yaml");
    std::fs::write(
        &recipe,
        "name: timed\noutput: {size: 32MiB}\nsteps:\n  first:\n    file: {path: /etc/first, content: \"1\\n\"}\n  \
         second:\n    needs: [first]\n    file: {path: /etc/second, content: \"2\\n\"}\n  \
         other:\n    file: {path: /etc/other, content: \"3\\n\"}\n",
    )
    .unwrap();
    let page = dir.join("timings.html");
    let mut cmd = build_command(&recipe, &dir.join("cache"), &dir.join("out"));
    cmd.arg(format!("--timings={}", page.display()));
    let ran = common::run(cmd);
    assert!(ran.stderr().contains("timings  "), "{ran}");
    let html = std::fs::read_to_string(&page).unwrap();
    for id in ["first", "second", "other"] {
        assert!(html.contains(&format!(">{id}</text>")), "no bar for {id}");
        assert!(html.contains(&format!("<td>{id}</td>")), "no row for {id}");
    }
    assert!(html.contains("3 built, 0 pulled, 0 cached"));
    assert!(html.contains("assembly: write"));
    // Self-contained: nothing to fetch, nothing to run.
    for outside in ["<script", "<link", "src=", "url("] {
        assert!(!html.contains(outside), "the page refers to `{outside}`");
    }

    // A person opens it: Chromium renders it offline to a picture.
    let shot = dir.join("timings.png");
    let mut chromium = Command::new("chromium");
    chromium
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1100,700",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = chromium
        .status()
        .expect("chromium is needed (tests/run installs Debian's package)");
    assert!(status.success());
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let (width, height) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((width, height), (1100, 700));
    assert!(png.len() > 10_000, "a blank page ({} bytes)", png.len());
}

#[test]
fn a_terminal_shows_the_running_steps_and_a_log_gets_plain_lines() {
    // It builds into the shared cache, whose file counts other tests assert.
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let nonce = format!("{:?}", std::time::SystemTime::now());
    // A download served slowly on loopback: 16 MiB over about 6 s.
    let mut blob = nonce.clone().into_bytes();
    blob.extend((0..16u32 << 20).map(|i| (i % 251) as u8));
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&blob));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut request);
            let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", blob.len());
            let _ = std::io::Write::write_all(&mut stream, head.as_bytes());
            for chunk in blob.chunks(256 << 10) {
                if std::io::Write::write_all(&mut stream, chunk).is_err() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    });
    let recipe = tmp.path().join("live.yaml");
    std::fs::write(
        &recipe,
        format!(
            "name: live\noutput: {{size: 512MiB}}\nsteps:\n  base:\n    debootstrap: {{suite: trixie}}\n  \
             slow:\n    needs: [base]\n    run: \"sleep 4; echo '{nonce}' > /srv/x\"\n  \
             blob:\n    needs: [base]\n    fetch: {{url: \"http://127.0.0.1:{port}/blob\", sha256: {sha256}, \
             unpack: false, dest: /srv/blob}}\n"
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let session = format!("kiln-live-{}", std::process::id());
    let command = format!(
        "{} build {} --cache {} -o {}; echo KILN-EXIT=$?; sleep 120",
        env!("CARGO_BIN_EXE_kiln"),
        recipe.display(),
        shared_cache().display(),
        out.display()
    );
    let tmux = |args: &[&str]| {
        let mut cmd = Command::new("tmux");
        cmd.args(args);
        common::run(cmd)
    };
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "150",
        "-y",
        "40",
        &command,
    ])
    .expect_success();
    let pane = || tmux(&["capture-pane", "-p", "-t", &session]).stdout();
    // While `slow` runs, the bottom line says so, with its time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let mut live = None;
    let mut downloading = None;
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        last = pane();
        if let Some(line) = last.lines().find(|l| l.starts_with("running: ")) {
            if line.contains("slow ") && !line.contains("slow 0s") {
                live = Some(line.to_string());
            }
            // While `blob` downloads, the bytes it has so far.
            if line.contains("blob ") && line.contains(" MiB downloaded)") {
                downloading = Some(line.to_string());
            }
        }
        if last.contains("KILN-EXIT=") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    tmux(&["kill-session", "-t", &session]);
    let live = live.unwrap_or_else(|| panic!("no live status line seen; last pane:\n{last}"));
    assert!(live.contains("slow "), "{live}");
    let downloading =
        downloading.unwrap_or_else(|| panic!("no download progress seen; last pane:\n{last}"));
    assert!(downloading.contains("blob "), "{downloading}");
    // When it is done: the plain lines, and no status line left behind.
    assert!(last.contains("KILN-EXIT=0"), "{last}");
    assert!(last.contains("[3/3] "), "{last}");
    assert!(
        !last.lines().any(|l| l.starts_with("running:")),
        "a status line was left behind:\n{last}"
    );
}
