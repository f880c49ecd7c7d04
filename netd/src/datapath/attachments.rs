//! The attachments this node needs, compared with what the kernel reports,
//! and the repair of the difference. The kernel is the truth: a filter
//! deleted by hand or by another tool, a clsact qdisc removed, XDP turned
//! off or a NIC re-created are all found by looking, never by a record.
//!
//! An attachment is an (interface, hook, program) triple, so another
//! program on another device is one more entry in the wanted list.

use std::{collections::BTreeMap, fmt};

use aya::programs::{ProgramInfo, TcAttachType};
use netd_common::names;

use super::{Hook, PinDir, TC_HANDLE, TC_PRIORITY, Underlay, xdp};
use crate::netlink::Netlink;

/// Where a program runs on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttachPoint {
    /// Our filter slot (priority 1, handle 1) on clsact ingress.
    TcIngress,
    /// The same slot on clsact egress.
    TcEgress,
    /// The link's XDP program (IFLA_XDP), native or generic.
    Xdp,
}

impl fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachPoint::TcIngress => "tc ingress",
            AttachPoint::TcEgress => "tc egress",
            AttachPoint::Xdp => "xdp",
        })
    }
}

/// One program that must run on one interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attachment {
    pub iface: String,
    /// Only the link with this index counts (a container's veth: a new link
    /// of the same name is someone else's); `None`: whichever has the name.
    pub ifindex: Option<u32>,
    pub point: AttachPoint,
    /// Name of the pinned program.
    pub program: &'static str,
}

impl Attachment {
    /// `from_container` on a container's host-side veth.
    pub fn container(host_ifname: &str, ifindex: u32) -> Self {
        Attachment {
            iface: host_ifname.to_string(),
            ifindex: Some(ifindex),
            point: AttachPoint::TcIngress,
            program: names::FROM_CONTAINER,
        }
    }

    /// `to_container` on a container's host-side veth.
    pub fn to_container(host_ifname: &str, ifindex: u32) -> Self {
        Attachment {
            point: AttachPoint::TcEgress,
            program: names::TO_CONTAINER,
            ..Self::container(host_ifname, ifindex)
        }
    }

    /// Both programs of a container's host-side veth.
    pub fn container_veth(host_ifname: &str, ifindex: u32) -> [Self; 2] {
        [
            Self::container(host_ifname, ifindex),
            Self::to_container(host_ifname, ifindex),
        ]
    }

    /// Decapsulation on the underlay NIC: TC, and XDP in front of it when
    /// that is the hook.
    pub fn underlay(underlay: &Underlay) -> Vec<Self> {
        let tc = Attachment {
            iface: underlay.iface.clone(),
            ifindex: None,
            point: AttachPoint::TcIngress,
            program: names::TC_FROM_UNDERLAY,
        };
        match underlay.hook {
            Hook::Xdp => vec![
                Attachment {
                    point: AttachPoint::Xdp,
                    program: names::XDP_FROM_UNDERLAY,
                    ..tc.clone()
                },
                tc,
            ],
            Hook::Tc | Hook::Auto => vec![tc],
        }
    }
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {} {}", self.program, self.iface, self.point)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("pinned program {program}: {cause}")]
    Pinned {
        program: &'static str,
        cause: aya::programs::ProgramError,
    },
    #[error("looking at {what} in the kernel: {cause:#}")]
    Query { what: String, cause: anyhow::Error },
    #[error("attaching {what}: {cause:#}")]
    Attach { what: String, cause: anyhow::Error },
}

/// What the kernel has where an attachment should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Our pinned program.
    Ours,
    /// Nothing, or another program in our slot.
    Wrong,
    /// No such interface (or another link under the name).
    NoLink,
}

/// The result of one pass.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Put back in this pass.
    pub repaired: Vec<Attachment>,
    /// Wanted on an interface that does not exist.
    pub no_link: Vec<Attachment>,
    pub failed: Vec<(Attachment, AttachError)>,
}

