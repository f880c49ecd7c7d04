//! Wire headers of the overlay, shared so that their layout and the
//! encapsulation header built by the kernel are unit-tested on the host.
//!
//! Multi-byte fields are kept in network byte order; fields that are not
//! naturally aligned on the wire are byte arrays so the structs pack with no
//! padding (alignment 2).

use crate::{NodeConfig, Peer};

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet: what encapsulation adds.
pub const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;

pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_TCP: u8 = 6;
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// IPv4 "more fragments" flag and fragment offset, host byte order.
pub const IP_MF_OFFSET: u16 = 0x3fff;
/// IPv4 fragment offset alone (zero in a first fragment), host byte order.
pub const IP_OFFSET: u16 = 0x1fff;

#[repr(C)]
#[derive(Copy, Clone)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct VxlanHdr {
    pub flags: u8,
    pub _reserved: [u8; 3],
    pub vni: [u8; 3],
    pub _reserved2: u8,
}

/// Everything written in front of an inner IPv4 packet by encapsulation,
/// including the outer Ethernet header: one store per packet.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct EncapHdr {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub vxlan: VxlanHdr,
    pub inner_eth: EthHdr,
}

/// The 8-byte header of an ICMP error: "destination unreachable" with the
/// next-hop MTU (RFC 1191), or "time exceeded" (the MTU field unused, 0).
#[repr(C)]
#[derive(Copy, Clone)]
pub struct IcmpErrorHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    pub _unused: u16,
    /// Next-hop MTU, network byte order (fragmentation needed only).
    pub mtu: u16,
}

/// Bytes of the offending packet quoted in an ICMP error: its IPv4 header
/// and the first 8 bytes of its payload.
pub const ICMP_QUOTE_LEN: usize = IPV4_HLEN + 8;

/// A whole ICMP error frame, written over the packet that caused it.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct IcmpErrorFrame {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub icmp: IcmpErrorHdr,
    pub quote: [u8; ICMP_QUOTE_LEN],
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_EXC_TTL: u8 = 0;

/// ECN field of the TOS byte (RFC 3168) and its code points.
pub const ECN_MASK: u8 = 0x03;
pub const ECN_ECT0: u8 = 0x02;
pub const ECN_CE: u8 = 0x03;

pub const IPPROTO_ICMP: u8 = 1;
pub const IP_DF: u16 = 0x4000;

const _: () = assert!(core::mem::size_of::<IcmpErrorHdr>() == 8);
const _: () =
    assert!(core::mem::size_of::<IcmpErrorFrame>() == ETH_HLEN + IPV4_HLEN + 8 + ICMP_QUOTE_LEN);
const _: () = assert!(core::mem::size_of::<EthHdr>() == ETH_HLEN);
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == IPV4_HLEN);
const _: () = assert!(core::mem::size_of::<UdpHdr>() == UDP_HLEN);
const _: () = assert!(core::mem::size_of::<VxlanHdr>() == VXLAN_HLEN);
const _: () = assert!(core::mem::size_of::<EncapHdr>() == ETH_HLEN + ENCAP_LEN);

impl Ipv4Hdr {
    /// Header length in bytes from the IHL field.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.ver_ihl & 0x0f) as usize) * 4
    }

    /// RFC 1071 checksum of a 20-byte header whose `check` field is zero.
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        let words: [u16; 10] = unsafe { core::mem::transmute(*self) };
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < 10 {
            sum += words[i] as u32;
            i += 1;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }

    /// Sets the TOS byte, updating the checksum incrementally.
    #[inline(always)]
    pub fn set_tos(&mut self, tos: u8) {
        let old = u16::from_ne_bytes([self.ver_ihl, self.tos]);
        self.tos = tos;
        let new = u16::from_ne_bytes([self.ver_ihl, self.tos]);
        self.check = csum_replace(self.check, old, new);
    }

    /// One router hop: TTL minus one, checksum updated incrementally. The
    /// caller has checked that the TTL is above 1.
    #[inline(always)]
    pub fn decrement_ttl(&mut self) {
        let old = u16::from_ne_bytes([self.ttl, self.proto]);
        self.ttl = self.ttl.wrapping_sub(1);
        let new = u16::from_ne_bytes([self.ttl, self.proto]);
        self.check = csum_replace(self.check, old, new);
    }
}

/// A checksum after one 16-bit word of the data changed from `old` to
/// `new` (RFC 1624, eqn. 3). Words as stored, like the checksum: one's
/// complement sums do not depend on byte order.
#[inline(always)]
pub fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    fold(sum)
}

