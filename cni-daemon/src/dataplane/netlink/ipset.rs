//! ipset over netlink (`NFNL_SUBSYS_IPSET`), written by hand.
//!
//! Why by hand: no crate does this well. `ipset`/`ipset-sys` are FFI to libipset (C build deps,
//! non-thread-safe global session), `ripset` has no comment extension and opens a socket per call
//! in the caller's netns, and `netlink-packet-netfilter` knows only nflog/conntrack. The protocol
//! subset we need is small: CREATE (`hash:ip`, inet, with comments), DESTROY, ADD, DEL, LIST and
//! HEADER, all with `IPSET_ATTR_PROTOCOL` 7 (constants from `linux/netfilter/ipset/ip_set.h`).
//!
//! Encoding is plain byte pushing; decoding never indexes without a bounds check and never
//! panics, whatever the kernel (or a fuzzer) hands us.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::Family;

/// `NFNL_SUBSYS_IPSET`: the high byte of the netlink message type.
const NFNL_SUBSYS_IPSET: u16 = 6;
/// Protocol version we speak (kernel minimum is 6).
const IPSET_PROTOCOL: u8 = 7;
/// Set and type names include their NUL within 32 bytes.
const IPSET_MAXNAMELEN: usize = 32;
/// Longest comment the kernel keeps.
pub(crate) const IPSET_MAX_COMMENT_SIZE: usize = 255;

// Commands.
const IPSET_CMD_CREATE: u8 = 2;
const IPSET_CMD_DESTROY: u8 = 3;
const IPSET_CMD_LIST: u8 = 7;
const IPSET_CMD_ADD: u8 = 9;
const IPSET_CMD_DEL: u8 = 10;
const IPSET_CMD_HEADER: u8 = 12;

// Command-level attributes.
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_TYPENAME: u16 = 3;
const IPSET_ATTR_REVISION: u16 = 4;
const IPSET_ATTR_FAMILY: u16 = 5;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_ADT: u16 = 8;

// CADT / create / ADT attributes inside DATA.
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_CADT_FLAGS: u16 = 8;
const IPSET_ATTR_HASHSIZE: u16 = 18;
const IPSET_ATTR_MAXELEM: u16 = 19;
const IPSET_ATTR_COMMENT: u16 = 26;

// Inside IPSET_ATTR_IP.
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
const IPSET_ATTR_IPADDR_IPV6: u16 = 2;

const IPSET_FLAG_WITH_COMMENT: u32 = 1 << 4;

/// ipset-specific error codes (positive, as in the kernel's `enum ipset_errno`).
pub(crate) const IPSET_ERR_PROTOCOL: i32 = 4097;
pub(crate) const IPSET_ERR_FIND_TYPE: i32 = 4098;
pub(crate) const IPSET_ERR_EXIST: i32 = 4103;
pub(crate) const IPSET_ERR_REFERENCED: i32 = 4108;
pub(crate) const IPSET_ERR_COMMENT: i32 = 4112;

use super::nfnl::{NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLA_TYPE_MASK};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;

const TYPE_HASH_IP: &str = "hash:ip";
/// Revisions of `hash:ip` that carry the comment extension, newest first (2 added comments;
/// 6 is current in 6.x kernels). Creation tries them in order until the kernel knows one.
const HASH_IP_REVISIONS: [u8; 5] = [6, 5, 4, 3, 2];
const DEFAULT_HASHSIZE: u32 = 1024;
const DEFAULT_MAXELEM: u32 = 65536;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A failed ipset request.
#[derive(Debug)]
pub(crate) enum IpsetError {
    /// The kernel answered with this (positive) errno or ipset error code.
    Kernel(i32),
    /// Socket I/O failed.
    Io(io::Error),
    /// The answer did not parse, or the request could not be encoded.
    Invalid(String),
}

impl std::fmt::Display for IpsetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IpsetError::Kernel(code) => write!(f, "{}", describe_code(*code)),
            IpsetError::Io(e) => write!(f, "socket: {e}"),
            IpsetError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

