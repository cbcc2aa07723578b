//! Building a recipe: run or reuse every step (in parallel where the graph
//! allows), then assemble the image.
//!
//! Each step, once its dependencies are done: compute its key from its
//! parameters and its lower layers' digests; on an action-cache hit reuse the
//! layer; otherwise run it in the sandbox over its lower layers, capture the
//! overlay upper dir as a layer, store it, and record the key. A failed step
//! records nothing; the build stops starting new steps, lets running ones
//! finish, and reports the failure with the tail of the step's log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::apt_lists;
use crate::artifacts::{self, Artifact, Boot, Manifest, ManifestStep, Register};
use crate::assemble;
use crate::capture;
use crate::debs;
use crate::delta;
use crate::digest::{Digest, KeyEncoder};
use crate::dpkg::Deb;
use crate::explain::{Explainer, Ingredients};
use crate::ext4::data_blocks::ToRead;
use crate::ext4::{uuid_from, Ext4Options};
use crate::graph::Graph;
use crate::host;
use crate::io_at::{io_at, IoAt};
use crate::key::family_key;
use crate::layer::{Kind, Layer};
use crate::lock::{self, Lock};
use crate::measure::Measured;
use crate::normalize::Normalizer;
use crate::outputs::{self, Outputs};
use crate::progress::Progress;
use crate::recipe::Recipe;
use crate::recipe::Step;
use crate::remote::Remotes;
use crate::resolve::{self, Found};
use crate::sandbox::{self, Action, Bind, ImageJob, Job, SandboxError, StepJob};
use crate::sbom;
use crate::step::{root_env, StepContext, StepKind, DELTA_DIR, DELTA_REFUSED, DOWNLOAD_DIR};
use crate::store::{ActionEntry, LastBuild, Origin, Store, WorkDir};

/// Build settings from the command line.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub cache: PathBuf,
    pub out_dir: PathBuf,
    pub jobs: usize,
    /// Public key file for `user` steps' authorized_keys (`--ssh-key`).
    pub ssh_key: Option<PathBuf>,
    /// Print progress lines on stderr.
    pub progress: bool,
    /// Shared caches to pull from and push to.
    pub remotes: Arc<Remotes>,
    /// The recipe's lock file (see `lock`): what steps resolve in the build
    /// is written there. `None` writes no lock.
    pub lock_file: Option<PathBuf>,
    /// Steps to resolve against the archives even when a cached run of the
    /// step could give their pins (`kiln lock --update`).
    pub update: Vec<String>,
}

/// Whether a step ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Cached,
    /// Taken from a remote cache.
    Pulled,
    Built,
}

/// One step's result.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub id: String,
    pub kind: String,
    pub key: Digest,
    pub layer: Digest,
    pub outcome: Outcome,
    pub seconds: f64,
    /// For an `apt` step built as a delta: the key of the cached run it built on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_over: Option<Digest>,
    /// For a step that ran: what differs from its last build (see `explain`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub why: Vec<String>,
    /// Seconds since the build started: when the steps it needs were done,
    /// when a worker took it up, and when it finished.
    pub ready_at: f64,
    pub started_at: f64,
    pub finished_at: f64,
}

/// The whole build's result.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub recipe: String,
    /// Digest over every step key in graph order: names this exact build.
    pub recipe_key: Digest,
    pub image: PathBuf,
    pub image_blake3: Digest,
    pub image_bytes: u64,
    /// The kernel and initrd, when the recipe's output asks for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Artifact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<Artifact>,
    /// The manifest file, when the recipe's output asks for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<PathBuf>,
    /// The SPDX software bill of materials, when the recipe's output asks for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sbom: Option<Artifact>,
    /// False when no layer changed since the outputs were written and they
    /// were left as they were (see `outputs`).
    pub assembled: bool,
    /// Where assembly's time went (empty when nothing was assembled).
    pub assembly: Vec<Phase>,
    /// kiln's own peak memory (resident set, KiB), without the programs it ran.
    pub peak_rss_kib: u64,
    /// What the build changed in the lock file, one line per step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lock_changes: Vec<String>,
    pub steps: Vec<StepReport>,
    pub built: usize,
    /// Steps taken from a remote cache.
    pub pulled: usize,
    pub cached: usize,
    pub seconds: f64,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "kiln build needs root (it uses mount namespaces, overlayfs and chroot); run it with sudo"
    )]
    NotRoot,
    #[error("step `{id}` failed: {reason}\n--- last lines of its log ---\n{tail}\n--- full log: {log} ---")]
    StepFailed {
        id: String,
        reason: String,
        tail: String,
        log: PathBuf,
    },
    #[error("step `{id}`: {message}")]
    Step { id: String, message: String },
    #[error(transparent)]
    Conflict(#[from] assemble::ConflictError),
    #[error("writing the image failed: {reason}\n--- last lines of its log ---\n{tail}\n--- full log: {log} ---")]
    Image {
        reason: String,
        tail: String,
        log: PathBuf,
    },
    #[error(transparent)]
    Mkfs(#[from] crate::ext4::Ext4Error),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    Artifact(#[from] artifacts::ArtifactError),
    #[error(transparent)]
    Resolve(#[from] resolve::ResolveError),
    #[error(transparent)]
    Layer(#[from] capture::LayerError),
    #[error(transparent)]
    Io(#[from] IoAt),
    /// Assembly read a damaged blob (now removed): building again makes it anew.
    #[error("{0}")]
    DamagedBlob(Box<BuildError>),
}

/// What the workers share.
struct Shared {
    recipe: Recipe,
    store: Store,
    resolv_conf: Option<PathBuf>,
    ssh_key: Option<PathBuf>,
    remotes: Arc<Remotes>,
    /// Step results to push, handled by a background thread; `None` once closed.
    pushes: Mutex<Option<mpsc::Sender<(Digest, Digest, String)>>>,
    /// When the build started (step times are reported from here).
    started: Instant,
    /// Where progress lines go (and, on a terminal, the running steps).
    progress: Progress,
    /// The packages each step without pins installed, for the lock file.
    resolved: Mutex<BTreeMap<String, Vec<Deb>>>,
    /// Steps that resolve against the archives even when a cached run could
    /// give their pins (`kiln lock --update`).
    update: HashSet<String>,
    /// What each debootstrap run read from the archive's index (see `debs`).
    indexes: Mutex<HashMap<String, debs::ArchiveIndex>>,
    /// Why each step runs (quoting the reasons of the steps below it).
    explainer: Mutex<Explainer>,
}

/// Builds `recipe` and writes its image into `options.out_dir`. When
/// assembly finds a damaged blob in the cache (a `stat` cannot tell bit rot),
/// the blob is removed and the build runs once more, making it anew.
pub fn build(
    recipe: &Recipe,
    graph: &Graph,
    options: &BuildOptions,
) -> Result<BuildReport, BuildError> {
    match build_once(recipe, graph, options) {
        Err(BuildError::DamagedBlob(e)) => {
            eprintln!(
                "kiln: {e}
kiln: the damaged blob was removed from the cache; building the steps that made it again"
            );
            build_once(recipe, graph, options)
        }
        done => done,
    }
}

/// Whether any blob of `layers` is no longer intact, i.e. `e` came from a
/// damaged blob that the reader removed.
fn blame_damaged_blobs(store: &Store, layers: &[Layer], e: BuildError) -> BuildError {
    let damaged = layers
        .iter()
        .flat_map(|l| &l.entries)
        .any(|entry| match &entry.kind {
            Kind::File { blob, size } => !store.blob_looks_intact(blob, Some(*size)),
            _ => false,
        });
    if damaged {
        BuildError::DamagedBlob(Box::new(e))
    } else {
        e
    }
}

/// Runs or reuses every step of `recipe` and writes the lock file; the
/// steps' reports in recipe order and what changed in the lock.
fn run_recipe_steps(
    recipe: &Recipe,
    graph: &Graph,
    options: &BuildOptions,
) -> Result<StepsDone, BuildError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BuildError::NotRoot);
    }
    let started = Instant::now();
    let mut tools = host::IMAGE_TOOLS.to_vec();
    if recipe.steps.iter().any(|s| s.kind.is_base()) {
        // mmdebstrap builds the base; debootstrap's suite scripts give the defaults.
        tools.push(host::Tool {
            program: "mmdebstrap",
            package: "mmdebstrap",
        });
        tools.push(host::Tool {
            program: "debootstrap",
            package: "debootstrap",
        });
    }
    host::ensure(&tools).map_err(BuildError::Host)?;
    let store = Store::open(&options.cache)?;
    let resolv_conf = host_resolv_conf(&store)?;
    // Pushing runs beside the build, never on its critical path.
    let (push_tx, push_rx) = mpsc::channel::<(Digest, Digest, String)>();
    let pusher = {
        let remotes = Arc::clone(&options.remotes);
        let reader = Store::open_read_only(store.root());
        Pusher(Some(std::thread::spawn(move || {
            for (key, layer, step) in push_rx {
                let _ = remotes.push(&key, &layer, &step, &reader);
            }
        })))
    };
    let shared = Arc::new(Shared {
        recipe: recipe.clone(),
        store,
        resolv_conf,
        ssh_key: options.ssh_key.clone(),
        remotes: Arc::clone(&options.remotes),
        pushes: Mutex::new(Some(push_tx)),
        started,
        progress: Progress::start(options.progress),
        resolved: Mutex::default(),
        update: options.update.iter().cloned().collect(),
        indexes: Mutex::default(),
        explainer: Mutex::default(),
    });
    let reports = run_steps(&shared, graph, options);
    // No more pushes: the pusher finishes what is queued (beside assembly).
    shared
        .pushes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    // What the steps that ran resolved is kept even when another step failed.
    let lock_changes = match &options.lock_file {
        Some(path) => write_lock(&shared, path)?,
        None => Vec::new(),
    };
    Ok(StepsDone {
        reports: reports?,
        shared,
        lock_changes,
        pusher,
    })
}

/// Every step done: what assembly starts from.
struct StepsDone {
    shared: Arc<Shared>,
    /// By step index.
    reports: Vec<StepReport>,
    lock_changes: Vec<String>,
    /// Pushes still going on.
    pusher: Pusher,
}

/// The thread pushing step results to the remotes; dropping it waits until
/// everything queued is pushed.
struct Pusher(Option<std::thread::JoinHandle<()>>);

impl Drop for Pusher {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            if thread.join().is_err() {
                eprintln!("warning: pushing to the remote caches stopped early");
            }
        }
    }
}

