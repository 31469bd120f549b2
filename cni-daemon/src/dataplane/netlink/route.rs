//! IPv4 and IPv6 routes in our tables over rtnetlink, all carrying our protocol number.
//!
//! IPv6 differs in three ways the model hides: a route added without a metric gets 1024
//! (IP6_RT_PRIO_USER), so 1024 reads back as our 0 and a delete of metric 0 says 1024 (for IPv6
//! the kernel matches neither type nor, with 0, metric: it would take the unreachable fallback);
//! every IPv6 route reports scope universe; and an `unreachable` route reports `dev lo`.
//!
//! The protocol number is our ownership mark: dumps are filtered by it, deletes send it so the
//! kernel cannot match a foreign route, and `replace` refuses to overwrite a foreign route that
//! happens to have the same key (the kernel's NLM_F_REPLACE would take any protocol).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::model::{Family, Prefix, Route, RouteKey, RouteKind, Scope};

/// The metric the kernel gives an IPv6 route added without one (IP6_RT_PRIO_USER).
pub(crate) const V6_DEFAULT_METRIC: u32 = 1024;

/// The metric as the model has it: IPv6's default reads as 0, like IPv4's.
fn model_metric(f: Family, m: u32) -> u32 {
    if f.is_v6() && m == V6_DEFAULT_METRIC {
        0
    } else {
        m
    }
}

/// The metric to say to the kernel: IPv6's 0 is its default 1024.
fn kernel_metric(f: Family, m: u32) -> u32 {
    if f.is_v6() && m == 0 {
        V6_DEFAULT_METRIC
    } else {
        m
    }
}

fn af(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn family_of(a: AddressFamily) -> Option<Family> {
    match a {
        AddressFamily::Inet => Some(Family::V4),
        AddressFamily::Inet6 => Some(Family::V6),
        _ => None,
    }
}

/// The connection is opened with NETLINK_GET_STRICT_CHK, so the kernel filters dumps by the
/// header's table and protocol (and type); zero means "any".
fn dump_request(family: Family, table: Option<u32>, protocol: Option<u8>) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = af(family);
    m.header.table = RouteHeader::RT_TABLE_UNSPEC;
    m.header.protocol = protocol
        .map(RouteProtocol::from)
        .unwrap_or(RouteProtocol::Unspec);
    m.header.scope = RouteScope::Universe; // 0: required by the strict dump check
    m.header.kind = RouteType::Unspec;
    if let Some(t) = table {
        m.attributes.push(RouteAttribute::Table(t));
    }
    m
}

/// Routes of `family` in `table` (all when `None`) with `protocol` (any when `None`). Filtered
/// again here, so a kernel that ignores the filter does not change the answer.
pub(crate) async fn dump(
    handle: &Handle,
    family: Family,
    table: Option<u32>,
    protocol: Option<u8>,
) -> Result<Vec<RouteMessage>, rtnetlink::Error> {
    let all: Vec<RouteMessage> = handle
        .route()
        .get(dump_request(family, table, protocol))
        .execute()
        .try_collect()
        .await?;
    Ok(all
        .into_iter()
        .filter(|m| m.header.address_family == af(family))
        .filter(|m| table.is_none_or(|t| table_of(m) == t))
        .filter(|m| protocol.is_none_or(|p| u8::from(m.header.protocol) == p))
        .collect())
}

