//! `/metrics` (Prometheus text format) and `/healthz` for `netd run
//! --metrics-addr`.
//!
//! The kernel counters and the daemon's published state are read at each
//! scrape, so a scrape always shows what the kernel has now; what only the
//! daemon sees as it happens (sync latency, peers programmed) is recorded
//! in process-wide metrics by the code that does it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        LazyLock,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    datapath::{Maps, PinDir},
    state::{NodeState, now},
};

/// Watch event received to kernel maps programmed, in seconds.
static SYNC_LATENCY: LazyLock<Histogram> = LazyLock::new(|| {
    // 100 µs to about 3 s.
    let buckets = prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets");
    Histogram::with_opts(
        HistogramOpts::new(
            "netd_sync_event_to_programmed_seconds",
            "Time from an etcd watch event reaching the daemon to the kernel maps programmed",
        )
        .buckets(buckets),
    )
    .expect("valid histogram")
});

/// Remote subnets programmed into the kernel by the sync task.
static PEERS: AtomicI64 = AtomicI64::new(0);

/// Records how long one watch event took to reach the kernel maps.
pub fn observe_sync_latency(elapsed: Duration) {
    SYNC_LATENCY.observe(elapsed.as_secs_f64());
}

/// Records how many remote subnets are programmed.
pub fn set_peers(count: usize) {
    PEERS.store(count as i64, Ordering::Relaxed);
}

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("binding the metrics address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving metrics: {0}")]
    Serve(std::io::Error),
}

/// What a scrape reads.
#[derive(Clone)]
pub struct Source {
    pub pin: PinDir,
    pub run_dir: PathBuf,
    pub state: watch::Receiver<NodeState>,
}

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, source: Source) -> Result<(), MetricsError> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics and /healthz");
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(source);
    axum::serve(listener, app)
        .await
        .map_err(MetricsError::Serve)
}

async fn metrics(State(source): State<Source>) -> impl IntoResponse {
    match render(&source) {
        Ok(text) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            warn!("rendering metrics: {e:#}");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
        }
    }
}

/// 200 while this host holds its lease and its data path is enabled, as
/// flannel's `/healthz`; 503 with the reason otherwise.
async fn healthz(State(source): State<Source>) -> impl IntoResponse {
    let state = source.state.borrow().clone();
    match health(&state, &source.pin) {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

fn health(state: &NodeState, pin: &PinDir) -> Result<(), String> {
    if state.subnet.is_none() {
        return Err("no lease".into());
    }
    if state.lease_expires_at <= now() {
        return Err("lease expired".into());
    }
    let maps = Maps::open(pin).map_err(|e| format!("data path maps: {e:#}"))?;
    let config = maps
        .config()
        .map_err(|e| format!("data path config: {e:#}"))?;
    if config.enabled == 0 {
        return Err("data path disabled".into());
    }
    Ok(())
}

/// One scrape: a fresh registry filled from the kernel and the state.
fn render(source: &Source) -> anyhow::Result<String> {
    let registry = Registry::new();
    let maps = Maps::open(&source.pin)?;
    register_counters(&registry, &maps.counters()?)?;

    let state = source.state.borrow().clone();
    let gauges = [
        (
            "netd_lease_expiry_timestamp_seconds",
            "Unix time at which etcd drops this host's lease unless renewed",
            state.lease_expires_at as i64,
        ),
        (
            "netd_etcd_reachable",
            "1 while etcd answers, 0 while it does not",
            state.etcd.reachable as i64,
        ),
        (
            "netd_peers",
            "Remote subnets programmed into the kernel",
            PEERS.load(Ordering::Relaxed),
        ),
        (
            "netd_endpoints",
            "Containers attached on this host",
            endpoint_count(&source.run_dir) as i64,
        ),
    ];
    for (name, help, value) in gauges {
        let gauge = IntGauge::new(name, help)?;
        gauge.set(value);
        registry.register(Box::new(gauge))?;
    }
    registry.register(Box::new(SYNC_LATENCY.clone()))?;
    let build = IntGaugeVec::new(
        Opts::new("netd_build_info", "netd build; always 1"),
        &["version"],
    )?;
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    registry.register(Box::new(build))?;
    encode(&registry)
}

fn encode(registry: &Registry) -> anyhow::Result<String> {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// Drop reasons under `reason` (Cilium's `drop_count_total` convention),
/// every other verdict under `verdict`.
fn register_counters(
    registry: &Registry,
    counters: &std::collections::BTreeMap<&'static str, u64>,
) -> prometheus::Result<()> {
    let drops = IntCounterVec::new(
        Opts::new(
            "netd_drop_count_total",
            "Packets dropped by the kernel programs, by reason, summed over CPUs",
        ),
        &["reason"],
    )?;
    let verdicts = IntCounterVec::new(
        Opts::new(
            "netd_packets_total",
            "Packets by kernel program verdict other than a drop, summed over CPUs",
        ),
        &["verdict"],
    )?;
    for (&label, &value) in counters {
        match label.strip_prefix("drop_") {
            Some(reason) => drops.with_label_values(&[reason]).inc_by(value),
            None => verdicts.with_label_values(&[label]).inc_by(value),
        }
    }
    registry.register(Box::new(drops))?;
    registry.register(Box::new(verdicts))
}

fn endpoint_count(run_dir: &Path) -> usize {
    std::fs::read_dir(run_dir.join("endpoints"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn drops_are_labelled_by_reason_and_the_rest_by_verdict() {
        let registry = Registry::new();
        let counters = BTreeMap::from([("drop_unknown_peer", 3), ("encapsulated", 7)]);
        register_counters(&registry, &counters).unwrap();
        let text = encode(&registry).unwrap();
        assert!(
            text.contains("netd_drop_count_total{reason=\"unknown_peer\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("netd_packets_total{verdict=\"encapsulated\"} 7"),
            "{text}"
        );
        assert!(!text.contains("verdict=\"drop_"), "{text}");
    }

    #[test]
    fn policy_drops_are_drop_reasons() {
        let registry = Registry::new();
        let counters: BTreeMap<&'static str, u64> = netd_common::Counter::ALL
            .iter()
            .map(|c| (c.label(), 1))
            .collect();
        register_counters(&registry, &counters).unwrap();
        let text = encode(&registry).unwrap();
        for reason in ["policy", "isolation"] {
            let line = format!("netd_drop_count_total{{reason=\"{reason}\"}} 1");
            assert!(text.contains(&line), "{text}");
        }
    }

    #[test]
    fn health_needs_a_subnet_and_a_live_lease() {
        let pin = PinDir::new(Path::new("/nonexistent"));
        let none = NodeState::default();
        assert_eq!(health(&none, &pin), Err("no lease".into()));
        let expired = NodeState {
            subnet: Some("10.244.1.0/24".parse().unwrap()),
            lease_expires_at: now() - 1,
            ..Default::default()
        };
        assert_eq!(health(&expired, &pin), Err("lease expired".into()));
    }

    #[test]
    fn sync_latency_is_a_histogram_with_sub_millisecond_buckets() {
        observe_sync_latency(Duration::from_micros(250));
        let registry = Registry::new();
        registry.register(Box::new(SYNC_LATENCY.clone())).unwrap();
        let text = encode(&registry).unwrap();
        assert!(
            text.contains("netd_sync_event_to_programmed_seconds_bucket{le=\"0.0004\"}"),
            "{text}"
        );
        assert!(
            text.contains("netd_sync_event_to_programmed_seconds_count"),
            "{text}"
        );
    }
}