/// Writes what the build resolved into the lock file at `path` (only when
/// that changes it); what changed, one line per step.
fn write_lock(shared: &Shared, path: &Path) -> Result<Vec<String>, BuildError> {
    let old = Lock::read(path)?;
    let resolved = shared.resolved.lock().unwrap_or_else(|e| e.into_inner());
    let next = old.updated(&shared.recipe, &resolved);
    let changes = old.changes(&next);
    if next != old {
        let name = shared.recipe.file.file_name().unwrap_or_default();
        next.write(path, &name.to_string_lossy())?;
        for line in &changes {
            shared.progress.line(&format!("lock: {line}"));
        }
        shared
            .progress
            .line(&format!("lock: wrote {}", path.display()));
    }
    Ok(changes)
}

/// The result of `kiln lock`: every step's report and what changed in the lock.
#[derive(Debug, Clone, Serialize)]
pub struct LockReport {
    pub steps: Vec<StepReport>,
    pub changes: Vec<String>,
}

/// Runs or reuses the steps of `recipe` (steps without pins resolve their
/// packages) and writes the lock file, without assembling an image.
pub fn lock(
    recipe: &Recipe,
    graph: &Graph,
    options: &BuildOptions,
) -> Result<LockReport, BuildError> {
    let done = run_recipe_steps(recipe, graph, options)?;
    let (reports, changes) = (done.reports, done.lock_changes);
    Ok(LockReport {
        steps: graph.order().iter().map(|&i| reports[i].clone()).collect(),
        changes,
    })
}

