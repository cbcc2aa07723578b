//! The command line (clap): parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::build::{self, BuildOptions, Outcome};
use crate::graph::Graph;
use crate::lock::{self, Lock};
use crate::plan;
use crate::recipe::{self, Recipe};
use crate::store::Store;

/// kiln: declarative, cached, reproducible microVM root filesystems.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct CacheArg {
    /// The layer cache directory.
    #[arg(long, env = "KILN_CACHE", default_value = "cache")]
    cache: PathBuf,
}

#[derive(Debug, clap::Args)]
struct SshKeyArg {
    /// A public key file to install as the authorized_keys of `user` steps
    /// (instead of the recipe's); only public keys are accepted.
    #[arg(long, value_name = "PATH.pub")]
    ssh_key: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// A shared cache to read (and push to): oci://HOST[:PORT]/REPO, file:///PATH or a path.
    /// Repeatable; read in order.
    #[arg(long = "remote", value_name = "URL")]
    remotes: Vec<String>,
    /// Push what this build makes to the remotes (the default).
    #[arg(long, overrides_with = "no_push")]
    push: bool,
    /// Do not push.
    #[arg(long)]
    no_push: bool,
    /// The key that signs pushed entries (from `kiln key generate`).
    #[arg(long, value_name = "PATH.key")]
    signing_key: Option<PathBuf>,
    /// A public key whose entries this build trusts (text or .pub file). Repeatable.
    #[arg(long = "trusted-key", value_name = "KEY")]
    trusted_keys: Vec<String>,
    /// Use no remote entry signed longer ago than this many days (so a
    /// remote cannot hand out an old signed layer for a step unnoticed).
    #[arg(long, value_name = "DAYS")]
    remote_max_age: Option<u64>,
    /// Settings file (default: ./kiln.toml when present).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl RemoteArgs {
    fn remotes(&self) -> Result<std::sync::Arc<crate::remote::Remotes>, String> {
        let flags = crate::config::RemoteFlags {
            remotes: self.remotes.clone(),
            push: match (self.push, self.no_push) {
                (_, true) => Some(false),
                (true, _) => Some(true),
                _ => None,
            },
            signing_key: self.signing_key.clone(),
            trusted_keys: self.trusted_keys.clone(),
            max_age_days: self.remote_max_age,
            config: self.config.clone(),
        };
        crate::config::remotes(&flags)
            .map(std::sync::Arc::new)
            .map_err(|e| e.to_string())
    }

