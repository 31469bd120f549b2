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

use super::ipt::{Packet, Rule, Target};
use super::view::{KernelView, NsView, RouteEntry, RuleAction};
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

    fn tunnel_peer(&self, dev: &str) -> Option<&str> {
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

enum Hook {
    Continue,
    Accept,
    Drop,
    Reject(String),
    Tproxy(u16, String),
}

struct Walk<'a> {
    view: &'a KernelView,
    names: &'a Names,
    steps: Vec<String>,
    notes: &'a mut Vec<String>,
}

fn fmt_mark(m: u32) -> String {
    format!("{m:#x}")
}

impl Walk<'_> {
    fn note(&mut self, n: String) {
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }

    /// Runs the built-in chain `hook` of `table`: our jump evaluated, foreign rules noted.
    fn hook(&mut self, ns: &NsView, label: &str, table: &str, hook: &str, p: &mut Packet) -> Hook {
        let Some(rules) = ns.iptables.get(table) else {
            return Hook::Continue;
        };
        let mut seen_ours = false;
        let mut foreign_before = 0;
        let mut foreign_after = 0;
        for (_, body) in rules.iter().filter(|(c, _)| c == hook) {
            let r = Rule::parse(body);
            match &r.target {
                Target::Jump(c) if c.starts_with("ztunnel-") => {
                    seen_ours = true;
                    match self.chain(ns, label, table, c, p, 0) {
                        Hook::Continue => {}
                        other => return other,
                    }
                }
                _ if seen_ours => foreign_after += 1,
                _ => foreign_before += 1,
            }
        }
        if foreign_before > 0 {
            self.note(format!(
                "{label}: {foreign_before} foreign rule(s) in {table} {hook} BEFORE our jump were \
                 not evaluated (assumed not to match): they could change this path"
            ));
        }
        if foreign_after > 0 && table != "filter" {
            self.note(format!(
                "{label}: {foreign_after} foreign rule(s) in {table} {hook} after ours were not \
                 evaluated"
            ));
        }
        Hook::Continue
    }

    fn chain(
        &mut self,
        ns: &NsView,
        label: &str,
        table: &str,
        chain: &str,
        p: &mut Packet,
        depth: usize,
    ) -> Hook {
        if depth > 8 {
            self.note(format!("{label}: {table} {chain}: jumps nested too deep"));
            return Hook::Continue;
        }
        let Some(rules) = ns.iptables.get(table) else {
            return Hook::Continue;
        };
        let sets = &self.view.sets;
        for (n, (_, body)) in rules.iter().filter(|(c, _)| c == chain).enumerate() {
            let r = Rule::parse(body);
            match r.matches(p, sets) {
                Ok(false) => continue,
                Err(e) => {
                    self.note(format!(
                        "{label}: {table} {chain} rule {}: `{body}`: {e}; assumed not to match",
                        n + 1
                    ));
                    continue;
                }
                Ok(true) => {}
            }
            let at = format!("{label} {table} {chain} #{}: `{body}`", n + 1);
            match r.target {
                Target::Mark(v, m) => {
                    let old = p.mark;
                    p.mark = (p.mark & !m) ^ v;
                    self.steps.push(format!(
                        "{at} → mark {} → {}",
                        fmt_mark(old),
                        fmt_mark(p.mark)
                    ));
                }
                Target::ConnmarkSave(nf, ct) => {
                    p.connmark = (p.connmark & !ct) | (p.mark & nf);
                    self.steps
                        .push(format!("{at} → connmark saved: {}", fmt_mark(p.connmark)));
                }
                Target::ConnmarkRestore(nf, ct) => {
                    p.mark = (p.mark & !nf) | (p.connmark & ct);
                    self.steps
                        .push(format!("{at} → mark restored: {}", fmt_mark(p.mark)));
                }
                Target::Tproxy { port, ip, mark } => {
                    p.mark = (p.mark & !mark.1) ^ mark.0;
                    self.steps.push(format!(
                        "{at} → TPROXY to {ip}:{port}, mark {}",
                        fmt_mark(p.mark)
                    ));
                    return Hook::Tproxy(port, ip);
                }
                Target::Return => {
                    self.steps.push(format!("{at} → RETURN"));
                    return Hook::Continue;
                }
                Target::Accept => {
                    self.steps.push(format!("{at} → ACCEPT"));
                    return Hook::Accept;
                }
                Target::Drop => {
                    self.steps.push(format!("{at} → DROP"));
                    return Hook::Drop;
                }
                Target::Reject(with) => {
                    self.steps.push(format!("{at} → REJECT ({with})"));
                    return Hook::Reject(with);
                }
                Target::Jump(c) => match self.chain(ns, label, table, &c, p, depth + 1) {
                    Hook::Continue => {}
                    other => return other,
                },
                Target::None => {}
                Target::Other(t) => self.note(format!(
                    "{label}: {table} {chain} #{}: target {t} is not modelled",
                    n + 1
                )),
            }
        }
        Hook::Continue
    }

    /// The ip rules of `ns` and the route the first matching lookup gives.
    fn route(&mut self, ns: &NsView, label: &str, p: &Packet) -> Option<(u32, RouteEntry)> {
        let mut from_prio = 0;
        for rule in &ns.rules {
            if rule.priority < from_prio {
                continue;
            }
            if !rule.unknown.is_empty() {
                self.note(format!(
                    "{label}: ip rule {} has selectors not modelled ({}); assumed not to match",
                    rule.priority,
                    rule.unknown.join(", ")
                ));
                continue;
            }
            let mut hit = rule.fwmark.is_none_or(|(v, m)| p.mark & m == v)
                && rule.src.is_none_or(|n| n.contains(p.src))
                && rule.dst.is_none_or(|n| n.contains(p.dst))
                && rule
                    .iif
                    .as_ref()
                    .is_none_or(|i| p.iif.as_deref().unwrap_or("lo") == i)
                && rule.oif.is_none();
            if rule.not {
                hit = !hit;
            }
            if !hit {
                continue;
            }
            let sel = match rule.fwmark {
                Some((v, m)) => format!("fwmark {}/{}", fmt_mark(v), fmt_mark(m)),
                None => "from all".into(),
            };
            match &rule.action {
                RuleAction::Goto(g) => {
                    self.steps.push(format!(
                        "{label} ip rule {} ({sel}) → goto {g}",
                        rule.priority
                    ));
                    from_prio = *g;
                }
                RuleAction::Lookup(t) => match lookup(ns, *t, p.dst) {
                    Some(r) if r.kind == "throw" => continue,
                    Some(r) => {
                        self.steps.push(format!(
                            "{label} ip rule {} ({sel}) → table {}: {r}",
                            rule.priority,
                            table_name(*t)
                        ));
                        return Some((*t, r.clone()));
                    }
                    None => {
                        // The local table is consulted for every packet; say nothing of it.
                        if *t != 255 {
                            self.steps.push(format!(
                                "{label} ip rule {} ({sel}) → table {}: no route to {}, next rule",
                                rule.priority,
                                table_name(*t),
                                p.dst
                            ));
                        }
                    }
                },
                RuleAction::Other(a) => {
                    self.note(format!(
                        "{label}: ip rule {} action {a} is not modelled",
                        rule.priority
                    ));
                }
            }
        }
        None
    }

    /// The node: PREROUTING (OUTPUT for a packet made here), routing, then FORWARD or the
    /// tunnel into ztunnel.
    fn node(&mut self, p: &mut Packet) -> Outcome {
        let view = self.view;
        let ns = &view.node;
        let hook = if p.iif.is_some() {
            "PREROUTING"
        } else {
            "OUTPUT"
        };
        if let Some(o) = self.stop(ns, "node", "mangle", hook, p) {
            return o;
        }
        if p.new_conn {
            if let Some(o) = self.stop(ns, "node", "nat", hook, p) {
                return o;
            }
        }
        let Some((table, r)) = self.route(ns, "node", p) else {
            return Outcome::Dropped {
                why: format!("no route to {}", p.dst),
            };
        };
        match r.kind.as_str() {
            "local" => {
                for (t, h) in [("mangle", "INPUT"), ("filter", "INPUT")] {
                    if let Some(o) = self.stop(ns, "node", t, h, p) {
                        return o;
                    }
                }
                return Outcome::Local;
            }
            "unicast" => {}
            kind => {
                let held = table == tables::OUTBOUND && r.metric == tables::FALLBACK_METRIC;
                return Outcome::Rejected {
                    why: if held {
                        "held closed, no ztunnel (table 101 has only its unreachable default)"
                            .into()
                    } else {
                        format!("{kind} route in table {}", table_name(table))
                    },
                };
            }
        }
        let dev = r.dev.clone().unwrap_or_default();
        p.oif = Some(dev.clone());
        if p.iif.is_some() {
            for (t, h) in [("mangle", "FORWARD"), ("filter", "FORWARD")] {
                if let Some(o) = self.stop(ns, "node", t, h, p) {
                    return o;
                }
            }
        } else if let Some(o) = self.stop(ns, "node", "filter", "OUTPUT", p) {
            return o;
        }
        for (t, h) in [("mangle", "POSTROUTING"), ("nat", "POSTROUTING")] {
            if t == "nat" && !p.new_conn {
                continue;
            }
            if let Some(o) = self.stop(ns, "node", t, h, p) {
                return o;
            }
        }
        if let Some(peer) = self.names.tunnel_peer(&dev) {
            let peer = peer.to_string();
            self.steps
                .push(format!("node → {dev} ══veth══> {peer} (ztunnel netns)"));
            return self.ztunnel(p, &peer);
        }
        if Some(&dev) == self.ztunnel_host_if().as_ref() {
            let ifname = self.names.ztunnel_ifname.clone();
            self.steps
                .push(format!("node → {dev} ══veth══> {ifname} (ztunnel netns)"));
            return self.ztunnel(p, &ifname);
        }
        Outcome::Direct { dev }
    }

    /// Runs a hook; Some(outcome) when it ends the packet's way.
    fn stop(
        &mut self,
        ns: &NsView,
        label: &str,
        table: &str,
        hook: &str,
        p: &mut Packet,
    ) -> Option<Outcome> {
        match self.hook(ns, label, table, hook, p) {
            Hook::Continue | Hook::Accept => None,
            Hook::Drop => Some(Outcome::Dropped {
                why: format!("{label} {table} {hook} DROP"),
            }),
            Hook::Reject(with) => {
                let held = table == "filter";
                let why = if held && self.view.ztunnel.is_none() {
                    "held closed, no ztunnel".to_string()
                } else if held {
                    "held closed: TCP to an enrolled pod that does not come through ztunnel"
                        .to_string()
                } else {
                    format!("{label} {table} {hook} REJECT {with}")
                };
                Some(Outcome::Rejected { why })
            }
            Hook::Tproxy(port, ip) => Some(Outcome::Unknown {
                why: format!("TPROXY to {ip}:{port} in {label} {table} {hook} (unexpected here)"),
            }),
        }
    }

    /// The node interface that leads to the ztunnel pod (its host veth).
    fn ztunnel_host_if(&self) -> Option<String> {
        let ip = self.view.ztunnel_ip?;
        lookup(&self.view.node, 254, ip).and_then(|r| r.dev.clone())
    }

    /// The ztunnel netns: its mangle PREROUTING (TPROXY) and the route to its local sockets.
    fn ztunnel(&mut self, p: &mut Packet, iif: &str) -> Outcome {
        let Some(zt) = self.view.ztunnel.as_ref() else {
            return Outcome::Unknown {
                why: format!(
                    "enters the ztunnel netns by {iif}, whose state was not read{}",
                    self.view
                        .ztunnel_note
                        .as_ref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                ),
            };
        };
        p.iif = Some(iif.to_string());
        p.oif = None;
        let tproxy = match self.hook(zt, "ztunnel", "mangle", "PREROUTING", p) {
            Hook::Tproxy(port, _) => Some(port),
            Hook::Drop => {
                return Outcome::Dropped {
                    why: "ztunnel mangle PREROUTING DROP".into(),
                }
            }
            _ => None,
        };
        let routed = self.route(zt, "ztunnel", p);
        match (tproxy, routed) {
            (Some(port), Some((_, r))) if r.kind == "local" => Outcome::Captured { port },
            (None, Some((_, r))) if r.kind == "local" => Outcome::ToZtunnel,
            (Some(port), _) => Outcome::Unknown {
                why: format!("TPROXY to {port}, but the ztunnel netns does not route it locally"),
            },
            (None, Some((_, r))) => Outcome::Unknown {
                why: format!("in the ztunnel netns, routed on: {r}"),
            },
            (None, None) => Outcome::Dropped {
                why: "no route in the ztunnel netns".into(),
            },
        }
    }
}

