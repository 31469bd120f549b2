//! What `explain` reads from the kernel, as plain data, and the parsers of the tools' text:
//! `iptables-save`, `ip -j rule`, `ip -j route show table N`, `ipset save`. Pure, so the
//! evaluator's tests run on text fixtures.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::Serialize;
use serde_json::Value;

/// An address prefix of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Net {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Net {
    /// `default`, `A.B.C.D`, `A.B.C.D/L`, and the same for IPv6 (`default` needs `v6` to know the
    /// family).
    pub fn parse(s: &str, v6: bool) -> Option<Net> {
        if s == "default" {
            let addr = if v6 {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            };
            return Some(Net { addr, len: 0 });
        }
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse().ok().filter(|l| *l <= max)?,
            None => max,
        };
        Some(Net { addr, len })
    }

    /// Does the prefix hold `ip` (same family only)?
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.len == 0 {
            f.write_str("default")
        } else if (self.addr.is_ipv4() && self.len == 32) || self.len == 128 {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

/// What an ip rule does when it matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum RuleAction {
    /// `lookup N`.
    Lookup(u32),
    /// `goto P`.
    Goto(u32),
    /// Something else (`blackhole`, `prohibit`, `nop`...).
    Other(String),
}

/// One ip rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IpRule {
    /// Priority.
    pub priority: u32,
    /// `fwmark V/M`.
    pub fwmark: Option<(u32, u32)>,
    /// `from P` (None: all).
    pub src: Option<Net>,
    /// `to P`.
    pub dst: Option<Net>,
    /// `iif NAME`.
    pub iif: Option<String>,
    /// `oif NAME`.
    pub oif: Option<String>,
    /// `not`.
    pub not: bool,
    /// Action.
    pub action: RuleAction,
    /// `proto N` (who made it).
    pub protocol: Option<String>,
    /// Selectors the evaluator does not model (it says so when it meets the rule).
    pub unknown: Vec<String>,
}

/// One route of a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteEntry {
    /// unicast, local, unreachable, blackhole, prohibit, throw, broadcast...
    pub kind: String,
    /// Destination.
    pub dst: Net,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Output device.
    pub dev: Option<String>,
    /// Metric (lower wins).
    pub metric: u32,
    /// `proto`.
    pub protocol: String,
}

impl std::fmt::Display for RouteEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind != "unicast" {
            write!(f, "{} ", self.kind)?;
        }
        write!(f, "{}", self.dst)?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(d) = &self.dev {
            write!(f, " dev {d}")?;
        }
        write!(f, " proto {}", self.protocol)?;
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        Ok(())
    }
}

/// One network namespace as read.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NsView {
    /// ip rules, in priority order.
    pub rules: Vec<IpRule>,
    /// Routes by table id.
    pub tables: BTreeMap<u32, Vec<RouteEntry>>,
    /// iptables rules by table: (chain, body after `-A CHAIN `), in order.
    pub iptables: BTreeMap<String, Vec<(String, String)>>,
    /// What was read: the iptables variant (legacy, nft), or our nftables table.
    pub backend: String,
    /// What the reader met and could not evaluate (a rule of ours without our comment...).
    pub notes: Vec<String>,
}

/// Everything `explain` evaluates.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelView {
    /// The node netns.
    pub node: NsView,
    /// ipset members by set name (`ztunnel-pods-ips`; `ztunnel-pods-ips6` for IPv6).
    pub sets: BTreeMap<String, BTreeSet<IpAddr>>,
    /// The ztunnel's netns, when known and readable.
    pub ztunnel: Option<NsView>,
    /// The ztunnel pod's IP, when known.
    pub ztunnel_ip: Option<IpAddr>,
    /// Why the ztunnel netns was not read, if it was not.
    pub ztunnel_note: Option<String>,
}

/// Table id of a name in `ip -j` output.
pub fn table_id(s: &str) -> Option<u32> {
    match s {
        "local" => Some(255),
        "main" => Some(254),
        "default" => Some(253),
        n => n.parse().ok(),
    }
}

