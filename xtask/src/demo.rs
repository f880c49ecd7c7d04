//! `cargo xtask demo`: placeholder.

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> Result<()> {
    bail!("`cargo xtask demo`: not yet")
}
