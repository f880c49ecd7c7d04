//! Links, addresses and routes over rtnetlink, in this network namespace or
//! (on a dedicated thread) in another one.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow};
use futures::TryStreamExt as _;
use futures::{Stream, StreamExt as _};
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{
        InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp,
    },
    route::{RouteAttribute, RouteMessage, RouteScope},
    tc::{TcAttribute, TcFilterBpfOption, TcMessage, TcOption},
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, LinkVxlan, MulticastGroup, RouteMessageBuilder};

const EEXIST: i32 = -libc::EEXIST;

pub struct Netlink {
    handle: Handle,
}

/// A link's properties that netd cares about.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    /// `veth`, `bridge`...; `None` for physical NICs.
    pub kind: Option<String>,
    /// The XDP program attached, in whatever mode.
    pub xdp_prog_id: Option<u32>,
}

/// A TC filter as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilter {
    pub priority: u16,
    /// The filter's handle, e.g. 1 for `handle 0:1`.
    pub handle: u32,
    /// `bpf`, `u32`, `matchall`...
    pub kind: String,
    /// The program of a `bpf` filter.
    pub prog_id: Option<u32>,
}

impl From<&TcMessage> for TcFilter {
    fn from(msg: &TcMessage) -> Self {
        let mut filter = TcFilter {
            // tcm_info holds the priority above the protocol.
            priority: (msg.header.info >> 16) as u16,
            handle: msg.header.handle.into(),
            kind: String::new(),
            prog_id: None,
        };
        for attr in &msg.attributes {
            match attr {
                TcAttribute::Kind(kind) => filter.kind = kind.clone(),
                TcAttribute::Options(options) => {
                    for option in options {
                        if let TcOption::Bpf(TcFilterBpfOption::ProgId(id)) = option {
                            filter.prog_id = Some(*id);
                        }
                    }
                }
                _ => {}
            }
        }
        filter
    }
}