fn build_once(
    recipe: &Recipe,
    graph: &Graph,
    options: &BuildOptions,
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    // Assembly runs while the last pushes finish (`_pusher` waits for them).
    let StepsDone {
        shared,
        reports,
        lock_changes,
        pusher: _pusher,
    } = run_recipe_steps(recipe, graph, options)?;

    let mut enc = KeyEncoder::new("kiln recipe key");
    for &i in graph.order() {
        enc.digest(&reports[i].key);
    }
    let recipe_key = enc.finish();
    let count = |o: Outcome| reports.iter().filter(|r| r.outcome == o).count();
    let (built, pulled) = (count(Outcome::Built), count(Outcome::Pulled));
    let ordered: Vec<StepReport> = graph.order().iter().map(|&i| reports[i].clone()).collect();
    shared.store.record_last_build(&LastBuild {
        recipe: recipe.name.clone(),
        built,
        pulled,
        cached: ordered.len() - built - pulled,
    });
    let finish = |written: Outputs, assembly: Vec<Phase>| BuildReport {
        recipe: recipe.name.clone(),
        recipe_key,
        image: written.rootfs.path,
        image_blake3: written.rootfs.blake3,
        image_bytes: written.rootfs.bytes,
        kernel: written.kernel,
        initrd: written.initrd,
        manifest: written.manifest,
        sbom: written.sbom,
        peak_rss_kib: peak_rss_kib(),
        lock_changes: lock_changes.clone(),
        assembled: !assembly.is_empty(),
        assembly,
        cached: ordered.len() - built - pulled,
        pulled,
        built,
        steps: ordered.clone(),
        seconds: started.elapsed().as_secs_f64(),
    };

    let layer_digests: Vec<Digest> = ordered.iter().map(|s| s.layer).collect();
    let mkfs = crate::ext4::writer_version()?;
    let output_key = outputs::output_key(recipe, &mkfs, &layer_digests)
        .map_err(io_at(Path::new("/proc/self/exe")))?;
    let rootfs_name = &recipe.output.rootfs;
    if let Some(written) = outputs::fresh(&options.out_dir, rootfs_name, &output_key) {
        shared.progress.line(&format!(
            "outputs up to date: no layer changed since {rootfs_name} was written"
        ));
        return Ok(finish(written, Vec::new()));
    }
    outputs::forget(&options.out_dir, rootfs_name).map_err(io_at(&options.out_dir))?;

    let mut phases = Phases::default();
    let layers = reports
        .iter()
        .map(|r| shared.store.layer(&r.layer))
        .collect::<Result<Vec<Layer>, _>>()?;
    let store = &shared.store;
    let merged = assemble::merge(recipe, graph, &layers, store)
        .map_err(|e| blame_damaged_blobs(store, &layers, e.into()))?;
    phases.lap("merge");
    let block = crate::ext4::block_size(recipe.output.size.0);
    let (tree, trees, to_read, from) =
        match in_place(store, graph, &reports, &layers, &merged, block)? {
            Some(InPlace {
                fixups,
                trees,
                to_read,
            }) => {
                let from = format!(
                "from the layers' trees in place ({} entries over them, {} files read for zeros)",
                fixups.entries.len(),
                to_read.files.len()
            );
                (fixups, trees, Some(to_read), from)
            }
            None => (
                merged.clone(),
                Vec::new(),
                None,
                "from a copy of the merged tree".to_string(),
            ),
        };
    phases.lap("trees");
    shared.progress.line(&format!(
        "assembling {} entries into {rootfs_name} {from}",
        merged.entries.len()
    ));
    std::fs::create_dir_all(&options.out_dir).map_err(io_at(&options.out_dir))?;
    let image = options.out_dir.join(rootfs_name);
    // The kernel, the initrd and what the SBOM lists come from the merged
    // layer alone: they are written and measured while the image job runs
    // mkfs (one core), once it has copied the tree (with every core).
    let (log_tx, log_rx) = std::sync::mpsc::channel::<PathBuf>();
    let image_done = std::sync::atomic::AtomicBool::new(false);
    let (image_phases, rootfs, side) = std::thread::scope(|scope| {
        let side = scope.spawn(|| -> Result<_, BuildError> {
            let log_rx = log_rx;
            if let Ok(log) = log_rx.recv() {
                wait_for_phase(&log, "tree", &image_done);
            }
            let started = Instant::now();
            let blame = |e: BuildError| blame_damaged_blobs(store, &layers, e);
            let boot =
                artifacts::write_boot_files(store, &merged, &recipe.output, &options.out_dir)
                    .map_err(|e| blame(e.into()))?;
            let kernel = boot.as_ref().map(|b| Artifact::of(&b.kernel)).transpose()?;
            let initrd = boot
                .as_ref()
                .and_then(|b| b.initrd.as_deref())
                .map(Artifact::of)
                .transpose()?;
            let contents = match &recipe.output.sbom {
                Some(_) => {
                    Some(sbom::contents(recipe, &merged, store).map_err(|e| blame(e.into()))?)
                }
                None => None,
            };
            Ok((
                boot,
                kernel,
                initrd,
                contents,
                started.elapsed().as_secs_f64(),
            ))
        });
        let written = write_image(store, recipe, tree, trees, to_read, &image, &log_tx);
        image_done.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(log_tx);
        let written = written
            .map_err(|e| blame_damaged_blobs(store, &layers, e))
            .and_then(|(phases, measured)| Ok((phases, Artifact::measured(&image, measured)?)));
        let side = side.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        written.map(|(phases, rootfs)| (phases, rootfs, side))
    })?;
    let (boot, kernel, initrd, contents, side_seconds) = side?;
    for (name, seconds) in image_phases {
        phases.add(name, seconds);
    }
    let sbom = match (&recipe.output.sbom, &contents) {
        (Some(name), Some(contents)) => {
            let path = options.out_dir.join(name);
            let text = sbom::document(recipe, contents, &rootfs);
            std::fs::write(&path, text).map_err(io_at(&path))?;
            Some(Artifact::of(&path)?)
        }
        _ => None,
    };
    if sbom.is_some() {
        phases.lap("sbom");
    }
    let parts: Vec<String> = phases
        .done
        .iter()
        .map(|p| format!("{} {:.1}s", p.phase, p.seconds))
        .collect();
    shared.progress.line(&format!(
        "assembled in {:.1}s: {} (kernel, initrd and SBOM contents {side_seconds:.1}s alongside)",
        phases.done.iter().map(|p| p.seconds).sum::<f64>(),
        parts.join(", ")
    ));
    let manifest = match &recipe.output.manifest {
        None => None,
        Some(name) => {
            let output = &recipe.output;
            let manifest = Manifest {
                name: recipe.name.clone(),
                reference: output.reference.clone(),
                recipe_key,
                built_by: format!("kiln {}", env!("CARGO_PKG_VERSION")),
                written_by: mkfs,
                register: Register {
                    reference: output.reference.clone(),
                    kernel_path: kernel.as_ref().map(|k| artifacts::install_path(output, k)),
                    rootfs_path: artifacts::install_path(output, &rootfs),
                },
                boot: Boot {
                    kernel_release: boot.as_ref().map(|b| b.release.clone()),
                    kernel_format: "elf-vmlinux",
                    initrd_required: initrd.is_some(),
                    kernel_cmdline: artifacts::KERNEL_CMDLINE,
                },
                rootfs: rootfs.clone(),
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                sbom: sbom.clone(),
                steps: ordered
                    .iter()
                    .map(|s| ManifestStep {
                        id: s.id.clone(),
                        kind: s.kind.clone(),
                        key: s.key,
                        layer: s.layer,
                    })
                    .collect(),
            };
            let path = options.out_dir.join(name);
            let text = serde_json::to_string_pretty(&manifest).expect("manifests serialize") + "\n";
            std::fs::write(&path, text).map_err(io_at(&path))?;
            Some(std::fs::canonicalize(&path).unwrap_or(path))
        }
    };
    let written = Outputs {
        rootfs,
        kernel,
        initrd,
        manifest,
        sbom,
    };
    outputs::remember(&options.out_dir, &output_key, &written).map_err(io_at(&options.out_dir))?;
    Ok(finish(written, phases.done))
}

/// A copy of the host's resolv.conf for chroots (none if the host has none).
fn host_resolv_conf(store: &Store) -> Result<Option<PathBuf>, BuildError> {
    let Ok(text) = std::fs::read("/etc/resolv.conf") else {
        return Ok(None);
    };
    let path = store.tmp_file_path();
    std::fs::write(&path, text).map_err(io_at(&path))?;
    Ok(Some(path))
}