    /// The remotes, for a command that means nothing without one (`what`:
    /// "pull from", "push to").
    fn required(&self, what: &str) -> Result<std::sync::Arc<crate::remote::Remotes>, String> {
        let remotes = self.remotes()?;
        if remotes.is_empty() {
            return Err(format!(
                "no remote to {what}: give --remote URL or set one in kiln.toml"
            ));
        }
        Ok(remotes)
    }
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a signing key pair: PREFIX.key (secret, 0600) and PREFIX.pub.
    Generate { prefix: PathBuf },
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Fetch every step of RECIPE that the remotes have, ahead of a build.
    Pull(CachePullArgs),
    /// What the local cache holds, and how the last build used it.
    Stats(CacheStatsArgs),
    /// Remove what no kept recipe needs and no build used recently.
    Gc(CacheGcArgs),
    /// Check everything in the cache in full: blobs against their digests,
    /// layer manifests, action entries, and trees against their layers.
    /// Exits 1 when something is damaged.
    Fsck(CacheFsckArgs),
    /// Push every step of RECIPE that is in the local cache to the remotes.
    Push(CachePushArgs),
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a recipe's image (needs root).
    Build(BuildArgs),
    /// Resolve the recipe's package steps and write its lock file
    /// (RECIPE.lock beside it) without writing an image (needs root).
    Lock(LockArgs),
    /// Signing keys for shared caches.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Work with shared caches.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Show what a build would run or reuse (runs nothing, needs no root).
    Plan(PlanArgs),
    /// Print the step graph in Graphviz dot.
    Graph { recipe: PathBuf },
    /// Check a finished image without mounting it or needing root.
    Verify(VerifyArgs),
    /// Boot an image under qemu's microvm machine (as Firecracker would) and
    /// prove it: systemd up, SSH login, sudo, node, opencode and its unit, clean poweroff.
    Boot(BootArgs),
    /// What changed between two images: packages, users, enabled units and
    /// every file (read from the ext4 files directly; needs no root).
    Diff(DiffArgs),
    /// Print the JSON Schema of recipe files (for editors: yaml-language-server).
    Schema,
    /// Print a completion script for a shell, e.g. `kiln completions bash > /etc/bash_completion.d/kiln`.
    Completions { shell: clap_complete::Shell },
    /// Internal: the sandbox process a step runs in.
    #[command(hide = true)]
    InternalSandbox { job: PathBuf },
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    recipe: PathBuf,
    /// Where the image goes.
    #[arg(short = 'o', long = "out", default_value = "images")]
    out: PathBuf,
    #[command(flatten)]
    cache: CacheArg,
    #[command(flatten)]
    key: SshKeyArg,
    /// How many steps may run at once.
    #[arg(short, long, default_value_t = default_jobs())]
    jobs: usize,
    /// Print a JSON report on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Write a self-contained HTML page of the build's time line, layer
    /// sizes and cache hits (default: OUT/kiln-timings.html).
    #[arg(long, value_name = "FILE", num_args = 0..=1, require_equals = true)]
    timings: Option<Option<PathBuf>>,
    /// Fail unless the lock file pins every package step for the recipe as
    /// it is; never change the lock (for CI).
    #[arg(long)]
    locked: bool,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
struct LockArgs {
    recipe: PathBuf,
    /// Resolve these steps again with what the archives give now (all
    /// steps when none is named), instead of keeping their pins.
    #[arg(long, value_name = "STEP", num_args = 0..)]
    update: Option<Vec<String>>,
    #[command(flatten)]
    cache: CacheArg,
    #[command(flatten)]
    key: SshKeyArg,
    #[arg(short, long, default_value_t = default_jobs())]
    jobs: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
struct PlanArgs {
    recipe: PathBuf,
    #[command(flatten)]
    cache: CacheArg,
    #[command(flatten)]
    key: SshKeyArg,
    #[arg(long)]
    json: bool,
    /// Under each step that will run, say what differs from its last
    /// build: which field and value, which file, which step below it
    /// (`--json` always has it, as `why`).
    #[arg(long)]
    explain: bool,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    image: PathBuf,
    /// Derive checks from this recipe (and run its `verify:` section).
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Also run the recipe's command checks inside the image (needs root).
    /// They run the image's own programs as root, in the sandbox a build
    /// step gets: a throwaway writable view of the image, its own mount,
    /// PID, UTS, IPC and cgroup namespaces, pivot_root, a reduced
    /// capability set, /proc/sys read-only. It shares the host's network
    /// and trusts the kernel's namespaces: use it on images you would build.
    #[arg(long)]
    exec: bool,
    #[command(flatten)]
    key: SshKeyArg,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct DiffArgs {
    /// The image before (an ext4 file, or the manifest a build wrote for it).
    a: PathBuf,
    /// The image after (an ext4 file, or the manifest a build wrote for it).
    b: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CachePullArgs {
    recipe: PathBuf,
    #[command(flatten)]
    cache: CacheArg,
    #[command(flatten)]
    key: SshKeyArg,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
struct CacheStatsArgs {
    #[command(flatten)]
    cache: CacheArg,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CacheGcArgs {
    #[command(flatten)]
    cache: CacheArg,
    /// Keep every step of this recipe (repeatable).
    #[arg(long = "keep", value_name = "RECIPE")]
    keep: Vec<PathBuf>,
    /// Keep entries a build used within this many days.
    #[arg(long, value_name = "DAYS")]
    max_age_days: Option<u64>,
    #[command(flatten)]
    key: SshKeyArg,
}

#[derive(Debug, clap::Args)]
struct CacheFsckArgs {
    #[command(flatten)]
    cache: CacheArg,
    /// Remove what is damaged (the next build makes it again), and
    /// reseal intact blobs an older kiln wrote. Waits for no build: fails
    /// while one is using the cache.
    #[arg(long)]
    repair: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CachePushArgs {
    recipe: PathBuf,
    #[command(flatten)]
    cache: CacheArg,
    #[command(flatten)]
    key: SshKeyArg,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// `kiln boot`'s arguments.
#[derive(Debug, clap::Args)]
struct BootArgs {
    /// The rootfs image (or give --recipe).
    image: Option<PathBuf>,
    /// The kernel (ELF vmlinux or bzImage).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The initrd (needed when the kernel has virtio drivers as modules).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The recipe of the image: its `boot:` section gives the login user
    /// and the checks of stage 3, and what IMAGE, --kernel and --initrd do
    /// not give comes from what `kiln build RECIPE` wrote.
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// The account to log in as (default: the recipe's `boot: user:`, or
    /// its only `user` step).
    #[arg(long)]
    user: Option<String>,
    /// The output directory of that build.
    #[arg(short = 'o', long = "out", default_value = "images")]
    out: PathBuf,
    /// How the test key reaches the VM.
    #[arg(long, value_enum, default_value = "inject")]
    key_via: crate::boot::KeyVia,
    /// Stop after the SSH login stage.
    #[arg(long)]
    login_only: bool,
    /// Print the stages as JSON on stdout (also when one fails).
    #[arg(long)]
    json: bool,
}

fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Loads a recipe with the pins of its lock file (see `lock`).
fn load(path: &std::path::Path) -> Result<(Recipe, Graph), String> {
    let mut recipe = recipe::load(path).map_err(|e| e.to_string())?;
    let (lock, read) = Lock::for_recipe(&recipe).map_err(|e| e.to_string())?;
    if let Some(read) = read.filter(|read| *read != lock::path_for(path)) {
        eprintln!(
            "lock: {} has no lock file yet; starting from the pins of {}",
            path.display(),
            read.display()
        );
    }
    lock.attach(&mut recipe);
    let graph = Graph::new(&recipe).map_err(|e| e.to_string())?;
    Ok((recipe, graph))
}

/// `kiln verify`: prints one line per check and a summary; fails if any check failed.
fn verify_command(args: VerifyArgs) -> Result<(), String> {
    let VerifyArgs {
        image,
        recipe,
        exec,
        key,
        json,
    } = args;
    let (image, ssh_key) = (image.as_path(), key.ssh_key.as_deref());
    let recipe = recipe
        .as_deref()
        .map(recipe::load)
        .transpose()
        .map_err(|e| e.to_string())?;
    if exec && !nix::unistd::geteuid().is_root() {
        return Err("--exec runs commands in a chroot of the image and needs root".into());
    }
    let results = crate::verify::verify(&crate::verify::VerifyOptions {
        image,
        recipe: recipe.as_ref(),
        exec,
        ssh_key,
    })
    .map_err(|e| e.to_string())?;
    let failed = results.iter().filter(|r| !r.passed).count();
    let skipped = results.iter().filter(|r| r.skipped).count();
    let passed = results.len() - failed - skipped;
    if json {
        let report = serde_json::json!({
            "image": image,
            "passed": passed,
            "failed": failed,
            "skipped": skipped,
            "checks": results,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialize")
        );
    } else {
        for r in &results {
            match (r.passed, r.skipped) {
                (true, false) => println!("[PASS] {}", r.name),
                (true, true) => println!("[SKIP] {} ({})", r.name, r.detail),
                (false, _) => println!("[FAIL] {}: {}", r.name, r.detail),
            }
        }
        println!("verify: {passed} passed, {failed} failed, {skipped} skipped");
    }
    if failed > 0 {
        Err(format!("{failed} check(s) failed on {}", image.display()))
    } else {
        Ok(())
    }
}

/// `kiln boot`: resolves what to boot, runs the stages, prints them.
fn boot_command(args: BootArgs) -> Result<(), String> {
    let BootArgs {
        image,
        kernel,
        initrd,
        recipe,
        user,
        out,
        key_via,
        login_only,
        json,
    } = args;
    let recipe = match &recipe {
        Some(path) => Some(recipe::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let built = |file: &str| out.join(file);
    let (image, kernel, initrd) = match &recipe {
        // What the command line does not give comes from the recipe's build.
        Some(r) => {
            let kernel = match kernel {
                Some(kernel) => kernel,
                None => built(r.output.kernel.as_deref().ok_or_else(|| {
                    format!(
                        "{}: the recipe's output has no `kernel`; give --kernel",
                        r.file.display()
                    )
                })?),
            };
            let initrd = initrd.or_else(|| r.output.initrd.as_deref().map(built));
            (
                image.unwrap_or_else(|| built(&r.output.rootfs)),
                kernel,
                initrd,
            )
        }
        None => {
            let image = image.ok_or("give an IMAGE and --kernel, or --recipe")?;
            let kernel = kernel.ok_or("give --kernel (the image's kernel), or --recipe")?;
            (image, kernel, initrd)
        }
    };
    let user = user
        .or_else(|| recipe.as_ref().and_then(Recipe::boot_user))
        .ok_or(
            "give --user (the account to log in as), or a --recipe with a `boot: user:` \
             or a single `user` step",
        )?;
    let checks = recipe.map(|r| r.boot.checks).unwrap_or_default();
    let options = crate::boot::BootOptions {
        image,
        kernel,
        initrd,
        key_via,
        user,
        checks,
        login_only,
    };
    let mut seen = Vec::new();
    let result = crate::boot::boot(&options, &mut |stage| {
        seen.push(stage.clone());
        let mark = if stage.passed { "PASS" } else { "FAIL" };
        eprintln!(
            "[{mark}] {} ({:.1}s){}",
            stage.name,
            stage.seconds,
            if stage.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", stage.detail)
            }
        );
    });
    // With --json the stages are printed whether or not they all passed.
    let stages = match &result {
        Ok(stages) => stages,
        Err(_) => &seen,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(stages).expect("stages serialize")
        );
    }
    if result.is_ok() {
        eprintln!(
            "boot: {} stages passed in {:.1}s",
            stages.len(),
            stages.iter().map(|s| s.seconds).sum::<f64>()
        );
    }
    result.map(|_| ()).map_err(|e| e.to_string())
}

/// `kiln diff`: lists both images (at once) and prints what changed.
fn diff_command(args: DiffArgs) -> Result<(), String> {
    let DiffArgs { a, b, json } = args;
    (|| {
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| crate::diff::list(&a));
            let b = crate::diff::list(&b);
            (a.join().expect("listing does not panic"), b)
        });
        let diff = crate::diff::diff(
            &a.map_err(|e| e.to_string())?,
            &b.map_err(|e| e.to_string())?,
        );
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&diff).expect("diffs serialize")
            );
        } else {
            print!("{}", crate::diff::render(&diff));
        }
        Ok(())
    })()
}

fn cache_pull_command(args: CachePullArgs) -> Result<(), String> {
    let CachePullArgs {
        recipe,
        cache,
        key,
        remote,
    } = args;
    load(&recipe).and_then(|(r, g)| {
        let remotes = remote.required("pull from")?;
        let store = Store::open(&cache.cache).map_err(|e| e.to_string())?;
        let (here, pulled, missing) =
            crate::cache::pull(&r, &g, &store, &remotes, key.ssh_key.as_deref())
                .map_err(|e| e.to_string())?;
        eprintln!(
            "{pulled} pulled, {here} already here, {missing} not available (they will be built)"
        );
        Ok(())
    })
}

fn cache_stats_command(args: CacheStatsArgs) -> Result<(), String> {
    let CacheStatsArgs { cache, json } = args;
    {
        let store = Store::open_read_only(&cache.cache);
        let stats = crate::cache::stats(&store);
        let last = store.last_build();
        if json {
            println!(
                "{}",
                serde_json::json!({"store": stats, "last_build": last})
            );
        } else {
            for (what, t) in [
                ("blobs", stats.blobs),
                ("layers", stats.layers),
                ("actions", stats.actions),
            ] {
                println!("{what:<8} {:>8} {:>14} bytes", t.count, t.bytes);
            }
            if let Some(l) = last {
                println!(
                    "last build ({}): {} cached, {} pulled, {} built — hit rate {:.0}%",
                    l.recipe,
                    l.cached,
                    l.pulled,
                    l.built,
                    l.hit_rate()
                );
            }
        }
        Ok(())
    }
}

fn cache_gc_command(args: CacheGcArgs) -> Result<(), String> {
    let CacheGcArgs {
        cache,
        keep,
        max_age_days,
        key,
    } = args;
    (|| {
        let store = Store::open_exclusive(&cache.cache).map_err(|e| e.to_string())?;
        let mut kept = std::collections::BTreeSet::new();
        let mut kept_debs = std::collections::BTreeSet::new();
        for path in &keep {
            let (r, g) = load(path)?;
            kept.extend(
                crate::cache::recipe_keys(&r, &g, &store, key.ssh_key.as_deref())
                    .map_err(|e| e.to_string())?,
            );
            kept_debs.extend(crate::cache::pinned_debs(&r));
        }
        let age = max_age_days.map(|d| std::time::Duration::from_secs(d * 86_400));
        let done = crate::cache::gc(&store, &kept, &kept_debs, age).map_err(|e| e.to_string())?;
        eprintln!(
            "removed {} action entries, {} layers, {} blobs, {} package files ({} bytes)",
            done.actions, done.layers, done.blobs, done.debs, done.bytes
        );
        Ok(())
    })()
}

fn cache_fsck_command(args: CacheFsckArgs) -> Result<(), String> {
    let CacheFsckArgs {
        cache,
        repair,
        json,
    } = args;
    (|| {
        let store = if repair {
            Store::open_exclusive(&cache.cache)
        } else {
            Store::open(&cache.cache)
        }
        .map_err(|e| e.to_string())?;
        let report = crate::fsck::fsck(&store, repair);
        if json {
            println!("{}", serde_json::json!(report));
        }
        for f in &report.findings {
            eprintln!("{}: {}", f.path.display(), f.problem);
        }
        eprintln!(
            "checked {} blobs, {} layers, {} action entries, {} trees: {} problems{}",
            report.blobs,
            report.layers,
            report.actions,
            report.trees,
            report.findings.len(),
            if repair && !report.findings.is_empty() {
                ", repaired"
            } else {
                ""
            }
        );
        if report.findings.is_empty() || repair {
            Ok(())
        } else {
            Err("the cache is damaged; `kiln cache fsck --repair` removes what is damaged and the next build makes it again".into())
        }
    })()
}

fn cache_push_command(args: CachePushArgs) -> Result<(), String> {
    let CachePushArgs {
        recipe,
        cache,
        key,
        remote,
    } = args;
    load(&recipe).and_then(|(r, g)| {
        let remotes = remote.required("push to")?;
        let store = Store::open_read_only(&cache.cache);
        let (pushed, steps) = crate::cache::push(&r, &g, &store, &remotes, key.ssh_key.as_deref())
            .map_err(|e| e.to_string())?;
        eprintln!("pushed {pushed} of {steps} steps (the others are not built here yet)");
        Ok(())
    })
}

fn plan_command(args: PlanArgs) -> Result<(), String> {
    let PlanArgs {
        recipe,
        cache,
        key,
        json,
        explain,
    } = args;
    load(&recipe).and_then(|(r, g)| {
        let store = Store::open_read_only(&cache.cache);
        let steps =
            plan::plan(&r, &g, &store, key.ssh_key.as_deref()).map_err(|e| e.to_string())?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&steps).expect("plans serialize")
            );
        } else {
            print!("{}", plan::render(&steps, explain));
        }
        Ok(())
    })
}

