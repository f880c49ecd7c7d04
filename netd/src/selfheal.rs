//! The data path heals itself: the attachments this node needs (the
//! underlay hook, `from_container` on every recorded container's veth) are
//! compared with what the kernel has at start-up, after every link or TC
//! change in this namespace, and on a timer (in case a notification is
//! lost), and what is missing is attached again, counted and logged. A
//! re-created underlay NIC (new index, maybe new MAC) is followed in the
//! node configuration too, since `from_container` redirects to it by index.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::Result;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    datapath::{
        Maps, PinDir, Underlay,
        attachments::{self, Attachment},
    },
    endpoint,
    netlink::{self, Netlink},
    state::NodeState,
};

/// Default period of the timer-driven pass.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3);

/// A burst of notifications (our own repair makes some) becomes one pass.
const SETTLE: Duration = Duration::from_millis(20);

pub struct Healer {
    pin: PinDir,
    run_dir: PathBuf,
    underlay: Underlay,
    /// Said once each, until they are fine again: no log line per pass.
    reported_no_link: BTreeSet<Attachment>,
    reported_failed: BTreeSet<Attachment>,
    /// The underlay index the node configuration holds, once checked.
    underlay_index: Option<u32>,
}

impl Healer {
    pub fn new(pin: PinDir, run_dir: PathBuf, underlay: Underlay) -> Self {
        Healer {
            pin,
            run_dir,
            underlay,
            reported_no_link: BTreeSet::new(),
            reported_failed: BTreeSet::new(),
            underlay_index: None,
        }
    }

    /// The underlay hook and both programs of every recorded container's veth.
    fn wanted(&self) -> Vec<Attachment> {
        let mut wanted = Attachment::underlay(&self.underlay);
        match endpoint::records(&self.run_dir) {
            Ok(records) => wanted.extend(
                records
                    .iter()
                    .flat_map(|r| Attachment::container_veth(&r.host_ifname, r.host_ifindex)),
            ),
            Err(e) => warn!("reading endpoint records: {e:#}; checking the underlay only"),
        }
        wanted
    }

    /// One pass; returns how many attachments it put back.
    pub async fn reconcile(&mut self, nl: &Netlink) -> u64 {
        let wanted = self.wanted();
        let outcome = attachments::reconcile(&self.pin, nl, &wanted).await;
        for a in &outcome.repaired {
            warn!(iface = %a.iface, hook = %a.point, program = a.program, "attachment was missing in the kernel; restored");
        }
        for a in &outcome.no_link {
            // One line per interface, however many of its programs are wanted.
            let known = self.reported_no_link.iter().any(|r| r.iface == a.iface);
            if self.reported_no_link.insert(a.clone()) && !known {
                info!(iface = %a.iface, hook = %a.point, "interface is gone; nothing to attach until it is back");
            }
        }
        for (a, e) in &outcome.failed {
            if self.reported_failed.insert(a.clone()) {
                warn!(iface = %a.iface, hook = %a.point, "could not restore attachment: {e}; retrying");
            }
        }
        // Forget what is fine again (or no longer wanted), so a new fault
        // is reported again.
        let no_link: BTreeSet<_> = outcome.no_link.into_iter().collect();
        let failed: BTreeSet<_> = outcome.failed.into_iter().map(|(a, _)| a).collect();
        self.reported_no_link.retain(|a| no_link.contains(a));
        self.reported_failed.retain(|a| failed.contains(a));
        let followed = match self.follow_underlay(nl).await {
            Ok(changed) => changed as u64,
            Err(e) => {
                warn!(iface = %self.underlay.iface, "checking the underlay's index: {e:#}");
                0
            }
        };
        outcome.repaired.len() as u64 + followed
    }

    /// Points the node configuration at the underlay link now under the
    /// name, if its index or MAC changed. Returns whether it did.
    async fn follow_underlay(&mut self, nl: &Netlink) -> Result<bool> {
        let Some(link) = nl.link(&self.underlay.iface).await? else {
            return Ok(false);
        };
        if self.underlay_index == Some(link.index) {
            return Ok(false);
        }
        let mut maps = Maps::open(&self.pin)?;
        let mut config = maps.config()?;
        let mac = link.mac.unwrap_or(config.underlay_mac);
        let changed = config.underlay_ifindex != link.index || config.underlay_mac != mac;
        if changed {
            warn!(
                iface = %self.underlay.iface,
                old_index = config.underlay_ifindex,
                new_index = link.index,
                "underlay interface was re-created; the data path now sends through the new one"
            );
            config.underlay_ifindex = link.index;
            config.underlay_mac = mac;
            maps.set_config(&config)?;
        }
        self.underlay_index = Some(link.index);
        Ok(changed)
    }
}

/// Runs a pass after every link or TC change and every `interval`, adding
/// the repairs to the published state.
pub async fn run(
    mut healer: Healer,
    interval: Duration,
    state: watch::Sender<NodeState>,
) -> Result<()> {
    let nl = Netlink::connect()?;
    let mut changes = match netlink::link_and_tc_changes() {
        Ok(changes) => Some(changes),
        Err(e) => {
            warn!("{e:#}; checking attachments on the timer only");
            None
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            change = next_change(&mut changes) => {
                if change.is_none() {
                    warn!("link notifications stopped; checking attachments on the timer only");
                    changes = None;
                    continue;
                }
                tokio::time::sleep(SETTLE).await;
                drain(&mut changes);
            }
        }
        let repaired = healer.reconcile(&nl).await;
        if repaired > 0 {
            state.send_modify(|s| s.repairs += repaired);
        }
    }
}

/// The next notification; never, once the stream is gone.
async fn next_change(changes: &mut Option<impl futures::Stream<Item = ()> + Unpin>) -> Option<()> {
    match changes {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// Takes every notification already queued.
fn drain(changes: &mut Option<impl futures::Stream<Item = ()> + Unpin>) {
    if let Some(stream) = changes {
        while let Some(Some(())) = stream.next().now_or_never() {}
    }
}
