//! `netd attach` and `netd detach`.

use std::path::Path;

use anyhow::{Result, bail};

use super::{AttachArgs, DetachArgs};
use crate::{
    datapath::PinDir,
    endpoint::{self, AttachRequest},
};

pub async fn attach(pin: &PinDir, run_dir: &Path, args: AttachArgs) -> Result<()> {
    let mut req = AttachRequest::for_netns(args.netns, args.ip, args.ifname);
    req.network = Some(args.network);
    for (key, value) in args.labels {
        if let Some(first) = req.labels.insert(key.clone(), value) {
            bail!("label {key} given twice (first as {key}={first})");
        }
    }
    let record = endpoint::attach(pin, run_dir, req).await?;
    println!("{}", record.ip);
    Ok(())
}

pub async fn detach(pin: &PinDir, run_dir: &Path, args: DetachArgs) -> Result<()> {
    endpoint::detach(pin, run_dir, &args.netns).await?;
    Ok(())
}