/// Ids of the pinned programs, read once per pass: what "ours" means.
struct Ours(BTreeMap<&'static str, u32>);

impl Ours {
    fn id(&mut self, pin: &PinDir, program: &'static str) -> Result<u32, AttachError> {
        if let Some(id) = self.0.get(program) {
            return Ok(*id);
        }
        let id = ProgramInfo::from_pin(pin.program(program))
            .map_err(|cause| AttachError::Pinned { program, cause })?
            .id();
        self.0.insert(program, id);
        Ok(id)
    }
}

/// Looks at every wanted attachment in the kernel and attaches, in place,
/// what is missing or runs another program.
pub async fn reconcile(pin: &PinDir, nl: &Netlink, wanted: &[Attachment]) -> Outcome {
    let mut ours = Ours(BTreeMap::new());
    let mut outcome = Outcome::default();
    for want in wanted {
        let found = match ours.id(pin, want.program) {
            Ok(id) => inspect(nl, want, id).await,
            Err(e) => Err(e),
        };
        match found {
            Ok(Found::Ours) => {}
            Ok(Found::NoLink) => outcome.no_link.push(want.clone()),
            Ok(Found::Wrong) => match repair(pin, want).await {
                Ok(()) => outcome.repaired.push(want.clone()),
                Err(e) => outcome.failed.push((want.clone(), e)),
            },
            Err(e) => outcome.failed.push((want.clone(), e)),
        }
    }
    outcome
}

/// What the kernel has for `want`, given our program's id.
async fn inspect(nl: &Netlink, want: &Attachment, our_id: u32) -> Result<Found, AttachError> {
    let query = |cause| AttachError::Query {
        what: want.to_string(),
        cause,
    };
    let link = match nl.link(&want.iface).await.map_err(query)? {
        Some(link) if want.ifindex.is_none_or(|i| i == link.index) => link,
        _ => return Ok(Found::NoLink),
    };
    let running = match want.point {
        AttachPoint::Xdp => link.xdp_prog_id,
        AttachPoint::TcIngress => our_filter(nl.ingress_filters(link.index).await.map_err(query)?),
        AttachPoint::TcEgress => our_filter(nl.egress_filters(link.index).await.map_err(query)?),
    };
    Ok(if running == Some(our_id) {
        Found::Ours
    } else {
        Found::Wrong
    })
}

/// The program in our filter slot, if any.
fn our_filter(filters: Vec<crate::netlink::TcFilter>) -> Option<u32> {
    filters
        .into_iter()
        .find(|f| f.priority == TC_PRIORITY && f.handle == u32::from(TC_HANDLE) && f.kind == "bpf")
        .and_then(|f| f.prog_id)
}

async fn repair(pin: &PinDir, want: &Attachment) -> Result<(), AttachError> {
    let result = match want.point {
        // Creates the clsact qdisc too when it went missing.
        AttachPoint::TcIngress => super::attach_tc(pin, want.program, &want.iface),
        AttachPoint::TcEgress => {
            super::attach_tc_at(pin, want.program, &want.iface, TcAttachType::Egress)
        }
        AttachPoint::Xdp => xdp::attach(pin, &want.iface, xdp::XdpFlags::Any).await,
    };
    result.map_err(|cause| AttachError::Attach {
        what: want.to_string(),
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underlay_hooks() {
        let tc = Attachment::underlay(&Underlay {
            iface: "eth0".into(),
            hook: Hook::Tc,
        });
        assert_eq!(tc.len(), 1);
        assert_eq!(tc[0].point, AttachPoint::TcIngress);
        assert_eq!(tc[0].program, names::TC_FROM_UNDERLAY);
        let xdp = Attachment::underlay(&Underlay {
            iface: "eth0".into(),
            hook: Hook::Xdp,
        });
        let points: Vec<_> = xdp.iter().map(|a| (a.point, a.program)).collect();
        assert_eq!(
            points,
            [
                (AttachPoint::Xdp, names::XDP_FROM_UNDERLAY),
                (AttachPoint::TcIngress, names::TC_FROM_UNDERLAY)
            ]
        );
        assert!(xdp.iter().all(|a| a.iface == "eth0" && a.ifindex.is_none()));
    }

    #[test]
    fn container_names_its_veth() {
        let a = Attachment::container("ndv0000abcd", 7);
        assert_eq!(a.ifindex, Some(7));
        assert_eq!(a.to_string(), "from_container on ndv0000abcd tc ingress");
    }

    #[test]
    fn container_veth_has_both_directions() {
        let [from, to] = Attachment::container_veth("ndv0000abcd", 7);
        assert_eq!(
            (from.point, from.program),
            (AttachPoint::TcIngress, names::FROM_CONTAINER)
        );
        assert_eq!(
            (to.point, to.program),
            (AttachPoint::TcEgress, names::TO_CONTAINER)
        );
        assert_eq!((to.iface.as_str(), to.ifindex), ("ndv0000abcd", Some(7)));
        assert_eq!(to.to_string(), "to_container on ndv0000abcd tc egress");
    }
}
