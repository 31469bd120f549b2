//! The pure evaluator: follows one packet through what was read ([`KernelView`]) — our mangle,
//! nat and filter chains, the marks they set, the ip rules, the route each table gives, and the
//! ztunnel netns's TPROXY rules — and says where it ends. Nothing is sent. What it cannot
//! evaluate (a foreign iptables rule before ours, a rule selector it does not model) is listed
//! in the notes and assumed not to match.
//!
//! Families: every address is an `IpAddr`; the set of a packet's family is looked up by name
//! ([`Names::set_for`]), and the view holds the state of that family (ip6tables, `ip -6` rules
//! and routes, `ztunnel-pods-ips6` for an IPv6 packet): one code for both.

use std::net::IpAddr;

use serde::Serialize;

use super::ipt::Packet;
use super::view::KernelView;
use super::walk::{fmt_mark, lookup, Walk};
use crate::config::{tables, Config};

/// Names of our objects, from the daemon's configuration.
#[derive(Clone, Debug)]
pub struct Names {
    /// Node end and ztunnel end of the inbound tunnel.
    pub inbound: (String, String),
    /// Node end and ztunnel end of the outbound tunnel.
    pub outbound: (String, String),
    /// The IPv4 set.
    pub set_v4: String,
    /// The IPv6 set.
    pub set_v6: String,
    /// Our route protocol, as `ip` prints it.
    pub protocol: String,
    /// The ztunnel's interface inside its pod (CNI_IFNAME).
    pub ztunnel_ifname: String,
}

impl Names {
    /// From the daemon's configuration.
    pub fn of(cfg: &Config) -> Names {
        Names {
            inbound: (cfg.inbound.0.clone(), cfg.inbound.2.clone()),
            outbound: (cfg.outbound.0.clone(), cfg.outbound.2.clone()),
            set_v4: crate::config::IPSET_NAME.to_string(),
            set_v6: crate::config::IPSET_NAME6.to_string(),
            protocol: cfg.route_protocol.to_string(),
            ztunnel_ifname: "eth0".into(),
        }
    }

    /// The set holding pod IPs of `ip`'s family.
    pub fn set_for(&self, ip: IpAddr) -> &str {
        if ip.is_ipv4() {
            &self.set_v4
        } else {
            &self.set_v6
        }
    }

    pub(super) fn tunnel_peer(&self, dev: &str) -> Option<&str> {
        if dev == self.inbound.0 {
            Some(&self.inbound.1)
        } else if dev == self.outbound.0 {
            Some(&self.outbound.1)
        } else {
            None
        }
    }
}

/// Where a packet ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// TPROXY'd to a ztunnel listener, original destination kept.
    Captured {
        /// Listener port (15001, 15006, 15008).
        port: u16,
    },
    /// Handed to the ztunnel's netns outside TPROXY (replies to its transparent sockets).
    ToZtunnel,
    /// Forwarded out of a node interface.
    Direct {
        /// The interface.
        dev: String,
    },
    /// Delivered to a socket of the node.
    Local,
    /// Refused (REJECT, or an unreachable route).
    Rejected {
        /// Why.
        why: String,
    },
    /// Dropped.
    Dropped {
        /// Why.
        why: String,
    },
    /// Not evaluated to the end.
    Unknown {
        /// Why.
        why: String,
    },
}

/// One direction of a connection, step by step.
#[derive(Clone, Debug, Serialize)]
pub struct Leg {
    /// What packet this is.
    pub title: String,
    /// The steps, in order.
    pub steps: Vec<String>,
    /// Where it ends, in words.
    pub verdict: String,
    /// Where it ends.
    pub outcome: Outcome,
}

/// The whole answer.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The connection's first packet.
    pub forward: Leg,
    /// The first answer.
    pub reply: Option<Leg>,
    /// The client's next packets (with the connection mark the answer left).
    pub next: Option<Leg>,
    /// What could not be evaluated.
    pub notes: Vec<String>,
}

/// The question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// `tcp` or `udp`.
    pub proto: String,
    /// The interface it arrives on (default: the one the node routes `src` out of).
    pub iif: Option<String>,
}