/// Table id: the RTA_TABLE attribute (ids > 255 exist only there), else the header byte.
pub(crate) fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// An address of family `f` (`None` for another family).
fn addr_of(f: Family, a: &RouteAddress) -> Option<IpAddr> {
    match (f, a) {
        (Family::V4, RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        (Family::V6, RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// The key of a kernel route (tos must be 0; we never set it).
pub(crate) fn key_of(m: &RouteMessage) -> Option<RouteKey> {
    let f = family_of(m.header.address_family)?;
    if m.header.tos != 0 || m.header.destination_prefix_length > f.host_len() {
        return None;
    }
    let mut dst = f.unspecified();
    let mut metric = 0;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = addr_of(f, d)?,
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    Some(RouteKey {
        table: table_of(m),
        dst: Prefix {
            addr: dst,
            len: m.header.destination_prefix_length,
        },
        metric: model_metric(f, metric),
    })
}

/// Decodes one of our routes. `names` maps interface index → name. `None` for shapes we do not
/// model (multipath, other types or scopes, a source prefix).
pub(crate) fn decode(m: &RouteMessage, names: &BTreeMap<u32, String>) -> Option<Route> {
    let key = key_of(m)?;
    let f = key.dst.family();
    if m.header.source_prefix_length != 0 {
        return None;
    }
    let kind = match m.header.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::Local => RouteKind::Local,
        RouteType::Unreachable => RouteKind::Unreachable,
        _ => return None,
    };
    let scope = match m.header.scope {
        RouteScope::Universe => Scope::Universe,
        RouteScope::Link => Scope::Link,
        RouteScope::Host => Scope::Host,
        _ => return None,
    };
    let mut dev = None;
    let mut via = None;
    let mut src = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => {
                dev = Some(names.get(i).cloned().unwrap_or_else(|| format!("if{i}")))
            }
            RouteAttribute::Gateway(g) => via = Some(addr_of(f, g)?),
            RouteAttribute::PrefSource(s) => src = Some(addr_of(f, s)?),
            RouteAttribute::MultiPath(_) | RouteAttribute::Source(_) | RouteAttribute::Via(_) => {
                return None
            }
            _ => {}
        }
    }
    let onlink = m.header.flags.contains(RouteFlags::Onlink);
    if f.is_v6() && kind == RouteKind::Unreachable {
        dev = None;
    }
    Some(Route {
        key,
        kind,
        dev,
        via,
        src,
        scope,
        onlink,
    })
}

/// Interface indexes the routes point at.
pub(crate) fn oifs(msgs: &[RouteMessage]) -> Vec<u32> {
    let mut v: Vec<u32> = msgs
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

// ---------------------------------------------------------------------------------------------
// Raw dumps: the table-100 routes of a node with 10,000 pods, read without building a
// `RouteMessage` (a `Vec` of attributes each) per route. Through rtnetlink the dump was ~3 MB of
// messages per resync, and the connection's receive queue stayed at its largest size after it
// (acni-bench at 10,000 pods, massif).

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTMSG_LEN: usize = 12;
const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_VIA: u16 = 18;
const RTNH_F_ONLINK: u32 = 4;

/// A route of ours as the raw dump gives it, its interface still an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawRoute {
    pub(crate) key: RouteKey,
    pub(crate) kind: RouteKind,
    pub(crate) oif: Option<u32>,
    pub(crate) via: Option<IpAddr>,
    pub(crate) src: Option<IpAddr>,
    pub(crate) scope: Scope,
    pub(crate) onlink: bool,
}

impl RawRoute {
    /// The route, its interface named by `names` (index → name; `if<N>` when unknown).
    pub(crate) fn to_route(self, names: &BTreeMap<u32, String>) -> Route {
        Route {
            key: self.key,
            kind: self.kind,
            dev: self
                .oif
                .map(|i| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}"))),
            via: self.via,
            src: self.src,
            scope: self.scope,
            onlink: self.onlink,
        }
    }
}

/// The `rtm_family` byte of a family.
fn af_byte(f: Family) -> u8 {
    match f {
        Family::V4 => libc::AF_INET as u8,
        Family::V6 => libc::AF_INET6 as u8,
    }
}

/// The dump request for routes of `family` in `table` with `protocol` (the same filter as
/// [`dump_request`]; the sequence number is set when sent).
pub(crate) fn raw_dump_request(family: Family, table: u32, protocol: u8) -> Vec<u8> {
    let len = 16 + RTMSG_LEN + 8;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    m.extend_from_slice(&(0x300u16 | 1).to_ne_bytes()); // NLM_F_DUMP | NLM_F_REQUEST
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // family, dst_len, src_len, tos, table (see RTA_TABLE), protocol, scope, type; flags.
    m.extend_from_slice(&[af_byte(family), 0, 0, 0, 0, protocol, 0, 0]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&8u16.to_ne_bytes());
    m.extend_from_slice(&RTA_TABLE.to_ne_bytes());
    m.extend_from_slice(&table.to_ne_bytes());
    m
}

/// The complete exclusive-add request for `route` (output interface resolved to `oif`), as
/// `raw_request(NewRoute(build(..)))` makes it but written straight into one buffer: a restore
/// of 10,000 pods encodes 10,000 of them, and the builder's attribute list, message and
/// serialization cost several allocations each. The sequence number is set when it is sent.
pub(crate) fn raw_add_request(route: &Route, oif: Option<u32>, protocol: u8) -> Vec<u8> {
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLM_F_EXCL: u16 = 0x200;
    const NLM_F_CREATE: u16 = 0x400;
    let k = &route.key;
    let fam = k.dst.family();
    let mut m = Vec::with_capacity(16 + RTMSG_LEN + 6 * 8 + 3 * 12);
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, below
    m.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    let table_byte = u8::try_from(k.table).unwrap_or(0);
    let scope = match route.scope {
        Scope::Universe => 0u8,
        Scope::Link => 253,
        Scope::Host => 254,
    };
    let kind = match route.kind {
        RouteKind::Unicast => 1u8,
        RouteKind::Local => 2,
        RouteKind::Unreachable => 7,
    };
    m.extend_from_slice(&[
        af_byte(fam),
        k.dst.len,
        0,
        0,
        table_byte,
        protocol,
        scope,
        kind,
    ]);
    let flags = if route.onlink { RTNH_F_ONLINK } else { 0 };
    m.extend_from_slice(&flags.to_ne_bytes());
    let mut attr = |ty: u16, v: &[u8]| {
        m.extend_from_slice(&(4 + v.len() as u16).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(v);
    };
    // An address of the other family is written as it is: the kernel refuses it (EINVAL).
    let ip = |a: IpAddr| -> Vec<u8> {
        match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    };
    if k.table > 255 {
        // The header byte says "see the attribute" (0).
        attr(RTA_TABLE, &k.table.to_ne_bytes());
    }
    attr(RTA_DST, &ip(k.dst.addr));
    if k.metric != 0 {
        attr(RTA_PRIORITY, &k.metric.to_ne_bytes());
    }
    if let Some(i) = oif {
        attr(RTA_OIF, &i.to_ne_bytes());
    }
    if let Some(gw) = route.via {
        attr(RTA_GATEWAY, &ip(gw));
    }
    if let Some(src) = route.src {
        attr(RTA_PREFSRC, &ip(src));
    }
    let len = (m.len() as u32).to_ne_bytes();
    if let Some(slot) = m.get_mut(..4) {
        slot.copy_from_slice(&len);
    }
    m
}

fn raw_ip(f: Family, b: &[u8]) -> Option<IpAddr> {
    match f {
        Family::V4 => {
            let a: [u8; 4] = b.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(a)))
        }
        Family::V6 => {
            let a: [u8; 16] = b.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
    }
}

fn raw_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

/// Decodes the body of one message of a route dump, with [`decode`]'s rules: `None` for other
/// messages, other families, tables or protocols, and shapes we do not model. Never panics.
pub(crate) fn decode_raw(ty: u16, body: &[u8], table: u32, protocol: u8) -> Option<RawRoute> {
    if ty != RTM_NEWROUTE {
        return None;
    }
    let h = body.get(..RTMSG_LEN)?;
    let (family, dst_len, src_len, tos, htable, proto, scope, rtype) =
        (h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
    let flags = raw_u32(&h[8..12])?;
    let f = if family == libc::AF_INET as u8 {
        Family::V4
    } else if family == libc::AF_INET6 as u8 {
        Family::V6
    } else {
        return None;
    };
    if proto != protocol || tos != 0 || dst_len > f.host_len() {
        return None;
    }
    if src_len != 0 {
        return None;
    }
    let kind = match rtype {
        1 => RouteKind::Unicast,
        2 => RouteKind::Local,
        7 => RouteKind::Unreachable,
        _ => return None,
    };
    let scope = match scope {
        0 => Scope::Universe,
        253 => Scope::Link,
        254 => Scope::Host,
        _ => return None,
    };
    let mut r = RawRoute {
        key: RouteKey {
            table: u32::from(htable),
            dst: Prefix {
                addr: f.unspecified(),
                len: dst_len,
            },
            metric: 0,
        },
        kind,
        oif: None,
        via: None,
        src: None,
        scope,
        onlink: flags & RTNH_F_ONLINK != 0,
    };
    let mut attrs = body.get(RTMSG_LEN..)?;
    while attrs.len() >= 4 {
        let alen = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let aty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if alen < 4 || alen > attrs.len() {
            return None;
        }
        let v = attrs.get(4..alen)?;
        match aty {
            RTA_DST => r.key.dst.addr = raw_ip(f, v)?,
            RTA_PRIORITY => r.key.metric = model_metric(f, raw_u32(v)?),
            RTA_TABLE => r.key.table = raw_u32(v)?,
            RTA_OIF => r.oif = Some(raw_u32(v)?),
            RTA_GATEWAY => r.via = Some(raw_ip(f, v)?),
            RTA_PREFSRC => r.src = Some(raw_ip(f, v)?),
            RTA_MULTIPATH | RTA_SRC | RTA_VIA => return None,
            _ => {}
        }
        attrs = attrs.get(((alen + 3) & !3).min(attrs.len())..)?;
    }
    if f.is_v6() && r.kind == RouteKind::Unreachable {
        r.oif = None;
    }
    (r.key.table == table).then_some(r)
}

fn route_type(kind: RouteKind) -> RouteType {
    match kind {
        RouteKind::Unicast => RouteType::Unicast,
        RouteKind::Local => RouteType::Local,
        RouteKind::Unreachable => RouteType::Unreachable,
    }
}

/// The message that creates `route` (output interface already resolved to `oif`).
pub(crate) fn build(route: &Route, oif: Option<u32>, protocol: u8) -> RouteMessage {
    let k = &route.key;
    let mut b = with_dst(k.dst)
        .table_id(k.table)
        .protocol(RouteProtocol::from(protocol))
        .scope(match route.scope {
            Scope::Universe => RouteScope::Universe,
            Scope::Link => RouteScope::Link,
            Scope::Host => RouteScope::Host,
        })
        .kind(route_type(route.kind));
    if k.table > 255 {
        // The id travels in RTA_TABLE; the header byte says "see the attribute".
        b.get_mut().header.table = RouteHeader::RT_TABLE_UNSPEC;
    }
    if k.metric != 0 {
        b = b.priority(k.metric);
    }
    if let Some(i) = oif {
        b = b.output_interface(i);
    }
    // An address of the other family is sent as it is: the kernel refuses it (EINVAL).
    if let Some(gw) = route.via {
        b.get_mut()
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    if let Some(s) = route.src {
        b.get_mut()
            .attributes
            .push(RouteAttribute::PrefSource(RouteAddress::from(s)));
    }
    if route.onlink {
        b = b.onlink();
    }
    b.build()
}

/// A builder for a route to `dst`, of its family.
fn with_dst(dst: Prefix) -> RouteMessageBuilder<IpAddr> {
    let mut b = RouteMessageBuilder::<IpAddr>::new();
    let m = b.get_mut();
    // `new` leaves what the builder for one family sets: the family and the defaults.
    m.header.address_family = af(dst.family());
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    m.header.destination_prefix_length = dst.len;
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst.addr)));
    b
}