/// How much a step of this kind weighs when choosing which ready step to
/// start: steps that install packages are the slow ones.
fn schedule_weight(step: &Step) -> u64 {
    if step.kind.downloads_packages() {
        10
    } else {
        1
    }
}

/// Runs the steps as their dependencies finish, at most `jobs` at a time;
/// of the ready steps, the one with the heaviest chain of steps after it
/// starts first (ties in graph order).
fn run_steps(
    shared: &Arc<Shared>,
    graph: &Graph,
    options: &BuildOptions,
) -> Result<Vec<StepReport>, BuildError> {
    let n = shared.recipe.steps.len();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.jobs.max(1))
        .build()
        .map_err(|e| BuildError::Step {
            id: "-".into(),
            message: format!("cannot start worker threads: {e}"),
        })?;
    let (tx, rx) = mpsc::channel::<(usize, Result<StepReport, BuildError>)>();
    let mut reports: Vec<Option<StepReport>> = vec![None; n];
    let mut waiting: Vec<usize> = (0..n).map(|i| graph.needs(i).len()).collect();
    let chain = graph.chain_weights(|i| schedule_weight(&shared.recipe.steps[i]));
    let jobs = options.jobs.max(1);
    // When each step's dependencies had all finished.
    let mut ready_at: Vec<Option<f64>> = waiting.iter().map(|&w| (w == 0).then_some(0.0)).collect();
    let mut started = vec![false; n];
    let mut running = 0usize;
    let mut failure: Option<BuildError> = None;
    let total = n;
    let mut done = 0usize;

    loop {
        if failure.is_none() {
            let mut ready: Vec<usize> = graph
                .order()
                .iter()
                .copied()
                .filter(|&i| !started[i] && waiting[i] == 0)
                .collect();
            ready.sort_by_key(|&i| std::cmp::Reverse(chain[i]));
            for i in ready.into_iter().take(jobs.saturating_sub(running)) {
                started[i] = true;
                running += 1;
                let layers: Vec<Option<Digest>> = reports
                    .iter()
                    .map(|r| r.as_ref().map(|r| r.layer))
                    .collect();
                let lowers: Vec<(String, Digest)> =
                    resolve::below(&shared.recipe, graph, i, &layers)
                        .into_iter()
                        .map(|(id, layer)| (id, layer.expect("dependencies finish first")))
                        .collect();
                let shared = Arc::clone(shared);
                let tx = tx.clone();
                let ready_at = ready_at[i].expect("a ready step has its time");
                pool.spawn(move || {
                    let result = run_step(&shared, i, &lowers, ready_at);
                    // Let go of the store before reporting, so that when the build
                    // ends its work directory is removed, whatever happens next.
                    drop(shared);
                    let _ = tx.send((i, result));
                });
            }
        }
        if running == 0 {
            break;
        }
        let (i, result) = rx.recv().expect("workers report back");
        running -= 1;
        done += 1;
        match result {
            Ok(report) => {
                let how = match report.outcome {
                    Outcome::Cached => "cached".to_string(),
                    Outcome::Pulled => "pulled".to_string(),
                    Outcome::Built => match report.delta_over {
                        Some(_) => format!("built in {:.1}s (delta)", report.seconds),
                        None => format!("built in {:.1}s", report.seconds),
                    },
                };
                shared.progress.line(&format!(
                    "[{done}/{total}] {:<16} {:<12} {how:<16} layer {}",
                    report.id,
                    report.kind,
                    report.layer.short()
                ));
                let now = shared.started.elapsed().as_secs_f64();
                for (child, count) in waiting.iter_mut().enumerate() {
                    if graph.needs(child).contains(&i) {
                        *count -= 1;
                        if *count == 0 {
                            ready_at[child] = Some(now);
                        }
                    }
                }
                reports[i] = Some(report);
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(reports
        .into_iter()
        .map(|r| r.expect("every step ran"))
        .collect())
}

/// Runs (or reuses) one step over the given lower layers.
fn run_step(
    shared: &Shared,
    i: usize,
    lowers_by_step: &[(String, Digest)],
    ready_at: f64,
) -> Result<StepReport, BuildError> {
    let started_at = shared.started.elapsed().as_secs_f64();
    let lowers: &[Digest] = &lowers_by_step.iter().map(|(_, l)| *l).collect::<Vec<_>>();
    let started = Instant::now();
    let recipe = &shared.recipe;
    let step = &recipe.steps[i];
    let store = &shared.store;
    let ctx = resolve::context(step, shared.ssh_key.as_deref());
    let epoch = recipe.output.epoch;
    let reuse_runs = !shared.update.contains(&step.id);
    let found = resolve::find(store, step, epoch, lowers, &ctx, reuse_runs)?;
    // The key without pins, for a step whose pins come from a cached run:
    // what it was last built (and explained) under.
    let key = match &found {
        Found::Resolved { run_key, .. } => *run_key,
        found => found.key(),
    };
    let by_step: Vec<(String, Option<Digest>)> = lowers_by_step
        .iter()
        .map(|(id, layer)| (id.clone(), Some(*layer)))
        .collect();
    let ingredients = || Ingredients::of(step, Some(key), epoch, &by_step, &ctx);
    let last = Ingredients::last(store, &recipe.name, &step.id);
    // Records what went into this build of the step, unless the last record
    // has this very key (then it says the same, and the files the step read
    // need not be read again).
    let remember = |now: Option<&Ingredients>| match now {
        Some(now) => now.record(store, &recipe.name, &step.id),
        None if last.as_ref().is_some_and(|l| l.key == Some(key)) => {}
        None => ingredients().record(store, &recipe.name, &step.id),
    };
    let report = |key: Digest,
                  layer: Digest,
                  outcome: Outcome,
                  delta_over: Option<Digest>,
                  why: Vec<String>| {
        StepReport {
            id: step.id.clone(),
            kind: step.kind.name().to_string(),
            key,
            layer,
            outcome,
            seconds: started.elapsed().as_secs_f64(),
            delta_over,
            why,
            ready_at,
            started_at,
            finished_at: shared.started.elapsed().as_secs_f64(),
        }
    };
    let queue_push = |key: Digest, layer: Digest| {
        let pushes = shared.pushes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = pushes.as_ref() {
            let _ = tx.send((key, layer, step.id.clone()));
        }
    };
    match found {
        Found::Cached { key, layer } => {
            store.touch_action(&key);
            queue_push(key, layer);
            remember(None);
            return Ok(report(key, layer, Outcome::Cached, None, Vec::new()));
        }
        Found::Resolved {
            key: locked_key,
            pins,
            run,
            ..
        } => {
            keep_resolution(shared, step, locked_key, &run, pins)?;
            shared.progress.line(&format!(
                "  ... {:<16} pins taken from a cached run of this step \
                 (`kiln lock --update {}` resolves against the archive now)",
                step.id, step.id
            ));
            queue_push(locked_key, run.layer);
            remember(None);
            return Ok(report(
                locked_key,
                run.layer,
                Outcome::Cached,
                None,
                Vec::new(),
            ));
        }
        Found::Missing {
            resolves: false, ..
        } => {
            if let Some(layer) = shared.remotes.fetch(&key, &step.id, store) {
                remember(None);
                return Ok(report(key, layer, Outcome::Pulled, None, Vec::new()));
            }
        }
        // It runs: what it installs is what the archive gives now, and
        // becomes its pins.
        Found::Missing { resolves: true, .. } => {}
    }
    let resolving = resolve::resolves(step);
    let now = ingredients();
    let why = shared
        .explainer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .why(&step.id, last.as_ref(), &now);
    let progress = &shared.progress;
    progress.line(&format!(
        "  ... {:<16} {:<12} running (key {})",
        step.id,
        step.kind.name(),
        key.short()
    ));
    for line in &why {
        progress.line(&format!("      {:<16} why: {line}", step.id));
    }
    progress.running(&step.id);
    // However the step ends, it is no longer running.
    struct Running<'a>(&'a Progress, &'a str);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.done(self.1);
        }
    }
    let _running = Running(progress, &step.id);
    let log = store.log_path(&key);
    std::fs::write(
        &log,
        format!(
            "kiln: step `{}` ({}), key {key}\n",
            step.id,
            step.kind.name()
        ),
    )
    .map_err(io_at(&log))?;

    // An apt step with a cached run of its family to build on tries a delta first.
    let apt_family = match (&step.kind, family_key(step, epoch, lowers)) {
        (StepKind::Apt(apt), Some(family)) => Some((apt, family)),
        _ => None,
    };
    if let Some(pinned) = &step.pinned {
        fetch_package_set(shared, step, pinned, &log);
    }
    let mut delta_built = None;
    // (A step with pins runs clean: it must install exactly those.)
    if let (Some((apt, family)), None) = (&apt_family, &step.pinned) {
        if let Some(base) = delta::find_base(store, family, &apt.packages) {
            match run_delta(shared, step, apt, lowers, &base, &log)? {
                Ok(layer) => delta_built = Some((layer, base.key)),
                Err(why) => {
                    let note = format!("delta over a cached run refused: {why}; running clean");
                    append_log(&log, &format!("kiln: {note}\n"));
                    progress.line(&format!("  ... {:<16} {note}", step.id));
                }
            }
        }
    }
    let (digest, delta_over) = match delta_built {
        Some((layer, over)) => (layer, Some(over)),
        None => (run_clean(shared, step, lowers, &log)?, None),
    };
    let entry = |resolved: Option<Vec<Deb>>| ActionEntry {
        layer: digest,
        step: step.id.clone(),
        build_ms: started.elapsed().as_millis() as u64,
        origin: Origin::Built,
        resolved,
    };
    let unpinned_key = key;
    let key = match lock::resolves(&step.kind) {
        true => pin(shared, step, lowers, &digest, key, &ctx)?,
        false => key,
    };
    if let Some((apt, family)) = &apt_family {
        store.put_family_member(family, &key, &apt.packages)?;
    }
    store.put_action(&key, &entry(None))?;
    if resolving {
        // What this run resolved, for the next build without pins.
        let pins = step_pins(shared, &step.id);
        store.put_action(&unpinned_key, &entry(pins))?;
    }
    if let Some(pins) = step.pinned.clone().or_else(|| step_pins(shared, &step.id)) {
        let index = shared
            .indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&step.id);
        if let Some(index) = index {
            let set = debs::set_key(&pins);
            if let Err(e) = index.save(&store.debs_dir(), &set) {
                append_log(&log, &format!("kiln: keeping the archive's index: {e}\n"));
            }
        }
        push_package_set(shared, step, &pins, &log, &queue_push)?;
    }
    queue_push(key, digest);
    remember(Some(&now));
    Ok(report(key, digest, Outcome::Built, delta_over, why))
}