fn hex_or_dec(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn net_of(v: &Value, key: &str, len_key: &str, v6: bool) -> Option<Net> {
    let s = v.get(key)?.as_str()?;
    if s == "all" {
        return None;
    }
    let mut n = Net::parse(s, v6)?;
    if let Some(l) = v.get(len_key).and_then(Value::as_u64) {
        n.len = u8::try_from(l).unwrap_or(n.len);
    }
    Some(n)
}

/// Parses `ip -j rule show` (either family).
pub fn parse_rules(json: &str, v6: bool) -> Result<Vec<IpRule>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("ip -j rule: {e}"))?;
    let arr = v.as_array().ok_or("ip -j rule: not a list")?;
    let mut out = Vec::new();
    for r in arr {
        let mut unknown = Vec::new();
        if let Some(o) = r.as_object() {
            for k in o.keys() {
                if !matches!(
                    k.as_str(),
                    "priority"
                        | "src"
                        | "srclen"
                        | "dst"
                        | "dstlen"
                        | "fwmark"
                        | "fwmask"
                        | "iif"
                        | "oif"
                        | "not"
                        | "table"
                        | "goto"
                        | "protocol"
                        | "action"
                        | "flags"
                ) {
                    unknown.push(format!("{k} {}", o[k]));
                }
            }
        }
        let fwmark = r
            .get("fwmark")
            .and_then(Value::as_str)
            .and_then(hex_or_dec)
            .map(|m| {
                let mask = r
                    .get("fwmask")
                    .and_then(Value::as_str)
                    .and_then(hex_or_dec)
                    .unwrap_or(u32::MAX);
                (m, mask)
            });
        let action = if let Some(g) = r.get("goto").and_then(Value::as_u64) {
            RuleAction::Goto(u32::try_from(g).unwrap_or(u32::MAX))
        } else if let Some(t) = r.get("table").and_then(Value::as_str) {
            match table_id(t) {
                Some(t) => RuleAction::Lookup(t),
                None => RuleAction::Other(format!("lookup {t}")),
            }
        } else {
            RuleAction::Other(
                r.get("action")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string(),
            )
        };
        out.push(IpRule {
            priority: r
                .get("priority")
                .and_then(Value::as_u64)
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
            fwmark,
            src: net_of(r, "src", "srclen", v6),
            dst: net_of(r, "dst", "dstlen", v6),
            iif: r.get("iif").and_then(Value::as_str).map(str::to_string),
            oif: r.get("oif").and_then(Value::as_str).map(str::to_string),
            not: r.get("not").is_some(),
            action,
            protocol: r
                .get("protocol")
                .and_then(Value::as_str)
                .map(str::to_string),
            unknown,
        });
    }
    out.sort_by_key(|r| r.priority);
    Ok(out)
}

/// Parses `ip -j route show table N` (either family).
pub fn parse_routes(json: &str, v6: bool) -> Result<Vec<RouteEntry>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("ip -j route: {e}"))?;
    let arr = v.as_array().ok_or("ip -j route: not a list")?;
    let mut out = Vec::new();
    for r in arr {
        let Some(dst) = r
            .get("dst")
            .and_then(Value::as_str)
            .and_then(|d| Net::parse(d, v6))
        else {
            continue;
        };
        out.push(RouteEntry {
            kind: r
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("unicast")
                .to_string(),
            dst,
            gateway: r
                .get("gateway")
                .and_then(Value::as_str)
                .and_then(|g| g.parse().ok()),
            dev: r.get("dev").and_then(Value::as_str).map(str::to_string),
            metric: r
                .get("metric")
                .and_then(Value::as_u64)
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(0),
            protocol: r
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("boot")
                .to_string(),
        });
    }
    Ok(out)
}

/// Parses `iptables-save` output: table → (chain, rule body) in order.
pub fn parse_iptables(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
            out.entry(table.clone()).or_default();
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, body) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(table.clone())
                .or_default()
                .push((chain.to_string(), body.to_string()));
        }
    }
    out
}

/// Parses `ipset save NAME` output: the members of each set.
pub fn parse_ipset(text: &str) -> BTreeMap<String, BTreeSet<IpAddr>> {
    let mut out: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("create"), Some(name), _) => {
                out.entry(name.to_string()).or_default();
            }
            (Some("add"), Some(name), Some(ip)) => {
                if let Ok(ip) = ip.parse() {
                    out.entry(name.to_string()).or_default().insert(ip);
                }
            }
            _ => {}
        }
    }
    out
}
