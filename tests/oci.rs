//! Shared caches through an OCI registry: Debian's `docker-registry` (the
//! CNCF distribution registry), started by each test on a free loopback port
//! with its storage in the test's temporary directory, and killed when the
//! test ends, however it ends. A second machine (an empty cache) pulls every
//! step and gets the same image; corrupted, untrusted, stopped and hanging
//! registries mean local builds with a warning; concurrent pushes agree; a
//! registry that wants credentials gets them from docker's `config.json` or
//! the environment.
// Needs root (builds run in mount namespaces): tests/run turns this on.
#![cfg(feature = "root-tests")]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::sharing::{file_recipe, files_below, outcomes, pull_build, push_build, step_keys};
use common::{kiln, repo, run, same_bytes, serial, signing_key_pair, Ran};

const REGISTRY: &str = "/usr/bin/docker-registry";

/// A running registry, killed when dropped.
struct Registry {
    child: Option<Child>,
    port: u16,
    root: PathBuf,
}

impl Registry {
    /// Starts a registry storing under `dir/registry`; `extra` is added to
    /// its configuration file.
    fn start(dir: &Path, extra: &str) -> Registry {
        assert!(
            Path::new(REGISTRY).exists(),
            "{REGISTRY} is missing: install Debian's docker-registry package (tests/run does)"
        );
        let root = dir.join("registry");
        // The port is free when asked; another process may take it before the
        // registry binds it, so try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = dir.join("registry.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: kiln-test\n{extra}",
                    root.display()
                ),
            )
            .unwrap();
            let child = Command::new(REGISTRY)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("registry.err")).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {REGISTRY}: {e}"));
            let mut registry = Registry {
                child: Some(child),
                port,
                root: root.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Some((status, _)) = http_get(port, "/v2/", "") {
                    assert!(status == 200 || status == 401, "registry answers {status}");
                    return registry;
                }
                let exited = registry.child.as_mut().unwrap().try_wait().unwrap();
                if exited.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            registry.stop();
        }
        panic!(
            "the registry did not start: {}",
            std::fs::read_to_string(dir.join("registry.err")).unwrap_or_default()
        );
    }

    fn url(&self) -> String {
        format!("oci://127.0.0.1:{}/kiln/cache", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every stored blob (the registry keeps manifests as blobs too).
    fn blob_files(&self) -> Vec<PathBuf> {
        files_below(&self.root.join("docker/registry/v2/blobs/sha256"))
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "data"))
            .collect()
    }

    /// A manifest (or index) of `kiln/cache`, as JSON.
    fn manifest(&self, reference: &str) -> serde_json::Value {
        let (status, body) = http_get(
            self.port,
            &format!("/v2/kiln/cache/manifests/{reference}"),
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .expect("the registry answers");
        assert_eq!(
            status,
            200,
            "manifest {reference}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).unwrap()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `GET path` over plain HTTP/1.0: the status and body, `None` if nothing answers.
fn http_get(port: u16, path: &str, accept: &str) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response[split + 4..].to_vec()))
}