/// A client port for the first packet (any; our rules do not look at it).
const CLIENT_PORT: u16 = 40000;

/// `ip:port`, IPv6 as `[ip]:port`.
fn hp(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn verdict(o: &Outcome, p: &Packet) -> String {
    match o {
        Outcome::Captured { port } => {
            format!(
                "captured by ztunnel on {port}, original destination kept ({})",
                hp(p.dst, p.dport)
            )
        }
        Outcome::ToZtunnel => "delivered into the ztunnel netns (to its transparent socket)".into(),
        Outcome::Direct { dev } => format!("direct via {dev}"),
        Outcome::Local => "delivered to the node itself".into(),
        Outcome::Rejected { why } => format!("rejected: {why}"),
        Outcome::Dropped { why } => format!("dropped: {why}"),
        Outcome::Unknown { why } => format!("not evaluated to the end: {why}"),
    }
}

impl KernelView {
    /// The interface the node routes `ip` out of (main table).
    fn dev_toward(&self, ip: IpAddr) -> Option<String> {
        lookup(&self.node, 254, ip).and_then(|r| r.dev.clone())
    }

    /// Is `ip` an address of the node (a `local` route in its local table)?
    fn is_local(&self, ip: IpAddr) -> bool {
        lookup(&self.node, 255, ip).is_some_and(|r| r.kind == "local")
    }
}

fn leg(
    view: &KernelView,
    names: &Names,
    notes: &mut Vec<String>,
    title: String,
    mut p: Packet,
) -> (Leg, Packet) {
    let mut w = Walk {
        view,
        names,
        steps: Vec::new(),
        notes,
    };
    let mut outcome = w.node(&mut p);
    let mut v = verdict(&outcome, &p);
    // An enrolled pod (table 100 routes it into ztunnel) whose TCP goes out uncaptured: the set
    // has lost it.
    if let (Outcome::Direct { .. }, Some(src_if)) = (&outcome, &p.iif) {
        let set = names.set_for(p.src);
        let enrolled_route = lookup(&view.node, tables::INBOUND, p.src).is_some_and(|r| {
            r.protocol == names.protocol
                && r.dev.as_deref() == Some(names.inbound.0.as_str())
                && r.dst.len == if p.src.is_ipv4() { 32 } else { 128 }
        });
        let in_set = view.sets.get(set).is_some_and(|s| s.contains(&p.src));
        if enrolled_route && !in_set && p.proto == "tcp" {
            v = format!(
                "not captured: pod IP missing from the set ({} is routed as enrolled in table \
                 100 but is not in {set}; arrives on {src_if}) — {v}",
                p.src
            );
            outcome = Outcome::Direct {
                dev: p.oif.clone().unwrap_or_default(),
            };
        }
    }
    // A packet of a connection that did not start through ztunnel (its answer, its next
    // packets) TPROXY'd to a listener: no socket of ztunnel holds the connection, the listener
    // answers with a reset.
    if let (Outcome::Captured { port }, false) = (&outcome, p.new_conn) {
        let why = format!(
            "reset: a packet of a connection that did not start through ztunnel is diverted to its listener on {port} (the connection breaks)"
        );
        v = format!("rejected: {why}");
        outcome = Outcome::Rejected { why };
    }
    let leg = Leg {
        title,
        steps: w.steps,
        verdict: v,
        outcome,
    };
    (leg, p)
}

/// Explains `q` against `view`.
pub fn explain(view: &KernelView, names: &Names, q: &Query) -> Explanation {
    let mut notes: Vec<String> = view
        .node
        .notes
        .iter()
        .map(|n| format!("node: {n}"))
        .collect();
    if let Some(z) = &view.ztunnel {
        notes.extend(z.notes.iter().map(|n| format!("ztunnel: {n}")));
    }
    if view.ztunnel.is_none() {
        notes.push(match &view.ztunnel_note {
            Some(n) => format!("ztunnel netns not read: {n}"),
            None => "no ztunnel known".into(),
        });
    }
    // A packet from an address of the node is made on the node (OUTPUT); any other arrives on
    // the interface the node routes its source out of.
    let iif = q.iif.clone().or_else(|| {
        if view.is_local(q.src) {
            None
        } else {
            view.dev_toward(q.src)
        }
    });
    let first = Packet {
        src: q.src,
        dst: q.dst,
        proto: q.proto.clone(),
        sport: CLIENT_PORT,
        dport: q.dport,
        iif: iif.clone(),
        oif: None,
        mark: 0,
        connmark: 0,
        new_conn: true,
    };
    let title = format!(
        "{} {} → {} arriving on {}",
        q.proto,
        hp(q.src, CLIENT_PORT),
        hp(q.dst, q.dport),
        iif.as_deref().unwrap_or("(made on the node)")
    );
    let (forward, after) = leg(view, names, &mut notes, title, first);
    if q.proto != "tcp" && !matches!(forward.outcome, Outcome::Direct { .. } | Outcome::Local) {
        return Explanation {
            forward,
            reply: None,
            next: None,
            notes,
        };
    }
    // The answer: from ztunnel (which answers as the original destination, from its own
    // interface) when captured, else from the destination's side.
    let reply_iif = match &forward.outcome {
        Outcome::Captured { .. } => view.ztunnel_ip.and_then(|ip| view.dev_toward(ip)),
        Outcome::Direct { dev } => Some(dev.clone()),
        Outcome::Local => None,
        _ => None,
    };
    let (reply, next) = match (&forward.outcome, reply_iif) {
        (Outcome::Captured { .. } | Outcome::Direct { .. }, Some(riif)) => {
            let rp = Packet {
                src: q.dst,
                dst: q.src,
                proto: q.proto.clone(),
                sport: q.dport,
                dport: CLIENT_PORT,
                iif: Some(riif.clone()),
                oif: None,
                mark: 0,
                connmark: after.connmark,
                new_conn: false,
            };
            let who = if matches!(forward.outcome, Outcome::Captured { .. }) {
                "ztunnel's answer (as the original destination)"
            } else {
                "the answer"
            };
            let title = format!(
                "{who} {} → {} arriving on {riif}",
                hp(q.dst, q.dport),
                hp(q.src, CLIENT_PORT)
            );
            let (reply, after_reply) = leg(view, names, &mut notes, title, rp);
            let np = Packet {
                connmark: after_reply.connmark,
                ..forward_packet(q, iif.clone())
            };
            let title = format!(
                "the client's next packets (connmark {})",
                fmt_mark(np.connmark)
            );
            let (next, _) = leg(view, names, &mut notes, title, np);
            (Some(reply), Some(next))
        }
        _ => (None, None),
    };
    Explanation {
        forward,
        reply,
        next,
        notes,
    }
}

fn forward_packet(q: &Query, iif: Option<String>) -> Packet {
    Packet {
        src: q.src,
        dst: q.dst,
        proto: q.proto.clone(),
        sport: CLIENT_PORT,
        dport: q.dport,
        iif,
        oif: None,
        mark: 0,
        connmark: 0,
        new_conn: false,
    }
}

impl Explanation {
    /// The text `ambient-cnid explain` prints.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let legs = [Some(&self.forward), self.reply.as_ref(), self.next.as_ref()];
        for (i, l) in legs.into_iter().flatten().enumerate() {
            if i > 0 {
                s.push('\n');
            }
            s.push_str(&format!("{}\n", l.title));
            for (n, st) in l.steps.iter().enumerate() {
                s.push_str(&format!("  {:>2}. {st}\n", n + 1));
            }
            s.push_str(&format!("  ⇒ {}\n", l.verdict));
        }
        if !self.notes.is_empty() {
            s.push_str("\nnot evaluated:\n");
            for n in &self.notes {
                s.push_str(&format!("  - {n}\n"));
            }
        }
        s.push_str("(evaluated from the kernel state read back; no packet was sent)\n");
        s
    }
}

#[cfg(test)]
#[path = "eval_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "eval_nft_tests.rs"]
mod nft_tests;
