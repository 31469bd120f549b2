//! The evaluator on text fixtures: what `iptables-save`, `ip -j rule`, `ip -j route` and
//! `ipset save` print on a node the daemon programmed (ztunnel 10.244.1.4 on veth0ae268a0,
//! enrolled pod app 10.244.1.2 on vethapp, pod other 10.244.1.3 not enrolled, remote
//! 198.51.100.2 behind eth1).

use super::*;
use crate::explain::view::{self, KernelView, NsView};

fn ns(ipt: &str, rules: &str, tables: &[(u32, &str)]) -> NsView {
    NsView {
        rules: view::parse_rules(rules, false).expect("rules"),
        tables: tables
            .iter()
            .map(|(t, j)| (*t, view::parse_routes(j, false).expect("routes")))
            .collect(),
        iptables: view::parse_iptables(ipt),
        backend: "nft".into(),
        notes: Vec::new(),
    }
}

fn node() -> NsView {
    ns(
        include_str!("fixtures/node-iptables.txt"),
        include_str!("fixtures/node-rules.json"),
        &[
            (100, include_str!("fixtures/node-table-100.json")),
            (101, include_str!("fixtures/node-table-101.json")),
            (102, include_str!("fixtures/node-table-102.json")),
            (254, include_str!("fixtures/node-table-main.json")),
            (255, include_str!("fixtures/node-table-local.json")),
        ],
    )
}

pub(super) fn world() -> KernelView {
    KernelView {
        node: node(),
        sets: view::parse_ipset(include_str!("fixtures/ipset.txt")),
        ztunnel: Some(ns(
            include_str!("fixtures/zt-iptables.txt"),
            include_str!("fixtures/zt-rules.json"),
            &[
                (100, include_str!("fixtures/zt-table-100.json")),
                (254, include_str!("fixtures/zt-table-main.json")),
                (255, include_str!("fixtures/zt-table-local.json")),
            ],
        )),
        ztunnel_ip: Some("10.244.1.4".parse().expect("ip")),
        ztunnel_note: None,
    }
}

pub(super) fn q(src: &str, dst: &str, dport: u16) -> Query {
    Query {
        src: src.parse().expect("src"),
        dst: dst.parse().expect("dst"),
        dport,
        proto: "tcp".into(),
        iif: None,
    }
}

pub(super) fn names() -> Names {
    Names::of(&Config::default())
}

const APP: &str = "10.244.1.2";
const OTHER: &str = "10.244.1.3";
const REMOTE: &str = "198.51.100.2";

#[test]
fn enrolled_egress_is_captured_on_15001_and_answers_come_back_through_ztunnel() {
    let e = explain(&world(), &names(), &q(APP, REMOTE, 8080));
    assert_eq!(
        e.forward.outcome,
        Outcome::Captured { port: 15001 },
        "{}",
        e.render()
    );
    assert!(e.forward.verdict.contains("original destination kept"));
    assert!(e.forward.title.contains("vethapp"), "{}", e.forward.title);
    let text = e.render();
    assert!(text.contains("mark 0x0 → 0x100"), "{text}");
    assert!(text.contains("ip rule 101"), "{text}");
    assert!(text.contains("istioout ══veth══> pistioout"), "{text}");
    // ztunnel answers as the remote, from its eth0: 0x210, routed by main back to app, saved.
    let reply = e.reply.as_ref().expect("reply");
    assert_eq!(
        reply.outcome,
        Outcome::Direct {
            dev: "vethapp".into()
        },
        "{text}"
    );
    assert!(
        reply
            .steps
            .iter()
            .any(|s| s.contains("connmark saved: 0x210")),
        "{text}"
    );
    // app's next packets: connmark 0x210 → 0x040 → table 102 → back into ztunnel's eth0.
    let next = e.next.as_ref().expect("next");
    assert_eq!(next.outcome, Outcome::ToZtunnel, "{text}");
    assert!(
        next.steps.iter().any(|s| s.contains("ip rule 102")),
        "{text}"
    );
    assert!(e.notes.is_empty(), "{:?}", e.notes);
}

#[test]
fn inbound_is_captured_on_15006_and_hbone_on_15008() {
    let w = world();
    let e = explain(&w, &names(), &q(REMOTE, APP, 8080));
    assert_eq!(
        e.forward.outcome,
        Outcome::Captured { port: 15006 },
        "{}",
        e.render()
    );
    assert!(e.forward.title.contains("eth1"));
    let e = explain(&w, &names(), &q(REMOTE, APP, 15008));
    assert_eq!(
        e.forward.outcome,
        Outcome::Captured { port: 15008 },
        "{}",
        e.render()
    );
}