#[test]
fn a_second_machine_pulls_every_step_from_a_registry() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(tmp.path(), "");
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let recipe = file_recipe(tmp.path(), "oci-test");
    let a = push_build(
        &recipe,
        &tmp.path().join("a"),
        &tmp.path().join("a-out"),
        &registry.url(),
        &secret,
    );
    assert_eq!(outcomes(&a), ["built"; 3], "{a}");
    assert!(!a.stderr().contains("warning"), "{a}");

    // The layout: one manifest per step key, tagged kiln-<key>.
    let keys = step_keys(&a);
    let manifest = registry.manifest(&format!("kiln-{}", keys[1]));
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(manifest["artifactType"], "application/vnd.kiln.step.v2");
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.kiln.action.v1+json"
    );
    assert_eq!(manifest["annotations"]["dev.kiln.key"], keys[1].as_str());
    assert_eq!(manifest["annotations"]["dev.kiln.step"], "bin");
    let layers = manifest["layers"].as_array().unwrap();
    let types: Vec<&str> = layers
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    // The step's one small file travels in a pack.
    assert_eq!(
        types,
        [
            "application/vnd.kiln.layer.v1+json",
            "application/vnd.kiln.pack.v1"
        ]
    );
    let a_report = a.json();
    assert_eq!(
        layers[0]["annotations"]["dev.kiln.blake3"],
        a_report["steps"][1]["layer"]
    );
    let (status, action) = http_get(
        registry.port,
        &format!(
            "/v2/kiln/cache/blobs/{}",
            manifest["config"]["digest"].as_str().unwrap()
        ),
        "",
    )
    .unwrap();
    assert_eq!(status, 200);
    let action: serde_json::Value = serde_json::from_slice(&action).unwrap();
    assert_eq!(action["layer"], a_report["steps"][1]["layer"]);
    assert_eq!(action["step"], "bin");
    // The empty file's blob is not stored: readers know it.
    let empty = registry.manifest(&format!("kiln-{}", keys[2]));
    assert_eq!(empty["layers"].as_array().unwrap().len(), 1, "{empty}");

    let b = pull_build(
        &recipe,
        &tmp.path().join("b"),
        &tmp.path().join("b-out"),
        &registry.url(),
        &public,
    );
    assert_eq!(outcomes(&b), ["pulled"; 3], "{b}");
    assert_eq!(b.json()["built"], 0);
    assert!(!b.stderr().contains("warning"), "{b}");
    assert!(same_bytes(
        &tmp.path().join("a-out/rootfs.ext4"),
        &tmp.path().join("b-out/rootfs.ext4")
    ));
}

#[test]
fn the_minimal_example_round_trips_through_a_registry() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(tmp.path(), "");
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    // Machine A: the real minimal recipe (debootstrap, apt, file, run), pushed while it builds.
    let started = Instant::now();
    let a = push_build(
        &repo("examples/minimal.yaml"),
        &repo("target/kiln-test-cache"),
        &tmp.path().join("a"),
        &registry.url(),
        &secret,
    );
    let a_time = started.elapsed();
    assert!(!a.stderr().contains("warning"), "{a}");
    // The base layer's thousands of files: its small ones travel in a pack
    // or two, only its few big ones on their own.
    let keys = step_keys(&a);
    let base = registry.manifest(&format!("kiln-{}", keys[0]));
    let layers = base["layers"].as_array().unwrap();
    let of_type = |media_type: &str| {
        layers
            .iter()
            .filter(|l| l["mediaType"] == media_type)
            .count()
    };
    assert_eq!(of_type("application/vnd.kiln.layer.v1+json"), 1, "{base}");
    assert!(of_type("application/vnd.kiln.pack.v1") >= 1, "{base}");
    assert!(layers.len() < 200, "{} layers: {base}", layers.len());

    // Machine B: an empty cache, the same registry, trusting A's key.
    let started = Instant::now();
    let b = pull_build(
        &repo("examples/minimal.yaml"),
        &tmp.path().join("b-cache"),
        &tmp.path().join("b"),
        &registry.url(),
        &public,
    );
    let b_time = started.elapsed();
    assert_eq!(outcomes(&b), ["pulled"; 4], "{b}");
    assert_eq!(b.json()["built"], 0);
    assert!(same_bytes(
        &tmp.path().join("a/minimal-rootfs.ext4"),
        &tmp.path().join("b/minimal-rootfs.ext4")
    ));
    eprintln!(
        "minimal.yaml: machine A (cached steps, pushing) {:.1} s; machine B (pulling all 4) {:.1} s; registry holds {} blobs",
        a_time.as_secs_f64(),
        b_time.as_secs_f64(),
        registry.blob_files().len()
    );
}