/// Human text for an errno or ipset error code.
pub(crate) fn describe_code(code: i32) -> String {
    let name = match code {
        4096 => "IPSET_ERR_PRIVATE",
        IPSET_ERR_PROTOCOL => "IPSET_ERR_PROTOCOL: kernel does not speak this ipset protocol",
        IPSET_ERR_FIND_TYPE => "IPSET_ERR_FIND_TYPE: set type/revision not supported by the kernel",
        4099 => "IPSET_ERR_MAX_SETS",
        4100 => {
            "IPSET_ERR_BUSY: set is in use by a kernel component (an iptables rule references it)"
        }
        4101 => "IPSET_ERR_EXIST_SETNAME2",
        4102 => "IPSET_ERR_TYPE_MISMATCH",
        IPSET_ERR_EXIST => "IPSET_ERR_EXIST: element (not) present",
        4104 => "IPSET_ERR_INVALID_CIDR",
        4105 => "IPSET_ERR_INVALID_NETMASK",
        4106 => "IPSET_ERR_INVALID_FAMILY",
        4107 => "IPSET_ERR_TIMEOUT",
        IPSET_ERR_REFERENCED => "IPSET_ERR_REFERENCED: set is referenced by another set",
        4109 => "IPSET_ERR_IPADDR_IPV4",
        4110 => "IPSET_ERR_IPADDR_IPV6",
        4111 => "IPSET_ERR_COUNTER",
        IPSET_ERR_COMMENT => "IPSET_ERR_COMMENT: set was created without the comment extension",
        c if c >= 4096 => return format!("ipset error {c}"),
        c => return io::Error::from_raw_os_error(c).to_string(),
    };
    format!("{name} ({code})")
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Builds one netlink message: nlmsghdr + nfgenmsg + attributes.
struct MsgBuilder {
    buf: Vec<u8>,
    /// Offsets of open nested attributes.
    nests: Vec<usize>,
}

impl MsgBuilder {
    fn new(cmd: u8, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, filled in finish()
        buf.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | u16::from(cmd)).to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it in
                                                    // nfgenmsg { nfgen_family, version = NFNETLINK_V0, res_id (big endian) = 0 }
        buf.push(libc::AF_INET as u8);
        buf.push(0);
        buf.extend_from_slice(&0u16.to_be_bytes());
        let mut b = MsgBuilder {
            buf,
            nests: Vec::new(),
        };
        b.put_u8(IPSET_ATTR_PROTOCOL, IPSET_PROTOCOL);
        b
    }

    fn put(&mut self, ty: u16, data: &[u8]) {
        let len = u16::try_from(NLA_HDRLEN + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        let aligned = align4(self.buf.len());
        self.buf.resize(aligned, 0);
    }

    fn put_u8(&mut self, ty: u16, v: u8) {
        self.put(ty, &[v]);
    }

    /// ipset wants every u32 (and address) in network order, flagged as such.
    fn put_u32_be(&mut self, ty: u16, v: u32) {
        self.put(ty | NLA_F_NET_BYTEORDER, &v.to_be_bytes());
    }

    fn put_str(&mut self, ty: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.put(ty, &data);
    }

    fn begin_nested(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    fn end_nested(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            if let Some(slot) = self.buf.get_mut(start..start + 2) {
                slot.copy_from_slice(&len.to_ne_bytes());
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end_nested();
        }
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        if let Some(slot) = self.buf.get_mut(0..4) {
            slot.copy_from_slice(&len.to_ne_bytes());
        }
        self.buf
    }
}

fn check_setname(name: &str) -> Result<(), IpsetError> {
    if name.is_empty() || name.len() >= IPSET_MAXNAMELEN || name.contains('\0') {
        return Err(IpsetError::Invalid(format!(
            "invalid set name {name:?} (1..31 bytes, no NUL)"
        )));
    }
    Ok(())
}

fn check_comment(c: &str) -> Result<(), IpsetError> {
    if c.len() > IPSET_MAX_COMMENT_SIZE || c.contains('\0') {
        return Err(IpsetError::Invalid(format!(
            "invalid ipset comment {c:?} (at most 255 bytes, no NUL)"
        )));
    }
    Ok(())
}

/// The ipset family attribute of an address family (NFPROTO_IPV4 = AF_INET, NFPROTO_IPV6 =
/// AF_INET6).
pub(crate) fn family_code(family: Family) -> u8 {
    match family {
        Family::V4 => libc::AF_INET as u8,
        Family::V6 => libc::AF_INET6 as u8,
    }
}

/// CREATE `name` hash:ip family inet (or inet6), with comments, at `revision`.
pub(crate) fn encode_create(
    seq: u32,
    name: &str,
    revision: u8,
    family: Family,
) -> Result<Vec<u8>, IpsetError> {
    check_setname(name)?;
    let mut b = MsgBuilder::new(IPSET_CMD_CREATE, NLM_F_REQUEST | NLM_F_ACK, seq);
    b.put_str(IPSET_ATTR_SETNAME, name);
    b.put_str(IPSET_ATTR_TYPENAME, TYPE_HASH_IP);
    b.put_u8(IPSET_ATTR_REVISION, revision);
    b.put_u8(IPSET_ATTR_FAMILY, family_code(family));
    b.begin_nested(IPSET_ATTR_DATA);
    b.put_u32_be(IPSET_ATTR_HASHSIZE, DEFAULT_HASHSIZE);
    b.put_u32_be(IPSET_ATTR_MAXELEM, DEFAULT_MAXELEM);
    b.put_u32_be(IPSET_ATTR_CADT_FLAGS, IPSET_FLAG_WITH_COMMENT);
    b.end_nested();
    Ok(b.finish())
}

/// DESTROY `name`.
pub(crate) fn encode_destroy(seq: u32, name: &str) -> Result<Vec<u8>, IpsetError> {
    check_setname(name)?;
    let mut b = MsgBuilder::new(IPSET_CMD_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq);
    b.put_str(IPSET_ATTR_SETNAME, name);
    Ok(b.finish())
}

/// ADD (with `comment`) or DEL (comment `None`) one IPv4 or IPv6 entry (the set must be of the
/// address's family: the kernel refuses the other with IPSET_ERR_PROTOCOL/EINVAL). Sent without
/// NLM_F_EXCL, which the kernel reads as `-exist`: adding an existing entry updates its comment,
/// deleting a missing one succeeds.
pub(crate) fn encode_adt(
    seq: u32,
    name: &str,
    ip: IpAddr,
    comment: Option<&str>,
) -> Result<Vec<u8>, IpsetError> {
    check_setname(name)?;
    let cmd = if comment.is_some() {
        IPSET_CMD_ADD
    } else {
        IPSET_CMD_DEL
    };
    let mut b = MsgBuilder::new(cmd, NLM_F_REQUEST | NLM_F_ACK, seq);
    b.put_str(IPSET_ATTR_SETNAME, name);
    b.begin_nested(IPSET_ATTR_DATA);
    b.begin_nested(IPSET_ATTR_IP);
    match ip {
        IpAddr::V4(a) => b.put(IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &a.octets()),
        IpAddr::V6(a) => b.put(IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, &a.octets()),
    }
    b.end_nested();
    if let Some(c) = comment {
        check_comment(c)?;
        b.put_str(IPSET_ATTR_COMMENT, c);
    }
    b.end_nested();
    Ok(b.finish())
}

/// LIST `name` (a dump).
pub(crate) fn encode_list(seq: u32, name: &str) -> Result<Vec<u8>, IpsetError> {
    check_setname(name)?;
    let mut b = MsgBuilder::new(IPSET_CMD_LIST, NLM_F_REQUEST | NLM_F_DUMP, seq);
    b.put_str(IPSET_ATTR_SETNAME, name);
    Ok(b.finish())
}

/// HEADER `name`: type, revision and family of an existing set.
pub(crate) fn encode_header(seq: u32, name: &str) -> Result<Vec<u8>, IpsetError> {
    check_setname(name)?;
    let mut b = MsgBuilder::new(IPSET_CMD_HEADER, NLM_F_REQUEST | NLM_F_ACK, seq);
    b.put_str(IPSET_ATTR_SETNAME, name);
    Ok(b.finish())
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// One netlink message of a reply.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply<'a> {
    /// NLMSG_ERROR with code 0.
    Ack,
    /// NLMSG_ERROR (or a DONE carrying an error) with this positive code.
    Error(i32),
    /// NLMSG_DONE: end of a dump.
    Done,
    /// An ipset message: command and its attributes (after nfgenmsg).
    Data { cmd: u8, attrs: &'a [u8] },
    /// Anything else (NOOP, another subsystem): ignored.
    Other,
}

/// A decoded message header plus body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Msg<'a> {
    pub(crate) seq: u32,
    pub(crate) reply: Reply<'a>,
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes([*s.first()?, *s.get(1)?]))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Some(u32::from_ne_bytes(a))
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    read_u32(b, at).map(|v| i32::from_ne_bytes(v.to_ne_bytes()))
}

/// Splits a datagram into netlink messages. Stops with an error on the first malformed header.
pub(crate) fn parse_messages(mut buf: &[u8]) -> Result<Vec<Msg<'_>>, IpsetError> {
    let bad = |m: &str| IpsetError::Invalid(format!("malformed netlink reply: {m}"));
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len = read_u32(buf, 0).ok_or_else(|| bad("truncated header"))? as usize;
        let ty = read_u16(buf, 4).ok_or_else(|| bad("truncated header"))?;
        let seq = read_u32(buf, 8).ok_or_else(|| bad("truncated header"))?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(bad("bad message length"));
        }
        let payload = buf
            .get(NLMSG_HDRLEN..len)
            .ok_or_else(|| bad("bad message length"))?;
        let reply = match ty {
            NLMSG_ERROR => match read_i32(payload, 0) {
                Some(0) => Reply::Ack,
                Some(e) => Reply::Error(e.checked_neg().unwrap_or(i32::MAX)),
                None => return Err(bad("truncated error message")),
            },
            NLMSG_DONE => match read_i32(payload, 0) {
                Some(e) if e < 0 => Reply::Error(e.checked_neg().unwrap_or(i32::MAX)),
                _ => Reply::Done,
            },
            t if t >> 8 == NFNL_SUBSYS_IPSET => {
                let attrs = payload
                    .get(NFGENMSG_LEN..)
                    .ok_or_else(|| bad("truncated nfgenmsg"))?;
                Reply::Data {
                    cmd: (t & 0xff) as u8,
                    attrs,
                }
            }
            _ => Reply::Other,
        };
        out.push(Msg { seq, reply });
        buf = buf.get(align4(len).min(buf.len())..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Iterates over netlink attributes: (type without flags, payload). Yields an error and stops on
/// a malformed attribute.
pub(crate) struct Nlas<'a> {
    buf: &'a [u8],
    failed: bool,
}

