use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    kiln::cli::run(kiln::cli::Cli::parse())
}