/// Adds the route; fails with EEXIST when a route with its key exists.
pub(crate) async fn add_excl(handle: &Handle, m: RouteMessage) -> Result<(), rtnetlink::Error> {
    handle.route().add(m).execute().await
}

/// Replaces the route with its key (NLM_F_REPLACE | NLM_F_CREATE).
pub(crate) async fn replace(handle: &Handle, m: RouteMessage) -> Result<(), rtnetlink::Error> {
    handle.route().add(m).replace().execute().await
}

/// The delete request for `key` among routes of `protocol` and type `kind`. The kernel matches
/// table, prefix, protocol and type exactly, and the metric when it is not 0 (0 is a wildcard).
pub(crate) fn del_request(key: &RouteKey, kind: RouteKind, protocol: u8) -> RouteMessage {
    let mut b = with_dst(key.dst)
        .table_id(key.table)
        .protocol(RouteProtocol::from(protocol))
        // RT_SCOPE_NOWHERE makes the kernel match any scope.
        .scope(RouteScope::NoWhere)
        .kind(route_type(kind));
    if key.table > 255 {
        b.get_mut().header.table = RouteHeader::RT_TABLE_UNSPEC;
    }
    // IPv6 matches no type, so the metric must always be said (0 means 1024 there).
    let metric = kernel_metric(key.dst.family(), key.metric);
    if metric != 0 {
        b = b.priority(metric);
    }
    b.build()
}

