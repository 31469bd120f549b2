//! IPv4 and IPv6 policy-routing rules over rtnetlink (`ip rule`, `ip -6 rule`: separate lists).
//!
//! Traps handled here (crates.md §3): the add request starts with `RuleAction::Unspec`, which the
//! kernel accepts but routes with EINVAL, so the action is always set; `.replace()` does not
//! replace rules, so adds list first and add only what is missing; deletes send back the exact
//! message the kernel dumped, so they can only ever remove the rule we matched.

use futures::TryStreamExt;
use netlink_packet_route::rule::{RuleAction as NlAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion};

use crate::model::{Family, Rule, RuleAction};

/// All rules of one family in the namespace.
pub(crate) async fn dump(
    handle: &Handle,
    family: Family,
) -> Result<Vec<RuleMessage>, rtnetlink::Error> {
    let v = match family {
        Family::V4 => IpVersion::V4,
        Family::V6 => IpVersion::V6,
    };
    handle.rule().get(v).execute().try_collect().await
}

/// The rule's priority (0 when the attribute is missing, as the kernel means it).
pub(crate) fn priority_of(m: &RuleMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// The rule's protocol (who made it: FRA_PROTOCOL, 0 when absent).
pub(crate) fn protocol_of(m: &RuleMessage) -> u8 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Protocol(p) => Some(u8::from(*p)),
            _ => None,
        })
        .unwrap_or(0)
}

/// Decodes a kernel rule into our model, or `None` when it has a shape we do not model (any
/// selector besides fwmark, an inverted match, an action other than lookup/goto).
pub(crate) fn decode(m: &RuleMessage) -> Option<Rule> {
    let h = &m.header;
    let family = match h.family {
        AddressFamily::Inet => Family::V4,
        AddressFamily::Inet6 => Family::V6,
        _ => return None,
    };
    if h.dst_len != 0 || h.src_len != 0 || h.tos != 0 {
        return None;
    }
    if h.flags.contains(RuleFlags::Invert) {
        return None;
    }
    let mut priority = 0;
    let mut mark = None;
    let mut mask = None;
    let mut table = None;
    let mut goto = None;
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::FwMask(v) => mask = Some(*v),
            RuleAttribute::Table(t) => table = Some(*t),
            RuleAttribute::Goto(g) => goto = Some(*g),
            // Informational: who made it. Not a selector.
            RuleAttribute::Protocol(_) => {}
            // The kernel reports these with their "unset" values on every rule.
            RuleAttribute::SuppressPrefixLen(v) | RuleAttribute::SuppressIfGroup(v)
                if *v == u32::MAX => {}
            RuleAttribute::L3MDev(false) => {}
            // Anything else selects traffic in a way our model cannot express.
            _ => return None,
        }
    }
    let fwmark = match (mark, mask) {
        (None, None) | (Some(0), Some(0)) => None,
        (Some(v), Some(m)) => Some((v, m)),
        (Some(v), None) => Some((v, u32::MAX)),
        (None, Some(m)) => Some((0, m)),
    };
    let action = match h.action {
        NlAction::ToTable => RuleAction::Lookup(table.unwrap_or(u32::from(h.table))),
        NlAction::Goto => RuleAction::Goto(goto?),
        _ => return None,
    };
    Some(Rule {
        family,
        priority,
        fwmark,
        action,
    })
}

/// Adds `rule` (the caller has checked that it is missing). Marks it with our protocol number.
pub(crate) async fn add(
    handle: &Handle,
    rule: &Rule,
    protocol: u8,
) -> Result<(), rtnetlink::Error> {
    match rule.family {
        Family::V4 => {
            let mut req = handle.rule().add().v4().priority(rule.priority);
            req = match rule.action {
                RuleAction::Lookup(t) => req.table_id(t).action(NlAction::ToTable),
                RuleAction::Goto(_) => req.action(NlAction::Goto),
            };
            fill(req.message_mut(), rule, protocol);
            req.execute().await
        }
        Family::V6 => {
            let mut req = handle.rule().add().v6().priority(rule.priority);
            req = match rule.action {
                RuleAction::Lookup(t) => req.table_id(t).action(NlAction::ToTable),
                RuleAction::Goto(_) => req.action(NlAction::Goto),
            };
            fill(req.message_mut(), rule, protocol);
            req.execute().await
        }
    }
}

/// The attributes both families' add requests carry besides priority, table and action.
fn fill(msg: &mut RuleMessage, rule: &Rule, protocol: u8) {
    if let RuleAction::Goto(target) = rule.action {
        // A goto rule has no table (iproute2 sends RT_TABLE_UNSPEC too).
        msg.header.table = 0;
        msg.attributes.push(RuleAttribute::Goto(target));
    }
    if let Some((v, m)) = rule.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(v));
        msg.attributes.push(RuleAttribute::FwMask(m));
    }
    msg.attributes
        .push(RuleAttribute::Protocol(protocol.into()));
}

/// Deletes exactly this kernel rule (a message from [`dump`]).
pub(crate) async fn del(handle: &Handle, m: RuleMessage) -> Result<(), rtnetlink::Error> {
    handle.rule().del(m).execute().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(action: NlAction, table: u8, attrs: Vec<RuleAttribute>) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = action;
        m.header.table = table;
        m.attributes = attrs;
        m
    }

    #[test]
    fn decodes_lookup_with_mark() {
        let m = msg(
            NlAction::ToTable,
            101,
            vec![
                RuleAttribute::Priority(101),
                RuleAttribute::FwMark(0x100),
                RuleAttribute::FwMask(0x100),
                RuleAttribute::Table(101),
                RuleAttribute::Protocol(212u8.into()),
                RuleAttribute::SuppressPrefixLen(u32::MAX),
            ],
        );
        assert_eq!(
            decode(&m),
            Some(Rule {
                family: Family::V4,
                priority: 101,
                fwmark: Some((0x100, 0x100)),
                action: RuleAction::Lookup(101)
            })
        );
        let mut m6 = m.clone();
        m6.header.family = AddressFamily::Inet6;
        assert_eq!(decode(&m6).map(|r| r.family), Some(Family::V6));
    }

    #[test]
    fn decodes_goto_and_big_table() {
        let m = msg(
            NlAction::Goto,
            0,
            vec![RuleAttribute::Priority(100), RuleAttribute::Goto(32766)],
        );
        assert_eq!(
            decode(&m),
            Some(Rule {
                family: Family::V4,
                priority: 100,
                fwmark: None,
                action: RuleAction::Goto(32766)
            })
        );
        let m = msg(
            NlAction::ToTable,
            252,
            vec![RuleAttribute::Priority(5), RuleAttribute::Table(1000)],
        );
        assert_eq!(decode(&m).map(|r| r.action), Some(RuleAction::Lookup(1000)));
    }

    #[test]
    fn skips_unmodelled_shapes() {
        let m = msg(
            NlAction::ToTable,
            100,
            vec![RuleAttribute::Iifname("eth0".into())],
        );
        assert_eq!(decode(&m), None);
        let mut m = msg(NlAction::ToTable, 100, vec![]);
        m.header.src_len = 24;
        assert_eq!(decode(&m), None);
        let m = msg(NlAction::Blackhole, 0, vec![]);
        assert_eq!(decode(&m), None);
        let m = msg(NlAction::Goto, 0, vec![]); // goto without a target
        assert_eq!(decode(&m), None);
        let mut m = msg(NlAction::ToTable, 100, vec![]);
        m.header.flags = RuleFlags::Invert;
        assert_eq!(decode(&m), None);
    }
}
