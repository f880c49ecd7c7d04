//! Raw etcd I/O for the network registry: the config key, subnet leases and
//! the watch on them. Policy (which subnet, when to renew) lives elsewhere.
//!
//! Layout under the prefix (flannel's):
//!   `<prefix>/config`            network config JSON
//!   `<prefix>/subnets/<a.b.c.d>-<len>`  lease JSON, bound to an etcd lease
//!   `<prefix>/policies/<name>`   policy JSON

use std::time::Duration;

use std::path::PathBuf;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd at {endpoints}{hint}")]
    Etcd {
        endpoints: String,
        failure: Failure,
        /// What the operator may be missing, when the error suggests it.
        hint: &'static str,
        source: etcd_client::Error,
    },
    #[error("reading {path}")]
    Credentials {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a different network config already exists at {key}: {existing}")]
    ConfigConflict { key: String, existing: String },
}

/// What an etcd error means to the caller, from its gRPC status code or,
/// below gRPC, the transport's own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The etcd lease named in the request does not exist (expired or
    /// revoked).
    LeaseNotFound,
    /// etcd unreachable, slow, restarting or between leaders: retry.
    Transient,
    /// etcd refused our credentials or permissions: retrying cannot help.
    Refused,
    /// The TLS handshake failed (certificate, CA, protocol): fatal too.
    Tls,
    /// A request etcd or the client will never accept (bad URL, argument).
    Invalid,
}

impl Failure {
    pub fn of(error: &etcd_client::Error) -> Failure {
        use etcd_client::Error as E;
        match error {
            E::GRpcStatus(status) => Self::of_status(status),
            E::TransportError(_) | E::IoError(_) if cause(error).is_some_and(tls_failure) => {
                Failure::Tls
            }
            E::TransportError(_)
            | E::IoError(_)
            | E::WatchError(_)
            | E::LeaseKeepAliveError(_)
            | E::ElectError(_)
            | E::EndpointError(_)
            | E::Internal(_) => Failure::Transient,
            _ => Failure::Invalid,
        }
    }

    fn of_status(status: &tonic::Status) -> Failure {
        use tonic::Code;
        match status.code() {
            // etcd answers NotFound only for leases (keys read as empty).
            Code::NotFound => Failure::LeaseNotFound,
            // etcd's "authentication failed" and "user name is empty" are
            // InvalidArgument; expired tokens are refreshed by the client
            // before an Unauthenticated gets here.
            Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument => {
                Failure::Refused
            }
            // tonic reports a failed connection as Unavailable, with the
            // transport error (maybe a TLS one) as its source.
            _ if tls_failure(status) => Failure::Tls,
            Code::Unimplemented => Failure::Invalid,
            // Unavailable, DeadlineExceeded, Cancelled (tonic's timeout),
            // Aborted, ResourceExhausted, Unknown, Internal, ...
            _ => Failure::Transient,
        }
    }

    /// Whether retrying may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, Failure::Transient | Failure::LeaseNotFound)
    }
}

/// What is inside an etcd client error (which names no source itself).
fn cause(error: &etcd_client::Error) -> Option<&(dyn std::error::Error + 'static)> {
    use etcd_client::Error as E;
    match error {
        E::GRpcStatus(status) => Some(status),
        E::TransportError(e) => Some(e),
        E::IoError(e) => Some(e),
        _ => None,
    }
}

/// Whether a TLS error is among the causes of `error`: rustls's own, or
/// the `InvalidData` I/O error the TLS stream turns an alert from the
/// server into (nothing else below gRPC reports that kind).
fn tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    causes(error).any(|e| {
        e.downcast_ref::<rustls::Error>().is_some()
            || e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
    })
}

/// Whether the connection could not be made at all (refused, timed out,
/// no route), as opposed to made and then closed by the peer (what a
/// TLS 1.3 server that wants a client certificate does).
fn connect_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind as K;
    causes(error)
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| {
            matches!(
                e.kind(),
                K::ConnectionRefused | K::TimedOut | K::HostUnreachable | K::NetworkUnreachable
            )
        })
}