/// Deletes with a prepared message.
pub(crate) async fn del(handle: &Handle, m: RouteMessage) -> Result<(), rtnetlink::Error> {
    handle.route().del(m).execute().await
}

/// Longest-prefix match over the main table, as `ip route get` would answer if no policy rule
/// came first: our own rule 103 (`lookup 100`) would otherwise make every enrolled pod's IP
/// resolve to the tunnel. Returns the output interface index.
pub(crate) fn lpm_main(msgs: &[RouteMessage], ip: IpAddr) -> Option<u32> {
    lpm_by(msgs, ip, |m| {
        m.attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
            // Multipath: take the first hop's interface.
            .or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
                    _ => None,
                })
            })
    })
}

/// The main-table unicast route the kernel would pick for `ip` (either family): longest prefix,
/// then lowest metric. Unlike [`lpm_main`] it returns the route itself (its gateway decides
/// whether the address is on a directly attached link), multipath routes included (the caller's
/// decode then refuses them rather than taking one hop's interface).
pub(crate) fn lpm_main_msg(msgs: &[RouteMessage], ip: IpAddr) -> Option<&RouteMessage> {
    lpm_by(msgs, ip, Some)
}

/// Longest-prefix match of `ip` over the main table's unicast routes of its family that `pick`
/// accepts (lowest metric among equal prefixes); what `pick` made of the winner.
fn lpm_by<'a, T>(
    msgs: &'a [RouteMessage],
    ip: IpAddr,
    pick: impl Fn(&'a RouteMessage) -> Option<T>,
) -> Option<T> {
    // Both families as 128-bit numbers, IPv4 in the low 32 bits (prefix lengths shifted by 96).
    let as_bits = |a: IpAddr| -> (u128, u32) {
        match a {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 96),
            IpAddr::V6(a) => (u128::from(a), 0),
        }
    };
    let (ipb, shift) = as_bits(ip);
    let mut best: Option<(u8, u32, T)> = None; // (prefix len, metric, picked)
    for m in msgs {
        if table_of(m) != u32::from(RouteHeader::RT_TABLE_MAIN)
            || m.header.kind != RouteType::Unicast
        {
            continue;
        }
        let Some(key) = key_of(m) else { continue };
        if key.dst.family() != Family::of(ip) {
            continue;
        }
        let len = key.dst.len;
        let full = u32::from(len) + shift;
        let mask = if len == 0 || full > 128 {
            0
        } else {
            u128::MAX << (128 - full)
        };
        let (db, _) = as_bits(key.dst.addr);
        if db & mask != ipb & mask {
            continue;
        }
        let better = match &best {
            None => true,
            Some((blen, bmetric, _)) => len > *blen || (len == *blen && key.metric < *bmetric),
        };
        if better {
            if let Some(t) = pick(m) {
                best = Some((len, key.metric, t));
            }
        }
    }
    best.map(|(_, _, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(kind: RouteKind, dst: Prefix, metric: u32) -> Route {
        Route {
            key: RouteKey {
                table: 100,
                dst,
                metric,
            },
            kind,
            dev: Some("istioin".into()),
            via: Some(Ipv4Addr::new(192, 168, 126, 2).into()),
            src: Some(Ipv4Addr::new(10, 244, 1, 1).into()),
            scope: Scope::Universe,
            onlink: true,
        }
    }

    #[test]
    fn build_then_decode_round_trips() {
        let r = route(
            RouteKind::Unicast,
            Prefix::host(Ipv4Addr::new(10, 244, 1, 5)),
            7,
        );
        let m = build(&r, Some(9), 212);
        assert_eq!(u8::from(m.header.protocol), 212);
        let names = BTreeMap::from([(9, "istioin".to_string())]);
        assert_eq!(decode(&m, &names), Some(r));
    }

    /// The body of the message `build` makes, as the kernel would dump it.
    fn raw_body(m: &RouteMessage) -> Vec<u8> {
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
        use netlink_packet_route::RouteNetlinkMessage;
        let mut nl = NetlinkMessage::new(
            Default::default(),
            NetlinkPayload::from(RouteNetlinkMessage::NewRoute(m.clone())),
        );
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        buf[16..].to_vec()
    }

    #[test]
    fn raw_decode_agrees_with_decode() {
        let names = BTreeMap::from([(9, "istioin".to_string())]);
        let mut shapes = vec![
            route(
                RouteKind::Unicast,
                Prefix::host(Ipv4Addr::new(10, 244, 1, 5)),
                0,
            ),
            route(
                RouteKind::Unicast,
                Prefix::host(Ipv4Addr::new(10, 244, 1, 6)),
                7,
            ),
            route(RouteKind::Unreachable, Prefix::DEFAULT, 1000),
        ];
        shapes[2].dev = None;
        shapes[2].via = None;
        shapes[2].src = None;
        shapes[2].onlink = false;
        shapes[1].scope = Scope::Link;
        for r in shapes {
            let m = build(&r, r.dev.as_ref().map(|_| 9), 212);
            let body = raw_body(&m);
            let raw = decode_raw(24, &body, 100, 212).expect("decodes");
            assert_eq!(raw.to_route(&names), r);
            assert_eq!(decode(&m, &names), Some(r));
            assert_eq!(decode_raw(24, &body, 101, 212), None, "other table");
            assert_eq!(decode_raw(24, &body, 100, 4), None, "other protocol");
        }
        let req = raw_dump_request(Family::V4, 100, 212);
        assert_eq!(req.len(), 36);
        assert_eq!(req.get(..4), Some(&36u32.to_ne_bytes()[..]));
    }

    /// An IPv6 route as the kernel dumps it: metric 1024 for "none", `unreachable` via lo.
    #[test]
    fn ipv6_routes_round_trip_and_normalise_what_the_kernel_adds() {
        let names = BTreeMap::from([(9, "istioin".to_string()), (1, "lo".to_string())]);
        let v6 = |s: &str| -> IpAddr { s.parse().expect("address") };
        let mut r = route(RouteKind::Unicast, Prefix::host(v6("fd00:10:244:1::5")), 0);
        r.via = Some(v6("fd69:7374:696f:7e::2"));
        r.src = Some(v6("fd00:10:244:1::1"));
        r.onlink = false;
        let mut m = build(&r, Some(9), 212);
        assert_eq!(m.header.address_family, AddressFamily::Inet6);
        // What the kernel reports back: the default metric.
        m.attributes
            .push(RouteAttribute::Priority(V6_DEFAULT_METRIC));
        assert_eq!(decode(&m, &names), Some(r.clone()));
        let raw = decode_raw(24, &raw_body(&m), 100, 212).expect("decodes");
        assert_eq!(raw.to_route(&names), r);
        let ours = raw_add_request(&r, Some(9), 212);
        let dec = decode_raw(24, ours.get(16..).unwrap_or(&[]), 100, 212).expect("decodes");
        assert_eq!(dec.to_route(&names), r);
        // An unreachable fallback reads back without `dev lo`.
        let mut u = route(
            RouteKind::Unreachable,
            Prefix::default_of(Family::V6),
            0xffff_fff0,
        );
        u.dev = None;
        u.via = None;
        u.src = None;
        u.onlink = false;
        let um = build(&u, Some(1), 212);
        assert_eq!(decode(&um, &names), Some(u.clone()));
        assert_eq!(
            decode_raw(24, &raw_body(&um), 100, 212).map(|x| x.to_route(&names)),
            Some(u)
        );
        // Deleting the metric-0 route says 1024, so it can never take the fallback.
        let d = del_request(&r.key, r.kind, 212);
        assert!(d
            .attributes
            .contains(&RouteAttribute::Priority(V6_DEFAULT_METRIC)));
        assert_eq!(
            raw_dump_request(Family::V6, 100, 212)[16],
            libc::AF_INET6 as u8
        );
    }

    #[test]
    fn lpm_matches_ipv6_only_against_ipv6_routes() {
        let mk = |dst: Prefix, oif: u32| {
            let mut r = route(RouteKind::Unicast, dst, 0);
            r.key.table = 254;
            r.via = None;
            r.src = None;
            build(&r, Some(oif), 3)
        };
        let v6 = |s: &str| -> IpAddr { s.parse().expect("address") };
        let msgs = vec![
            mk(Prefix::new(v6("fd00:10:244:1::"), 64), 2),
            mk(Prefix::host(v6("fd00:10:244:1::5")), 3),
            mk(Prefix::new(Ipv4Addr::UNSPECIFIED, 0), 4),
        ];
        assert_eq!(lpm_main(&msgs, v6("fd00:10:244:1::5")), Some(3));
        assert_eq!(lpm_main(&msgs, v6("fd00:10:244:1::9")), Some(2));
        assert_eq!(lpm_main(&msgs, v6("2001:db8::1")), None);
        assert_eq!(lpm_main(&msgs, Ipv4Addr::new(8, 8, 8, 8).into()), Some(4));
    }

    #[test]
    fn raw_add_request_says_what_the_builder_says() {
        let names = BTreeMap::from([(9, "istioin".to_string())]);
        let mut shapes = vec![
            route(
                RouteKind::Unicast,
                Prefix::host(Ipv4Addr::new(10, 244, 1, 5)),
                0,
            ),
            route(
                RouteKind::Unicast,
                Prefix::host(Ipv4Addr::new(10, 244, 1, 6)),
                7,
            ),
            route(RouteKind::Unreachable, Prefix::DEFAULT, 1000),
            route(RouteKind::Local, Prefix::DEFAULT, 0),
        ];
        for r in shapes.iter_mut().skip(2) {
            r.dev = None;
            r.via = None;
            r.src = None;
            r.onlink = false;
        }
        shapes[3].scope = Scope::Host;
        shapes[3].key.table = 1000;
        for r in shapes {
            let oif = r.dev.as_ref().map(|_| 9);
            let ours = raw_add_request(&r, oif, 212);
            let theirs = crate::dataplane::netlink::raw_request(
                netlink_packet_route::RouteNetlinkMessage::NewRoute(build(&r, oif, 212)),
            );
            // Same header (length, type, flags) and the same route once decoded.
            assert_eq!(ours.get(..8), theirs.get(..8), "{r}");
            let dec = |b: &[u8]| {
                decode_raw(24, b.get(16..).unwrap_or(&[]), r.key.table, 212)
                    .map(|x| x.to_route(&names))
            };
            assert_eq!(dec(&ours), Some(r.clone()));
            assert_eq!(dec(&theirs), Some(r.clone()));
        }
    }

    #[test]
    fn raw_decode_of_garbage_is_none_not_a_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 80) as usize;
            let mut b: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            if b.len() >= 12 {
                b[0] = libc::AF_INET as u8;
                b[5] = 212;
            }
            let _ = decode_raw(24, &b, u32::from(b.get(4).copied().unwrap_or(0)), 212);
        }
    }

    #[test]
    fn big_tables_use_the_attribute() {
        let mut r = route(RouteKind::Unreachable, Prefix::DEFAULT, 0);
        r.key.table = 1000;
        r.dev = None;
        r.via = None;
        r.src = None;
        r.onlink = false;
        let m = build(&r, None, 212);
        assert_eq!(m.header.table, 0);
        assert_eq!(table_of(&m), 1000);
        assert_eq!(decode(&m, &BTreeMap::new()), Some(r));
    }

    #[test]
    fn lpm_prefers_longest_then_lowest_metric() {
        let mk = |dst: Prefix, metric: u32, oif: u32| {
            let mut r = route(RouteKind::Unicast, dst, metric);
            r.key.table = 254;
            build(&r, Some(oif), 4)
        };
        let msgs = vec![
            mk(Prefix::DEFAULT, 0, 1),
            mk(
                Prefix {
                    addr: Ipv4Addr::new(10, 244, 0, 0).into(),
                    len: 16,
                },
                0,
                2,
            ),
            mk(Prefix::host(Ipv4Addr::new(10, 244, 1, 5)), 10, 3),
            mk(Prefix::host(Ipv4Addr::new(10, 244, 1, 5)), 5, 4),
        ];
        assert_eq!(
            lpm_main(&msgs, Ipv4Addr::new(10, 244, 1, 5).into()),
            Some(4)
        );
        assert_eq!(
            lpm_main(&msgs, Ipv4Addr::new(10, 244, 9, 9).into()),
            Some(2)
        );
        assert_eq!(lpm_main(&msgs, Ipv4Addr::new(8, 8, 8, 8).into()), Some(1));
        assert_eq!(lpm_main(&msgs[1..], Ipv4Addr::new(8, 8, 8, 8).into()), None);
    }
}
