//! iptables rules as `iptables-save` prints them, parsed into the matches and targets our chains
//! use, and evaluated against one packet. What is not modelled is said, not guessed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::view::Net;

/// A packet as the evaluator follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// `tcp`, `udp`.
    pub proto: String,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Input interface (None: made on this host).
    pub iif: Option<String>,
    /// Output interface, once routed.
    pub oif: Option<String>,
    /// The packet mark.
    pub mark: u32,
    /// The connection's mark.
    pub connmark: u32,
    /// The connection's first packet (nat chains are only traversed for it).
    pub new_conn: bool,
}

/// One match of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Match {
    Iif(bool, String),
    Oif(bool, String),
    Src(bool, Net),
    Dst(bool, Net),
    Proto(bool, String),
    Dport(bool, u16),
    Sport(bool, u16),
    Set {
        neg: bool,
        name: String,
        dir: String,
    },
    Mark(bool, u32, u32),
    Connmark(bool, u32, u32),
    /// `-m owner --socket-exists`: only on locally made packets.
    SocketExists,
    Unknown(String),
}

/// What a rule does when it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `MARK --set-xmark V/M` (also `--set-mark`).
    Mark(u32, u32),
    /// `CONNMARK --save-mark --nfmask N --ctmask C`.
    ConnmarkSave(u32, u32),
    /// `CONNMARK --restore-mark --nfmask N --ctmask C`.
    ConnmarkRestore(u32, u32),
    /// `TPROXY --on-port P --on-ip A --tproxy-mark V/M`.
    Tproxy {
        /// Port.
        port: u16,
        /// Address.
        ip: String,
        /// Mark and mask.
        mark: (u32, u32),
    },
    /// RETURN.
    Return,
    /// ACCEPT.
    Accept,
    /// DROP.
    Drop,
    /// REJECT (with what).
    Reject(String),
    /// Jump to a user chain.
    Jump(String),
    /// No target (a counter).
    None,
    /// A target not modelled.
    Other(String),
}

/// A parsed rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    matches: Vec<Match>,
    /// Its target.
    pub target: Target,
}

fn mark_pair(s: &str) -> Option<(u32, u32)> {
    let (v, m) = match s.split_once('/') {
        Some((v, m)) => (v, Some(m)),
        None => (s, None),
    };
    let p = |x: &str| match x.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => x.parse().ok(),
    };
    Some((p(v)?, m.map(p).unwrap_or(Some(u32::MAX))?))
}

