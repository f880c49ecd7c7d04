//! Both programs' work. Like Cilium's `ipv4_local_delivery`, a delivery
//! into a container is one router hop (TTL minus one, the container's MAC
//! as destination, the host veth's as source) and a `bpf_redirect_peer`;
//! the way into the tunnel only sets the tunnel key and redirects to the
//! VXLAN device, which builds the outer headers (Cilium's
//! `__encap_and_redirect_with_nodeid`).

use aya_ebpf::{
    bindings::{BPF_F_ZERO_CSUM_TX, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use netd_common::{
    Endpoint,
    headers::{ETH_HLEN, ETH_P_IP, EthHdr, IPV4_HLEN, Ipv4Hdr},
};

use crate::maps::{Counter, ENDPOINTS, TUNNEL_DEVICE, TUNNELS, count};

/// The network's VNI, as in the other VXLAN modes.
const VNI: u32 = 1;
/// TTL of the outer header (Cilium's `IPDEFTTL`).
const OUTER_TTL: u8 = 64;

/// A TC action and the counter that says why; counted once, at the exit.
struct Exit {
    action: i32,
    counter: Counter,
}

impl Exit {
    #[inline(always)]
    fn ok(counter: Counter) -> Self {
        Exit {
            action: TC_ACT_OK as i32,
            counter,
        }
    }

    #[inline(always)]
    fn shot(counter: Counter) -> Self {
        Exit {
            action: TC_ACT_SHOT as i32,
            counter,
        }
    }

    #[inline(always)]
    fn redirected(rc: i64, done: Counter) -> Self {
        if rc == TC_ACT_REDIRECT as i64 {
            Exit {
                action: TC_ACT_REDIRECT as i32,
                counter: done,
            }
        } else {
            Exit::shot(Counter::DropRedirectFailed)
        }
    }

    #[inline(always)]
    fn finish(self) -> i32 {
        count(self.counter);
        self.action
    }
}

#[inline(always)]
pub fn from_container(ctx: &TcContext) -> i32 {
    container_verdict(ctx).finish()
}

#[inline(always)]
pub fn from_overlay(ctx: &TcContext) -> i32 {
    overlay_verdict(ctx).finish()
}

#[inline(always)]
fn container_verdict(ctx: &TcContext) -> Exit {
    let (eth, ip) = match headers(ctx) {
        Ok(Some(h)) => h,
        Ok(None) => return Exit::ok(Counter::ToStack),
        Err(e) => return Exit::shot(e),
    };
    let dst = unsafe { (*ip).daddr };
    if let Some(ep) = unsafe { ENDPOINTS.get(dst) } {
        return deliver(eth, ip, ep, Counter::DeliveredLocal);
    }
    match TUNNELS.get(&Key::new(32, dst)) {
        Some(remote) => encapsulate(ctx, *remote),
        None => Exit::ok(Counter::ToStack),
    }
}

#[inline(always)]
fn overlay_verdict(ctx: &TcContext) -> Exit {
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    let size = core::mem::size_of::<bpf_tunnel_key>() as u32;
    // Cilium reads the key for the source identity carried in the VNI;
    // here it is the network's one VNI.
    if unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size, 0) } != 0 {
        return Exit::shot(Counter::DropMalformed);
    }
    if key.tunnel_id != VNI {
        return Exit::shot(Counter::DropBadVni);
    }
    let (eth, ip) = match headers(ctx) {
        Ok(Some(h)) => h,
        Ok(None) => return Exit::ok(Counter::ToStack),
        Err(e) => return Exit::shot(e),
    };
    match unsafe { ENDPOINTS.get((*ip).daddr) } {
        Some(ep) => deliver(eth, ip, ep, Counter::DeliveredFromOverlay),
        None => Exit::ok(Counter::ToStack),
    }
}

/// The Ethernet and IPv4 headers, `None` for anything but IPv4.
#[inline(always)]
fn headers(ctx: &TcContext) -> Result<Option<(*mut EthHdr, *mut Ipv4Hdr)>, Counter> {
    const PROBE: usize = ETH_HLEN + IPV4_HLEN;
    if ctx.data() + PROBE > ctx.data_end() && ctx.len() as usize >= PROBE {
        let _ = ctx.pull_data(PROBE as u32);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(start, end, 0).ok_or(Counter::DropMalformed)?;
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return Ok(None);
    }
    let ip = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN).ok_or(Counter::DropMalformed)?;
    Ok(Some((eth, ip)))
}

#[inline(always)]
fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// One router hop into a container on this host.
#[inline(always)]
fn deliver(eth: *mut EthHdr, ip: *mut Ipv4Hdr, ep: &Endpoint, done: Counter) -> Exit {
    // Cilium answers with ICMP time exceeded; dropping is enough here.
    if unsafe { (*ip).ttl } <= 1 {
        return Exit::shot(Counter::DropTtl);
    }
    unsafe {
        (*ip).decrement_ttl();
        (*eth).dst = ep.mac;
        (*eth).src = ep.host_mac;
    }
    let rc = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    Exit::redirected(rc, done)
}

/// Hands the frame to the VXLAN device with its tunnel endpoint set.
#[inline(always)]
fn encapsulate(ctx: &TcContext, remote: [u8; 4]) -> Exit {
    let Some(&ifindex) = TUNNEL_DEVICE.get(0) else {
        return Exit::shot(Counter::DropNoTunnelDevice);
    };
    if ifindex == 0 {
        return Exit::shot(Counter::DropNoTunnelDevice);
    }
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = VNI;
    // The helper takes the address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(remote);
    key.tunnel_ttl = OUTER_TTL;
    let size = core::mem::size_of::<bpf_tunnel_key>() as u32;
    let flags = BPF_F_ZERO_CSUM_TX as u64;
    if unsafe { bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, size, flags) } != 0 {
        return Exit::shot(Counter::DropRedirectFailed);
    }
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    Exit::redirected(rc, Counter::Encapsulated)
}