impl From<&LinkMessage> for Link {
    fn from(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            kind: None,
            xdp_prog_id: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Address(addr) if addr.len() == 6 => {
                    link.mac = Some(addr.as_slice().try_into().expect("length checked"))
                }
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind_name(kind));
                        }
                    }
                }
                LinkAttribute::Xdp(xdp) => {
                    for attr in xdp {
                        if let LinkXdp::ProgId(id) = attr {
                            link.xdp_prog_id = Some(*id).filter(|id| *id != 0);
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// A VXLAN device's receive side, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    pub index: u32,
    pub up: bool,
    pub port: Option<u16>,
    /// External (collect_md) mode: one device for every VNI and remote.
    pub external: bool,
}

impl Vxlan {
    /// `None` when `msg` is not a VXLAN device.
    fn from_message(msg: &LinkMessage) -> Option<Self> {
        let infos = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })?;
        if !infos.contains(&LinkInfo::Kind(InfoKind::Vxlan)) {
            return None;
        }
        let mut vxlan = Vxlan {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            port: None,
            external: false,
        };
        for info in infos {
            if let LinkInfo::Data(InfoData::Vxlan(attrs)) = info {
                for attr in attrs {
                    match attr {
                        InfoVxlan::Port(port) => vxlan.port = Some(*port),
                        InfoVxlan::CollectMetadata(on) => vxlan.external = *on,
                        _ => {}
                    }
                }
            }
        }
        Some(vxlan)
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Dummy => "dummy".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == EEXIST)
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace; needs a
    /// tokio runtime.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(msg) => Ok(msg.as_ref().map(Link::from)),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up interface {name}")),
        }
    }

    pub async fn require_link(&self, name: &str) -> Result<Link> {
        self.link(name)
            .await?
            .ok_or_else(|| anyhow!("no interface named {name}"))
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Link> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let msg = links
            .try_next()
            .await?
            .ok_or_else(|| anyhow!("no interface with index {index}"))?;
        Ok(Link::from(&msg))
    }

    /// The interface of the IPv4 default route, if any.
    pub async fn default_route_link(&self) -> Result<Option<Link>> {
        match self.default_gateway().await? {
            Some((index, _)) => Ok(Some(self.link_by_index(index).await?)),
            None => Ok(None),
        }
    }

    /// The IPv4 default route's interface index and gateway, if any.
    pub async fn default_gateway(&self) -> Result<Option<(u32, Option<Ipv4Addr>)>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut routes = self.handle.route().get(filter).execute();
        while let Some(route) = routes.try_next().await? {
            if route.header.destination_prefix_length != 0 {
                continue;
            }
            if let Some(index) = output_interface(&route) {
                let gw = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(netlink_packet_route::route::RouteAddress::Inet(
                        ip,
                    )) => Some(*ip),
                    _ => None,
                });
                return Ok(Some((index, gw)));
            }
        }
        Ok(None)
    }

    /// The first IPv4 address on an interface.
    pub async fn first_ipv4(&self, index: u32) -> Result<Option<Ipv4Addr>> {
        Ok(self
            .ipv4_prefixes(index)
            .await?
            .first()
            .map(|net| net.addr()))
    }

    /// The IPv4 addresses on an interface, with their prefix lengths: the
    /// subnets directly connected through it.
    pub async fn ipv4_prefixes(&self, index: u32) -> Result<Vec<Ipv4Net>> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = addrs.try_next().await? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                    out.push(Ipv4Net::new(*ip, msg.header.prefix_len)?);
                }
            }
        }
        Ok(out)
    }

    pub async fn create_veth(&self, name: &str, peer: &str) -> Result<()> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .with_context(|| format!("creating veth pair {name}/{peer}"))
    }

    /// The link named `name` and, when it is a VXLAN device, its receive
    /// side.
    pub async fn vxlan(&self, name: &str) -> Result<Option<(Link, Option<Vxlan>)>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some((Link::from(&msg), Vxlan::from_message(&msg)))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up interface {name}")),
        }
    }

    /// Creates a VXLAN device in external (collect_md) mode receiving on
    /// UDP `port`, without address learning, up.
    pub async fn create_vxlan_external(&self, name: &str, port: u16) -> Result<()> {
        let msg = LinkVxlan::new(name, 0)
            .port(port)
            .collect_metadata(true)
            .learning(false)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("creating VXLAN device {name} on port {port}"))
    }

    /// Whether a BPF filter sits on `index`'s TC ingress.
    pub async fn has_ingress_bpf(&self, index: u32) -> Result<bool> {
        let mut filters = self
            .handle
            .traffic_filter(index as i32)
            .get()
            .ingress()
            .execute();
        while let Some(msg) = filters.try_next().await.context("listing TC filters")? {
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub async fn move_to_netns(&self, index: u32, netns: &File) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        self.set_link(msg)
            .await
            .context("moving interface to namespace")
    }

    pub async fn set_up(&self, index: u32, mtu: Option<u32>) -> Result<()> {
        let mut builder = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        self.set_link(builder.build())
            .await
            .context("setting link up")
    }

    pub async fn set_link(&self, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .context("changing link")
    }

    pub async fn rename(&self, index: u32, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .name(name.to_string())
            .build();
        self.set_link(msg)
            .await
            .with_context(|| format!("renaming link to {name}"))
    }

    pub async fn delete_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .context("deleting link")
    }

    /// The filters on `index`'s clsact ingress; none when there is no
    /// clsact qdisc.
    pub async fn ingress_filters(&self, index: u32) -> Result<Vec<TcFilter>> {
        let request = self.handle.traffic_filter(index as i32).get().ingress();
        Self::filters(request, index).await
    }

    /// The filters on `index`'s clsact egress; none when there is no
    /// clsact qdisc.
    pub async fn egress_filters(&self, index: u32) -> Result<Vec<TcFilter>> {
        let request = self.handle.traffic_filter(index as i32).get().egress();
        Self::filters(request, index).await
    }

    async fn filters(
        request: rtnetlink::TrafficFilterGetRequest,
        index: u32,
    ) -> Result<Vec<TcFilter>> {
        let mut filters = request.execute();
        let mut out = Vec::new();
        loop {
            match filters.try_next().await {
                Ok(Some(msg)) => out.push(TcFilter::from(&msg)),
                Ok(None) => return Ok(out),
                // The kernel's answer when the parent qdisc is missing.
                Err(rtnetlink::Error::NetlinkError(m))
                    if m.raw_code() == -libc::EINVAL || m.raw_code() == -libc::ENOENT =>
                {
                    return Ok(Vec::new());
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("listing TC filters of link {index}"));
                }
            }
        }
    }

    /// Adds an address; one already present is fine.
    pub async fn add_address(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix_len)
            .execute()
            .await
        {
            Err(e) if is_exists(&e) => Ok(()),
            other => other.with_context(|| format!("adding {ip}/{prefix_len}")),
        }
    }

    /// Removes `ip/prefix_len` from an interface; one already absent is
    /// fine. Returns whether it was there.
    pub async fn remove_address(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<bool> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(ip))
            .set_prefix_length_filter(prefix_len)
            .execute();
        let mut found = Vec::new();
        while let Some(msg) = addrs.try_next().await? {
            found.push(msg);
        }
        let removed = !found.is_empty();
        for msg in found {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .with_context(|| format!("removing {ip}/{prefix_len}"))?;
        }
        Ok(removed)
    }

    /// Adds (or replaces) a route to `dst` out of `index`, via `gateway`
    /// on-link when given, otherwise scope link.
    pub async fn replace_route(
        &self,
        dst: Ipv4Net,
        index: u32,
        gateway: Option<Ipv4Addr>,
    ) -> Result<()> {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(index);
        builder = match gateway {
            Some(gw) => builder.gateway(gw).onlink(),
            None => builder.scope(RouteScope::Link),
        };
        self.handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding route to {dst}"))
    }
}

