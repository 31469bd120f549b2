//! Our chains, as the reconciler states them (rules in iptables-save form), compiled to
//! nf_tables expressions: the same matches and targets, one nft rule per iptables rule, with
//! the iptables text kept as the rule's comment (read back to compare, shown by `nft list`).
//!
//! Only the vocabulary `reconcile::desired` uses is known; anything else is an error, never a
//! silently different rule. Each rule starts with `meta nfproto ipv4|ipv6` (our table is
//! `inet`: one chain per family and hook).

use std::net::IpAddr;

use super::wire::{
    Msg, NFPROTO_IPV4, NFPROTO_IPV6, NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_EXPR_DATA,
    NFTA_EXPR_NAME, NFTA_LIST_ELEM, NFTA_VERDICT_CODE,
};
use crate::model::{Chain, Family};

// Expression attributes (linux/netfilter/nf_tables.h).
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_CT_SREG: u16 = 4;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_REJECT_TYPE: u16 = 1;
const NFTA_TPROXY_FAMILY: u16 = 1;
const NFTA_TPROXY_REG_ADDR: u16 = 2;
const NFTA_TPROXY_REG_PORT: u16 = 3;

const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_SKUID: u32 = 10;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_MARK: u32 = 3;
const NFT_PAYLOAD_NETWORK: u32 = 1;
const NFT_PAYLOAD_TRANSPORT: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_GTE: u32 = 5;
const NFT_LOOKUP_F_INV: u32 = 1;
const NFT_REJECT_TCP_RST: u32 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NF_ACCEPT: i32 = 1;
const NFT_RETURN: i32 = -5;

/// How one of our chains is hooked: nf_tables chain type, hook number and priority, the same
/// points and priorities as the iptables table it stands for (mangle -150, nat -100/100,
/// filter 0). mangle OUTPUT is a `route` chain: a mark set there re-routes, as in iptables.
pub(crate) fn hook_of(table: &str, hook: &str) -> Option<(&'static str, u32, i32)> {
    let num = match hook {
        "PREROUTING" => 0,
        "INPUT" => 1,
        "FORWARD" => 2,
        "OUTPUT" => 3,
        "POSTROUTING" => 4,
        _ => return None,
    };
    match table {
        "mangle" if num == 3 => Some(("route", num, -150)),
        "mangle" => Some(("filter", num, -150)),
        "nat" if num == 0 || num == 3 => Some(("nat", num, -100)),
        "nat" => Some(("nat", num, 100)),
        "filter" => Some(("filter", num, 0)),
        "raw" => Some(("filter", num, -300)),
        _ => None,
    }
}

/// The nft chain of an iptables chain of a family: `ip-mangle-prerouting`, `ip6-nat-output`.
pub(crate) fn chain_name(f: Family, c: &Chain) -> String {
    c.nft_name(f)
}

/// Our pod set of a family.
pub(crate) fn set_name(f: Family) -> &'static str {
    crate::config::nft_set_name(f)
}

