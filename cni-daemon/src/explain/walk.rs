//! The walk of one packet through one namespace after another: our iptables chains (the marks
//! they set, TPROXY), the ip rules and the route each table gives, from the node into the
//! ztunnel's netns. Used by [`super::eval`], which turns walks into legs and verdicts.

use std::net::IpAddr;

use super::eval::{Names, Outcome};
use super::ipt::{Packet, Rule, Target};
use super::read::NFT_CHAIN;
use super::view::{KernelView, NsView, RouteEntry, RuleAction};
use crate::config::tables;

pub(super) enum Hook {
    Continue,
    Accept,
    Drop,
    Reject(String),
    Tproxy(u16, String),
}

pub(super) struct Walk<'a> {
    pub(super) view: &'a KernelView,
    pub(super) names: &'a Names,
    pub(super) steps: Vec<String>,
    pub(super) notes: &'a mut Vec<String>,
}

pub(super) fn fmt_mark(m: u32) -> String {
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
                Target::Jump(c) if c.starts_with("ztunnel-") || c.starts_with(NFT_CHAIN) => {
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
    pub(super) fn node(&mut self, p: &mut Packet) -> Outcome {
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