/// The key a step that resolves packages is recorded under, once its run
/// made `layer`. With pins, the packages it installed must be exactly the
/// pinned ones (version and file digest), else the step fails: the layer
/// would not be what its key says. Without, what it installed becomes its
/// pins (for the lock file) and its key is the one those pins give.
fn pin(
    shared: &Shared,
    step: &Step,
    lowers: &[Digest],
    layer: &Digest,
    key: Digest,
    ctx: &StepContext,
) -> Result<Digest, BuildError> {
    let store = &shared.store;
    let step_err = |message: String| BuildError::Step {
        id: step.id.clone(),
        message,
    };
    let before = dpkg_status(store, lowers)?;
    let mut with_layer = lowers.to_vec();
    with_layer.push(*layer);
    let after = dpkg_status(store, &with_layer)?.unwrap_or_default();
    let installed = lock::installed_by_step(&after, before.as_deref(), &store.debs_dir())
        .map_err(|e| step_err(e.to_string()))?;
    match &step.pinned {
        Some(pinned) => {
            let moved = lock::differences(pinned, &installed);
            if !moved.is_empty() {
                return Err(step_err(format!(
                    "it did not install what the lock pins ({}): a step below it changed what \
                     it installs, or the archive no longer gives the pinned packages and the \
                     package cache does not hold them all; run `kiln lock --update {}` to move \
                     the lock to what the archive gives now",
                    moved.join(", "),
                    step.id
                )));
            }
            Ok(key)
        }
        None => {
            let key =
                resolve::pinned_key(step, &installed, shared.recipe.output.epoch, lowers, ctx)?;
            shared
                .resolved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(step.id.clone(), installed);
            Ok(key)
        }
    }
}

/// Before a step with pins runs: when the package cache lacks some of the
/// pinned `.deb`s, takes the step's package set from the remotes (see
/// `debs`). Best effort: without it the archive may still have them.
fn fetch_package_set(shared: &Shared, step: &Step, pinned: &[Deb], log: &Path) {
    let store = &shared.store;
    let missing = pinned
        .iter()
        .filter(|d| debs::cached(&store.debs_dir(), d).is_none())
        .count();
    if missing == 0 || shared.remotes.is_empty() {
        return;
    }
    let set = debs::set_key(pinned);
    let note = match shared
        .remotes
        .fetch(&set, &format!("{} packages", step.id), store)
    {
        Some(layer) => match store
            .layer(&layer)
            .map(|l| debs::unpack_set(store, &l, pinned))
        {
            Ok(Ok(n)) => format!("took {n} pinned packages from a remote's package set"),
            Ok(Err(e)) | Err(e) => format!("unpacking the remote's package set: {e}"),
        },
        None => format!("{missing} pinned packages are in no cache; asking the archive"),
    };
    append_log(log, &format!("kiln: {note}\n"));
    shared
        .progress
        .line(&format!("  ... {:<16} {note}", step.id));
}

