//! netd: an eBPF VXLAN overlay for containers across hosts.

use std::process::ExitCode;

use clap::Parser as _;
use netd::{
    cli::{self, Cli, Command, NetworkCommand},
    datapath::PinDir,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("NETD_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let pin = PinDir::new(&cli.pin_path);
    let run_dir = cli.run_dir.as_path();
    match cli.command {
        Command::Run(args) => cli::run::run(&cli.pin_path, run_dir, args).await,
        Command::Network(NetworkCommand::Init(args)) => cli::network::init(args).await,
        Command::Network(NetworkCommand::Show(args)) => cli::network::show(args).await,
        Command::Attach(args) => cli::attach::attach(&pin, run_dir, args).await,
        Command::Detach(args) => cli::attach::detach(&pin, run_dir, args).await,
        Command::Status(args) => cli::status::status(&pin, run_dir, args),
        Command::Teardown => cli::teardown::teardown(&pin, run_dir).await,
        Command::Policy(command) => cli::policy::run(command).await,
    }
}
