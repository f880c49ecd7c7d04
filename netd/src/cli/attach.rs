//! `netd attach`, `netd detach` and `netd teardown`.

use std::path::Path;

use anyhow::Result;

use super::{AttachArgs, DetachArgs};
use crate::{
    datapath::{self, PinDir},
    endpoint::{self, AttachRequest},
};

pub async fn attach(pin: &PinDir, run_dir: &Path, args: AttachArgs) -> Result<()> {
    let req = AttachRequest::for_netns(args.netns, args.ip, args.ifname);
    let record = endpoint::attach(pin, run_dir, req).await?;
    println!("{}", record.ip);
    Ok(())
}

pub async fn detach(pin: &PinDir, run_dir: &Path, args: DetachArgs) -> Result<()> {
    endpoint::detach(pin, run_dir, &args.netns).await?;
    Ok(())
}

/// Removes every container attachment, then every pin of this node.
pub async fn teardown(pin: &PinDir, run_dir: &Path) -> Result<()> {
    let mut errors = Vec::new();
    if let Err(e) = endpoint::detach_all(pin, run_dir).await {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = datapath::teardown(pin, run_dir).await {
        errors.push(format!("{e:#}"));
    }
    if !errors.is_empty() {
        anyhow::bail!("teardown finished with errors: {}", errors.join("; "));
    }
    Ok(())
}
