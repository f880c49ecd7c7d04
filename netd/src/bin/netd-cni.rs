//! `netd-cni`: the CNI plugin binary. Logs go to stderr (`NETD_LOG`,
//! default `warn`), stdout carries only the result or the error JSON.

use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("NETD_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    netd::runtime::cni::main()
}