pub(crate) fn nlas(buf: &[u8]) -> Nlas<'_> {
    Nlas { buf, failed: false }
}

impl<'a> Iterator for Nlas<'a> {
    type Item = Result<(u16, &'a [u8]), IpsetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.buf.is_empty() {
            return None;
        }
        let parsed = (|| {
            let len = read_u16(self.buf, 0)? as usize;
            let ty = read_u16(self.buf, 2)?;
            if len < NLA_HDRLEN || len > self.buf.len() {
                return None;
            }
            let payload = self.buf.get(NLA_HDRLEN..len)?;
            let rest = self.buf.get(align4(len).min(self.buf.len())..)?;
            Some((ty & NLA_TYPE_MASK, payload, rest))
        })();
        match parsed {
            Some((ty, payload, rest)) => {
                self.buf = rest;
                Some(Ok((ty, payload)))
            }
            None => {
                self.failed = true;
                Some(Err(IpsetError::Invalid(
                    "malformed netlink attribute".into(),
                )))
            }
        }
    }
}

/// A NUL-terminated (or not) string attribute.
fn attr_str(p: &[u8]) -> String {
    let end = p.iter().position(|&b| b == 0).unwrap_or(p.len());
    String::from_utf8_lossy(p.get(..end).unwrap_or(&[])).into_owned()
}

