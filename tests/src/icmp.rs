//! ICMP errors as a container's stack really receives them (a raw ICMP
//! socket in its namespace), and UDP senders with chosen TTL, TOS and DF.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::NsRef;

/// RFC 1071 checksum of `bytes` (0 when a header holds its own checksum).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP error received, with what a test checks of it.
#[derive(Clone, Debug)]
pub struct IcmpError {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub kind: u8,
    pub code: u8,
    /// Next-hop MTU (bytes 6..8 of the ICMP header).
    pub mtu: u16,
    /// The outer IPv4 header's checksum verifies.
    pub ip_checksum_ok: bool,
    /// The ICMP checksum over the whole ICMP message verifies.
    pub icmp_checksum_ok: bool,
    /// What the error quotes: the offending packet's IPv4 header and the
    /// start of its payload.
    pub quote: Vec<u8>,
}

impl IcmpError {
    /// Parses an IPv4 packet carrying an ICMP error (type 3 or 11).
    pub fn parse(packet: &[u8]) -> Option<IcmpError> {
        if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 1 {
            return None;
        }
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        let icmp = packet.get(ihl..)?;
        if icmp.len() < 8 || !matches!(icmp[0], 3 | 11) {
            return None;
        }
        Some(IcmpError {
            src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
            dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
            kind: icmp[0],
            code: icmp[1],
            mtu: u16::from_be_bytes([icmp[6], icmp[7]]),
            ip_checksum_ok: internet_checksum(&packet[..ihl]) == 0,
            icmp_checksum_ok: internet_checksum(icmp) == 0,
            quote: icmp[8..].to_vec(),
        })
    }
}

/// A raw ICMP socket opened in a namespace: every ICMP packet that reaches
/// that namespace's stack, IPv4 header included.
pub struct IcmpSocket {
    file: File,
}

impl IcmpSocket {
    pub fn open(ns: &NsRef) -> IcmpSocket {
        let fd = ns.run_in_thread(|| {
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            assert!(
                fd >= 0,
                "raw ICMP socket: {}",
                std::io::Error::last_os_error()
            );
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        IcmpSocket {
            file: File::from(fd),
        }
    }

    /// The ICMP errors received until none came for `quiet`, at most for
    /// `max`.
    pub fn errors(&mut self, quiet: Duration, max: Duration) -> Vec<IcmpError> {
        set_recv_timeout(self.file.as_raw_fd(), quiet);
        let deadline = Instant::now() + max;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            match self.file.read(&mut buf) {
                Ok(n) => got.extend(IcmpError::parse(&buf[..n])),
                Err(_) => break,
            }
        }
        got
    }
}

fn set_recv_timeout(fd: i32, timeout: Duration) {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
}

fn set_ip_option(sock: &UdpSocket, name: libc::c_int, value: libc::c_int) {
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// How a [`udp_sender`] marks what it sends.
#[derive(Clone, Copy, Debug)]
pub struct SendOpts {
    pub ttl: u32,
    /// The whole TOS byte, ECN bits included (UDP keeps them as given).
    pub tos: u8,
    /// DF set, and sent even above a learnt path MTU (`IP_PMTUDISC_PROBE`).
    pub df: bool,
}

/// A UDP socket bound in `ns` whose datagrams carry `opts`.
pub fn udp_sender(ns: &NsRef, bind: SocketAddr, opts: SendOpts) -> UdpSocket {
    let sock = ns.run_in_thread(move || {
        UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"))
    });
    sock.set_ttl(opts.ttl).expect("IP_TTL");
    set_ip_option(&sock, libc::IP_TOS, libc::c_int::from(opts.tos));
    let pmtu = if opts.df {
        libc::IP_PMTUDISC_PROBE
    } else {
        libc::IP_PMTUDISC_DONT
    };
    set_ip_option(&sock, libc::IP_MTU_DISCOVER, pmtu);
    sock
}
