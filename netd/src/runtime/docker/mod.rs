//! The Docker plugin: a libnetwork remote network driver and IPAM driver
//! served on a unix socket (`netd run --docker-plugin PATH`), so that
//! `docker network create -d netd --ipam-driver netd NAME` just works.
//!
//! Docker's calls map onto the host's one allocator (`endpoint`):
//! RequestAddress reserves an address, CreateEndpoint binds it to the
//! endpoint and its network, Join makes the veth and leaves the container
//! end in the host namespace for Docker to move into the sandbox, Leave
//! and DeleteEndpoint undo that, ReleaseAddress frees the address. Every
//! call is idempotent, because Docker retries and rolls back.

mod ipam;
mod network;
pub mod protocol;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::{net::UnixListener, sync::Mutex};
use tracing::{info, warn};

use self::protocol::{CONTENT_TYPE, ErrorReply};
use crate::{datapath::PinDir, endpoint};

/// Record ids of Docker's addresses start with this.
const RUNTIME: &str = "docker";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Endpoint(#[from] endpoint::Error),
    #[error(transparent)]
    System(#[from] anyhow::Error),
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_)
            | Error::Endpoint(
                endpoint::Error::InvalidRequest(_)
                | endpoint::Error::Address(_)
                | endpoint::Error::NotAttached(_),
            ) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// What the handlers share.
pub struct Driver {
    pin: PinDir,
    run_dir: PathBuf,
    /// One change at a time: the endpoint lock is a blocking `flock`, and
    /// two holders in one process would block the runtime's threads.
    serial: Mutex<()>,
    /// Pool id to the number of RequestPool calls not yet released.
    pools: Mutex<BTreeMap<String, u32>>,
}

impl Driver {
    pub fn new(pin: PinDir, run_dir: PathBuf) -> Self {
        Driver {
            pin,
            run_dir,
            serial: Mutex::new(()),
            pools: Mutex::new(BTreeMap::new()),
        }
    }

    /// `<run-dir>/docker/networks/<id>`: a network's name, for endpoints
    /// created after a restart.
    fn network_file(&self, network_id: &str) -> Result<PathBuf, Error> {
        if network_id.is_empty() || !network_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(Error::BadRequest(format!(
                "NetworkID {network_id:?} must be a non-empty alphanumeric id"
            )));
        }
        Ok(self.run_dir.join("docker/networks").join(network_id))
    }
}

/// Binds the socket (replacing a stale one), so a path that cannot be
/// served fails the daemon's start.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()));
        }
        _ => {}
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

pub async fn serve(listener: UnixListener, driver: Arc<Driver>) -> anyhow::Result<()> {
    info!(socket = ?listener.local_addr().ok(), "serving the Docker plugin");
    axum::serve(listener, router(driver))
        .await
        .context("Docker plugin server")
}

type Shared = State<Arc<Driver>>;

fn router(driver: Arc<Driver>) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/IpamDriver.GetCapabilities", post(ipam::capabilities))
        .route(
            "/IpamDriver.GetDefaultAddressSpaces",
            post(ipam::address_spaces),
        )
        .route("/IpamDriver.RequestPool", post(ipam::request_pool))
        .route("/IpamDriver.ReleasePool", post(ipam::release_pool))
        .route("/IpamDriver.RequestAddress", post(ipam::request_address))
        .route("/IpamDriver.ReleaseAddress", post(ipam::release_address))
        .route(
            "/NetworkDriver.GetCapabilities",
            post(network::capabilities),
        )
        .route(
            "/NetworkDriver.CreateNetwork",
            post(network::create_network),
        )
        .route(
            "/NetworkDriver.DeleteNetwork",
            post(network::delete_network),
        )
        .route(
            "/NetworkDriver.CreateEndpoint",
            post(network::create_endpoint),
        )
        .route(
            "/NetworkDriver.EndpointOperInfo",
            post(network::endpoint_oper_info),
        )
        .route(
            "/NetworkDriver.DeleteEndpoint",
            post(network::delete_endpoint),
        )
        .route("/NetworkDriver.Join", post(network::join))
        .route("/NetworkDriver.Leave", post(network::leave))
        .fallback(not_implemented)
        .with_state(driver)
}

async fn activate() -> Response {
    reply(Ok(protocol::Activate {
        implements: vec!["NetworkDriver", "IpamDriver"],
    }))
}

/// Docker treats a 404 as a method the plugin does not implement.
async fn not_implemented() -> Response {
    let body = ErrorReply {
        err: "not implemented by netd".into(),
    };
    json(StatusCode::NOT_FOUND, &body)
}

/// Docker sends its own content type, so the body is parsed by hand; an
/// empty body is an empty request.
fn parse<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| Error::BadRequest(e.to_string()))
}

fn reply<T: Serialize>(result: Result<T, Error>) -> Response {
    match result {
        Ok(value) => json(StatusCode::OK, &value),
        Err(e) => {
            warn!("Docker request refused: {e:#}");
            json(
                e.status(),
                &ErrorReply {
                    err: format!("{e:#}"),
                },
            )
        }
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
