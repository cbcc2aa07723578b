//! The sandbox a step runs in, and the one that writes the image.
//!
//! kiln re-executes itself as `kiln internal-sandbox JOB.json`; that fresh,
//! single-threaded process enters a private mount namespace (and, for steps,
//! private PID, UTS, IPC and cgroup namespaces, with the host name `kiln`), so
//! every mount it makes disappears with it — on success, on failure, on Ctrl-C
//! or `kill -9` of kiln (the sandbox dies with its parent). Nothing is ever
//! mounted in the host's namespace, and a step cannot rename the host.
//!
//! A step job mounts an overlayfs (its dependencies' layer trees as lower dirs,
//! a fresh upper dir that becomes the step's layer), then either runs a host
//! program against the root (`debootstrap`), or runs a program of the root's
//! own inside it, or writes a file into it. A program of the root's own gets
//! `/proc` (with `/proc/sys` and `/proc/sysrq-trigger` read-only), a read-only
//! `/sys`, a minimal `/dev`, a tmpfs `/run` and the host's `resolv.conf` (not
//! captured); it runs after `pivot_root` into the root (the host's file
//! systems are detached from its view), with device files unusable outside
//! `/dev` and a capability bounding set cut to what package installs need
//! ([`KEPT_CAPABILITIES`]): it cannot mount, load modules, set the clock,
//! reboot, change the network or reach the host through `/proc/1/root`. It
//! shares the host's network, as apt needs it. An image job writes the ext4
//! image from the layers' trees in place, shown through a read-only
//! overlayfs below a tmpfs with what assembly changed, or from the merged
//! tree unpacked into a tmpfs when some tree is not unpacked.
//!
//! A step's programs do not wait on the disk: `fsync` and its kin return at
//! once ([`no_sync_filter`]). kiln captures the output afterwards and the
//! image written at the end is the durable artifact.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use caps::{CapSet, Capability};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, chroot, execve, fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use crate::ext4::data_blocks::ToRead;
use crate::ext4::Ext4Options;
use crate::fields::{Owner, Principal};
use crate::io_at::{io_at, IoAt};
use crate::layer::Layer;

/// Errors from preparing or running a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Io(#[from] IoAt),
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("{0}")]
    Failed(String),
    #[error("exited with status {0}")]
    Exited(i32),
    #[error("was stopped after running {}s, its time limit (raise the step's `timeout:` if it needs longer)", .0.as_secs())]
    TimedOut(std::time::Duration),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Sys { what, source }
}

/// What a step does inside its sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Action {
    /// Run a host program; the argument [`Action::ROOT`] is replaced by the root's path.
    Host { argv: Vec<String> },
    /// Run a program chrooted into the root.
    Chroot { argv: Vec<String> },
    /// Write a file (contents staged at `content`) into the root.
    WriteFile {
        path: String,
        content: PathBuf,
        mode: u32,
        owner: Owner,
    },
    /// Copy the host directory `staging` into the root at `dest` (merging
    /// with what is there), give everything copied to `owner`, then create
    /// `symlinks` (link path in the image -> target).
    CopyIn {
        staging: PathBuf,
        dest: String,
        owner: Owner,
        symlinks: Vec<(String, String)>,
    },
}

impl Action {
    /// Placeholder for the root directory in [`Action::Host`] arguments.
    pub const ROOT: &'static str = "{root}";
}

/// Everything a sandboxed step needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepJob {
    /// Lower dirs, lowest first.
    pub lowers: Vec<PathBuf>,
    /// An empty directory, used as the lower dir when there is none.
    pub empty: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    pub action: Action,
    pub env: Vec<(String, String)>,
    /// A copy of the host's resolv.conf to show inside chroots.
    pub resolv_conf: Option<PathBuf>,
    /// An ext4 image to mount read-only (at `empty`) as the only lower dir,
    /// instead of `lowers`: a throwaway writable view of a finished image.
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// Host directories shown inside a chroot, writable, and never captured.
    #[serde(default)]
    pub binds: Vec<Bind>,
}