#[test]
fn a_corrupted_blob_in_the_registry_means_a_local_build() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(tmp.path(), "");
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let recipe = file_recipe(tmp.path(), "corrupt-test");
    push_build(
        &recipe,
        &tmp.path().join("a"),
        &tmp.path().join("a-out"),
        &registry.url(),
        &secret,
    )
    .expect_success();
    let reference = tmp.path().join("a-out/rootfs.ext4");
    // What the registry stores, by kind: file blobs are not JSON, OCI
    // manifests have a schemaVersion, entries signatures, layer manifests
    // neither.
    let kind = |bytes: &[u8]| match serde_json::from_slice::<serde_json::Value>(bytes) {
        Err(_) => "file",
        Ok(v) if v.get("schemaVersion").is_some() => "manifest",
        Ok(v) if v.get("signatures").is_some() => "entry",
        Ok(_) => "layer",
    };
    // Every stored object of a kind, tampered with, till the guard drops.
    struct Tampered(Vec<(PathBuf, Vec<u8>)>);
    impl Drop for Tampered {
        fn drop(&mut self) {
            for (path, bytes) in &self.0 {
                std::fs::write(path, bytes).unwrap();
            }
        }
    }
    let tamper = |which: &str, how: fn(&[u8]) -> Vec<u8>| {
        let mut originals = Vec::new();
        for data in registry.blob_files() {
            let bytes = std::fs::read(&data).unwrap();
            if kind(&bytes) == which {
                std::fs::write(&data, how(&bytes)).unwrap();
                originals.push((data, bytes));
            }
        }
        assert!(
            originals.len() >= 2,
            "{} {which} objects tampered with",
            originals.len()
        );
        Tampered(originals)
    };
    let flipped: fn(&[u8]) -> Vec<u8> = |b| b.iter().map(|b| b ^ 0x20).collect();
    let longer: fn(&[u8]) -> Vec<u8> = |b| [b, b"!"].concat();
    let shorter: fn(&[u8]) -> Vec<u8> = |b| b[..b.len() - 1].to_vec();
    // (`empty` has no file blob to tamper with: it is still pulled.)
    for (round, (which, how, complaint, expected)) in [
        // A pack (each of this recipe's files is small: packed) of the right
        // size with the wrong bytes fails its blobs' digests; a longer one
        // is cut off at the size the signed layer gives it, a shorter one
        // found short. All say "(tampered)".
        ("file", flipped, "(tampered)", ["built", "built", "pulled"]),
        ("file", longer, "(tampered)", ["built", "built", "pulled"]),
        ("file", shorter, "bytes short", ["built", "built", "pulled"]),
        (
            "layer",
            flipped,
            "the layer manifest does not match its digest (tampered)",
            ["built"; 3],
        ),
        // The registry parses what it serves: it answers 500, and a
        // registry that errs is not asked again during the build.
        ("manifest", flipped, "building without it", ["built"; 3]),
    ]
    .into_iter()
    .enumerate()
    {
        let _tampered = tamper(which, how);
        let cache = tmp.path().join(format!("b{round}"));
        let b = pull_build(
            &recipe,
            &cache,
            &tmp.path().join(format!("b{round}-out")),
            &registry.url(),
            &public,
        );
        assert!(b.stderr().contains(complaint), "{which}: {b}");
        if which == "file" {
            assert!(
                b.stderr().contains("pack sha256:") || b.stderr().contains("blob "),
                "{b}"
            );
        }
        assert_eq!(outcomes(&b), expected, "{which}: {b}");
        assert!(
            same_bytes(
                &reference,
                &tmp.path().join(format!("b{round}-out/rootfs.ext4"))
            ),
            "a wrong image"
        );
        // Nothing wrong entered the store, and nothing is left half received.
        for blob in files_below(&cache.join("blobs")) {
            let name = blob.file_name().unwrap().to_str().unwrap();
            let bytes = std::fs::read(&blob).unwrap();
            assert_eq!(blake3::hash(&bytes).to_hex().as_str(), name, "{which}");
        }
        assert_eq!(
            files_below(&cache.join("tmp")),
            Vec::<PathBuf>::new(),
            "{which}"
        );
    }
}

#[test]
fn an_entry_signed_by_an_untrusted_key_means_a_local_build() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(tmp.path(), "");
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let (stranger, _) = signing_key_pair(tmp.path(), "stranger");
    let recipe = file_recipe(tmp.path(), "untrusted-test");
    push_build(
        &recipe,
        &tmp.path().join("a"),
        &tmp.path().join("a-out"),
        &registry.url(),
        &secret,
    )
    .expect_success();
    // Someone else builds the same recipe and pushes entries signed by their
    // own key over A's (they do not trust A's either).
    let s = push_build(
        &recipe,
        &tmp.path().join("s"),
        &tmp.path().join("s-out"),
        &registry.url(),
        &stranger,
    );
    assert_eq!(outcomes(&s), ["built"; 3], "{s}");
    assert!(
        s.stderr()
            .contains("signed by a key this build does not trust"),
        "{s}"
    );
    let b = pull_build(
        &recipe,
        &tmp.path().join("b"),
        &tmp.path().join("b-out"),
        &registry.url(),
        &public,
    );
    assert!(
        b.stderr()
            .contains("signed by a key this build does not trust"),
        "{b}"
    );
    assert_eq!(outcomes(&b), ["built"; 3], "{b}");
    assert!(same_bytes(
        &tmp.path().join("a-out/rootfs.ext4"),
        &tmp.path().join("b-out/rootfs.ext4")
    ));
}

