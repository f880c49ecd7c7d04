//! `cargo xtask test`: setup, build netd, unit tests, privileged tests.
//!
//! Everything builds with `--release` so dependencies compile only once.

use anyhow::{Result, bail};
use clap::Args;

use crate::setup;
use crate::util::{self, is_root};

#[derive(Args)]
pub struct Options {
    /// Only run the privileged integration tests whose name contains this.
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
    /// Do not run `cargo xtask setup` first.
    #[arg(long)]
    skip_setup: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask test` must run as root: the integration tests create \
             network namespaces and load eBPF programs (try `sudo -E cargo xtask test`)"
        );
    }
    if !opts.skip_setup {
        setup::run(&setup::Options::default())?;
    }

    println!("==> build netd (release, with the embedded eBPF object)");
    util::run(util::cargo().args(["build", "--release", "-p", "netd"]))?;
    let netd_bin = util::target_dir().join("release").join("netd");
    if !netd_bin.is_file() {
        bail!("built netd, yet {} does not exist", netd_bin.display());
    }

    println!("==> unit tests");
    util::run(util::cargo().args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "netd-ebpf",
        "--exclude",
        "netd-tests",
    ]))?;

    println!("==> privileged integration tests");
    let mut cmd = util::cargo();
    cmd.args(["test", "--release", "-p", "netd-tests", "--"])
        .arg("--test-threads=1")
        .env("NETD_BIN", &netd_bin);
    if let Some(filter) = &opts.filter {
        cmd.arg(filter);
    }
    util::run(&mut cmd)?;

    println!("==> all tests passed");
    Ok(())
}
