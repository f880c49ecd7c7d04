//! Orchestration for netd: `cargo xtask <command>`.
//!
//! xtask shells out freely; every command it runs is echoed first.

mod bench;
mod demo;
mod demo_docker;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "netd development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the tools netd needs (Debian packages, nightly rust-src,
    /// bpf-linker) and mount bpffs. Idempotent.
    Setup(setup::Options),
    /// Run setup, build netd, run unit tests, then the privileged integration
    /// tests (root only).
    Test(test::Options),
    /// A three-host demo cluster in namespaces: cross-host pings and status.
    Demo(demo::Options),
    /// Measure netd against flannel-style kernel VXLAN, plain routing and
    /// the bare underlay, side by side; BPF program costs; control-plane
    /// scale. Writes JSON, Markdown and a PNG chart.
    Bench(bench::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    util::prepare_env();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain without anyhow's backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Setup(opts) => setup::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Demo(opts) => demo::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
    }
}
