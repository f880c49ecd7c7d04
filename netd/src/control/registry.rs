//! Raw etcd I/O for the network registry: the config key, subnet leases and
//! the watch on them. Policy (which subnet, when to renew) lives elsewhere.
//!
//! Layout under the prefix (flannel's):
//!   `<prefix>/config`            network config JSON
//!   `<prefix>/subnets/<a.b.c.d>-<len>`  lease JSON, bound to an etcd lease

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

pub type Result<T> = std::result::Result<T, RegistryError>;

/// One lease as stored: key suffix after `<prefix>/subnets/`, raw value, and
/// the revision it was last written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLease {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
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
        let text = format!("{source:?}").to_lowercase();
        let closed = [
            "connection closed",
            "canceled",
            "broken pipe",
            "certificate",
        ]
        .iter()
        .any(|needle| text.contains(needle));
        if self.ca_cert.is_some() && self.client_cert.is_none() && closed {
            " (TLS without a client certificate: if etcd requires one, pass --etcd-cert and --etcd-key)"
        } else {
            ""
        }
    }
}

impl RegistryError {
    /// Errors that retrying cannot fix: credentials, certificates, auth.
    pub fn is_permanent(&self) -> bool {
        match self {
            RegistryError::Credentials { .. } | RegistryError::ConfigConflict { .. } => true,
            RegistryError::Etcd { source, .. } => {
                let text = format!("{source:?}").to_lowercase();
                // Transport errors carry the TLS alert or auth status as text.
                [
                    "certificate",
                    "tls",
                    "authentication failed",
                    "user name is empty",
                    "permission denied",
                    "pem",
                ]
                .iter()
                .any(|needle| text.contains(needle))
            }
        }
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

    fn err(&self, source: etcd_client::Error) -> RegistryError {
        RegistryError::Etcd {
            endpoints: self.endpoints.clone(),
            hint: self.access.hint(&source),
            source,
        }
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
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
                    }),
                    EventType::Delete => SubnetEvent::Delete(key),
                })
            })
            .collect()
    }
}