/// Writes the expressions of `rule` (iptables-save form) into `m`, inside an open
/// NFTA_RULE_EXPRESSIONS.
pub(crate) fn compile(m: &mut Msg, f: Family, rule: &str) -> Result<(), String> {
    let bad = |why: &str| format!("rule `{rule}`: {why}");
    let mut t = rule.split_whitespace().peekable();
    let mut neg = false;
    // (value, mask) of the last `-m mark --mark`, for CONNMARK --save-mark.
    let mut mark_match: Option<(u32, u32)> = None;
    let nfproto = match f {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    };
    meta_load(m, NFT_META_NFPROTO);
    cmp(m, NFT_CMP_EQ, &[nfproto]);
    while let Some(tok) = t.next() {
        let mut arg = || {
            t.next()
                .ok_or_else(|| bad(&format!("{tok} needs an argument")))
        };
        match tok {
            "!" => {
                neg = true;
                continue;
            }
            "-i" | "-o" => {
                let name = arg()?;
                if name.len() >= 16 {
                    return Err(bad("interface name too long"));
                }
                let key = if tok == "-i" {
                    NFT_META_IIFNAME
                } else {
                    NFT_META_OIFNAME
                };
                meta_load(m, key);
                let mut v = name.as_bytes().to_vec();
                v.push(0);
                cmp(m, op(neg), &v);
            }
            "-s" | "-d" => {
                let (ip, len) = prefix(arg()?).ok_or_else(|| bad("bad address"))?;
                if Family::of(ip) != f {
                    return Err(bad("address of the other family"));
                }
                addr_load(m, f, tok == "-s");
                let bytes = ip_bytes(ip);
                let full = bytes.len() * 8;
                if len < full {
                    let mask = prefix_mask(bytes.len(), len);
                    let masked: Vec<u8> = bytes.iter().zip(&mask).map(|(a, b)| a & b).collect();
                    bitwise(m, &mask, &vec![0; bytes.len()]);
                    cmp(m, op(neg), &masked);
                } else {
                    cmp(m, op(neg), &bytes);
                }
            }
            "-p" => {
                let p = match arg()? {
                    "tcp" => 6u8,
                    "udp" => 17,
                    "icmp" => 1,
                    other => return Err(bad(&format!("protocol {other}"))),
                };
                meta_load(m, NFT_META_L4PROTO);
                cmp(m, op(neg), &[p]);
            }
            "-m" => match arg()? {
                "tcp" | "udp" => {
                    let opt = t.next();
                    let port = t.next().and_then(|p| p.parse::<u16>().ok());
                    match (opt, port) {
                        (Some("--dport"), Some(p)) => {
                            payload(m, NFT_PAYLOAD_TRANSPORT, 2, 2);
                            cmp(m, op(neg), &p.to_be_bytes());
                        }
                        _ => return Err(bad("only --dport N")),
                    }
                }
                which @ ("mark" | "connmark") => {
                    let (v, mask) = match (t.next(), t.next().and_then(value_mask)) {
                        (Some("--mark"), Some(vm)) => vm,
                        _ => return Err(bad("--mark V/M")),
                    };
                    if which == "mark" {
                        meta_load(m, NFT_META_MARK);
                        if !neg {
                            mark_match = Some((v, mask));
                        }
                    } else {
                        ct_load(m, NFT_CT_MARK);
                    }
                    if mask != u32::MAX {
                        bitwise(m, &mask.to_ne_bytes(), &0u32.to_ne_bytes());
                    }
                    cmp(m, op(neg), &v.to_ne_bytes());
                }
                "set" => {
                    let (set, dir) = match (t.next(), t.next(), t.next()) {
                        (Some("--match-set"), Some(s), Some(d)) => (s, d),
                        _ => return Err(bad("--match-set NAME src|dst")),
                    };
                    if set != crate::config::ipset_name(f) {
                        return Err(bad(&format!("unknown set {set}")));
                    }
                    let src = match dir {
                        "src" => true,
                        "dst" => false,
                        _ => return Err(bad("set direction")),
                    };
                    addr_load(m, f, src);
                    expr(m, "lookup", |m| {
                        m.put_str(NFTA_LOOKUP_SET, set_name(f));
                        m.put_be32(NFTA_LOOKUP_SREG, NFT_REG_1);
                        if neg {
                            m.put_be32(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
                        }
                    });
                }
                "owner" => match t.next() {
                    // Fails the rule (NFT_BREAK) when the packet has no full socket.
                    Some("--socket-exists") if !neg => {
                        meta_load(m, NFT_META_SKUID);
                        cmp(m, NFT_CMP_GTE, &0u32.to_ne_bytes());
                    }
                    _ => return Err(bad("only --socket-exists")),
                },
                other => return Err(bad(&format!("match {other}"))),
            },
            "-j" => {
                if neg {
                    return Err(bad("! before -j"));
                }
                target(m, f, &mut t, mark_match).map_err(|e| bad(&e))?;
                if t.peek().is_some() {
                    return Err(bad("text after the target"));
                }
            }
            other => return Err(bad(&format!("unknown option {other}"))),
        }
        neg = false;
    }
    Ok(())
}

fn target<'a>(
    m: &mut Msg,
    f: Family,
    t: &mut impl Iterator<Item = &'a str>,
    mark_match: Option<(u32, u32)>,
) -> Result<(), String> {
    match t.next() {
        Some("RETURN") => verdict(m, NFT_RETURN),
        Some("ACCEPT") => verdict(m, NF_ACCEPT),
        Some("MARK") => {
            let (v, mask) = match (t.next(), t.next().and_then(value_mask)) {
                (Some("--set-xmark"), Some(vm)) => vm,
                _ => return Err("MARK: only --set-xmark V/M".into()),
            };
            set_xmark(m, v, mask);
        }
        Some("CONNMARK") => {
            let words: Vec<&str> = t.collect();
            let (nf, ct) = match words.as_slice() {
                ["--save-mark", "--nfmask", n, "--ctmask", c] => (hex(n), hex(c)),
                _ => return Err("CONNMARK: only --save-mark --nfmask M --ctmask M".into()),
            };
            // ct mark = (ct mark & ~ctmask) | (mark & nfmask); behind `-m mark --mark M/M` the
            // packet's bits of M are all set, so this is `ct mark |= M` (no register-register
            // arithmetic needed, which older kernels lack).
            match (nf, ct, mark_match) {
                (Some(n), Some(c), Some((v, mm))) if n == c && v == n && mm == n => {
                    ct_load(m, NFT_CT_MARK);
                    bitwise(m, &(!n).to_ne_bytes(), &n.to_ne_bytes());
                    expr(m, "ct", |m| {
                        m.put_be32(NFTA_CT_KEY, NFT_CT_MARK);
                        m.put_be32(NFTA_CT_SREG, NFT_REG_1);
                    });
                }
                _ => return Err("CONNMARK --save-mark only behind -m mark --mark M/M".into()),
            }
        }
        Some("REJECT") => match (t.next(), t.next()) {
            (Some("--reject-with"), Some("tcp-reset")) => expr(m, "reject", |m| {
                m.put_be32(NFTA_REJECT_TYPE, NFT_REJECT_TCP_RST);
            }),
            _ => return Err("REJECT: only --reject-with tcp-reset".into()),
        },
        Some("TPROXY") => {
            let words: Vec<&str> = t.collect();
            let (port, ip, vm) = match words.as_slice() {
                ["--on-port", p, "--on-ip", ip, "--tproxy-mark", vm] => (
                    p.parse::<u16>().ok(),
                    ip.parse::<IpAddr>().ok(),
                    value_mask(vm),
                ),
                _ => return Err("TPROXY: --on-port P --on-ip IP --tproxy-mark V/M".into()),
            };
            let (Some(port), Some(ip), Some((v, mask))) = (port, ip, vm) else {
                return Err("TPROXY: bad port, address or mark".into());
            };
            if Family::of(ip) != f {
                return Err("TPROXY: address of the other family".into());
            }
            set_xmark(m, v, mask);
            immediate(m, NFT_REG_1, &ip_bytes(ip));
            immediate(m, NFT_REG_2, &port.to_be_bytes());
            expr(m, "tproxy", |m| {
                m.put_be32(
                    NFTA_TPROXY_FAMILY,
                    u32::from(match f {
                        Family::V4 => NFPROTO_IPV4,
                        Family::V6 => NFPROTO_IPV6,
                    }),
                );
                m.put_be32(NFTA_TPROXY_REG_ADDR, NFT_REG_1);
                m.put_be32(NFTA_TPROXY_REG_PORT, NFT_REG_2);
            });
            verdict(m, NF_ACCEPT);
        }
        other => return Err(format!("target {other:?}")),
    }
    Ok(())
}

