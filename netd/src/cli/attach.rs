//! `netd attach`, `netd detach` and `netd teardown`.

use std::path::Path;

use anyhow::Result;

use super::{AttachArgs, DetachArgs};
use crate::{
    datapath::{self, PinDir},
    endpoint::{self, AttachRequest},
};

pub async fn attach(pin: &PinDir, run_dir: &Path, args: AttachArgs) -> Result<()> {
    let req = AttachRequest {
        netns: args.netns,
        ip: args.ip,
        ifname: args.ifname,
    };
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
    for record in endpoint::records(run_dir)? {
        if let Err(e) = endpoint::detach(pin, run_dir, &record.netns).await {
            errors.push(format!("{e:#}"));
        }
    }
    errors.extend(crate::egress::teardown(pin, run_dir).await);
    if let Err(e) = datapath::teardown(pin, run_dir).await {
        errors.push(format!("{e:#}"));
    }
    if !errors.is_empty() {
        anyhow::bail!("teardown finished with errors: {}", errors.join("; "));
    }
    Ok(())
}
