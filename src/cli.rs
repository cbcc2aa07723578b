//! The command line (clap): parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::build::{self, BuildOptions, Outcome};
use crate::graph::Graph;
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a recipe's image (needs root).
    Build {
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
    },
    /// Show what a build would run or reuse (runs nothing, needs no root).
    Plan {
        recipe: PathBuf,
        #[command(flatten)]
        cache: CacheArg,
        #[command(flatten)]
        key: SshKeyArg,
        #[arg(long)]
        json: bool,
    },
    /// Print the step graph in Graphviz dot.
    Graph { recipe: PathBuf },
    /// Internal: the sandbox process a step runs in.
    #[command(hide = true)]
    InternalSandbox { job: PathBuf },
}

fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

fn load(path: &std::path::Path) -> Result<(Recipe, Graph), String> {
    let recipe = recipe::load(path).map_err(|e| e.to_string())?;
    let graph = Graph::new(&recipe).map_err(|e| e.to_string())?;
    Ok((recipe, graph))
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::InternalSandbox { job } => {
            return ExitCode::from(crate::sandbox::main(&job).clamp(0, 255) as u8)
        }
        Command::Graph { recipe } => load(&recipe).map(|(r, g)| print!("{}", g.to_dot(&r))),
        Command::Plan {
            recipe,
            cache,
            key,
            json,
        } => load(&recipe).and_then(|(r, g)| {
            let store = Store::open_read_only(&cache.cache);
            let steps = plan::plan(&r, &g, &store, key.ssh_key.as_deref())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&steps).expect("plans serialize")
                );
            } else {
                print!("{}", plan::render(&steps));
            }
            Ok(())
        }),
        Command::Build {
            recipe,
            out,
            cache,
            key,
            jobs,
            json,
        } => load(&recipe).and_then(|(r, g)| {
            let options = BuildOptions {
                cache: cache.cache,
                out_dir: out,
                jobs,
                ssh_key: key.ssh_key,
                progress: true,
            };
            let report = build::build(&r, &g, &options).map_err(|e| e.to_string())?;
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
                    Outcome::Built => "built",
                };
                eprintln!(
                    "{:<18} {:<12} {:<8} {:>7.1}s",
                    s.id, s.kind, result, s.seconds
                );
            }
            eprintln!(
                "{} built, {} cached in {:.1}s",
                report.built, report.cached, report.seconds
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
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