/// A host directory bound into a step's root for the step's run only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bind {
    pub host: PathBuf,
    /// Absolute path inside the root; created if missing.
    pub inside: String,
}

/// Everything the image writer needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageJob {
    pub store: PathBuf,
    /// The merged layer (no whiteouts) or, when `trees` is not empty, what
    /// goes on top of them ([`crate::assemble::fixups`]).
    pub tree: Layer,
    /// The layers' unpacked trees, lowest first, that an overlayfs shows
    /// below `tree`: the image is written from them in place. Empty: `tree`
    /// is unpacked whole.
    #[serde(default)]
    pub trees: Vec<PathBuf>,
    /// With `trees`: the only files read to find their blocks of zeros
    /// (paths relative to the root, see [`crate::ext4::data_blocks`]), all
    /// those of `tree` among them; every file is read when `None` or when
    /// the list was found for another block size than the image's.
    #[serde(default)]
    pub to_read: Option<ToRead>,
    /// An empty directory to mount the tmpfs on.
    pub scratch: PathBuf,
    pub image: PathBuf,
    pub options: Ext4Options,
}

/// A job for the sandbox process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Job {
    Step(StepJob),
    Image(ImageJob),
}

/// Runs `job` in a sandbox process, its output appended to `log`.
pub fn run(
    job: &Job,
    job_file: &Path,
    log: &Path,
    time_limit: Option<std::time::Duration>,
) -> Result<(), SandboxError> {
    let bytes = serde_json::to_vec(job).expect("jobs serialize");
    fs::write(job_file, bytes).map_err(io_at(job_file))?;
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_at(log))?;
    let log_err = log_file.try_clone().map_err(io_at(log))?;
    let exe = std::env::current_exe().map_err(io_at(Path::new("/proc/self/exe")))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("internal-sandbox")
        .arg(job_file)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(io_at(&exe))?;
    let started = std::time::Instant::now();
    // Short steps end within a few milliseconds: look often at first.
    let mut pause = std::time::Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io_at(&exe))? {
            break status;
        }
        if let Some(limit) = time_limit.filter(|l| started.elapsed() > *l) {
            // Everything below the sandbox dies with it (parent-death signals).
            let _ = child.kill();
            let _ = child.wait();
            return Err(SandboxError::TimedOut(limit));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    };
    if status.success() {
        Ok(())
    } else {
        Err(match status.code() {
            Some(code) => SandboxError::Exited(code),
            None => SandboxError::Failed("was killed by a signal".into()),
        })
    }
}

/// Entry point of `kiln internal-sandbox JOB.json`; returns the exit code.
pub fn main(job_file: &Path) -> i32 {
    let result = fs::read(job_file)
        .map_err(|e| SandboxError::from(io_at(job_file)(e)))
        .and_then(|b| {
            serde_json::from_slice::<Job>(&b)
                .map_err(|e| SandboxError::Failed(format!("bad job file: {e}")))
        })
        .and_then(|job| match job {
            Job::Step(step) => run_step(&step),
            Job::Image(image) => write_image(&image).map(|()| 0),
        });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln sandbox: {e}");
            125
        }
    }
}

fn private_mounts() -> Result<(), SandboxError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making mounts private"))
}

/// The host name a step sees (in its own UTS namespace).
pub const STEP_HOSTNAME: &str = "kiln";

/// The capabilities a program of the root's own keeps: Docker's default set
/// (which `apt-get install` in a Dockerfile has always run with).
const KEPT_CAPABILITIES: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

fn run_step(job: &StepJob) -> Result<i32, SandboxError> {
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(sys("unshare"))?;
    nix::unistd::sethostname(STEP_HOSTNAME).map_err(sys("setting the step's host name"))?;
    private_mounts()?;
    // SAFETY: this process is single-threaded (a fresh exec of kiln).
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            let code = match step_init(job) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("kiln sandbox: {e}");
                    125
                }
            };
            std::process::exit(code)
        }
        ForkResult::Parent { child } => wait_for(child),
    }
}