/// The outer TOS for an inner one, as the kernel's tunnels set it
/// (`INET_ECN_encapsulate` with TOS 0): the inner ECN bits are copied,
/// except CE, which becomes ECT(0) (RFC 6040 normal mode).
#[inline(always)]
pub fn ecn_encapsulate(inner_tos: u8) -> u8 {
    match inner_tos & ECN_MASK {
        ECN_CE => ECN_ECT0,
        ecn => ecn,
    }
}

/// The inner TOS after decapsulation (RFC 6040 section 4.2): CE on the
/// outer header is carried to an ECN-capable inner one. `None`: CE on an
/// inner packet that is not ECN-capable, which must be dropped.
#[inline(always)]
pub fn ecn_decapsulate(outer_tos: u8, inner_tos: u8) -> Option<u8> {
    if outer_tos & ECN_MASK != ECN_CE {
        return Some(inner_tos);
    }
    if inner_tos & ECN_MASK == 0 {
        return None;
    }
    Some(inner_tos | ECN_CE)
}

impl VxlanHdr {
    #[inline(always)]
    pub fn new(vni: u32) -> Self {
        VxlanHdr {
            flags: VXLAN_FLAG_VNI,
            _reserved: [0; 3],
            vni: [(vni >> 16) as u8, (vni >> 8) as u8, vni as u8],
            _reserved2: 0,
        }
    }

    #[inline(always)]
    pub fn vni(&self) -> u32 {
        ((self.vni[0] as u32) << 16) | ((self.vni[1] as u32) << 8) | self.vni[2] as u32
    }
}

/// UDP source port for a flow hash, spread over the ephemeral range as the
/// kernel's `udp_flow_src_port` does, so underlay ECMP/RSS sees entropy.
#[inline(always)]
pub fn flow_src_port(hash: u32) -> u16 {
    const MIN: u64 = 32768;
    const MAX: u64 = 61000;
    ((((hash as u64) * (MAX - MIN)) >> 32) + MIN) as u16
}

/// The 64 bytes in front of the inner IPv4 header. Lengths saturate: for a
/// GSO packet the kernel rewrites them per segment anyway.
#[inline(always)]
pub fn encap_header(
    cfg: &NodeConfig,
    peer: &Peer,
    inner_len: usize,
    src_port: u16,
    ip_id: u16,
    tos: u8,
) -> EncapHdr {
    let ip_len = (inner_len + ENCAP_LEN).min(0xffff) as u16;
    let udp_len = (inner_len + UDP_HLEN + VXLAN_HLEN + ETH_HLEN).min(0xffff) as u16;
    let mut ip = Ipv4Hdr {
        ver_ihl: 0x45,
        tos,
        tot_len: ip_len.to_be(),
        // DF clear, as a kernel vxlan device sends: the ID must vary
        // (RFC 6864) for the underlay to reassemble fragments safely.
        id: ip_id.to_be(),
        frag_off: 0,
        ttl: 64,
        proto: IPPROTO_UDP,
        check: 0,
        saddr: cfg.public_ip,
        daddr: peer.public_ip,
    };
    ip.check = ip.checksum();
    EncapHdr {
        eth: EthHdr {
            dst: [0; 6],
            src: cfg.underlay_mac,
            proto: ETH_P_IP.to_be(),
        },
        ip,
        udp: UdpHdr {
            source: src_port.to_be(),
            dest: cfg.port.to_be(),
            len: udp_len.to_be(),
            check: 0,
        },
        vxlan: VxlanHdr::new(cfg.vni),
        inner_eth: EthHdr {
            dst: peer.vtep_mac,
            src: cfg.vtep_mac,
            proto: ETH_P_IP.to_be(),
        },
    }
}

/// One's-complement sum of 16-bit words, folded (RFC 1071).
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The ICMP error telling a container that `quote`'s packet does not fit
/// the tunnel: from `gateway` to the packet's source, MACs swapped.
#[inline(always)]
pub fn frag_needed(
    orig_eth: &EthHdr,
    quote: &[u8; ICMP_QUOTE_LEN],
    gateway: [u8; 4],
    mtu: u16,
) -> IcmpErrorFrame {
    icmp_error(
        orig_eth,
        quote,
        gateway,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        mtu,
    )
}

/// The ICMP error telling a container that `quote`'s packet reached TTL 0
/// at its gateway, as a router sends it.
#[inline(always)]
pub fn time_exceeded(
    orig_eth: &EthHdr,
    quote: &[u8; ICMP_QUOTE_LEN],
    gateway: [u8; 4],
) -> IcmpErrorFrame {
    icmp_error(
        orig_eth,
        quote,
        gateway,
        ICMP_TIME_EXCEEDED,
        ICMP_EXC_TTL,
        0,
    )
}