/// `error` and its sources, looking inside `io::Error`s too (whose own
/// `source` skips the error they wrap).
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    let mut next = Some(error);
    // Bounded: error chains are short, and a cycle must not hang us.
    std::iter::from_fn(move || {
        let current = next?;
        next = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static))
                .or_else(|| current.source()),
            None => current.source(),
        };
        Some(current)
    })
    .take(32)
}

pub type Result<T> = std::result::Result<T, RegistryError>;

/// One lease as stored: key suffix after `<prefix>/subnets/`, raw value, and
/// the revision it was last written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLease {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// The etcd lease the key is bound to (0: none).
    pub lease: i64,
}

/// A change seen by the watch.
#[derive(Debug)]
pub enum SubnetEvent {
    Put(RawLease),
    Delete(String),
}

/// How to reach etcd: endpoints, key prefix and credentials.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// CA certificate: turns TLS on.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key for client-certificate authentication.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// User name and password for etcd's own authentication.
    pub user: Option<(String, String)>,
}

impl Access {
    fn options(&self) -> Result<ConnectOptions> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| RegistryError::Credentials {
                path: path.clone(),
                source,
            })
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        if self.ca_cert.is_some() || self.client_cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_cert {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let Some((cert, key)) = &self.client_cert {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        if let Some((user, password)) = &self.user {
            // etcd's tokens die with a restart of etcd: log in again then.
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        Ok(options)
    }

    /// With TLS, a server that requires a client certificate may just close
    /// the connection (TLS 1.3 rejects after the handshake): say so.
    fn hint(&self, source: &etcd_client::Error) -> &'static str {
        let suspicious = match Failure::of(source) {
            Failure::Tls => true,
            Failure::Transient => !cause(source).is_some_and(connect_failed),
            _ => false,
        };
        if self.ca_cert.is_some() && self.client_cert.is_none() && suspicious {
            " (TLS without a client certificate: if etcd requires one, pass --etcd-cert and --etcd-key)"
        } else {
            ""
        }
    }
}

impl RegistryError {
    /// What went wrong, for callers that retry some failures.
    pub fn failure(&self) -> Failure {
        match self {
            RegistryError::Etcd { failure, .. } => *failure,
            RegistryError::Credentials { .. } | RegistryError::ConfigConflict { .. } => {
                Failure::Invalid
            }
        }
    }

    /// Errors that retrying cannot fix: credentials, certificates, auth.
    pub fn is_permanent(&self) -> bool {
        !self.failure().is_transient()
    }
}

#[derive(Clone)]
pub struct Registry {
    client: Client,
    prefix: String,
    endpoints: String,
    access: Access,
}

