//! The kernel side as the daemon and CLI see it: the embedded object, the
//! pinned programs, maps and links, and attaching to interfaces.
//!
//! Maps and programs are pinned by name under `<pin-path>/v<layout>/`.
//! Attachments are netlink ones (a TC filter at a fixed priority and handle,
//! XDP set on the link), which the kernel keeps with no netd process alive,
//! so forwarding goes on while the daemon restarts. A new object replaces
//! the program behind each attachment in place. Whether an attachment is
//! there is asked of the kernel ([`attachments`]); `datapath.json` only
//! remembers which build is pinned and which decapsulation hook was chosen.

pub mod attachments;
mod batch;
pub mod conntrack;
mod maps;
mod pins;
pub mod policy_maps;
pub mod tunnel_device;
mod xdp;

use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::{
    EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, TcHandle, Xdp,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
};
use aya_obj::programs::XdpAttachType;
use netd_common::names;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

pub use maps::Maps;
pub use pins::PinDir;

const MAP_NAMES: [&str; 10] = [
    names::SUBNETS,
    names::PEERS,
    names::ENDPOINTS,
    names::CONFIG,
    names::STATS,
    names::IDENTITIES,
    names::LOCAL_POLICY,
    names::POLICY,
    names::POLICY_STATE,
    names::CONNTRACK,
];
const PROGRAM_NAMES: [&str; 5] = [
    names::FROM_CONTAINER,
    names::TO_CONTAINER,
    names::XDP_FROM_UNDERLAY,
    names::TC_FROM_UNDERLAY,
    names::FROM_TUNNEL_DEVICE,
];

/// The kernel programs, built by `build.rs`.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netd"))
}

/// FNV-1a of the object: tells whether pinned programs are this build's.
fn object_hash() -> String {
    let hash = object().iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    });
    format!("{hash:016x}")
}

/// Where decapsulation runs on the underlay NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Xdp,
    Tc,
    /// XDP on NICs with a native XDP driver, TC on virtual devices.
    Auto,
}

/// What this node's run directory remembers about the pinned data path.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    object: String,
    underlay: Option<Underlay>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Underlay {
    pub iface: String,
    pub hook: Hook,
}