#[test]
fn a_stopped_or_hanging_registry_means_one_warning_and_a_local_build() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut registry = Registry::start(tmp.path(), "");
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let recipe = file_recipe(tmp.path(), "stopped-test");
    push_build(
        &recipe,
        &tmp.path().join("a"),
        &tmp.path().join("a-out"),
        &registry.url(),
        &secret,
    )
    .expect_success();
    let url = registry.url();
    registry.stop();
    let check = |ran: &Ran, took: Duration, limit: Duration| {
        assert!(ran.success(), "{ran}");
        assert_eq!(outcomes(ran), ["built"; 3], "{ran}");
        assert!(ran.stderr().contains(&format!("remote {url}")), "{ran}");
        assert_eq!(
            ran.stderr().matches("warning").count(),
            1,
            "one warning: {ran}"
        );
        assert!(ran.stderr().contains("building without it"), "{ran}");
        assert!(took < limit, "took {took:?}: {ran}");
    };
    let started = Instant::now();
    let b = pull_build(
        &recipe,
        &tmp.path().join("b"),
        &tmp.path().join("b-out"),
        &url,
        &public,
    );
    check(&b, started.elapsed(), Duration::from_secs(15));

    // A registry that takes the connection and never answers: the time-outs end it.
    let _silent = TcpListener::bind(("127.0.0.1", registry.port)).unwrap();
    let started = Instant::now();
    let c = pull_build(
        &recipe,
        &tmp.path().join("c"),
        &tmp.path().join("c-out"),
        &url,
        &public,
    );
    let took = started.elapsed();
    // One time-out, not one per step asking at once.
    check(&c, took, Duration::from_secs(25));
    eprintln!(
        "a silent registry cost the build {:.1} s",
        took.as_secs_f64()
    );
}

#[test]
fn concurrent_pushes_to_one_registry_leave_it_consistent() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(tmp.path(), "");
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    // 40 independent steps, each content twice: the same blobs are uploaded
    // by several steps, and by both builds, at once.
    let recipe = tmp.path().join("many.yaml");
    let steps: String = (0..40)
        .map(|i| {
            format!(
                "  f{i}:\n    file: {{path: /srv/f{i}, content: \"content {}\\n\"}}\n",
                i % 20
            )
        })
        .collect();
    std::fs::write(
        &recipe,
        format!("name: many\noutput: {{size: 32MiB}}\nsteps:\n{steps}"),
    )
    .unwrap();
    let spawn = |name: &str| {
        let mut cmd = kiln();
        cmd.arg("build")
            .arg(&recipe)
            .arg("--cache")
            .arg(tmp.path().join(name))
            .arg("-o")
            .arg(tmp.path().join(format!("{name}-out")));
        cmd.arg("--remote")
            .arg(registry.url())
            .arg("--signing-key")
            .arg(&secret);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let (x, y) = (spawn("x"), spawn("y"));
    for child in [x, y] {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains("warning"), "both pushes succeed: {stderr}");
    }
    let z = pull_build(
        &recipe,
        &tmp.path().join("z"),
        &tmp.path().join("z-out"),
        &registry.url(),
        &public,
    );
    assert_eq!(outcomes(&z), ["pulled"; 40], "{z}");
    assert!(same_bytes(
        &tmp.path().join("x-out/rootfs.ext4"),
        &tmp.path().join("z-out/rootfs.ext4")
    ));
    assert!(same_bytes(
        &tmp.path().join("y-out/rootfs.ext4"),
        &tmp.path().join("z-out/rootfs.ext4")
    ));
}