/// Waits for `child`, reaping any other process on the way; its exit code.
fn wait_for(child: Pid) -> Result<i32, SandboxError> {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => return Ok(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                return Err(SandboxError::Sys {
                    what: "wait".into(),
                    source: e,
                })
            }
        }
    }
}

/// PID 1 of the step's namespace: mounts the root and runs the action.
fn step_init(job: &StepJob) -> Result<i32, SandboxError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(sys("prctl"))?;
    if let Some(image) = &job.image {
        // mount(8) sets up the loop device; the mount lives in this namespace only.
        let status = Command::new("mount")
            .args(["-o", "loop,ro", "-t", "ext4"])
            .arg(image)
            .arg(&job.empty)
            .status()
            .map_err(io_at(Path::new("mount")))?;
        if !status.success() {
            return Err(SandboxError::Failed(format!(
                "cannot mount {} read-only",
                image.display()
            )));
        }
    }
    let lowers = if job.lowers.is_empty() {
        job.empty.display().to_string()
    } else {
        short_lower_names(&job.lowers, &job.empty)?
    };
    let options = format!(
        "lowerdir={lowers},upperdir={},workdir={},redirect_dir=off,metacopy=off",
        job.upper.display(),
        job.work.display()
    );
    // A program of the root's own may create device files, but never use one
    // outside the sandbox's /dev. debootstrap (a host program) needs them.
    let flags = match job.action {
        Action::Host { .. } => MsFlags::empty(),
        _ => MsFlags::MS_NODEV,
    };
    mount(
        Some("overlay"),
        &job.merged,
        Some("overlay"),
        flags,
        Some(options.as_str()),
    )
    .map_err(sys(format!(
        "mounting overlayfs on {}",
        job.merged.display()
    )))?;
    if !job.lowers.is_empty() {
        // overlayfs has resolved the links; they are no longer needed.
        chdir("/").map_err(sys("chdir"))?;
        umount2(&job.empty, MntFlags::MNT_DETACH).map_err(sys("unmounting the lower links"))?;
    }
    match &job.action {
        Action::Host { argv } => {
            let argv: Vec<String> = argv
                .iter()
                .map(|a| {
                    if a == Action::ROOT {
                        job.merged.display().to_string()
                    } else {
                        a.clone()
                    }
                })
                .collect();
            spawn_and_wait(&argv, &job.env, None)
        }
        Action::Chroot { argv } => {
            let created_resolv = mount_api_filesystems(&job.merged, job.resolv_conf.as_deref())?;
            bind_dirs(&job.merged, &job.binds)?;
            let code = spawn_and_wait(argv, &job.env, Some(&job.merged))?;
            if let (true, Some(host)) = (created_resolv, &job.resolv_conf) {
                withdraw_resolv_conf(&job.merged, host)?;
            }
            Ok(code)
        }
        Action::WriteFile {
            path,
            content,
            mode,
            owner,
        } => {
            // Opened before the chroot hides it; copied, never held in memory.
            let mut source = File::open(content).map_err(io_at(content))?;
            chroot(&job.merged).map_err(sys("chroot"))?;
            chdir("/").map_err(sys("chdir"))?;
            write_file_in_root(path, &mut source, *mode, owner)?;
            Ok(0)
        }
        Action::CopyIn {
            staging,
            dest,
            owner,
            symlinks,
        } => {
            let stage = job.merged.join(STAGE);
            fs::create_dir(&stage).map_err(io_at(&stage))?;
            mount(
                Some(staging.as_path()),
                &stage,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(sys("binding the staged files"))?;
            chroot(&job.merged).map_err(sys("chroot"))?;
            chdir("/").map_err(sys("chdir"))?;
            let copied = copy_in(Path::new("/").join(STAGE).as_path(), dest, owner, symlinks);
            let stage = Path::new("/").join(STAGE);
            umount2(&stage, MntFlags::MNT_DETACH).map_err(sys("unmounting the staged files"))?;
            fs::remove_dir(&stage).map_err(io_at(&stage))?;
            copied.map(|()| 0)
        }
    }
}