impl Registry {
    pub async fn connect(access: &Access) -> Result<Self> {
        let (endpoints, prefix) = (&access.endpoints, &access.prefix);
        let joined = endpoints.join(",");
        let options = access.options()?;
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| RegistryError::Etcd {
                endpoints: joined.clone(),
                failure: Failure::of(&source),
                hint: access.hint(&source),
                source,
            })?;
        Ok(Registry {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            endpoints: joined,
            access: access.clone(),
        })
    }

    /// Wraps an error of a stream this registry opened (keep-alive, watch).
    pub fn err(&self, source: etcd_client::Error) -> RegistryError {
        RegistryError::Etcd {
            endpoints: self.endpoints.clone(),
            failure: Failure::of(&source),
            hint: self.access.hint(&source),
            source,
        }
    }

    /// The client, for the key spaces other modules own (endpoints,
    /// policies); cheap to clone.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// `<prefix>/<rest>`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// `<prefix>/policies/`: one policy document per key, named by it.
    pub fn policies_prefix(&self) -> String {
        format!("{}/policies/", self.prefix)
    }

    pub fn policy_key(&self, name: &str) -> String {
        format!("{}{name}", self.policies_prefix())
    }

    /// Every stored policy: name (key suffix) and document.
    pub async fn list_policies(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = self.policies_prefix();
        let resp = self
            .client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let name = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&prefix)?;
                Some((name.to_string(), kv.value().to_vec()))
            })
            .collect())
    }

    /// Writes a policy; the document it replaced, if any.
    pub async fn put_policy(&mut self, name: &str, json: &str) -> Result<Option<Vec<u8>>> {
        let options = PutOptions::new().with_prev_key();
        let resp = self
            .client
            .put(self.policy_key(name), json, Some(options))
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.prev_key().map(|kv| kv.value().to_vec()))
    }

    /// Removes a policy; whether it existed.
    pub async fn delete_policy(&mut self, name: &str) -> Result<bool> {
        let resp = self
            .client
            .delete(self.policy_key(name), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.deleted() > 0)
    }

    pub async fn get_config(&mut self) -> Result<Option<Vec<u8>>> {
        let key = self.config_key();
        let resp = self.client.get(key, None).await.map_err(|e| self.err(e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes the config unless one exists; an identical one is fine.
    pub async fn init_config(&mut self, json: &str, same: impl Fn(&[u8]) -> bool) -> Result<bool> {
        let key = self.config_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), json, None)]);
        let resp = self.client.txn(txn).await.map_err(|e| self.err(e))?;
        if resp.succeeded() {
            return Ok(true);
        }
        let existing = self.get_config().await?.unwrap_or_default();
        if same(&existing) {
            return Ok(false);
        }
        Err(RegistryError::ConfigConflict {
            key,
            existing: String::from_utf8_lossy(&existing).into_owned(),
        })
    }

    /// All leases and the revision they were read at.
    pub async fn list_subnets(&mut self) -> Result<(Vec<RawLease>, i64)> {
        let prefix = self.subnets_prefix();
        let resp = self
            .client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let leases = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key())
                    .ok()?
                    .strip_prefix(&prefix)?
                    .to_string();
                Some(RawLease {
                    key,
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                })
            })
            .collect();
        Ok((leases, revision))
    }

    pub async fn grant(&mut self, ttl_secs: i64) -> Result<i64> {
        let resp = self
            .client
            .lease_grant(ttl_secs, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.id())
    }

    pub async fn revoke(&mut self, lease: i64) -> Result<()> {
        self.client
            .lease_revoke(lease)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Creates `key` bound to `lease` only if nobody holds it.
    pub async fn create_subnet(&mut self, key: &str, value: &str, lease: i64) -> Result<bool> {
        let full = format!("{}{key}", self.subnets_prefix());
        self.put_if(
            Compare::create_revision(full.clone(), CompareOp::Equal, 0),
            full,
            value,
            lease,
        )
        .await
    }

    /// Rebinds our own lease to a new etcd lease, only if unchanged since
    /// we read it at `mod_revision`.
    pub async fn reclaim_subnet(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
        mod_revision: i64,
    ) -> Result<bool> {
        let full = format!("{}{key}", self.subnets_prefix());
        let guard = Compare::mod_revision(full.clone(), CompareOp::Equal, mod_revision);
        self.put_if(guard, full, value, lease).await
    }

    async fn put_if(
        &mut self,
        guard: Compare,
        key: String,
        value: &str,
        lease: i64,
    ) -> Result<bool> {
        let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
        let txn = Txn::new().when([guard]).and_then([put]);
        let resp = self.client.txn(txn).await.map_err(|e| self.err(e))?;
        Ok(resp.succeeded())
    }

    pub async fn keep_alive(&mut self, lease: i64) -> Result<(LeaseKeeper, LeaseKeepAliveStream)> {
        self.client
            .lease_keep_alive(lease)
            .await
            .map_err(|e| self.err(e))
    }

    /// Renews `lease` once; its remaining TTL, 0 if etcd no longer has it.
    pub async fn renew_once(&mut self, lease: i64) -> Result<i64> {
        let (mut keeper, mut stream) = self.keep_alive(lease).await?;
        keeper.keep_alive().await.map_err(|e| self.err(e))?;
        match stream.message().await.map_err(|e| self.err(e))? {
            Some(resp) => Ok(resp.ttl()),
            None => Err(self.err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive stream closed".into(),
            ))),
        }
    }

    /// Watches the subnets prefix from `revision` on.
    pub async fn watch_subnets(&mut self, revision: i64) -> Result<WatchStream> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let prefix = self.subnets_prefix();
        self.client
            .watch(prefix, Some(options))
            .await
            .map_err(|e| self.err(e))
    }

    /// Turns a watch response's events into subnet events.
    pub fn events(&self, resp: &etcd_client::WatchResponse) -> Vec<SubnetEvent> {
        let prefix = self.subnets_prefix();
        resp.events()
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                let key = std::str::from_utf8(kv.key())
                    .ok()?
                    .strip_prefix(&prefix)?
                    .to_string();
                Some(match event.event_type() {
                    EventType::Put => SubnetEvent::Put(RawLease {
                        key,
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                        lease: kv.lease(),
                    }),
                    EventType::Delete => SubnetEvent::Delete(key),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn grpc(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(Status::new(code, message))
    }

    #[test]
    fn failures_by_grpc_code() {
        let cases = [
            (
                grpc(Code::NotFound, "etcdserver: requested lease not found"),
                Failure::LeaseNotFound,
            ),
            (
                grpc(Code::Unavailable, "connection refused"),
                Failure::Transient,
            ),
            (
                grpc(Code::DeadlineExceeded, "context deadline exceeded"),
                Failure::Transient,
            ),
            (grpc(Code::Cancelled, "Timeout expired"), Failure::Transient),
            (
                grpc(Code::Unavailable, "etcdserver: leader changed"),
                Failure::Transient,
            ),
            (
                grpc(Code::InvalidArgument, "etcdserver: authentication failed"),
                Failure::Refused,
            ),
            (
                grpc(Code::PermissionDenied, "etcdserver: permission denied"),
                Failure::Refused,
            ),
            (
                grpc(Code::Unauthenticated, "invalid auth token"),
                Failure::Refused,
            ),
            (
                etcd_client::Error::InvalidArgs("bad".into()),
                Failure::Invalid,
            ),
            (
                etcd_client::Error::LeaseKeepAliveError("stream closed".into()),
                Failure::Transient,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(Failure::of(&error), want, "{error}");
        }
    }

    #[test]
    fn tls_failures_are_found_among_the_causes() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        // As tonic reports a failed connection: a status with the cause.
        let status = Status::from_error(Box::new(std::io::Error::other(alert.clone())));
        assert_eq!(
            Failure::of(&etcd_client::Error::GRpcStatus(status)),
            Failure::Tls
        );
        let io = etcd_client::Error::IoError(std::io::Error::other(alert));
        assert_eq!(Failure::of(&io), Failure::Tls);
        // An alert from the server, as the TLS stream reports it.
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: BadCertificate",
        );
        let status = Status::from_error(Box::new(alert));
        assert_eq!(
            Failure::of(&etcd_client::Error::GRpcStatus(status)),
            Failure::Tls
        );
        let refused = etcd_client::Error::IoError(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(Failure::of(&refused), Failure::Transient);
        assert!(cause(&refused).is_some_and(connect_failed));
    }

    #[test]
    fn permanent_errors() {
        let etcd = |source| RegistryError::Etcd {
            endpoints: "http://e:2379".into(),
            failure: Failure::of(&source),
            hint: "",
            source,
        };
        assert!(!etcd(grpc(Code::Unavailable, "down")).is_permanent());
        assert!(!etcd(grpc(Code::NotFound, "lease not found")).is_permanent());
        assert!(etcd(grpc(Code::PermissionDenied, "no")).is_permanent());
        let conflict = RegistryError::ConfigConflict {
            key: "k".into(),
            existing: "{}".into(),
        };
        assert!(conflict.is_permanent());
    }

    #[test]
    fn hint_only_for_tls_without_a_client_certificate() {
        let tls_only = Access {
            ca_cert: Some("ca.pem".into()),
            ..Default::default()
        };
        let closed = grpc(Code::Unknown, "h2 protocol error: connection closed");
        assert!(!tls_only.hint(&closed).is_empty());
        let refused = etcd_client::Error::IoError(std::io::ErrorKind::ConnectionRefused.into());
        assert!(tls_only.hint(&refused).is_empty());
        assert!(Access::default().hint(&closed).is_empty());
    }
}