fn table_name(t: u32) -> String {
    match t {
        255 => "local".into(),
        254 => "main".into(),
        253 => "default".into(),
        n => n.to_string(),
    }
}

/// Longest prefix match in one table (lowest metric among equals).
pub fn lookup(ns: &NsView, table: u32, dst: IpAddr) -> Option<&RouteEntry> {
    ns.tables
        .get(&table)?
        .iter()
        .filter(|r| r.dst.contains(dst) && r.kind != "broadcast")
        .min_by_key(|r| (std::cmp::Reverse(r.dst.len), r.metric))
}

fn verdict(o: &Outcome, p: &Packet) -> String {
    match o {
        Outcome::Captured { port } => {
            format!(
                "captured by ztunnel on {port}, original destination kept ({}:{})",
                p.dst, p.dport
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
    let mut notes = Vec::new();
    if view.ztunnel.is_none() {
        notes.push(match &view.ztunnel_note {
            Some(n) => format!("ztunnel netns not read: {n}"),
            None => "no ztunnel known".into(),
        });
    }
    let iif = q.iif.clone().or_else(|| view.dev_toward(q.src));
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
        "{} {}:{} → {}:{} arriving on {}",
        q.proto,
        q.src,
        CLIENT_PORT,
        q.dst,
        q.dport,
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
                "{who} {}:{} → {}:{} arriving on {riif}",
                q.dst, q.dport, q.src, CLIENT_PORT
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