impl State {
    fn path(run_dir: &Path) -> std::path::PathBuf {
        run_dir.join("datapath.json")
    }
    fn read(run_dir: &Path) -> State {
        fs::read(Self::path(run_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
    fn write(&self, run_dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        fs::write(Self::path(run_dir), json).context("writing datapath state")
    }
}

/// A freshly loaded build whose programs are pinned but not yet behind the
/// existing attachments: [`Pending::switch_over`] once its maps are filled.
#[must_use]
pub struct Pending {
    hash: String,
    /// The programs being verified and pinned, the maps already are.
    verifying: Option<tokio::task::JoinHandle<Result<()>>>,
}

/// Makes sure this build's programs and the maps are pinned, reusing what a
/// previous run left when it is the same build. A new build is returned
/// pending: the attachments keep running the previous programs (and maps)
/// until its own maps hold endpoints, configuration and peers.
pub async fn prepare(pin: &PinDir, run_dir: &Path) -> Result<Option<Pending>> {
    if object().is_empty() {
        bail!(
            "this netd was built without its eBPF object (bpf-linker missing): run `cargo xtask setup` and rebuild"
        );
    }
    let state = State::read(run_dir);
    let hash = object_hash();
    if state.object == hash && PROGRAM_NAMES.iter().all(|p| pin.program(p).exists()) {
        info!(dir = %pin.dir().display(), "reusing pinned data path");
        return Ok(None);
    }
    let verifying = load_and_pin(pin)?;
    Ok(Some(Pending {
        hash,
        verifying: Some(verifying),
    }))
}

impl Pending {
    /// Waits until the new programs are verified and pinned: the maps can
    /// be filled before, the programs attached only after.
    pub async fn programs_pinned(&mut self) -> Result<()> {
        if let Some(verifying) = self.verifying.take() {
            verifying.await.context("loading the programs")??;
        }
        Ok(())
    }

    /// Points every attachment at the new programs, then forgets older
    /// layouts.
    /// `containers`: the host-side veth of every attached container.
    pub async fn switch_over(
        mut self,
        pin: &PinDir,
        run_dir: &Path,
        containers: &[String],
    ) -> Result<()> {
        self.programs_pinned().await?;
        let mut state = State::read(run_dir);
        reattach(pin, containers, &state).await?;
        state.object = self.hash;
        state.write(run_dir)?;
        pin.remove_other_versions();
        info!("attachments now run this build's programs");
        Ok(())
    }
}

/// Creates and pins the maps, then verifies and pins the programs on a
/// blocking thread: the verifier takes most of a start (most of a second
/// for `from_container`), time in which the maps can already be filled.
fn load_and_pin(pin: &PinDir) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let started = std::time::Instant::now();
    let mut loader = EbpfLoader::new();
    for name in MAP_NAMES {
        loader.map_pin_path(name, pin.map(name));
    }
    let ebpf = loader.load(object()).context("loading eBPF object")?;
    debug!(elapsed = ?started.elapsed(), "maps created and pinned");
    let pin = pin.clone();
    Ok(tokio::task::spawn_blocking(move || {
        load_programs(ebpf, &pin, started)
    }))
}

fn load_programs(mut ebpf: aya::Ebpf, pin: &PinDir, started: std::time::Instant) -> Result<()> {
    for name in PROGRAM_NAMES {
        let verifying = std::time::Instant::now();
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?;
        match program {
            aya::programs::Program::SchedClassifier(p) => p.load(),
            aya::programs::Program::Xdp(p) => p.load(),
            _ => bail!("unexpected program type for {name}"),
        }
        .with_context(|| format!("loading program {name}"))?;
        debug!(program = name, elapsed = ?verifying.elapsed(), "program loaded");
        let path = pin.program(name);
        let _ = fs::remove_file(&path);
        program
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
    }
    info!(
        dir = %pin.dir().display(),
        elapsed = ?started.elapsed(),
        "loaded and pinned data path"
    );
    Ok(())
}

/// Points every existing attachment at the freshly pinned programs.
async fn reattach(pin: &PinDir, containers: &[String], state: &State) -> Result<()> {
    for host_ifname in containers {
        if let Err(e) = attach_container(pin, host_ifname) {
            warn!(iface = %host_ifname, "could not update container programs: {e:#}");
        }
    }
    if let Some(underlay) = &state.underlay {
        match underlay.hook {
            Hook::Xdp => attach_underlay_xdp(pin, &underlay.iface, XdpFlags::Any).await?,
            _ => attach_underlay_tc(pin, &underlay.iface)?,
        };
    }
    Ok(())
}

/// Our TC filter's slot on every interface: one filter, replaced in place.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);

/// Attaches `program` to `iface`'s TC ingress, replacing our previous
/// filter there if any. The filter outlives this process.
pub fn attach_tc(pin: &PinDir, program: &str, iface: &str) -> Result<()> {
    attach_tc_at(pin, program, iface, TcAttachType::Ingress)
}

/// A container's host-side veth: `from_container` on its ingress (what
/// the container sends), `to_container` on its egress (what the host
/// stack delivers to it).
pub fn attach_container(pin: &PinDir, host_ifname: &str) -> Result<()> {
    attach_tc_at(
        pin,
        names::FROM_CONTAINER,
        host_ifname,
        TcAttachType::Ingress,
    )?;
    attach_tc_at(pin, names::TO_CONTAINER, host_ifname, TcAttachType::Egress)
}

/// Attaches `program` to our filter slot on `iface`'s TC `direction`,
/// replacing the program there if any.
fn attach_tc_at(pin: &PinDir, program: &str, iface: &str, direction: TcAttachType) -> Result<()> {
    let mut prog = SchedClassifier::from_pin(pin.program(program))
        .with_context(|| format!("opening pinned program {program}: is `netd run` up?"))?;
    // clsact may already be there.
    let _ = tc::qdisc_add_clsact(iface);
    let options = NlOptions {
        priority: TC_PRIORITY,
        handle: TC_HANDLE,
        classid: None,
    };
    let id = match prog.attach_with_options(iface, direction, TcAttachOptions::Netlink(options)) {
        Ok(id) => id,
        Err(_) => {
            let existing =
                SchedClassifierLink::attached(iface, direction, TC_PRIORITY, TC_HANDLE, None)
                    .with_context(|| format!("no interface {iface}"))?;
            prog.attach_to_link(existing)
                .with_context(|| format!("attaching {program} to {iface}"))?
        }
    };
    // Dropping the link would detach it: the kernel keeps it instead.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// Whether our TC filter is on `iface`'s ingress.
pub fn tc_attached(iface: &str) -> bool {
    tc_attached_at(iface, TcAttachType::Ingress)
}

/// Whether both container programs are on a host-side veth.
pub fn container_attached(host_ifname: &str) -> bool {
    tc_attached(host_ifname) && tc_attached_at(host_ifname, TcAttachType::Egress)
}

/// Whether our TC filter is on `iface`'s `direction`.
fn tc_attached_at(iface: &str, direction: TcAttachType) -> bool {
    SchedClassifierLink::attached(iface, direction, TC_PRIORITY, TC_HANDLE, None).is_ok()
}

/// Removes our TC filter from `iface`; one already gone is fine.
pub fn detach_tc(iface: &str) -> Result<()> {
    let link =
        SchedClassifierLink::attached(iface, TcAttachType::Ingress, TC_PRIORITY, TC_HANDLE, None)?;
    match aya::programs::Link::detach(link) {
        Err(aya::programs::ProgramError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other.with_context(|| format!("detaching TC program from {iface}")),
    }
}

use crate::netlink::Netlink;
use xdp::XdpFlags;

/// Attaches decapsulation to the underlay NIC with the chosen hook, unless
/// that hook was chosen already: then whatever of it is missing in the
/// kernel is put back by [`attachments::reconcile`]. Returns the hook.
pub async fn attach_underlay(
    pin: &PinDir,
    run_dir: &Path,
    iface: &str,
    hook: Hook,
    kind: Option<&str>,
) -> Result<Hook> {
    let mut state = State::read(run_dir);
    if let Some(current) = &state.underlay {
        if current.iface == iface && (hook == Hook::Auto || hook == current.hook) {
            info!(iface, hook = ?current.hook, "underlay hook chosen before; keeping it");
            return Ok(current.hook);
        }
        detach_underlay(current).await;
    }
    let used = match hook {
        Hook::Tc => attach_underlay_tc(pin, iface)?,
        Hook::Xdp => attach_underlay_xdp(pin, iface, XdpFlags::Any).await?,
        // Virtual devices (veth above all) pay for XDP by converting every
        // skb; only a native driver makes XDP the fast path.
        Hook::Auto if kind.is_some() => attach_underlay_tc(pin, iface)?,
        Hook::Auto => match attach_underlay_xdp(pin, iface, XdpFlags::Driver).await {
            Ok(hook) => hook,
            Err(e) => {
                info!(iface, "no native XDP ({e:#}); using TC");
                attach_underlay_tc(pin, iface)?
            }
        },
    };
    state.underlay = Some(Underlay {
        iface: iface.to_string(),
        hook: used,
    });
    state.write(run_dir)?;
    info!(iface, hook = ?used, "underlay program attached");
    Ok(used)
}

fn attach_underlay_tc(pin: &PinDir, iface: &str) -> Result<Hook> {
    attach_tc(pin, names::TC_FROM_UNDERLAY, iface)?;
    Ok(Hook::Tc)
}

/// XDP decapsulates; TC behind it delivers what XDP passes up (frames it
/// may not redirect, and plain IPv4 for local containers).
async fn attach_underlay_xdp(pin: &PinDir, iface: &str, flags: XdpFlags) -> Result<Hook> {
    xdp::attach(pin, iface, flags).await?;
    attach_tc(pin, names::TC_FROM_UNDERLAY, iface)?;
    Ok(Hook::Xdp)
}

async fn detach_underlay(underlay: &Underlay) {
    for e in remove_underlay(underlay).await {
        warn!(iface = %underlay.iface, "{e:#}");
    }
}

/// Takes our programs off the underlay NIC, trying each even when another
/// fails. An interface that no longer exists holds nothing of ours.
async fn remove_underlay(underlay: &Underlay) -> Vec<anyhow::Error> {
    let iface = underlay.iface.as_str();
    match Netlink::connect() {
        Ok(nl) => match nl.link(iface).await {
            Ok(Some(_)) => {}
            Ok(None) => return Vec::new(),
            Err(e) => return vec![e],
        },
        Err(e) => return vec![e],
    }
    let mut errors = Vec::new();
    if underlay.hook == Hook::Xdp
        && let Err(e) = xdp::detach(iface).await
    {
        errors.push(e);
    }
    if let Err(e) = detach_tc(iface) {
        errors.push(e);
    }
    errors
}

/// The underlay attachment recorded for this node, if any.
pub fn underlay(run_dir: &Path) -> Option<Underlay> {
    State::read(run_dir).underlay
}

/// Detaches the underlay programs (those recorded here, or `fallback` when
/// this record is gone), removes the pins of every layout version and this
/// module's record. Keeps going past failures and returns them all.
pub async fn teardown(
    pin: &PinDir,
    run_dir: &Path,
    fallback: Option<Underlay>,
) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    if let Some(underlay) = underlay(run_dir).or(fallback) {
        errors.extend(remove_underlay(&underlay).await);
    }
    if let Err(e) = pin.remove_all_versions() {
        errors.push(e);
    }
    match fs::remove_file(State::path(run_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => errors.push(
            anyhow::Error::new(e).context(format!("removing {}", State::path(run_dir).display())),
        ),
        _ => {}
    }
    errors
}

/// Loads a pinned XDP program (for the netlink attachment).
pub(crate) fn pinned_xdp(pin: &PinDir) -> Result<Xdp> {
    Xdp::from_pin(
        pin.program(names::XDP_FROM_UNDERLAY),
        XdpAttachType::Interface,
    )
    .context("opening pinned XDP program: is `netd run` up?")
}
