//! `netd-cni`, the CNI plugin: one function per verb around the
//! [`endpoint`](crate::endpoint) code `netd attach` uses. The environment
//! and stdin are parsed once ([`spec`]); the result, or the spec's error
//! JSON, goes to stdout and logs to stderr.

pub mod spec;

use std::{io::Read as _, path::Path, process::ExitCode};

use serde_json::Value;
use spec::{Added, CniError, Command, Env, NetConf, code};

use crate::{
    control::lease::gateway,
    datapath::{Maps, PinDir},
    endpoint::{self, AttachRequest},
    state::{NodeState, SubnetEnv},
};

/// The plugin's `main`: never panics on bad input, exit 0 only on success.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => run(|k| std::env::var(k).ok(), &stdin),
        Err(e) => Err(CniError::new(5, "reading stdin").with_details(e.to_string())),
    };
    match outcome {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let version = spec::version_of(&stdin).unwrap_or_else(|| spec::LATEST.into());
            tracing::error!(code = e.code, "{}", e.msg);
            println!("{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// One invocation: the environment through `get`, the config in `stdin`.
pub fn run(get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let env = Env::parse(get)?;
    if env.command == Command::Version {
        return Ok(Some(spec::version_result()));
    }
    let conf = NetConf::parse(stdin, env.command)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::INTERNAL, format!("starting runtime: {e}")))?;
    runtime.block_on(async {
        match env.command {
            Command::Add => add(&env, &conf).await.map(Some),
            Command::Del => del(&env, &conf).await.map(|()| None),
            Command::Check => check(&env, &conf).await.map(|()| None),
            Command::Gc => gc(&conf).await.map(|()| None),
            Command::Status => status(&conf).map(|()| None),
            Command::Version => unreachable!("answered above"),
        }
    })
}

fn pin_dir(conf: &NetConf) -> PinDir {
    PinDir::new(&conf.pin_path)
}

/// The spec's code for each way an endpoint operation fails.
fn cni_error(e: endpoint::Error) -> CniError {
    use endpoint::Error as E;
    let code = match &e {
        E::NotReady(_) => code::TRY_AGAIN_LATER,
        E::NoNamespace(_) => code::UNKNOWN_CONTAINER,
        E::AlreadyAttached(_) | E::InterfaceExists { .. } => code::ALREADY_EXISTS,
        E::InvalidRequest(_) => code::INVALID_CONFIG,
        E::NotAttached(_) | E::Mismatch { .. } => code::CHECK_FAILED,
        E::Address(_) | E::System(_) => code::INTERNAL,
    };
    CniError::new(code, format!("{e:#}"))
}

async fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let netns = env.netns.clone().unwrap_or_default();
    let mut labels = conf.labels.clone();
    labels.extend(env.pod_labels());
    let req = AttachRequest {
        id: Some(env.endpoint_id()),
        netns: netns.clone(),
        ip: None,
        ifname: env.ifname.clone(),
        network: Some(conf.name.clone()),
        container_id: Some(env.container_id.clone()),
        labels,
    };
    let rec = endpoint::attach(&pin_dir(conf), &conf.run_dir, req)
        .await
        .map_err(cni_error)?;
    let subnet_env = SubnetEnv::read(&conf.run_dir)
        .map_err(|e| CniError::new(code::TRY_AGAIN_LATER, format!("{e:#}")))?;
    let added = Added {
        host_ifname: rec.host_ifname,
        host_mac: rec.host_mac,
        ifname: rec.ifname,
        mac: rec.mac,
        sandbox: netns,
        ip: rec.ip,
        gateway: gateway(subnet_env.subnet),
        mtu: subnet_env.mtu,
    };
    Ok(spec::add_result(
        &conf.cni_version,
        conf.prev_result.as_ref(),
        &added,
    ))
}

/// Succeeds on everything already gone: the namespace, the veth, the record.
async fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    endpoint::release(&pin_dir(conf), &conf.run_dir, &env.endpoint_id())
        .await
        .map(|_| ())
        .map_err(cni_error)
}

async fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult in the config")
    })?;
    let want = spec::prev_address(prev, &env.ifname).ok_or_else(|| {
        CniError::new(
            code::CHECK_FAILED,
            format!("prevResult has no address for {}", env.ifname),
        )
    })?;
    let rec = endpoint::check(&pin_dir(conf), &conf.run_dir, &env.endpoint_id())
        .await
        .map_err(cni_error)?;
    if rec.ip != want {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!("{} holds {}, prevResult says {want}", env.ifname, rec.ip),
        ));
    }
    if env
        .netns
        .as_deref()
        .is_some_and(|n| Path::new(n) != rec.netns_path)
    {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!(
                "{} is attached in {}",
                env.endpoint_id(),
                rec.netns_path.display()
            ),
        ));
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let keep = conf.valid_attachments.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments in the config",
        )
    })?;
    let removed = endpoint::gc(&pin_dir(conf), &conf.run_dir, &conf.name, &keep)
        .await
        .map_err(cni_error)?;
    if !removed.is_empty() {
        tracing::info!(?removed, "garbage-collected attachments");
    }
    Ok(())
}

/// Ready when the daemon lives, holds a lease and has pinned its maps.
fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |why: String| CniError::new(code::NOT_AVAILABLE, why);
    let state = NodeState::read(&conf.run_dir).ok_or_else(|| {
        unavailable(format!(
            "netd is not running ({} has no state.json)",
            conf.run_dir.display()
        ))
    })?;
    if !Path::new(&format!("/proc/{}", state.pid)).exists() {
        return Err(unavailable(format!(
            "netd (pid {}) is not running",
            state.pid
        )));
    }
    SubnetEnv::read(&conf.run_dir)
        .map_err(|e| unavailable(format!("netd has no lease yet: {e:#}")))?;
    Maps::open(&pin_dir(conf)).map_err(|e| unavailable(format!("{e:#}")))?;
    Ok(())
}