fn build_command(args: BuildArgs) -> Result<(), String> {
    let BuildArgs {
        recipe,
        out,
        cache,
        key,
        jobs,
        json,
        timings,
        locked,
        remote,
    } = args;
    let lock_file = lock::path_for(&recipe);
    load(&recipe).and_then(|(r, g)| {
        if locked {
            check_locked(&r, &lock_file)?;
        }
        let timings = timings.map(|file| file.unwrap_or_else(|| out.join("kiln-timings.html")));
        let store_dir = cache.cache.clone();
        let options = BuildOptions {
            remotes: remote.remotes()?,
            cache: cache.cache,
            out_dir: out,
            jobs,
            ssh_key: key.ssh_key,
            progress: true,
            lock_file: (!locked).then_some(lock_file),
            update: Vec::new(),
        };
        let report = build::build(&r, &g, &options).map_err(|e| e.to_string())?;
        if let Some(path) = &timings {
            let page = crate::timings::page(&report, &Store::open_read_only(&store_dir));
            std::fs::write(path, page).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("reports serialize")
            );
        }
        eprintln!(
            "\n{:<18} {:<12} {:<8} {:>8}",
            "STEP", "KIND", "RESULT", "TIME"
        );
        for s in &report.steps {
            let result = match s.outcome {
                Outcome::Cached => "cached",
                Outcome::Pulled => "pulled",
                Outcome::Built => "built",
            };
            eprintln!(
                "{:<18} {:<12} {:<8} {:>7.1}s",
                s.id, s.kind, result, s.seconds
            );
        }
        eprintln!(
            "{} built, {} pulled, {} cached in {:.1}s (kiln's peak memory {} MiB)",
            report.built,
            report.pulled,
            report.cached,
            report.seconds,
            report.peak_rss_kib / 1024
        );
        eprintln!(
            "rootfs   {} ({} bytes, blake3 {})",
            report.image.display(),
            report.image_bytes,
            report.image_blake3.short()
        );
        for (what, artifact) in [("kernel", &report.kernel), ("initrd", &report.initrd)] {
            if let Some(a) = artifact {
                eprintln!(
                    "{what:<8} {} ({} bytes, blake3 {})",
                    a.path.display(),
                    a.bytes,
                    a.blake3.short()
                );
            }
        }
        if let Some(m) = &report.manifest {
            eprintln!("manifest {}", m.display());
        }
        if let Some(s) = &report.sbom {
            eprintln!("sbom     {}", s.path.display());
        }
        if let Some(path) = &timings {
            eprintln!("timings  {}", path.display());
        }
        Ok(())
    })
}

