//! What can go wrong attaching, detaching or checking an endpoint, typed so
//! callers (the CNI plugin above all) can tell a retry from a refusal.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon has not (yet) leased a subnet or pinned its maps.
    #[error("netd is not ready on this host: {0:#}")]
    NotReady(anyhow::Error),
    #[error("network namespace {} does not exist", .0.display())]
    NoNamespace(PathBuf),
    #[error("{0} is already attached (detach it first)")]
    AlreadyAttached(String),
    #[error("{0} is not attached on this host")]
    NotAttached(String),
    #[error("interface {ifname} already exists in {}", netns.display())]
    InterfaceExists { ifname: String, netns: PathBuf },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Address(String),
    /// CHECK found the kernel different from the record.
    #[error("{id}: {what}")]
    Mismatch { id: String, what: String },
    #[error(transparent)]
    System(#[from] anyhow::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::System(e.into())
    }
}