/// Whether an ICMP error may be sent about the packet whose first bytes
/// are `quote`: never about an ICMP error or a fragment other than the
/// first (RFC 1812 section 4.3.2.7).
#[inline(always)]
pub fn may_send_icmp_error(quote: &[u8; ICMP_QUOTE_LEN]) -> bool {
    let frag_offset = u16::from_be_bytes([quote[6], quote[7]]) & 0x1fff;
    if frag_offset != 0 {
        return false;
    }
    // Only a 20-byte header puts the ICMP type at byte 20; with options
    // the quote may not reach it, and such packets are not ICMP errors
    // netd's containers send: be conservative and stay silent.
    if quote[9] == IPPROTO_ICMP {
        let ihl = ((quote[0] & 0x0f) as usize) * 4;
        if ihl != IPV4_HLEN {
            return false;
        }
        return matches!(quote[20], 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18);
    }
    true
}

/// An ICMP error about `quote`'s packet, from `gateway` to its source,
/// MACs swapped.
#[inline(always)]
fn icmp_error(
    orig_eth: &EthHdr,
    quote: &[u8; ICMP_QUOTE_LEN],
    gateway: [u8; 4],
    kind: u8,
    code: u8,
    mtu: u16,
) -> IcmpErrorFrame {
    let dst = [quote[12], quote[13], quote[14], quote[15]];
    let total = (IPV4_HLEN + 8 + ICMP_QUOTE_LEN) as u16;
    let mut ip = Ipv4Hdr {
        ver_ihl: 0x45,
        tos: 0xc0,
        tot_len: total.to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto: IPPROTO_ICMP,
        check: 0,
        saddr: gateway,
        daddr: dst,
    };
    ip.check = ip.checksum();
    let mut icmp = IcmpErrorHdr {
        kind,
        code,
        check: 0,
        _unused: 0,
        mtu: mtu.to_be(),
    };
    let header: [u16; 4] = unsafe { core::mem::transmute(icmp) };
    let mut sum: u32 = header[0] as u32 + header[1] as u32 + header[2] as u32 + header[3] as u32;
    let mut i = 0;
    while i < ICMP_QUOTE_LEN {
        sum += u16::from_ne_bytes([quote[i], quote[i + 1]]) as u32;
        i += 2;
    }
    icmp.check = fold(sum);
    IcmpErrorFrame {
        eth: EthHdr {
            dst: orig_eth.src,
            src: orig_eth.dst,
            proto: ETH_P_IP.to_be(),
        },
        ip,
        icmp,
        quote: *quote,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T>(v: &T) -> &[u8] {
        unsafe {
            core::slice::from_raw_parts(v as *const T as *const u8, core::mem::size_of::<T>())
        }
    }

    /// Independent RFC 1071 over bytes, to check the word-wise one.
    fn rfc1071(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn config() -> NodeConfig {
        NodeConfig {
            vni: 0x0a0b0c,
            underlay_ifindex: 2,
            public_ip: [198, 18, 0, 1],
            port: 8472,
            enabled: 1,
            xdp_redirect: 0,
            underlay_mac: [2, 0, 0, 0, 0, 1],
            vtep_mac: [0x0e, 0x6e, 198, 18, 0, 1],
            inner_mtu: 1450,
            _pad2: [0; 2],
            gateway: [10, 244, 1, 1],
        }
    }

    fn peer() -> Peer {
        Peer {
            public_ip: [198, 18, 0, 2],
            vtep_mac: [0x0e, 0x6e, 198, 18, 0, 2],
            mode: 0,
            _pad: 0,
        }
    }

    #[test]
    fn checksum_of_known_header() {
        // Classic example: 45 00 00 73 00 00 40 00 40 11 [b8 61] c0 a8 00 01 c0 a8 00 c7
        let hdr = Ipv4Hdr {
            ver_ihl: 0x45,
            tos: 0,
            tot_len: 0x73u16.to_be(),
            id: 0,
            frag_off: 0x4000u16.to_be(),
            ttl: 64,
            proto: IPPROTO_UDP,
            check: 0,
            saddr: [192, 168, 0, 1],
            daddr: [192, 168, 0, 199],
        };
        assert_eq!(u16::from_be(hdr.checksum()), 0xb861);
        let mut with = hdr;
        with.check = hdr.checksum();
        assert_eq!(
            rfc1071(bytes(&with)),
            0,
            "a header with its checksum sums to zero"
        );
    }

    #[test]
    fn encap_header_is_what_a_vxlan_peer_expects() {
        let inner_len = 84; // an ICMP echo: 20 + 8 + 56
        let hdr = encap_header(&config(), &peer(), inner_len, 40000, 0x1234, 0x02);
        let b = bytes(&hdr);
        assert_eq!(b.len(), 64);
        // Outer Ethernet: source is the underlay NIC, type IPv4.
        assert_eq!(&b[6..12], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&b[12..14], &[0x08, 0x00]);
        // Outer IPv4.
        let ip = &b[14..34];
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip[1], 0x02, "TOS as given (the inner ECN bits)");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, inner_len + 50);
        assert_eq!(&ip[4..8], &[0x12, 0x34, 0, 0], "ID, no DF, no fragment");
        assert_eq!(ip[8], 64);
        assert_eq!(ip[9], 17);
        assert_eq!(&ip[12..16], &[198, 18, 0, 1]);
        assert_eq!(&ip[16..20], &[198, 18, 0, 2]);
        assert_eq!(rfc1071(ip), 0, "valid outer checksum");
        // UDP: entropy source port, VXLAN port, length, no checksum.
        let udp = &b[34..42];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 40000);
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 8472);
        assert_eq!(
            u16::from_be_bytes([udp[4], udp[5]]) as usize,
            inner_len + 30
        );
        assert_eq!(&udp[6..8], &[0, 0]);
        // VXLAN: I flag and 24-bit VNI.
        assert_eq!(&b[42..50], &[0x08, 0, 0, 0, 0x0a, 0x0b, 0x0c, 0]);
        // Inner Ethernet: VTEP MACs as flannel's vxlan device expects.
        assert_eq!(&b[50..56], &peer().vtep_mac);
        assert_eq!(&b[56..62], &config().vtep_mac);
        assert_eq!(&b[62..64], &[0x08, 0x00]);
    }

    #[test]
    fn lengths_saturate_for_gso_packets() {
        let hdr = encap_header(&config(), &peer(), 70000, 1, 0, 0);
        assert_eq!(u16::from_be(hdr.ip.tot_len), 0xffff);
        assert_eq!(u16::from_be(hdr.udp.len), 0xffff);
    }

    #[test]
    fn frag_needed_is_a_valid_icmp_error() {
        let orig = EthHdr {
            dst: [2, 0, 0, 0, 0, 0xaa],
            src: [2, 0, 0, 0, 0, 0xbb],
            proto: ETH_P_IP.to_be(),
        };
        let mut quote = [0u8; ICMP_QUOTE_LEN];
        quote[0] = 0x45;
        quote[12..16].copy_from_slice(&[10, 244, 1, 2]);
        quote[16..20].copy_from_slice(&[10, 244, 2, 2]);
        quote[20..28].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let frame = frag_needed(&orig, &quote, [10, 244, 1, 1], 1450);
        let b = bytes(&frame);
        assert_eq!(b.len(), 70);
        assert_eq!(&b[0..6], &orig.src, "back to the sender");
        assert_eq!(&b[6..12], &orig.dst);
        let ip = &b[14..34];
        assert_eq!(rfc1071(ip), 0, "IPv4 checksum");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56);
        assert_eq!(ip[9], 1);
        assert_eq!(&ip[12..16], &[10, 244, 1, 1]);
        assert_eq!(&ip[16..20], &[10, 244, 1, 2]);
        let icmp = &b[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1450);
        assert_eq!(rfc1071(icmp), 0, "ICMP checksum");
        assert_eq!(&icmp[8..], &quote);
    }

    #[test]
    fn time_exceeded_is_a_valid_icmp_error() {
        let orig = EthHdr {
            dst: [2, 0, 0, 0, 0, 0xaa],
            src: [2, 0, 0, 0, 0, 0xbb],
            proto: ETH_P_IP.to_be(),
        };
        let mut quote = [0u8; ICMP_QUOTE_LEN];
        quote[0] = 0x45;
        quote[8] = 1;
        quote[12..16].copy_from_slice(&[10, 244, 1, 2]);
        quote[16..20].copy_from_slice(&[10, 244, 2, 2]);
        quote[20..28].copy_from_slice(&[8, 0, 3, 4, 5, 6, 7, 8]);
        let frame = time_exceeded(&orig, &quote, [10, 244, 1, 1]);
        let b = bytes(&frame);
        assert_eq!(b.len(), 70);
        assert_eq!(&b[0..6], &orig.src, "back to the sender");
        assert_eq!(&b[6..12], &orig.dst);
        let ip = &b[14..34];
        assert_eq!(rfc1071(ip), 0, "IPv4 checksum");
        assert_eq!(ip[9], 1);
        assert_eq!(&ip[12..16], &[10, 244, 1, 1], "from the gateway");
        assert_eq!(&ip[16..20], &[10, 244, 1, 2], "to the sender");
        let icmp = &b[34..];
        assert_eq!((icmp[0], icmp[1]), (11, 0));
        assert_eq!(&icmp[4..8], &[0; 4], "unused");
        assert_eq!(rfc1071(icmp), 0, "ICMP checksum");
        assert_eq!(&icmp[8..], &quote);
    }

    fn header(tos: u8, ttl: u8) -> Ipv4Hdr {
        let mut h = Ipv4Hdr {
            ver_ihl: 0x45,
            tos,
            tot_len: 1400u16.to_be(),
            id: 0xbeefu16.to_be(),
            frag_off: 0x4000u16.to_be(),
            ttl,
            proto: IPPROTO_TCP,
            check: 0,
            saddr: [10, 244, 1, 2],
            daddr: [10, 244, 2, 2],
        };
        h.check = h.checksum();
        h
    }

    /// The checksum a full recomputation gives.
    fn recomputed(mut h: Ipv4Hdr) -> u16 {
        h.check = 0;
        h.checksum()
    }

    #[test]
    fn incremental_updates_match_a_full_checksum() {
        for ttl in [2u8, 3, 64, 128, 255] {
            for tos in [0u8, 1, 2, 3, 0xb8, 0xff] {
                let mut h = header(tos, ttl);
                h.decrement_ttl();
                assert_eq!(h.ttl, ttl - 1);
                assert_eq!(h.check, recomputed(h), "ttl {ttl} tos {tos:#x}");
                for new in [0u8, 3, 0xb9, 0xfe] {
                    let mut t = h;
                    t.set_tos(new);
                    assert_eq!(t.tos, new);
                    assert_eq!(t.check, recomputed(t), "tos {tos:#x} -> {new:#x}");
                }
            }
        }
    }

    #[test]
    fn ecn_follows_rfc6040() {
        // Encapsulation: copied, CE becomes ECT(0).
        assert_eq!(ecn_encapsulate(0xb8), 0);
        assert_eq!(ecn_encapsulate(0xb9), 1);
        assert_eq!(ecn_encapsulate(0x02), 2);
        assert_eq!(ecn_encapsulate(0x03), 2);
        // Decapsulation: only an outer CE changes anything.
        for outer in [0u8, 1, 2, 0xb8 | 2] {
            for inner in [0u8, 1, 2, 3, 0xb9] {
                assert_eq!(ecn_decapsulate(outer, inner), Some(inner));
            }
        }
        assert_eq!(ecn_decapsulate(3, 0xb8 | 1), Some(0xb8 | 3));
        assert_eq!(ecn_decapsulate(3, 2), Some(3));
        assert_eq!(ecn_decapsulate(3, 3), Some(3));
        assert_eq!(ecn_decapsulate(3, 0xb8), None, "CE on a not-ECT inner");
    }

    #[test]
    fn no_icmp_error_about_errors_or_later_fragments() {
        let mut q = [0u8; ICMP_QUOTE_LEN];
        q[0] = 0x45;
        q[9] = IPPROTO_UDP;
        assert!(may_send_icmp_error(&q));
        q[6] = 0x20; // MF, offset 0: the first fragment
        assert!(may_send_icmp_error(&q));
        q[7] = 1; // offset 8
        assert!(!may_send_icmp_error(&q));
        q[6] = 0;
        q[7] = 0;
        q[9] = IPPROTO_ICMP;
        for (kind, ok) in [(8, true), (0, true), (3, false), (11, false), (5, false)] {
            q[20] = kind;
            assert_eq!(may_send_icmp_error(&q), ok, "ICMP type {kind}");
        }
    }

    #[test]
    fn vni_round_trip() {
        for vni in [0, 1, 42, 0xffffff] {
            assert_eq!(VxlanHdr::new(vni).vni(), vni);
        }
    }

    #[test]
    fn source_ports_stay_in_range() {
        for hash in [0, 1, 0x7fff_ffff, 0xffff_ffff, 0xdead_beef] {
            let port = flow_src_port(hash);
            assert!((32768..61000).contains(&port), "{port}");
        }
        assert_ne!(flow_src_port(0x1000_0000), flow_src_port(0x9000_0000));
    }
}
