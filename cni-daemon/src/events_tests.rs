use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::NetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use netlink_packet_route::rule::{RuleAttribute, RuleMessage};
use netlink_packet_route::RouteNetlinkMessage as M;

use super::*;
use crate::config::Config;

fn route(table: u32, proto: u8, dst: Option<(Ipv4Addr, u8)>) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = netlink_packet_route::AddressFamily::Inet;
    m.header.protocol = RouteProtocol::from(proto);
    m.header.table = u8::try_from(table).unwrap_or(252);
    m.attributes.push(RouteAttribute::Table(table));
    if let Some((a, len)) = dst {
        m.header.destination_prefix_length = len;
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(a)));
    }
    m
}

fn rule(priority: u32, proto: u8) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.attributes.push(RuleAttribute::Priority(priority));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(proto)));
    m
}

fn link(index: u32, name: &str, up: bool) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if up {
        m.header.flags = LinkFlags::Up;
    }
    m.attributes.push(LinkAttribute::IfName(name.into()));
    m
}

fn node_filter() -> Filter {
    Filter::new(Interest::node(&Config::default()), [7])
}

#[test]
fn route_deletes_of_ours_repair_and_pod_routes_ask_first() {
    let mut f = node_filter();
    let pod = Ipv4Addr::new(10, 244, 1, 2);
    assert_eq!(
        f.classify(&M::DelRoute(route(100, 212, Some((pod, 32))))),
        Verdict::PodRoute(IpAddr::V4(pod))
    );
    assert_eq!(
        f.classify(&M::DelRoute(route(101, 212, None))),
        Verdict::Repair("route")
    );
    // A foreign route deleted from main, or our own route appearing: nothing.
    assert_eq!(
        f.classify(&M::DelRoute(route(254, 4, None))),
        Verdict::Ignore
    );
    assert_eq!(
        f.classify(&M::NewRoute(route(100, 212, Some((pod, 32))))),
        Verdict::Ignore
    );
    // Another protocol's route in our table (e.g. `ip route replace` of ours): repair.
    assert_eq!(
        f.classify(&M::NewRoute(route(100, 3, Some((pod, 32))))),
        Verdict::Repair("route")
    );
    // The ztunnel netns has no pod table: a /32 there repairs at once.
    let mut z = Filter::new(Interest::ztunnel(&Config::default()), []);
    assert_eq!(
        z.classify(&M::DelRoute(route(100, 212, Some((pod, 32))))),
        Verdict::Repair("route")
    );
}

#[test]
fn rules_at_our_priorities_or_of_our_protocol() {
    let mut f = node_filter();
    assert_eq!(
        f.classify(&M::DelRule(rule(101, 212))),
        Verdict::Repair("rule")
    );
    assert_eq!(
        f.classify(&M::DelRule(rule(101, 0))),
        Verdict::Repair("rule")
    );
    assert_eq!(f.classify(&M::DelRule(rule(500, 0))), Verdict::Ignore);
    assert_eq!(f.classify(&M::NewRule(rule(101, 212))), Verdict::Ignore);
    let mut z = Filter::new(Interest::ztunnel(&Config::default()), []);
    assert_eq!(
        z.classify(&M::DelRule(rule(20000, 212))),
        Verdict::Repair("rule")
    );
    assert_eq!(z.classify(&M::DelRule(rule(101, 0))), Verdict::Ignore);
}

#[test]
fn links_by_name_then_by_index() {
    let mut f = node_filter();
    assert_eq!(
        f.classify(&M::NewLink(link(9, "istioin", true))),
        Verdict::Ignore
    );
    assert_eq!(
        f.classify(&M::NewLink(link(9, "istioin", false))),
        Verdict::Repair("link")
    );
    // Renamed away from our name: known by its index.
    assert_eq!(
        f.classify(&M::NewLink(link(9, "other", true))),
        Verdict::Repair("link")
    );
    assert_eq!(
        f.classify(&M::NewLink(link(9, "other", true))),
        Verdict::Ignore
    );
    assert_eq!(
        f.classify(&M::DelLink(link(7, "x", true))),
        Verdict::Repair("link")
    );
    assert_eq!(
        f.classify(&M::DelLink(link(3, "istioout", true))),
        Verdict::Repair("link")
    );
    assert_eq!(
        f.classify(&M::DelLink(link(4, "eth9", true))),
        Verdict::Ignore
    );
    let mut a = AddressMessage::default();
    a.header.index = 12;
    a.attributes.push(AddressAttribute::Label("istioin".into()));
    assert_eq!(
        f.classify(&M::DelAddress(a.clone())),
        Verdict::Repair("address")
    );
    a.attributes.clear();
    assert_eq!(f.classify(&M::DelAddress(a)), Verdict::Ignore);
}

#[test]
fn decodes_every_message_of_a_datagram() {
    let mut buf = Vec::new();
    for m in [
        M::DelRule(rule(101, 212)),
        M::DelRoute(route(100, 212, Some((Ipv4Addr::new(10, 244, 1, 9), 32)))),
    ] {
        let mut nl = NetlinkMessage::from(m);
        nl.finalize();
        let mut b = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut b);
        buf.extend_from_slice(&b);
    }
    let got = decode_all(&buf);
    assert_eq!(got.len(), 2);
    let mut f = node_filter();
    assert_eq!(f.classify(&got[0]), Verdict::Repair("rule"));
    assert_eq!(
        f.classify(&got[1]),
        Verdict::PodRoute(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 9)))
    );
    assert!(decode_all(&buf[..10]).is_empty());
    assert!(decode_all(&[]).is_empty());
}
