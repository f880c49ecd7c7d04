//! `netd attach` and `netd detach`.

use std::path::Path;

use anyhow::Result;

use super::{AttachArgs, DetachArgs};
use crate::{
    datapath::PinDir,
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
