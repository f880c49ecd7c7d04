//! Egress masquerading with kernel nftables, over netlink (nftnl).
//!
//! Why nftables and not SNAT in the eBPF programs: the kernel's conntrack
//! already allocates ports, expires bindings and un-NATs replies and ICMP
//! errors, and its NAT bindings outlive both the rules and the daemon, so a
//! restart or a rule replacement never breaks an open connection. This is
//! what flannel (`--ip-masq`) and Calico (`natOutgoing`) do with iptables.
//!
//! netd owns one table, `ip netd`, with one `postrouting` nat chain:
//! traffic from this host's leased subnet to anything outside the cluster
//! network (multicast excepted) leaves with the address of the interface it
//! leaves by. Traffic between cluster addresses is never rewritten.

use std::{
    collections::HashSet,
    ffi::{CStr, CString},
    io,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use nftnl::{Batch, Chain, FinalizedBatch, MsgType, ProtoFamily, Rule, Table, nft_expr};
use tracing::{info, warn};

pub const TABLE: &CStr = c"netd";
const CHAIN: &CStr = c"postrouting";
/// NF_IP_PRI_NAT_SRC: where `iptables -t nat -A POSTROUTING` rules run.
const SRCNAT_PRIORITY: i32 = 100;
const MULTICAST: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nftables over netlink: {0}")]
    Netlink(#[from] io::Error),
}

/// What the table should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Masquerade {
    /// This host's leased subnet: the sources rewritten.
    pub subnet: Ipv4Net,
    /// The cluster network: destinations left alone.
    pub network: Ipv4Net,
}

/// Makes the kernel hold exactly the desired table: nftnl cannot read rules
/// back, so the whole table is replaced in one atomic batch (delete and
/// re-create), which leaves conntrack's bindings, and so every open
/// connection, untouched.
pub fn reconcile(want: &Masquerade) -> Result<(), Error> {
    let present = table_exists()?;
    let mut batch = Batch::new();
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    // Adding first makes the delete valid when the table is missing.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let mut chain = Chain::new(CHAIN, &table);
    chain.set_hook(nftnl::Hook::PostRouting, SRCNAT_PRIORITY);
    chain.set_type(nftnl::ChainType::Nat);
    chain.set_policy(nftnl::Policy::Accept);
    batch.add(&chain, MsgType::Add);
    batch.add(&masquerade_rule(&chain, want), MsgType::Add);
    send(&batch.finalize())?;
    if !present {
        info!(subnet = %want.subnet, network = %want.network, "masquerading table created");
    }
    Ok(())
}

/// `ip saddr SUBNET ip daddr != NETWORK ip daddr != 224.0.0.0/4 masquerade`
fn masquerade_rule<'a>(chain: &'a Chain<'a>, want: &Masquerade) -> Rule<'a> {
    let mut rule = Rule::new(chain);
    rule.add_expr(&nft_expr!(payload ipv4 saddr));
    rule.add_expr(&nft_expr!(bitwise mask want.subnet.netmask(), xor 0u32));
    rule.add_expr(&nft_expr!(cmp == want.subnet.network()));
    for outside in [want.network, MULTICAST] {
        rule.add_expr(&nft_expr!(payload ipv4 daddr));
        rule.add_expr(&nft_expr!(bitwise mask outside.netmask(), xor 0u32));
        rule.add_expr(&nft_expr!(cmp != outside.network()));
    }
    rule.add_expr(&nft_expr!(counter));
    rule.add_expr(&nftnl::expr::Masquerade);
    rule
}

/// Removes netd's table; one already gone is fine.
pub fn remove() -> Result<(), Error> {
    if !table_exists()? {
        return Ok(());
    }
    let mut batch = Batch::new();
    batch.add(&Table::new(TABLE, ProtoFamily::Ipv4), MsgType::Del);
    send(&batch.finalize())?;
    info!("masquerading table removed");
    Ok(())
}

/// Whether the `ip netd` table is in the kernel.
pub fn table_exists() -> Result<bool, Error> {
    Ok(tables()?.contains(TABLE))
}

fn tables() -> Result<HashSet<CString>, Error> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let seq = 0;
    let request = nftnl::table::get_tables_nlmsg(seq);
    // The request is built in a maximum-size buffer: send only the message.
    let len = u32::from_ne_bytes([request[0], request[1], request[2], request[3]]) as usize;
    socket.send(&request[..len.min(request.len())])?;
    let portid = socket.portid();
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut names = HashSet::new();
    loop {
        let n = socket.recv_raw(&mut buffer)?;
        if n == 0 {
            break;
        }
        match mnl::cb_run2(
            &buffer[..n],
            seq,
            portid,
            nftnl::table::get_tables_cb,
            &mut names,
        )? {
            mnl::CbResult::Stop => break,
            mnl::CbResult::Ok => {}
        }
    }
    Ok(names)
}

fn send(batch: &FinalizedBatch) -> Result<(), Error> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    socket.send_all(batch)?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer)? {
            let message = message?;
            let Some(seq) = expected.next() else {
                warn!("unexpected nftables acknowledgement");
                break;
            };
            mnl::cb_run(message, seq, portid)?;
        }
    }
    Ok(())
}
