//! Builds the kernel programs (netd-ebpf) with the nightly toolchain and
//! embeds the object in the daemon. Without bpf-linker (plain `cargo check`
//! or clippy on a machine that never ran `cargo xtask setup`), an empty
//! object is embedded instead and `netd run` says so at start.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    if which("bpf-linker").is_none() {
        println!(
            "cargo:warning=bpf-linker not found: embedding no eBPF object (run `cargo xtask setup`)"
        );
        let out = PathBuf::from(env::var_os("OUT_DIR").ok_or(anyhow!("OUT_DIR not set"))?);
        fs::write(out.join("netd"), []).context("writing empty object")?;
        return Ok(());
    }
    let root = env::var("CARGO_MANIFEST_DIR")?;
    // The kernel programs are built from netd-common's map types and
    // capacities too: a change there must rebuild them.
    println!("cargo:rerun-if-changed={root}/../netd-common/src");
    let ebpf_dir = PathBuf::from(root).join("../netd-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package {
            name: "netd-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}

fn which(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