/// The `lowerdir=` value for `lowers` (lowest first), short enough for
/// hundreds of layers: mount options fit in one page (4096 bytes), which
/// absolute tree paths fill at ~60 layers. Each lower gets a symlink named by
/// its position on a tmpfs mounted at `links` (an unused empty directory),
/// which becomes the working directory, so the value is `N:…:1:0`
/// (overlayfs lists the top-most first and follows the links).
fn short_lower_names(lowers: &[PathBuf], links: &Path) -> Result<String, SandboxError> {
    mount(
        Some("tmpfs"),
        links,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700,size=1m"),
    )
    .map_err(sys("mounting a tmpfs for the lower links"))?;
    for (i, lower) in lowers.iter().enumerate() {
        let link = links.join(i.to_string());
        std::os::unix::fs::symlink(lower, &link).map_err(io_at(&link))?;
    }
    chdir(links).map_err(sys("chdir"))?;
    let names: Vec<String> = (0..lowers.len()).rev().map(|i| i.to_string()).collect();
    Ok(names.join(":"))
}

/// Creates `dir` and its missing parents, each owned like the directory it is
/// created in (so `~/.local` made under `/home/agent` belongs to agent).
fn create_dirs_like_parent(dir: &Path) -> Result<(), SandboxError> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    create_dirs_like_parent(parent)?;
    fs::create_dir(dir).map_err(io_at(dir))?;
    let owner = fs::metadata(parent).map_err(io_at(parent))?;
    std::os::unix::fs::chown(dir, Some(owner.uid()), Some(owner.gid())).map_err(io_at(dir))?;
    Ok(())
}

/// Where [`Action::CopyIn`] shows its staged files inside the root (removed afterwards).
const STAGE: &str = ".kiln-stage";

/// Copies `from` into `dest` (relative to the current root), owned by `owner`,
/// then creates `symlinks`.
fn copy_in(
    from: &Path,
    dest: &str,
    owner: &Owner,
    symlinks: &[(String, String)],
) -> Result<(), SandboxError> {
    let uid = lookup("/etc/passwd", &owner.user)?;
    let gid = lookup("/etc/group", &owner.group)?;
    let dest = Path::new("/").join(dest);
    for entry in walkdir::WalkDir::new(from).sort_by_file_name() {
        let entry =
            entry.map_err(|e| SandboxError::Failed(format!("reading staged files: {e}")))?;
        let rel = entry.path().strip_prefix(from).unwrap_or(Path::new(""));
        let target = dest.join(rel);
        let meta = entry
            .path()
            .symlink_metadata()
            .map_err(io_at(entry.path()))?;
        if meta.is_dir() {
            if target.is_dir() {
                continue; // an existing directory keeps its owner and mode
            }
            if let Some(parent) = target.parent() {
                create_dirs_like_parent(parent)?;
            }
            fs::create_dir(&target).map_err(io_at(&target))?;
        } else {
            if let Ok(old) = fs::symlink_metadata(&target) {
                if old.is_dir() {
                    return Err(SandboxError::Failed(format!(
                        "{} is a directory in the image",
                        target.display()
                    )));
                }
                fs::remove_file(&target).map_err(io_at(&target))?;
            }
            if meta.file_type().is_symlink() {
                let link = fs::read_link(entry.path()).map_err(io_at(entry.path()))?;
                std::os::unix::fs::symlink(&link, &target).map_err(io_at(&target))?;
            } else {
                fs::copy(entry.path(), &target).map_err(io_at(&target))?;
            }
        }
        std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(io_at(&target))?;
        if !meta.file_type().is_symlink() {
            fs::set_permissions(
                &target,
                fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
            )
            .map_err(io_at(&target))?;
        }
    }
    for (link, target) in symlinks {
        let link = Path::new("/").join(link);
        if let Some(parent) = link.parent() {
            create_dirs_like_parent(parent)?;
        }
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).map_err(io_at(&link))?;
        }
        std::os::unix::fs::symlink(target, &link).map_err(io_at(&link))?;
    }
    Ok(())
}