impl Netlink {
    /// Adds (or replaces) a scope-link route to `dst` out of `index` whose
    /// locally originated packets take `src` as source.
    pub async fn replace_route_from(&self, dst: Ipv4Net, index: u32, src: Ipv4Addr) -> Result<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .pref_source(src)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding route to {dst} from {src}"))
    }
}

fn output_interface(route: &RouteMessage) -> Option<u32> {
    if route.header.address_family != AddressFamily::Inet {
        return None;
    }
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

/// A notification for every change of a link (created, deleted, up,
/// down, XDP set or cleared) or of a TC qdisc or filter in this network
/// namespace; needs a tokio runtime.
pub fn link_and_tc_changes() -> Result<impl Stream<Item = ()> + Unpin> {
    let (conn, _, messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Tc])
            .context("subscribing to link and TC notifications")?;
    tokio::spawn(conn);
    Ok(messages.map(|_| ()))
}

/// Runs `work` with a netlink socket inside the namespace at `netns`, on a
/// thread of its own so this process's namespace never changes. The
/// caller's runtime waits for the thread without blocking.
pub async fn in_netns<T, F>(netns: &Path, work: F) -> Result<T>
where
    T: Send + 'static,
    F: AsyncFnOnce(Netlink) -> Result<T> + Send + 'static,
{
    let file = File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let run = || -> Result<T> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering network namespace")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move { work(Netlink::connect()?).await })
        };
        // The receiver only goes away with the caller.
        let _ = done.send(run());
    });
    result
        .await
        .map_err(|_| anyhow!("namespace worker panicked"))?
}

/// Turns GRO on for `ifname` (ETHTOOL_SGRO). On a veth this also gives the
/// receive side a NAPI queue, which XDP redirects into it need.
pub fn enable_gro(ifname: &str) -> Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: 1,
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    for (dst, src) in req
        .name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for ethtool");
    }
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut req) };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(sock) };
    if rc < 0 {
        return Err(err).with_context(|| format!("enabling GRO on {ifname}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vxlan_message(infos: Vec<InfoVxlan>, up: bool) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        if up {
            msg.header.flags = LinkFlags::Up;
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(infos)),
        ]));
        msg
    }

    #[test]
    fn reads_a_vxlan_devices_receive_side() {
        let msg = vxlan_message(
            vec![InfoVxlan::Port(8472), InfoVxlan::CollectMetadata(true)],
            true,
        );
        assert_eq!(
            Vxlan::from_message(&msg),
            Some(Vxlan {
                index: 7,
                up: true,
                port: Some(8472),
                external: true
            })
        );
        let flannel = vxlan_message(vec![InfoVxlan::Id(1), InfoVxlan::Port(8472)], false);
        let vx = Vxlan::from_message(&flannel).expect("a VXLAN device");
        assert!(!vx.external && !vx.up);
    }

    #[test]
    fn other_kinds_are_not_vxlan() {
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Veth,
            )]));
        assert_eq!(Vxlan::from_message(&msg), None);
        assert_eq!(Vxlan::from_message(&LinkMessage::default()), None);
    }
}