fn op(neg: bool) -> u32 {
    if neg {
        NFT_CMP_NEQ
    } else {
        NFT_CMP_EQ
    }
}

fn hex(s: &str) -> Option<u32> {
    u32::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// `0x200/0x200` (a value alone has mask 0xffffffff).
fn value_mask(s: &str) -> Option<(u32, u32)> {
    match s.split_once('/') {
        Some((v, m)) => Some((hex(v)?, hex(m)?)),
        None => Some((hex(s)?, u32::MAX)),
    }
}

fn prefix(s: &str) -> Option<(IpAddr, usize)> {
    let (ip, len) = match s.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, l.parse::<usize>().ok()?),
        None => {
            let a = s.parse::<IpAddr>().ok()?;
            (a, ip_bytes(a).len() * 8)
        }
    };
    (len <= ip_bytes(ip).len() * 8).then_some((ip, len))
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn prefix_mask(bytes: usize, len: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| {
            let bits = len.saturating_sub(i * 8).min(8);
            if bits == 0 {
                0
            } else {
                0xffu8 << (8 - bits)
            }
        })
        .collect()
}

fn expr(m: &mut Msg, name: &str, body: impl FnOnce(&mut Msg)) {
    m.begin(NFTA_LIST_ELEM);
    m.put_str(NFTA_EXPR_NAME, name);
    m.begin(NFTA_EXPR_DATA);
    body(m);
    m.end();
    m.end();
}

fn meta_load(m: &mut Msg, key: u32) {
    expr(m, "meta", |m| {
        m.put_be32(NFTA_META_KEY, key);
        m.put_be32(NFTA_META_DREG, NFT_REG_1);
    });
}

fn ct_load(m: &mut Msg, key: u32) {
    expr(m, "ct", |m| {
        m.put_be32(NFTA_CT_KEY, key);
        m.put_be32(NFTA_CT_DREG, NFT_REG_1);
    });
}

fn payload(m: &mut Msg, base: u32, offset: u32, len: u32) {
    expr(m, "payload", |m| {
        m.put_be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        m.put_be32(NFTA_PAYLOAD_BASE, base);
        m.put_be32(NFTA_PAYLOAD_OFFSET, offset);
        m.put_be32(NFTA_PAYLOAD_LEN, len);
    });
}

