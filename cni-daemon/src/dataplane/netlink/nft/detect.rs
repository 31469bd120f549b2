//! `--firewall auto`: nftables where this node already speaks nftables, iptables elsewhere.
//!
//! The signs, read over netlink in the calling thread's netns (the node's), first match wins:
//! 1. our table `inet ambient-cni` exists: a previous run used nftables (a restart keeps it);
//! 2. kube-proxy runs in its nftables mode: its table `ip kube-proxy` or `ip6 kube-proxy` exists;
//! 3. otherwise iptables — also when the kernel has no nf_tables.
//!
//! Not a sign: iptables-nft's own tables (`ip mangle`, `ip filter`…): they are iptables rules
//! kept in nf_tables, and our iptables driver works with them (`--iptables-backend`).

use super::wire::{attr_str, Msg, NftSocket, NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6};
use super::wire::{NFTA_TABLE_NAME, NFT_MSG_GETTABLE};
use super::TABLE;
use crate::dataplane::netlink::FirewallKind;

/// Names of the tables of `family` in this netns (empty without nf_tables).
fn tables(s: &mut NftSocket, family: u8) -> Vec<String> {
    let mut out = Vec::new();
    let _ = s.dump(Msg::of_family(NFT_MSG_GETTABLE, 0, family), |_, a| {
        if let Some(n) = attr_str(a, NFTA_TABLE_NAME) {
            out.push(n.to_string());
        }
    });
    out
}

/// The firewall for `--firewall auto`, and why (for the log).
pub fn detect() -> (FirewallKind, String) {
    let Ok(mut s) = NftSocket::open() else {
        return (
            FirewallKind::Iptables,
            "no nfnetlink socket (no nf_tables)".into(),
        );
    };
    if tables(&mut s, NFPROTO_INET).iter().any(|t| t == TABLE) {
        return (
            FirewallKind::Nftables,
            format!("table inet {TABLE} exists (a previous run used nftables)"),
        );
    }
    for (fam, word) in [(NFPROTO_IPV4, "ip"), (NFPROTO_IPV6, "ip6")] {
        if tables(&mut s, fam).iter().any(|t| t == "kube-proxy") {
            return (
                FirewallKind::Nftables,
                format!("kube-proxy runs in nftables mode (table {word} kube-proxy exists)"),
            );
        }
    }
    (
        FirewallKind::Iptables,
        "neither our nft table nor kube-proxy's nftables tables exist".into(),
    )
}
