//! Wire headers and bounds-checked access to them.
//!
//! Multi-byte fields are kept in network byte order; fields that are not
//! naturally aligned on the wire are byte arrays so the structs pack with no
//! padding (alignment 2).

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet: what encapsulation adds.
pub const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;

pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_UDP: u8 = 17;
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// IPv4 "more fragments" flag and fragment offset, host byte order.
pub const IP_MF_OFFSET: u16 = 0x3fff;

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

/// A pointer to a `T` at `offset` in `[start, end)`, or `None` when the
/// packet is too short. Every header access goes through here.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// UDP source port for a flow hash, spread over the ephemeral range as the
/// kernel's `udp_flow_src_port` does, so underlay ECMP/RSS sees entropy.
#[inline(always)]
pub fn flow_src_port(hash: u32) -> u16 {
    const MIN: u64 = 32768;
    const MAX: u64 = 61000;
    ((((hash as u64) * (MAX - MIN)) >> 32) + MIN) as u16
}