/// Forks, optionally chroots, and executes `argv` with exactly `env`.
fn spawn_and_wait(
    argv: &[String],
    env: &[(String, String)],
    root: Option<&Path>,
) -> Result<i32, SandboxError> {
    let to_c =
        |s: &str| CString::new(s).map_err(|_| SandboxError::Failed(format!("NUL byte in `{s}`")));
    let c_argv = argv
        .iter()
        .map(|a| to_c(a))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env
        .iter()
        .map(|(k, v)| to_c(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let program = match root {
        Some(_) => c_argv[0].clone(),
        None => to_c(&which(&argv[0], env)?)?,
    };
    let no_sync = no_sync_filter();
    // SAFETY: single-threaded process.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            if let Some(filter) = &no_sync {
                if let Err(e) = install_filter(filter) {
                    eprintln!("kiln sandbox: {e}");
                    std::process::exit(125);
                }
            }
            if let Some(root) = root {
                if let Err(e) = enter_root(root) {
                    eprintln!("kiln sandbox: entering {}: {e}", root.display());
                    std::process::exit(125);
                }
            }
            let err = execve(&program, &c_argv, &c_env).unwrap_err();
            eprintln!("kiln sandbox: cannot run {}: {err}", argv[0]);
            std::process::exit(127);
        }
        ForkResult::Parent { child } => wait_for(child),
    }
}