/// For `--locked`: the lock file must exist and pin every package step and
/// record every download of `recipe` as it is.
fn check_locked(recipe: &Recipe, lock_file: &std::path::Path) -> Result<(), String> {
    if !lock_file.exists() {
        return Err(format!(
            "--locked: {} does not exist; run `kiln lock {}` and commit the lock file",
            lock_file.display(),
            recipe.file.display()
        ));
    }
    let missing = Lock::read(lock_file)
        .map_err(|e| e.to_string())?
        .missing(recipe);
    if missing.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = missing
        .iter()
        .map(|(id, why)| format!("  step `{id}`: {why}"))
        .collect();
    Err(format!(
        "--locked: {} does not pin the recipe as it is:\n{}\nrun `kiln lock {}` and commit the lock file",
        lock_file.display(),
        lines.join("\n"),
        recipe.file.display()
    ))
}

/// `kiln lock`: runs or reuses the steps (those without current pins, or
/// named by `--update`, resolve again) and writes the lock file.
fn lock_command(args: LockArgs) -> Result<(), String> {
    let LockArgs {
        recipe,
        update,
        cache,
        key,
        jobs,
        json,
        remote,
    } = args;
    let lock_file = lock::path_for(&recipe);
    let (mut r, g) = load(&recipe)?;
    let mut fresh = Vec::new();
    if let Some(steps) = &update {
        for id in steps {
            match r.steps.iter().find(|s| &s.id == id) {
                Some(s) if lock::resolves(&s.kind) => {}
                Some(s) => {
                    return Err(format!(
                        "--update: step `{id}` is a {} step; only debootstrap and apt steps resolve packages",
                        s.kind.name()
                    ))
                }
                None => return Err(format!("--update: {} has no step `{id}`", recipe.display())),
            }
        }
        for s in &mut r.steps {
            if lock::resolves(&s.kind) && (steps.is_empty() || steps.contains(&s.id)) {
                s.pinned = None;
                fresh.push(s.id.clone());
            }
        }
    }
    let options = BuildOptions {
        remotes: remote.remotes()?,
        cache: cache.cache,
        out_dir: PathBuf::new(),
        jobs,
        ssh_key: key.ssh_key,
        progress: true,
        lock_file: Some(lock_file.clone()),
        update: fresh,
    };
    let report = build::lock(&r, &g, &options).map_err(|e| e.to_string())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialize")
        );
    }
    if report.changes.is_empty() {
        eprintln!("{} is up to date", lock_file.display());
    }
    Ok(())
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::InternalSandbox { job } => {
            return ExitCode::from(crate::sandbox::main(&job).clamp(0, 255) as u8)
        }
        Command::Graph { recipe } => load(&recipe).map(|(r, g)| print!("{}", g.to_dot(&r))),
        Command::Diff(args) => diff_command(args),
        Command::Schema => {
            print!("{}", recipe::SCHEMA);
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
            Ok(())
        }
        Command::Key(KeyCommand::Generate { prefix }) => crate::sign::SigningKey::generate()
            .and_then(|k| {
                k.save(&prefix)?;
                println!("{}", k.public());
                eprintln!(
                    "wrote {} (secret: keep it on this machine) and {} (share it: trusted_keys)",
                    prefix.with_extension("key").display(),
                    prefix.with_extension("pub").display()
                );
                Ok(())
            })
            .map_err(|e| e.to_string()),
        Command::Cache(CacheCommand::Pull(args)) => cache_pull_command(args),
        Command::Cache(CacheCommand::Stats(args)) => cache_stats_command(args),
        Command::Cache(CacheCommand::Gc(args)) => cache_gc_command(args),
        Command::Cache(CacheCommand::Fsck(args)) => cache_fsck_command(args),
        Command::Cache(CacheCommand::Push(args)) => cache_push_command(args),
        Command::Verify(args) => verify_command(args),
        Command::Boot(args) => boot_command(args),
        Command::Plan(args) => plan_command(args),
        Command::Build(args) => build_command(args),
        Command::Lock(args) => lock_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