/// What one LIST/HEADER message says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SetChunk {
    pub(crate) setname: Option<String>,
    pub(crate) typename: Option<String>,
    pub(crate) revision: Option<u8>,
    pub(crate) family: Option<u8>,
    /// Entries (IPv4 or IPv6, as the set's family) with their comments ("" when none).
    pub(crate) entries: Vec<(IpAddr, String)>,
}

/// Decodes the attributes of one LIST (or HEADER) reply message.
pub(crate) fn decode_set_msg(attrs: &[u8]) -> Result<SetChunk, IpsetError> {
    let mut chunk = SetChunk::default();
    for nla in nlas(attrs) {
        let (ty, p) = nla?;
        match ty {
            IPSET_ATTR_SETNAME => chunk.setname = Some(attr_str(p)),
            IPSET_ATTR_TYPENAME => chunk.typename = Some(attr_str(p)),
            IPSET_ATTR_REVISION => chunk.revision = p.first().copied(),
            IPSET_ATTR_FAMILY => chunk.family = p.first().copied(),
            IPSET_ATTR_ADT => {
                for entry in nlas(p) {
                    let (ety, ep) = entry?;
                    if ety != IPSET_ATTR_DATA {
                        continue;
                    }
                    if let Some(e) = decode_entry(ep)? {
                        chunk.entries.push(e);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(chunk)
}

/// One DATA entry of an ADT list; `None` for entries without an address.
fn decode_entry(p: &[u8]) -> Result<Option<(IpAddr, String)>, IpsetError> {
    let mut ip = None;
    let mut comment = String::new();
    for nla in nlas(p) {
        let (ty, v) = nla?;
        match ty {
            IPSET_ATTR_IP => {
                for inner in nlas(v) {
                    let (ity, iv) = inner?;
                    if ity == IPSET_ATTR_IPADDR_IPV4 {
                        if let Ok(o) = <[u8; 4]>::try_from(iv) {
                            ip = Some(IpAddr::V4(Ipv4Addr::from(o)));
                        }
                    } else if ity == IPSET_ATTR_IPADDR_IPV6 {
                        if let Ok(o) = <[u8; 16]>::try_from(iv) {
                            ip = Some(IpAddr::V6(Ipv6Addr::from(o)));
                        }
                    }
                }
            }
            IPSET_ATTR_COMMENT => comment = attr_str(v),
            _ => {}
        }
    }
    Ok(ip.map(|ip| (ip, comment)))
}

mod socket;
pub(crate) use socket::IpsetSocket;

#[cfg(test)]
#[path = "ipset_tests.rs"]
mod tests;