/// A seccomp filter under which `fsync`, `fdatasync`, `sync_file_range`,
/// `syncfs` and `sync` return success without doing anything, for a step's
/// programs (dpkg syncs its database after each package: ~3,000 syncs, ~1 s
/// of waiting, in the agent image's `packages` step). `None` on an
/// architecture seccompiler does not know: the syncs then happen.
fn no_sync_filter() -> Option<seccompiler::BpfProgram> {
    use seccompiler::{SeccompAction, SeccompFilter};
    let calls = [
        nix::libc::SYS_fsync,
        nix::libc::SYS_fdatasync,
        nix::libc::SYS_sync_file_range,
        nix::libc::SYS_syncfs,
        nix::libc::SYS_sync,
    ];
    let filter = SeccompFilter::new(
        calls.into_iter().map(|call| (call, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(0),
        std::env::consts::ARCH.try_into().ok()?,
    )
    .ok()?;
    filter.try_into().ok()
}

/// Installs `filter` on this process (inherited by all it starts). Needs
/// CAP_SYS_ADMIN rather than `no_new_privs`, so setuid programs in the step
/// keep working.
fn install_filter(filter: &seccompiler::BpfProgram) -> Result<(), SandboxError> {
    let program = nix::libc::sock_fprog {
        len: u16::try_from(filter.len())
            .map_err(|_| SandboxError::Failed("the seccomp filter is too long".into()))?,
        filter: filter.as_ptr() as *mut nix::libc::sock_filter,
    };
    // SAFETY: `program` points into `filter`, alive for the call; the kernel
    // copies the filter.
    let rc = unsafe {
        nix::libc::prctl(
            nix::libc::PR_SET_SECCOMP,
            nix::libc::SECCOMP_MODE_FILTER,
            &program as *const nix::libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(SandboxError::Failed(format!(
            "installing the no-sync seccomp filter: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Makes `root` (a mount point) this process's `/` in a mount namespace of
/// its own, with the host's file systems detached, then cuts the capability
/// bounding set to [`KEPT_CAPABILITIES`]. The sandbox's PID 1 keeps its view
/// (it withdraws resolv.conf afterwards) and its capabilities, which also
/// keeps `/proc/1/root` out of the program's reach.
fn enter_root(root: &Path) -> Result<(), SandboxError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare"))?;
    chdir(root).map_err(sys("chdir"))?;
    // The old root is stacked under the new one, then detached.
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the host's root"))?;
    chdir("/").map_err(sys("chdir"))?;
    let failed = |e: caps::errors::CapsError| SandboxError::Failed(format!("capabilities: {e}"));
    for cap in caps::runtime::thread_all_supported() {
        if !KEPT_CAPABILITIES.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(failed)?;
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(failed)?;
    caps::clear(None, CapSet::Ambient).map_err(failed)
}

/// Finds a host program on the job's PATH.
fn which(program: &str, env: &[(String, String)]) -> Result<String, SandboxError> {
    if program.contains('/') {
        return Ok(program.to_string());
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/bin:/bin");
    path.split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .ok_or_else(|| SandboxError::Failed(format!("`{program}` is not installed on this machine; install it (e.g. `apt-get install {program}`)")))
}

/// Mounts /proc, /sys, a minimal /dev and /run inside `root` and provides resolv.conf.
/// Returns whether resolv.conf was created.
fn mount_api_filesystems(root: &Path, resolv: Option<&Path>) -> Result<bool, SandboxError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let dir = |name: &str| -> Result<PathBuf, SandboxError> {
        let p = root.join(name);
        if !p.is_dir() {
            fs::create_dir_all(&p).map_err(io_at(&p))?;
        }
        Ok(p)
    };
    let proc_dir = dir("proc")?;
    mount(Some("proc"), &proc_dir, Some("proc"), nosuid, None::<&str>)
        .map_err(sys("mounting /proc"))?;
    // The kernel's settings are the host's: show them read-only.
    for name in ["sys", "sysrq-trigger"] {
        let path = proc_dir.join(name);
        if !path.exists() {
            continue; // a kernel without magic SysRq has no trigger
        }
        mount(
            Some(path.as_path()),
            &path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| {
            mount(
                None::<&str>,
                &path,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid,
                None::<&str>,
            )
        })
        .map_err(sys(format!("making /proc/{name} read-only")))?;
    }
    let sys_dir = dir("sys")?;
    mount(
        Some("sysfs"),
        &sys_dir,
        Some("sysfs"),
        nosuid | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(sys("mounting /sys"))?;
    let dev = dir("dev")?;
    // nodev: only the host nodes bound below work, not ones the step creates.
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=16m"),
    )
    .map_err(sys("mounting /dev"))?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        File::create(&target).map_err(io_at(&target))?;
        mount(
            Some(Path::new("/dev").join(node).as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys(format!("binding /dev/{node}")))?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts).map_err(io_at(&pts))?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(sys("mounting /dev/pts"))?;
    let shm = dev.join("shm");
    fs::create_dir(&shm).map_err(io_at(&shm))?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        nosuid,
        Some("mode=1777"),
    )
    .map_err(sys("mounting /dev/shm"))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let p = dev.join(link);
        std::os::unix::fs::symlink(target, &p).map_err(io_at(&p))?;
    }
    let run = root.join("run");
    if run.is_dir() {
        mount(
            Some("tmpfs"),
            &run,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        )
        .map_err(sys("mounting /run"))?;
    }
    match resolv {
        Some(resolv) if root.join("etc").is_dir() => provide_resolv_conf(root, resolv),
        _ => Ok(false),
    }
}

/// Binds each of `binds` at its place inside `root`. A missing mount point
/// must lie in a volatile directory (see `normalize`), so creating it leaves
/// no trace in the layer.
fn bind_dirs(root: &Path, binds: &[Bind]) -> Result<(), SandboxError> {
    for bind in binds {
        let inside = root.join(bind.inside.trim_start_matches('/'));
        if !inside.is_dir() {
            fs::create_dir_all(&inside).map_err(io_at(&inside))?;
        }
        mount(
            Some(bind.host.as_path()),
            &inside,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(sys(format!(
            "binding {} at {}",
            bind.host.display(),
            bind.inside
        )))?;
    }
    Ok(())
}

/// Gives the step the host's DNS settings without leaving them in its layer.
///
/// A missing `/etc/resolv.conf` is created with the host's content (and
/// removed after the step, unless the step changed it); a symlink into `/run`
/// (systemd-resolved's) gets its target written on the step's private `/run`
/// tmpfs; a file the image has is left alone. Returns whether the file was created.
fn provide_resolv_conf(root: &Path, host: &Path) -> Result<bool, SandboxError> {
    let target = root.join("etc/resolv.conf");
    match fs::symlink_metadata(&target) {
        Ok(m) if m.file_type().is_symlink() => {
            let link = fs::read_link(&target).map_err(io_at(&target))?;
            let inside = Path::new("/etc").join(link);
            let normalized: PathBuf = inside.components().fold(PathBuf::new(), |mut p, c| {
                match c {
                    std::path::Component::ParentDir => {
                        p.pop();
                    }
                    other => p.push(other),
                }
                p
            });
            if let Ok(rest) = normalized.strip_prefix("/run") {
                let dest = root.join("run").join(rest);
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).map_err(io_at(parent))?;
                }
                fs::copy(host, &dest).map_err(io_at(&dest))?;
            }
            Ok(false)
        }
        Ok(_) => Ok(false),
        Err(_) => {
            fs::copy(host, &target).map_err(io_at(&target))?;
            Ok(true)
        }
    }
}

/// Removes the resolv.conf [`provide_resolv_conf`] created, if the step left it as it was.
fn withdraw_resolv_conf(root: &Path, host: &Path) -> Result<(), SandboxError> {
    let target = root.join("etc/resolv.conf");
    let ours = fs::symlink_metadata(&target).is_ok_and(|m| m.is_file())
        && fs::read(&target).ok() == fs::read(host).ok();
    if ours {
        fs::remove_file(&target).map_err(io_at(&target))?;
    }
    Ok(())
}

/// Looks a user or group name up in the (chrooted) root's `/etc/passwd` or `/etc/group`.
fn lookup(db: &str, principal: &Principal) -> Result<u32, SandboxError> {
    let name = match principal {
        Principal::Id(id) => return Ok(*id),
        Principal::Name(name) => name,
    };
    let text = fs::read_to_string(db).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let n = fields.next()?;
            let id = fields.nth(1)?.parse().ok()?;
            (n == name).then_some(id)
        })
        .next()
        .ok_or_else(|| {
            SandboxError::Failed(format!(
                "`{name}` is not in the image's {db}; create it in a step this step `needs`, or use a numeric id"
            ))
        })
}

/// Writes a file at `path` (relative to the current root), replacing what is there.
fn write_file_in_root(
    path: &str,
    contents: &mut dyn std::io::Read,
    mode: u32,
    owner: &Owner,
) -> Result<(), SandboxError> {
    let uid = lookup("/etc/passwd", &owner.user)?;
    let gid = lookup("/etc/group", &owner.group)?;
    let dest = Path::new("/").join(path);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(io_at(parent))?;
    }
    if let Ok(meta) = fs::symlink_metadata(&dest) {
        if meta.is_dir() {
            return Err(SandboxError::Failed(format!(
                "{} is a directory in the image",
                dest.display()
            )));
        }
        // Never write through a symlink: replace the link itself.
        fs::remove_file(&dest).map_err(io_at(&dest))?;
    }
    let mut file = File::create(&dest).map_err(io_at(&dest))?;
    std::io::copy(contents, &mut file).map_err(io_at(&dest))?;
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io_at(&dest))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_at(&dest))?;
    Ok(())
}