#[test]
fn credentials_reach_a_registry_that_wants_them() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    // user `kiln`, password `s3cret-pw` (bcrypt, cost 4)
    std::fs::write(
        tmp.path().join("htpasswd"),
        "kiln:$2b$04$Moz08daUKODQ4C89dMjIVOjtpgXIeyIYlpllgdoh6.UBDrA8yEEjG\n",
    )
    .unwrap();
    let registry = Registry::start(
        tmp.path(),
        &format!(
            "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
            tmp.path().join("htpasswd").display()
        ),
    );
    assert_eq!(http_get(registry.port, "/v2/", "").unwrap().0, 401);
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    let recipe = file_recipe(tmp.path(), "auth-test");
    let with_env = |mut cmd: Command, vars: &[(&str, &str)]| {
        cmd.env_remove("KILN_REGISTRY_USERNAME")
            .env_remove("KILN_REGISTRY_PASSWORD")
            .env_remove("KILN_REGISTRY_TOKEN")
            .env_remove("KILN_REGISTRY_HOST")
            .env("DOCKER_CONFIG", tmp.path().join("docker"));
        for (k, v) in vars {
            cmd.env(k, v);
        }
        run(cmd)
    };
    let build_cmd = |cache: &str, extra: &[&std::ffi::OsStr]| {
        let mut cmd = kiln();
        cmd.arg("build")
            .arg(&recipe)
            .arg("--cache")
            .arg(tmp.path().join(cache))
            .arg("-o")
            .arg(tmp.path().join(format!("{cache}-out")))
            .arg("--json")
            .arg("--remote")
            .arg(registry.url());
        cmd.args(extra);
        cmd
    };
    let push = ["--signing-key".as_ref(), secret.as_os_str()];
    let pull = [
        "--trusted-key".as_ref(),
        public.as_os_str(),
        "--no-push".as_ref(),
    ];

    // Anonymous: refused, a warning, a local build.
    let ran = with_env(build_cmd("anonymous", &push), &[]);
    assert_eq!(outcomes(&ran), ["built"; 3], "{ran}");
    assert!(ran.stderr().contains("building without it"), "{ran}");

    // From the environment, for the registry they name: given to it...
    let host = format!("127.0.0.1:{}", registry.port);
    let ran = with_env(
        build_cmd("env", &push),
        &[
            ("KILN_REGISTRY_USERNAME", "kiln"),
            ("KILN_REGISTRY_PASSWORD", "s3cret-pw"),
            ("KILN_REGISTRY_HOST", &host),
        ],
    );
    assert_eq!(outcomes(&ran), ["built"; 3], "{ran}");
    assert!(!ran.stderr().contains("warning"), "{ran}");
    // ...and to no other: named for another registry, they are not sent here.
    let ran = with_env(
        build_cmd("elsewhere", &push),
        &[
            ("KILN_REGISTRY_USERNAME", "kiln"),
            ("KILN_REGISTRY_PASSWORD", "s3cret-pw"),
            ("KILN_REGISTRY_HOST", "registry.elsewhere.example"),
        ],
    );
    assert_eq!(outcomes(&ran), ["built"; 3], "{ran}");
    assert!(ran.stderr().contains("building without it"), "{ran}");

    // From docker's config.json, as `docker login` writes it.
    std::fs::create_dir_all(tmp.path().join("docker")).unwrap();
    std::fs::write(
        tmp.path().join("docker/config.json"),
        format!(
            "{{\"auths\": {{\"127.0.0.1:{}\": {{\"auth\": \"a2lsbjpzM2NyZXQtcHc=\"}}}}}}",
            registry.port
        ),
    )
    .unwrap();
    let ran = with_env(build_cmd("docker", &pull), &[]);
    assert_eq!(outcomes(&ran), ["pulled"; 3], "{ran}");
    assert!(!ran.stderr().contains("warning"), "{ran}");
}

#[test]
fn a_big_blob_streams_through_a_registry_without_filling_memory() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(tmp.path(), "");
    let (secret, public) = signing_key_pair(tmp.path(), "ci");
    common::big_blob_round_trip(tmp.path(), &registry.url(), &secret, &public);
}

#[test]
fn a_registry_keeps_the_remote_contract() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(tmp.path(), "");
    let remote = kiln::remote::OciRemote::open(&registry.url()).unwrap();
    common::contract::check(&remote, &tmp.path().join("scratch"));
}