/// Source or destination address of family `f` into register 1.
fn addr_load(m: &mut Msg, f: Family, src: bool) {
    match (f, src) {
        (Family::V4, true) => payload(m, NFT_PAYLOAD_NETWORK, 12, 4),
        (Family::V4, false) => payload(m, NFT_PAYLOAD_NETWORK, 16, 4),
        (Family::V6, true) => payload(m, NFT_PAYLOAD_NETWORK, 8, 16),
        (Family::V6, false) => payload(m, NFT_PAYLOAD_NETWORK, 24, 16),
    }
}

fn data(m: &mut Msg, ty: u16, v: &[u8]) {
    m.begin(ty);
    m.put(NFTA_DATA_VALUE, v);
    m.end();
}

fn cmp(m: &mut Msg, op: u32, v: &[u8]) {
    expr(m, "cmp", |m| {
        m.put_be32(NFTA_CMP_SREG, NFT_REG_1);
        m.put_be32(NFTA_CMP_OP, op);
        data(m, NFTA_CMP_DATA, v);
    });
}

/// reg1 = (reg1 & mask) ^ xor, over `mask.len()` bytes.
fn bitwise(m: &mut Msg, mask: &[u8], xor: &[u8]) {
    let len = u32::try_from(mask.len()).unwrap_or(0);
    expr(m, "bitwise", |m| {
        m.put_be32(NFTA_BITWISE_SREG, NFT_REG_1);
        m.put_be32(NFTA_BITWISE_DREG, NFT_REG_1);
        m.put_be32(NFTA_BITWISE_LEN, len);
        data(m, NFTA_BITWISE_MASK, mask);
        data(m, NFTA_BITWISE_XOR, xor);
    });
}

/// mark = (mark & ~mask) ^ value: iptables' `--set-xmark`.
fn set_xmark(m: &mut Msg, v: u32, mask: u32) {
    meta_load(m, NFT_META_MARK);
    bitwise(m, &(!mask).to_ne_bytes(), &v.to_ne_bytes());
    expr(m, "meta", |m| {
        m.put_be32(NFTA_META_KEY, NFT_META_MARK);
        m.put_be32(NFTA_META_SREG, NFT_REG_1);
    });
}

fn immediate(m: &mut Msg, reg: u32, v: &[u8]) {
    expr(m, "immediate", |m| {
        m.put_be32(NFTA_IMMEDIATE_DREG, reg);
        data(m, NFTA_IMMEDIATE_DATA, v);
    });
}

fn verdict(m: &mut Msg, code: i32) {
    expr(m, "immediate", |m| {
        m.put_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        m.begin(NFTA_IMMEDIATE_DATA);
        m.begin(NFTA_DATA_VERDICT);
        m.put(NFTA_VERDICT_CODE, &code.to_be_bytes());
        m.end();
        m.end();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::reconcile::desired::node_chains;

    #[test]
    fn every_rule_we_program_compiles() {
        let cfg = Config::default();
        for f in Family::ALL {
            let (zt_ip, hip): (IpAddr, IpAddr) = match f {
                Family::V4 => (
                    "10.244.0.9".parse().expect("ip"),
                    "10.0.0.1".parse().expect("ip"),
                ),
                Family::V6 => (
                    "fd00::9".parse().expect("ip"),
                    "fd00::1".parse().expect("ip"),
                ),
            };
            for c in node_chains(&cfg, f, Some(("veth0", zt_ip)), Some(hip)) {
                assert!(hook_of(&c.table, &c.hook).is_some(), "{c:?}");
                for r in &c.rules {
                    let mut m = Msg::new(0, 0);
                    compile(&mut m, f, r).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }

    #[test]
    fn unknown_vocabulary_is_an_error() {
        let mut m = Msg::new(0, 0);
        assert!(compile(&mut m, Family::V4, "-m conntrack --ctstate NEW -j ACCEPT").is_err());
        assert!(compile(&mut m, Family::V4, "-s fd00::1/128 -j RETURN").is_err());
        assert!(compile(
            &mut m,
            Family::V4,
            "-j CONNMARK --save-mark --nfmask 0x1 --ctmask 0x1"
        )
        .is_err());
        assert!(compile(&mut m, Family::V4, "-i").is_err());
        assert!(compile(&mut m, Family::V4, "-j RETURN extra").is_err());
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_mask(4, 24), vec![255, 255, 255, 0]);
        assert_eq!(prefix_mask(4, 20), vec![255, 255, 240, 0]);
        assert_eq!(value_mask("0x200/0x200"), Some((0x200, 0x200)));
        assert_eq!(value_mask("0x10"), Some((0x10, u32::MAX)));
        assert_eq!(hook_of("mangle", "OUTPUT"), Some(("route", 3, -150)));
    }
}