/// Unpacks the job's tree into a private tmpfs, shows it above the layers'
/// trees (if any) in a read-only overlayfs, writes the ext4 image from that
/// and reports its measure. mkfs adds each directory's entries in sorted
/// order, so the order the host's file systems list them in does not matter.
fn write_image(job: &ImageJob) -> Result<(), SandboxError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare"))?;
    private_mounts()?;
    // Room for the tree, which fits in the image (a limit: tmpfs takes
    // memory as files fill it).
    let size = format!("mode=0755,size={}", job.options.size.max(64 << 20));
    mount(
        Some("tmpfs"),
        &job.scratch,
        Some("tmpfs"),
        MsFlags::MS_NOATIME,
        Some(size.as_str()),
    )
    .map_err(sys("mounting tmpfs for the image tree"))?;
    // Only reads blobs: no lock, no tmp/ of its own (the building kiln holds both).
    let store = crate::store::Store::open_read_only(&job.store);
    let tree = job.scratch.join("root");
    let started = std::time::Instant::now();
    crate::capture::materialize(&job.tree, &store, &tree)
        .map_err(|e| SandboxError::Failed(e.to_string()))?;
    let tree = if job.trees.is_empty() {
        tree
    } else {
        let (links, view) = (job.scratch.join("links"), job.scratch.join("view"));
        for dir in [&links, &view] {
            fs::create_dir(dir).map_err(io_at(dir))?;
        }
        let mut lowers = job.trees.clone();
        lowers.push(tree);
        let options = format!(
            "lowerdir={},redirect_dir=off,metacopy=off",
            short_lower_names(&lowers, &links)?
        );
        mount(
            Some("overlay"),
            &view,
            Some("overlay"),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            Some(options.as_str()),
        )
        .map_err(sys("mounting the layers' trees for the image"))?;
        chdir("/").map_err(sys("chdir"))?;
        view
    };
    let mut phase = |name: &str, took: std::time::Duration| {
        println!("{PHASE_PREFIX}{name} {:.3}", took.as_secs_f64());
    };
    phase("tree", started.elapsed());
    let measured = crate::ext4::write_image(
        &tree,
        &job.image,
        &job.options,
        job.to_read.as_ref(),
        &mut phase,
    )
    .map_err(|e| SandboxError::Failed(e.to_string()))?;
    println!(
        "{MEASURED_PREFIX}{} {} {}",
        measured.bytes, measured.blake3, measured.sha256
    );
    Ok(())
}