#[test]
fn not_enrolled_goes_direct() {
    let e = explain(&world(), &names(), &q(OTHER, REMOTE, 8080));
    assert_eq!(
        e.forward.outcome,
        Outcome::Direct { dev: "eth1".into() },
        "{}",
        e.render()
    );
    assert_eq!(e.forward.verdict, "direct via eth1");
    let reply = e.reply.as_ref().expect("reply");
    assert_eq!(
        reply.outcome,
        Outcome::Direct {
            dev: "vethother".into()
        }
    );
}

#[test]
fn without_ztunnel_enrolled_tcp_is_held_closed_both_ways() {
    let mut w = world();
    w.ztunnel = None;
    w.ztunnel_ip = None;
    w.ztunnel_note = Some("the daemon knows no live ztunnel".into());
    // What the daemon leaves: table 101 only its unreachable default, no pod routes in 100.
    w.node.tables.insert(
        101,
        view::parse_routes(
            r#"[{"type":"unreachable","dst":"default","protocol":"212","metric":4294967280}]"#,
            false,
        )
        .expect("routes"),
    );
    w.node.tables.insert(100, vec![]);
    let e = explain(&w, &names(), &q(APP, REMOTE, 8080));
    assert!(
        matches!(&e.forward.outcome, Outcome::Rejected { why } if why.contains("held closed, no ztunnel")),
        "{}",
        e.render()
    );
    let e = explain(&w, &names(), &q(REMOTE, APP, 8080));
    assert_eq!(
        e.forward.verdict,
        "rejected: held closed, no ztunnel",
        "{}",
        e.render()
    );
}

#[test]
fn a_flushed_set_is_named() {
    let mut w = world();
    w.sets.values_mut().for_each(|s| s.clear());
    let e = explain(&w, &names(), &q(APP, REMOTE, 8080));
    assert!(
        e.forward
            .verdict
            .starts_with("not captured: pod IP missing from the set"),
        "{}",
        e.render()
    );
    // The remote's answer still goes into ztunnel (table 100), whose listener resets it.
    let reply = e.reply.as_ref().expect("a reply leg");
    assert!(
        matches!(&reply.outcome, Outcome::Rejected { why } if why.contains("15006")),
        "{}",
        e.render()
    );
    // Inbound does not depend on the set.
    let e = explain(&w, &names(), &q(REMOTE, APP, 8080));
    assert_eq!(e.forward.outcome, Outcome::Captured { port: 15006 });
}

#[test]
fn a_foreign_rule_before_ours_is_reported() {
    let mut w = world();
    let mangle = w.node.iptables.get_mut("mangle").expect("mangle");
    mangle.insert(
        0,
        (
            "PREROUTING".into(),
            "-m conntrack --ctstate NEW -j CT --notrack".into(),
        ),
    );
    let e = explain(&w, &names(), &q(APP, REMOTE, 8080));
    assert_eq!(e.forward.outcome, Outcome::Captured { port: 15001 });
    assert!(
        e.notes.iter().any(|n| n.contains("BEFORE our jump")),
        "{:?}",
        e.notes
    );
    // An ip rule with a selector we do not model is named too.
    w.node.rules.insert(
        1,
        view::parse_rules(
            r#"[{"priority":50,"src":"all","ipproto":"tcp","table":"200"}]"#,
            false,
        )
        .expect("rule")
        .remove(0),
    );
    let e = explain(&w, &names(), &q(APP, REMOTE, 8080));
    assert!(
        e.notes.iter().any(|n| n.contains("ip rule 50")),
        "{:?}",
        e.notes
    );
}

#[test]
fn udp_is_not_captured() {
    let mut query = q(APP, REMOTE, 53);
    query.proto = "udp".into();
    let e = explain(&world(), &names(), &query);
    assert_eq!(
        e.forward.outcome,
        Outcome::Direct { dev: "eth1".into() },
        "{}",
        e.render()
    );
}

#[test]
fn prefixes_of_both_families() {
    let n = view::Net::parse("10.244.1.0/24", false).expect("net");
    assert!(n.contains("10.244.1.9".parse().expect("ip")));
    assert!(!n.contains("10.244.2.9".parse().expect("ip")));
    assert!(!n.contains("fd00::1".parse().expect("ip")));
    let n6 = view::Net::parse("fd00::/64", true).expect("net");
    assert!(n6.contains("fd00::1".parse().expect("ip")));
    let d6 = view::Net::parse("default", true).expect("net");
    assert!(d6.contains("2001:db8::1".parse().expect("ip")));
    assert!(!d6.contains("10.0.0.1".parse().expect("ip")));
    assert_eq!(view::Net::parse("10.0.0.1/33", false), None);
}