/// After a step with pins ran, when this build pushes: records its
/// `.deb`s as its package set and queues it for the remotes.
fn push_package_set(
    shared: &Shared,
    step: &Step,
    pins: &[Deb],
    log: &Path,
    queue_push: &dyn Fn(Digest, Digest),
) -> Result<(), BuildError> {
    let store = &shared.store;
    let set = debs::set_key(pins);
    if !shared.remotes.pushes() || store.action(&set)?.is_some() {
        return Ok(());
    }
    let Some(layer) = debs::capture_set(store, pins)? else {
        append_log(
            log,
            "kiln: not pushing the package set: the cache lacks some .debs\n",
        );
        return Ok(());
    };
    let digest = store.put_layer(&layer)?;
    store.put_action(
        &set,
        &ActionEntry {
            layer: digest,
            step: format!("{} packages", step.id),
            build_ms: 0,
            origin: Origin::Built,
            resolved: None,
        },
    )?;
    queue_push(set, digest);
    Ok(())
}

/// The pins the build resolved for step `id`, if it resolved any.
fn step_pins(shared: &Shared, id: &str) -> Option<Vec<Deb>> {
    let resolved = shared.resolved.lock().unwrap_or_else(|e| e.into_inner());
    resolved.get(id).cloned()
}

/// Takes the packages a cached run of a step without pins installed
/// (`run`) as the step's pins: records them for the lock file and the run's
/// layer under the key they give, `key`.
fn keep_resolution(
    shared: &Shared,
    step: &Step,
    key: Digest,
    run: &ActionEntry,
    pins: Vec<Deb>,
) -> Result<(), BuildError> {
    if !matches!(shared.store.action(&key)?, Some(e) if e.layer == run.layer) {
        let mut pinned_entry = run.clone();
        pinned_entry.resolved = None;
        shared.store.put_action(&key, &pinned_entry)?;
    }
    shared
        .resolved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(step.id.clone(), pins);
    Ok(())
}

/// dpkg's status file in the tree `layers` make (lowest first), if any.
fn dpkg_status(store: &Store, layers: &[Digest]) -> Result<Option<String>, BuildError> {
    let layers = layers
        .iter()
        .map(|l| store.layer(l))
        .collect::<Result<Vec<Layer>, _>>()?;
    let view = delta::view(&layers.iter().collect::<Vec<_>>());
    match view.get("var/lib/dpkg/status").map(|e| &e.kind) {
        Some(Kind::File { blob, .. }) => Ok(Some(
            String::from_utf8_lossy(&store.read_blob(blob)?).into_owned(),
        )),
        _ => Ok(None),
    }
}

/// Appends a line to a step's log (best effort: the log only informs).
fn append_log(log: &Path, text: &str) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::File::options().append(true).open(log) {
        let _ = file.write_all(text.as_bytes());
    }
}

/// A step's sandbox run in its own work directory: the overlay's dirs, the
/// private package archive when the kind downloads packages.
struct Run {
    work: WorkDir,
    archives: Option<PathBuf>,
    apt_lists: Option<PathBuf>,
}

impl Run {
    /// A run of `step`, its downloads shown as progress from now.
    fn prepare(shared: &Shared, step: &Step) -> Result<Run, BuildError> {
        let store = &shared.store;
        let work = store.work_dir()?;
        let archives = if step.kind.downloads_packages() {
            let dir = work.path().join("debs");
            debs::stage(&store.debs_dir(), &dir).map_err(io_at(&dir))?;
            Some(dir)
        } else {
            None
        };
        let apt_lists = if step.kind.updates_apt_lists() {
            let dir = work.path().join("apt-lists");
            apt_lists::seed(&store.apt_lists_dir(), &dir).map_err(io_at(&dir))?;
            Some(dir)
        } else {
            None
        };
        let run = Run {
            work,
            archives,
            apt_lists,
        };
        shared.progress.downloading(&step.id, run.download_dirs());
        Ok(run)
    }

    /// Where the run's downloads land: its package archive, and the
    /// scratch folder a `fetch` step downloads into.
    fn download_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.work.path().join(DOWNLOAD_DIR)];
        dirs.extend(self.archives.clone());
        dirs
    }

    /// The overlay's upper dir: the run's output.
    fn upper(&self) -> PathBuf {
        self.work.path().join("upper")
    }

    fn dir(&self, name: &str) -> Result<PathBuf, BuildError> {
        let p = self.work.path().join(name);
        std::fs::create_dir(&p).map_err(io_at(&p))?;
        Ok(p)
    }

    /// Runs `action` over the trees `lowers` (lowest first); the output is
    /// left in [`Run::upper`]. What was downloaded goes to the package cache,
    /// whatever the outcome; apt's lists are kept when the run ended well.
    fn run(
        &self,
        shared: &Shared,
        lowers: Vec<PathBuf>,
        action: Action,
        binds: Vec<Bind>,
        log: &Path,
        time_limit: std::time::Duration,
    ) -> Result<Result<(), SandboxError>, BuildError> {
        let job = Job::Step(StepJob {
            lowers,
            empty: self.dir("empty")?,
            upper: self.dir("upper")?,
            work: self.dir("work")?,
            merged: self.dir("merged")?,
            action,
            env: root_env(shared.recipe.output.epoch),
            resolv_conf: shared.resolv_conf.clone(),
            image: None,
            binds,
        });
        let started = Instant::now();
        let result = sandbox::run(
            &job,
            &self.work.path().join("job.json"),
            log,
            Some(time_limit),
        );
        append_log(
            log,
            &format!("kiln: ran in {:.1}s\n", started.elapsed().as_secs_f64()),
        );
        if let Some(archives) = &self.archives {
            if let Err(e) = debs::keep(archives, &shared.store.debs_dir()) {
                append_log(log, &format!("kiln: keeping downloaded packages: {e}\n"));
            }
        }
        if self.apt_lists.is_some() && result.is_ok() {
            let lists = self.upper().join("var/lib/apt/lists");
            if let Err(e) = apt_lists::keep(&lists, &shared.store.apt_lists_dir()) {
                append_log(log, &format!("kiln: keeping apt's package lists: {e}\n"));
            }
        }
        Ok(result)
    }

    fn context<'a>(&'a self, step: &'a Step, shared: &'a Shared) -> StepContext<'a> {
        StepContext {
            recipe_dir: step.origin.dir(),
            scratch: Some(self.work.path()),
            ssh_key: shared.ssh_key.as_deref(),
            archives: self.archives.as_deref(),
            apt_lists: self.apt_lists.as_deref(),
            time_limit: Some(step.time_limit()),
            reads: Default::default(),
        }
    }
}