/// How the image job reports each phase's seconds in its log:
/// `kiln phase NAME SECONDS`, one line each.
pub const PHASE_PREFIX: &str = "kiln phase ";

/// How the image job reports the image's measure in its log:
/// `kiln measured BYTES BLAKE3 SHA256`.
pub const MEASURED_PREFIX: &str = "kiln measured ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    fn under_the_no_sync_filter_a_sync_returns_without_reaching_the_kernel() {
        let filter = no_sync_filter().expect("a filter for this architecture");
        // Outside the filter the kernel answers: -1 is no file.
        // SAFETY: plain system calls on no file.
        assert_eq!(unsafe { nix::libc::fsync(-1) }, -1);
        // SAFETY: the child makes system calls only, then exits.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = match install_filter(&filter) {
                    Err(_) => 2,
                    // SAFETY: plain system calls on no file.
                    Ok(()) => unsafe {
                        let answers = [
                            nix::libc::fsync(-1),
                            nix::libc::fdatasync(-1),
                            nix::libc::syncfs(-1),
                            nix::libc::sync_file_range(-1, 0, 0, 0),
                        ];
                        // Other calls still reach the kernel.
                        let close = nix::libc::close(-1);
                        i32::from(answers != [0; 4] || close != -1)
                    },
                };
                // SAFETY: leaves the forked child without running the harness.
                unsafe { nix::libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                assert_eq!(
                    waitpid(child, None).unwrap(),
                    WaitStatus::Exited(child, 0),
                    "exit 2: the filter was refused; 1: a sync reached the kernel"
                );
            }
        }
    }
}
