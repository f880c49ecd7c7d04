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
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    route::{RouteAttribute, RouteMessage, RouteScope},
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

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
}

impl From<&LinkMessage> for Link {
    fn from(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            kind: None,
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
                _ => {}
            }
        }
        link
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
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut routes = self.handle.route().get(filter).execute();
        while let Some(route) = routes.try_next().await? {
            if route.header.destination_prefix_length != 0 {
                continue;
            }
            if let Some(index) = output_interface(&route) {
                return Ok(Some(self.link_by_index(index).await?));
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

/// Runs `work` with a netlink socket inside the namespace at `netns`, on a
/// thread of its own so this process's namespace never changes.
pub fn in_netns<T, F>(netns: &Path, work: F) -> Result<T>
where
    T: Send + 'static,
    F: AsyncFnOnce(Netlink) -> Result<T> + Send + 'static,
{
    let file = File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering network namespace")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move { work(Netlink::connect()?).await })
    })
    .join()
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