/// Splits a rule body into words, keeping a `"quoted string"` (a comment) as one.
fn words(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in body.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl Rule {
    /// Parses the body of a rule (after `-A CHAIN`).
    pub fn parse(body: &str) -> Rule {
        let w = words(body);
        let mut matches = Vec::new();
        let mut target = Target::None;
        let mut neg = false;
        let mut module = String::new();
        let mut i = 0;
        let arg = |i: usize| w.get(i + 1).cloned().unwrap_or_default();
        let mut v6 = false;
        while i < w.len() {
            let t = w[i].as_str();
            // Words this option takes, itself included.
            let mut used = 2;
            match t {
                "!" => {
                    neg = true;
                    i += 1;
                    continue;
                }
                "-i" => matches.push(Match::Iif(neg, arg(i))),
                "-o" => matches.push(Match::Oif(neg, arg(i))),
                "-s" | "-d" => {
                    let a = arg(i);
                    v6 = v6 || a.contains(':');
                    match Net::parse(&a, v6) {
                        Some(n) if t == "-s" => matches.push(Match::Src(neg, n)),
                        Some(n) => matches.push(Match::Dst(neg, n)),
                        None => matches.push(Match::Unknown(format!("{t} {a}"))),
                    }
                }
                "-p" => matches.push(Match::Proto(neg, arg(i))),
                "-m" => {
                    module = arg(i);
                    if !matches!(
                        module.as_str(),
                        "tcp" | "udp" | "set" | "mark" | "connmark" | "owner" | "comment"
                    ) {
                        matches.push(Match::Unknown(format!("-m {module}")));
                    }
                }
                "--dport" | "--sport" => match arg(i).parse() {
                    Ok(p) if t == "--dport" => matches.push(Match::Dport(neg, p)),
                    Ok(p) => matches.push(Match::Sport(neg, p)),
                    Err(_) => matches.push(Match::Unknown(format!("{t} {}", arg(i)))),
                },
                "--match-set" => {
                    matches.push(Match::Set {
                        neg,
                        name: arg(i),
                        dir: w.get(i + 2).cloned().unwrap_or_default(),
                    });
                    used = 3;
                }
                "--mark" => match (mark_pair(&arg(i)), module.as_str()) {
                    (Some((v, m)), "connmark") => matches.push(Match::Connmark(neg, v, m)),
                    (Some((v, m)), _) => matches.push(Match::Mark(neg, v, m)),
                    (None, _) => matches.push(Match::Unknown(format!("--mark {}", arg(i)))),
                },
                "--socket-exists" => {
                    matches.push(Match::SocketExists);
                    used = 1;
                }
                "--comment" => {}
                "-j" | "-g" => {
                    target = parse_target(&arg(i), &w[(i + 2).min(w.len())..]);
                    break;
                }
                other => matches.push(Match::Unknown(other.to_string())),
            }
            neg = false;
            i += used;
        }
        Rule { matches, target }
    }

    /// Does the rule match `p`? `Err` names what could not be evaluated.
    pub fn matches(
        &self,
        p: &Packet,
        sets: &BTreeMap<String, BTreeSet<IpAddr>>,
    ) -> Result<bool, String> {
        for m in &self.matches {
            let (neg, hit) = match m {
                Match::Iif(n, name) => (*n, p.iif.as_deref() == Some(name.as_str())),
                Match::Oif(n, name) => (*n, p.oif.as_deref() == Some(name.as_str())),
                Match::Src(n, net) => (*n, net.contains(p.src)),
                Match::Dst(n, net) => (*n, net.contains(p.dst)),
                Match::Proto(n, pr) => (*n, pr == &p.proto || pr == "all"),
                Match::Dport(n, port) => (*n, *port == p.dport),
                Match::Sport(n, port) => (*n, *port == p.sport),
                Match::Set { neg, name, dir } => {
                    let Some(set) = sets.get(name) else {
                        return Err(format!("ipset {name} was not read (or does not exist)"));
                    };
                    let ip = if dir.starts_with("src") { p.src } else { p.dst };
                    (*neg, set.contains(&ip))
                }
                Match::Mark(n, v, mask) => (*n, p.mark & mask == *v),
                Match::Connmark(n, v, mask) => (*n, p.connmark & mask == *v),
                Match::SocketExists => (false, p.iif.is_none()),
                Match::Unknown(what) => return Err(format!("match {what:?} is not modelled")),
            };
            if hit == neg {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn parse_target(name: &str, opts: &[String]) -> Target {
    let opt = |k: &str| {
        opts.iter()
            .position(|o| o == k)
            .and_then(|i| opts.get(i + 1))
            .cloned()
    };
    let masks = || {
        let n = opt("--nfmask").and_then(|m| mark_pair(&m)).map(|p| p.0);
        let c = opt("--ctmask").and_then(|m| mark_pair(&m)).map(|p| p.0);
        (n.unwrap_or(u32::MAX), c.unwrap_or(u32::MAX))
    };
    match name {
        "MARK" => match opt("--set-xmark")
            .or_else(|| opt("--set-mark"))
            .and_then(|m| mark_pair(&m))
        {
            Some((v, m)) => Target::Mark(v, m),
            None => Target::Other(format!("MARK {}", opts.join(" "))),
        },
        "CONNMARK" if opts.iter().any(|o| o == "--save-mark") => {
            let (n, c) = masks();
            Target::ConnmarkSave(n, c)
        }
        "CONNMARK" if opts.iter().any(|o| o == "--restore-mark") => {
            let (n, c) = masks();
            Target::ConnmarkRestore(n, c)
        }
        "TPROXY" => Target::Tproxy {
            port: opt("--on-port").and_then(|p| p.parse().ok()).unwrap_or(0),
            ip: opt("--on-ip").unwrap_or_default(),
            mark: opt("--tproxy-mark")
                .and_then(|m| mark_pair(&m))
                .unwrap_or((0, 0)),
        },
        "RETURN" => Target::Return,
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "REJECT" => Target::Reject(opt("--reject-with").unwrap_or_else(|| "icmp".into())),
        "" => Target::None,
        n if n.chars().all(|c| c.is_ascii_uppercase()) => {
            Target::Other(format!("{n} {}", opts.join(" ")))
        }
        chain => Target::Jump(chain.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt() -> Packet {
        Packet {
            src: "10.244.1.2".parse().expect("ip"),
            dst: "198.51.100.2".parse().expect("ip"),
            proto: "tcp".into(),
            sport: 40000,
            dport: 8080,
            iif: Some("veth1".into()),
            oif: None,
            mark: 0,
            connmark: 0,
            new_conn: true,
        }
    }

    #[test]
    fn parses_and_matches_our_rules() {
        let mut sets = BTreeMap::new();
        sets.insert(
            "ztunnel-pods-ips".to_string(),
            BTreeSet::from(["10.244.1.2".parse().expect("ip")]),
        );
        let r = Rule::parse(
            "-p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100",
        );
        assert_eq!(r.target, Target::Mark(0x100, 0x100));
        assert_eq!(r.matches(&pkt(), &sets), Ok(true));
        let r = Rule::parse("! -s 10.244.1.4/32 -i veth1 -j MARK --set-xmark 0x210/0x210");
        assert_eq!(r.matches(&pkt(), &sets), Ok(true));
        let r = Rule::parse("-i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff");
        assert_eq!(
            r.target,
            Target::Tproxy {
                port: 15008,
                ip: "127.0.0.1".into(),
                mark: (0x400, 0xfff)
            }
        );
        assert_eq!(r.matches(&pkt(), &sets), Ok(false));
        let r = Rule::parse(
            "-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220",
        );
        assert_eq!(r.target, Target::ConnmarkSave(0x220, 0x220));
        let r = Rule::parse("! -o istioin -p tcp -m set --match-set ztunnel-pods-ips dst -m mark --mark 0x0/0x340 -j REJECT --reject-with tcp-reset");
        assert_eq!(r.target, Target::Reject("tcp-reset".into()));
        let mut p = pkt();
        std::mem::swap(&mut p.src, &mut p.dst);
        p.oif = Some("veth1".into());
        assert_eq!(r.matches(&p, &sets), Ok(true));
        assert!(Rule::parse("-m conntrack --ctstate NEW -j ACCEPT")
            .matches(&pkt(), &sets)
            .is_err());
        assert_eq!(
            Rule::parse("-j ztunnel-PREROUTING").target,
            Target::Jump("ztunnel-PREROUTING".into())
        );
        assert!(Rule::parse("-m set --match-set other src -j ACCEPT")
            .matches(&pkt(), &sets)
            .is_err());
    }
}
