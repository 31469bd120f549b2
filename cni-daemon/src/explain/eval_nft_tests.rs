//! The evaluator on the nftables dataplane's view: the iptables fixtures turned into the table
//! inet ambient-cni listing the nft driver makes of them (one base chain per table and hook,
//! each rule's iptables text in its comment), merged as `read` merges it.

use super::tests::{names, q, world};
use super::*;
use crate::dataplane::netlink::nft_listing::{ListedChain, TableListing};
use crate::explain::read::{merge_nft, NFT_CHAIN};
use crate::explain::view::{KernelView, NsView};

/// `ns` as the nft driver would have programmed it: our iptables chains moved into nft base
/// chains (`ip-<table>-<hook>`), the rest (foreign rules) left as read from iptables.
fn as_nft(ns: &NsView, drop_comment_of: Option<usize>) -> NsView {
    let mut chains = Vec::new();
    let mut rest = ns.clone();
    for (table, rules) in &ns.iptables {
        for (hook, body) in rules {
            let Some(ours) = body.strip_prefix("-j ztunnel-") else {
                continue;
            };
            let name = format!("ztunnel-{ours}");
            let mut texts: Vec<Option<String>> = rules
                .iter()
                .filter(|(c, _)| *c == name)
                .map(|(_, b)| Some(b.clone()))
                .collect();
            if let Some(i) = drop_comment_of {
                if let Some(t) = texts.get_mut(i) {
                    *t = None;
                }
            }
            chains.push(ListedChain {
                name: format!("ip-{table}-{}", hook.to_ascii_lowercase()),
                stands_for: Some((table.clone(), hook.clone())),
                hooked_right: true,
                rules: texts,
            });
        }
    }
    for rules in rest.iptables.values_mut() {
        rules.retain(|(c, b)| !c.starts_with("ztunnel-") && !b.starts_with("-j ztunnel-"));
    }
    rest.backend = String::new();
    merge_nft(
        &mut rest,
        TableListing {
            exists: true,
            chains,
            set: None,
        },
    );
    rest
}

fn nft_world(drop_comment_of: Option<usize>) -> KernelView {
    let mut w = world();
    w.node = as_nft(&w.node, drop_comment_of);
    w.ztunnel = w.ztunnel.as_ref().map(|z| as_nft(z, None));
    w
}

#[test]
fn every_verdict_is_the_same_on_the_nft_view() {
    let (ipt, nft) = (world(), nft_world(None));
    assert!(nft.node.iptables["mangle"]
        .iter()
        .any(|(c, b)| c == "PREROUTING" && *b == format!("-j {NFT_CHAIN}ip-mangle-prerouting")));
    assert!(!nft.node.iptables["mangle"]
        .iter()
        .any(|(c, _)| c.starts_with("ztunnel-")));
    for (src, dst, port) in [
        ("10.244.1.2", "198.51.100.2", 8080),  // enrolled egress: 15001
        ("198.51.100.2", "10.244.1.2", 8080),  // inbound: 15006
        ("198.51.100.2", "10.244.1.2", 15008), // HBONE
        ("10.244.1.3", "198.51.100.2", 8080),  // not enrolled: direct
        ("10.244.1.4", "10.244.1.2", 8080),    // ztunnel to the pod: direct
    ] {
        let a = explain(&ipt, &names(), &q(src, dst, port));
        let b = explain(&nft, &names(), &q(src, dst, port));
        assert_eq!(a.forward.outcome, b.forward.outcome, "{}", b.render());
        assert_eq!(a.forward.verdict, b.forward.verdict, "{}", b.render());
        assert_eq!(
            a.reply.as_ref().map(|r| &r.outcome),
            b.reply.as_ref().map(|r| &r.outcome),
            "{}",
            b.render()
        );
        assert!(b.notes.is_empty(), "{:?}", b.notes);
    }
    let e = explain(&nft, &names(), &q("10.244.1.2", "198.51.100.2", 8080));
    let text = e.render();
    assert!(
        text.contains("ambient-cni/ip-mangle-prerouting #"),
        "{text}"
    );
}

#[test]
fn a_rule_without_our_comment_and_a_misplaced_chain_are_reported() {
    let w = nft_world(Some(0));
    let e = explain(&w, &names(), &q("10.244.1.2", "198.51.100.2", 8080));
    assert!(
        e.notes
            .iter()
            .any(|n| n.starts_with("node: 1 rule(s) of nft chain ip-mangle-")
                && n.contains("no comment of ours")),
        "{:?}",
        e.notes
    );
    let mut v = NsView::default();
    merge_nft(
        &mut v,
        TableListing {
            exists: true,
            chains: vec![
                ListedChain {
                    name: "ip-mangle-prerouting".into(),
                    stands_for: Some(("mangle".into(), "PREROUTING".into())),
                    hooked_right: false,
                    rules: vec![Some("-j RETURN".into())],
                },
                ListedChain {
                    name: "ip-extra".into(),
                    stands_for: None,
                    hooked_right: false,
                    rules: vec![],
                },
            ],
            set: None,
        },
    );
    assert!(v.iptables.is_empty(), "{:?}", v.iptables);
    assert!(
        v.notes[0].contains("not hooked where mangle PREROUTING is"),
        "{:?}",
        v.notes
    );
    assert!(v.notes[1].contains("ip-extra") && v.notes[1].contains("not one of ours"));
    let mut gone = NsView::default();
    merge_nft(&mut gone, TableListing::default());
    assert!(gone.notes[0].contains("does not exist"), "{:?}", gone.notes);
}