/// The trees of `layers`, unpacked where needed.
fn trees(store: &Store, layers: &[Digest]) -> Result<Vec<PathBuf>, BuildError> {
    Ok(layers
        .iter()
        .map(|l| capture::tree(store, l))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Captures a run's output as a layer (its contents into the store) and
/// settles the output into that layer's tree, in place.
fn keep_output(
    shared: &Shared,
    step: &Step,
    upper: &Path,
    log: &Path,
) -> Result<Layer, BuildError> {
    let started = Instant::now();
    let store = &shared.store;
    let step_err = |message: String| BuildError::Step {
        id: step.id.clone(),
        message,
    };
    let normalizer = Normalizer {
        epoch: shared.recipe.output.epoch,
        extra_drops: step.kind.extra_drops(),
    };
    let layer = capture::capture(upper, store, &normalizer).map_err(|e| step_err(e.to_string()))?;
    capture::settle(upper, &layer).map_err(|e| step_err(e.to_string()))?;
    append_log(
        log,
        &format!(
            "kiln: captured {} entries in {:.1}s\n",
            layer.entries.len(),
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(layer)
}

/// Runs a step from scratch over its lower layers; its layer's digest.
fn run_clean(
    shared: &Shared,
    step: &Step,
    lowers: &[Digest],
    log: &Path,
) -> Result<Digest, BuildError> {
    let store = &shared.store;
    let run = Run::prepare(shared, step)?;
    let ctx = run.context(step, shared);
    let step_err = |e: crate::step::StepError| BuildError::Step {
        id: step.id.clone(),
        message: e.to_string(),
    };
    let mut from_cache = false;
    let action = match (&step.kind, &step.pinned) {
        (StepKind::Apt(apt), Some(pinned)) => apt.locked_action(pinned),
        (StepKind::Debootstrap(base), Some(pinned)) => {
            match local_mirror(store, &run, base, pinned, log).map_err(step_err)? {
                Some((mirror, archive)) => {
                    from_cache = true;
                    base.local_action(&ctx, &mirror, &archive)
                        .map_err(step_err)?
                }
                None => step.kind.action(&ctx).map_err(step_err)?,
            }
        }
        _ => step.kind.action(&ctx).map_err(step_err)?,
    };
    let binds = step.kind.binds(&ctx);
    let time_limit = step.time_limit();
    if let Err(e) = run.run(
        shared,
        trees(store, lowers)?,
        action,
        binds,
        log,
        time_limit,
    )? {
        return Err(BuildError::StepFailed {
            id: step.id.clone(),
            reason: e.to_string(),
            tail: log_tail(log, 20),
            log: log.to_path_buf(),
        });
    }
    if let (StepKind::Debootstrap(base), false) = (&step.kind, from_cache) {
        // What the archive's index says of the packages, for a run from the
        // package cache later (read before capture drops the index).
        let arch = base.architecture().map_err(step_err)?;
        if let Some(index) = debs::ArchiveIndex::of_root(&run.upper(), &base.suite, &arch) {
            let mut indexes = shared.indexes.lock().unwrap_or_else(|e| e.into_inner());
            indexes.insert(step.id.clone(), index);
        }
    }
    let layer = keep_output(shared, step, &run.upper(), log)?;
    let digest = store.put_layer(&layer)?;
    // The output is the layer's tree now: the next step mounts it at once.
    store.adopt_tree(&digest, &run.upper())?;
    Ok(digest)
}

/// For a pinned debootstrap step: a local mirror of its pinned `.deb`s in
/// the run's work directory, and the `sources.list` the root gets, when the package cache holds every pinned file and the
/// archive's index entries for them (see `debs`).
fn local_mirror(
    store: &Store,
    run: &Run,
    base: &crate::step::Debootstrap,
    pinned: &[Deb],
    log: &Path,
) -> Result<Option<(PathBuf, String)>, crate::step::StepError> {
    let cache = store.debs_dir();
    let Some(index) = debs::ArchiveIndex::load(&cache, &debs::set_key(pinned)) else {
        return Ok(None);
    };
    let dir = run.work.path().join("mirror");
    let io = |source| crate::step::StepError::Io {
        path: dir.clone(),
        source,
    };
    let arch = base.architecture()?;
    Ok(
        match debs::local_mirror(&cache, pinned, &index, &base.suite, &arch, &dir).map_err(io)? {
            Some(()) => {
                append_log(
                    log,
                    "kiln: bootstrapping the pinned packages from the package cache\n",
                );
                Some((dir, index.sources_list))
            }
            None => None,
        },
    )
}

/// Runs an `apt` step as a delta over the cached run `base` (see `delta`):
/// the step's layer digest, or why the delta does not stand.
fn run_delta(
    shared: &Shared,
    step: &Step,
    apt: &crate::step::Apt,
    lowers: &[Digest],
    base: &delta::Base,
    log: &Path,
) -> Result<Result<Digest, String>, BuildError> {
    let store = &shared.store;
    let lower_layers = lowers
        .iter()
        .map(|l| store.layer(l))
        .collect::<Result<Vec<Layer>, _>>()?;
    let base_layer = store.layer(&base.layer)?;
    let mut before = delta::view(&lower_layers.iter().collect::<Vec<_>>());
    let status = match before.get("var/lib/dpkg/status").map(|e| &e.kind) {
        Some(Kind::File { blob, .. }) => store.read_blob(blob)?,
        Some(_) => return Ok(Err("the lower layers' dpkg status is not a file".into())),
        None => return Ok(Err("the lower layers have no dpkg status".into())),
    };

    let run = Run::prepare(shared, step)?;
    let notes = run.dir("delta")?;
    let status_copy = notes.join("base-status");
    std::fs::write(&status_copy, status).map_err(io_at(&status_copy))?;
    let base_tree = capture::tree(store, &base.layer)?;
    let mut lower_trees = trees(store, lowers)?;
    lower_trees.push(base_tree.clone());
    let mut binds = step.kind.binds(&run.context(step, shared));
    binds.push(Bind {
        host: notes,
        inside: DELTA_DIR.into(),
    });
    append_log(
        log,
        &format!("kiln: delta over the cached run {}\n", base.key),
    );
    match run.run(
        shared,
        lower_trees,
        apt.delta_action(),
        binds,
        log,
        step.time_limit(),
    )? {
        Ok(()) => {}
        Err(SandboxError::Exited(DELTA_REFUSED)) => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let why = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("kiln: delta refused: "))
                .unwrap_or("apt's plan differs from a clean run's");
            return Ok(Err(why.to_string()));
        }
        Err(e) => return Ok(Err(format!("the delta run failed ({e})"))),
    }
    let added = keep_output(shared, step, &run.upper(), log)?;
    delta::stack_on(&mut before, &base_layer);
    if let Err(why) = delta::check(&added, &before) {
        return Ok(Err(why.to_string()));
    }
    let layer = delta::squash(&base_layer, &added);
    let digest = store.put_layer(&layer)?;
    // The step's tree: links into the cached run's tree and the delta's output.
    let tree = run.work.path().join("tree");
    let upper = run.upper();
    let from_delta: HashSet<&str> = added.entries.iter().map(|e| e.path.as_str()).collect();
    let source = |path: &str| {
        if from_delta.contains(path) {
            upper.join(path)
        } else {
            base_tree.join(path)
        }
    };
    match capture::link_tree(&layer, &tree, &source) {
        Ok(()) => store.adopt_tree(&digest, &tree)?,
        // Only a shortcut: the tree is unpacked from the store when needed.
        Err(e) => append_log(log, &format!("kiln: linking the step's tree: {e}\n")),
    }
    Ok(Ok(digest))
}

/// Where assembly's time went, phase by phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub phase: String,
    pub seconds: f64,
}

/// Collects [`Phase`]s as assembly goes.
struct Phases {
    done: Vec<Phase>,
    since: Instant,
}

impl Default for Phases {
    fn default() -> Self {
        Phases {
            done: Vec::new(),
            since: Instant::now(),
        }
    }
}

impl Phases {
    /// Ends the phase `name`, which began when the last one ended.
    fn lap(&mut self, name: &str) {
        let seconds = self.since.elapsed().as_secs_f64();
        self.add(name.to_string(), seconds);
    }

    /// Records a phase timed elsewhere, which ended now.
    fn add(&mut self, phase: String, seconds: f64) {
        self.done.push(Phase { phase, seconds });
        self.since = Instant::now();
    }
}

/// What the image is written from in place.
struct InPlace {
    /// What goes on top of the trees ([`assemble::fixups`]).
    fixups: Layer,
    /// The layers' trees, lowest first.
    trees: Vec<PathBuf>,
    /// The files the image writer reads to find their blocks of zeros
    /// ([`crate::ext4::data_blocks`]): those the trees' records name, and
    /// the fix-ups.
    to_read: ToRead,
}

/// What the image is written from in place. `None` when some tree is not
/// unpacked (say, every layer was pulled) or no fix-up can express the
/// merge: then the merged tree is unpacked whole, and the image is the
/// same. Which files of a tree hold blocks of zeros (`block` bytes) is
/// found by reading it the first time, and recorded.
fn in_place(
    store: &Store,
    graph: &Graph,
    reports: &[StepReport],
    layers: &[Layer],
    merged: &Layer,
    block: u64,
) -> Result<Option<InPlace>, BuildError> {
    // A layer two steps share (say, the empty one) is stacked once, at the
    // higher place: overlayfs refuses one directory twice, and the higher
    // copy hides everything the lower one shows.
    let mut digests: Vec<Digest> = Vec::with_capacity(reports.len());
    for &step in graph.order().iter().rev() {
        let digest = reports[step].layer;
        if !digests.contains(&digest) {
            digests.push(digest);
        }
    }
    if digests.len() >= MAX_STACKED_TREES {
        return Ok(None);
    }
    let mut trees = Vec::with_capacity(digests.len());
    for digest in digests.iter().rev() {
        match capture::unpacked_tree(store, digest)? {
            Some(tree) => trees.push(tree),
            None => return Ok(None),
        }
    }
    let Some(fixups) = assemble::fixups(merged, graph, layers) else {
        return Ok(None);
    };
    use rayon::prelude::*;
    let mut files: HashSet<String> = digests
        .par_iter()
        .rev()
        .zip(trees.par_iter())
        .map(|(digest, tree)| -> Result<Vec<String>, BuildError> {
            if let Some(files) = store.tree_zeros(digest, block) {
                return Ok(files);
            }
            let files = crate::ext4::data_blocks::files_to_read(tree, block)?;
            store.record_tree_zeros(digest, block, &files)?;
            Ok(files)
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    files.extend(fixups.entries.iter().map(|e| e.path.clone()));
    Ok(Some(InPlace {
        fixups,
        trees,
        to_read: ToRead { block, files },
    }))
}

/// How many trees overlayfs stacks at most, with the fix-ups above them
/// (its limit is 500 lower directories).
const MAX_STACKED_TREES: usize = 499;

/// Writes the image from `tree` (over the layers' `trees`, if any, see
/// [`in_place`]); returns the image job's phases and the image's measure.
fn write_image(
    store: &Store,
    recipe: &Recipe,
    tree: Layer,
    trees: Vec<PathBuf>,
    to_read: Option<ToRead>,
    image: &Path,
    log_to: &std::sync::mpsc::Sender<PathBuf>,
) -> Result<(Vec<(String, f64)>, Measured), BuildError> {
    let work = store.work_dir()?;
    let scratch = work.path().join("tree");
    std::fs::create_dir(&scratch).map_err(io_at(&scratch))?;
    let seed = |domain: &str| {
        let d = KeyEncoder::new(domain).str(&recipe.name).finish();
        uuid_from(d.as_bytes())
    };
    let image = std::path::absolute(image).map_err(io_at(image))?;
    let job = Job::Image(ImageJob {
        store: store.root().to_path_buf(),
        tree,
        trees,
        to_read,
        scratch,
        image: image.clone(),
        options: Ext4Options {
            size: recipe.output.size.0,
            label: recipe.output.label.clone(),
            uuid: seed("kiln filesystem uuid"),
            hash_seed: seed("kiln directory hash seed"),
            epoch: recipe.output.epoch,
        },
    });
    let log = work.path().join("image.log");
    let _ = log_to.send(log.clone());
    sandbox::run(&job, &work.path().join("job.json"), &log, None).map_err(|e| {
        let kept = store.root().join("logs").join("last-image.log");
        let _ = std::fs::copy(&log, &kept);
        BuildError::Image {
            reason: e.to_string(),
            tail: log_tail(&log, 20),
            log: kept,
        }
    })?;
    let text = std::fs::read_to_string(&log).map_err(io_at(&log))?;
    let phases = text
        .lines()
        .filter_map(|l| l.strip_prefix(sandbox::PHASE_PREFIX))
        .filter_map(|l| {
            let (name, seconds) = l.split_once(' ')?;
            Some((name.to_string(), seconds.parse().ok()?))
        })
        .collect();
    let measured = text
        .lines()
        .find_map(|l| l.strip_prefix(sandbox::MEASURED_PREFIX))
        .and_then(|l| match l.split(' ').collect::<Vec<_>>()[..] {
            [bytes, blake3, sha256] => Some(Measured {
                bytes: bytes.parse().ok()?,
                blake3: blake3.parse().ok()?,
                sha256: sha256.to_string(),
            }),
            _ => None,
        })
        .ok_or_else(|| BuildError::Image {
            reason: "the image job did not say what it wrote".into(),
            tail: log_tail(&log, 20),
            log: log.clone(),
        })?;
    Ok((phases, measured))
}

/// Waits until the image job's log at `log` says `phase` ended, or `done`.
fn wait_for_phase(log: &Path, phase: &str, done: &std::sync::atomic::AtomicBool) {
    let line = format!("{}{phase} ", sandbox::PHASE_PREFIX);
    while !done.load(std::sync::atomic::Ordering::Relaxed)
        && !std::fs::read_to_string(log).is_ok_and(|text| text.contains(&line))
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// This process's peak resident set (`VmHWM`), in KiB; 0 if unknown.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
