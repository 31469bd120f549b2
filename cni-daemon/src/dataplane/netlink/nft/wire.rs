//! nf_tables over netlink (`NFNL_SUBSYS_NFTABLES`), written by hand: message building, batches
//! (one transaction: `NFNL_MSG_BATCH_BEGIN` … `END`, all or nothing), dumps, and a decoder that
//! never indexes without a bounds check. Constants from `linux/netfilter/nf_tables.h` and
//! `linux/netfilter/nfnetlink.h`.

use std::io;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
/// `NFPROTO_INET`: our table's family.
pub(crate) const NFPROTO_INET: u8 = 1;
pub(crate) const NFPROTO_IPV4: u8 = 2;
pub(crate) const NFPROTO_IPV6: u8 = 10;

// Messages.
pub(crate) const NFT_MSG_NEWTABLE: u8 = 0;
pub(crate) const NFT_MSG_GETTABLE: u8 = 1;
pub(crate) const NFT_MSG_DELTABLE: u8 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u8 = 3;
pub(crate) const NFT_MSG_GETCHAIN: u8 = 4;
pub(crate) const NFT_MSG_DELCHAIN: u8 = 5;
pub(crate) const NFT_MSG_NEWRULE: u8 = 6;
pub(crate) const NFT_MSG_GETRULE: u8 = 7;
pub(crate) const NFT_MSG_NEWSET: u8 = 9;
pub(crate) const NFT_MSG_GETSET: u8 = 10;
pub(crate) const NFT_MSG_DELSET: u8 = 11;
pub(crate) const NFT_MSG_NEWSETELEM: u8 = 12;
pub(crate) const NFT_MSG_GETSETELEM: u8 = 13;
pub(crate) const NFT_MSG_DELSETELEM: u8 = 14;
pub(crate) const NFT_MSG_GETGEN: u8 = 16;

// Attributes.
pub(crate) const NFTA_TABLE_NAME: u16 = 1;
pub(crate) const NFTA_CHAIN_TABLE: u16 = 1;
pub(crate) const NFTA_CHAIN_NAME: u16 = 3;
pub(crate) const NFTA_CHAIN_HOOK: u16 = 4;
pub(crate) const NFTA_CHAIN_POLICY: u16 = 5;
pub(crate) const NFTA_CHAIN_TYPE: u16 = 7;
pub(crate) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(crate) const NFTA_HOOK_PRIORITY: u16 = 2;
pub(crate) const NFTA_RULE_TABLE: u16 = 1;
pub(crate) const NFTA_RULE_CHAIN: u16 = 2;
pub(crate) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(crate) const NFTA_RULE_USERDATA: u16 = 7;
pub(crate) const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_EXPR_NAME: u16 = 1;
pub(crate) const NFTA_EXPR_DATA: u16 = 2;
pub(crate) const NFTA_SET_TABLE: u16 = 1;
pub(crate) const NFTA_SET_NAME: u16 = 2;
pub(crate) const NFTA_SET_KEY_TYPE: u16 = 4;
pub(crate) const NFTA_SET_KEY_LEN: u16 = 5;
pub(crate) const NFTA_SET_ID: u16 = 10;
pub(crate) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(crate) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(crate) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(crate) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(crate) const NFTA_SET_ELEM_USERDATA: u16 = 6;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
pub(crate) const NFTA_DATA_VERDICT: u16 = 2;
pub(crate) const NFTA_VERDICT_CODE: u16 = 1;

/// The comment TLV in rule and element userdata (`NFTNL_UDATA_RULE_COMMENT`,
/// `NFTNL_UDATA_SET_ELEM_COMMENT`): what `nft list` prints as `comment "…"`.
pub(crate) const UDATA_COMMENT: u8 = 0;

use crate::dataplane::netlink::nfnl::{NLA_F_NESTED, NLA_TYPE_MASK};
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 1;
pub(crate) const NLM_F_ACK: u16 = 4;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
const NLM_F_DUMP: u16 = 0x300;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A failed nf_tables request.
#[derive(Debug)]
pub(crate) enum NftError {
    /// The kernel answered with this (positive) errno; `index` is the message of the batch it
    /// was about (0 = the first after BEGIN), when known.
    Kernel { code: i32, index: Option<usize> },
    /// Socket I/O failed.
    Io(io::Error),
    /// The answer did not parse, or the request could not be encoded.
    Invalid(String),
}

impl NftError {
    /// The errno of a kernel answer.
    pub(crate) fn code(&self) -> Option<i32> {
        match self {
            NftError::Kernel { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl std::fmt::Display for NftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NftError::Kernel { code, index } => {
                write!(f, "{}", io::Error::from_raw_os_error(*code))?;
                if let Some(i) = index {
                    write!(f, " (message {i} of the batch)")?;
                }
                Ok(())
            }
            NftError::Io(e) => write!(f, "socket: {e}"),
            NftError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

/// One nf_tables message: nlmsghdr + nfgenmsg (family inet) + attributes. Integers in
/// attributes are big-endian, as nf_tables wants them (`put_be32`).
pub(crate) struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    /// A message of type `msg` with `flags` (NLM_F_REQUEST is always set).
    pub(crate) fn new(msg: u8, flags: u16) -> Self {
        Self::raw(
            (NFNL_SUBSYS_NFTABLES << 8) | u16::from(msg),
            flags,
            NFPROTO_INET,
        )
    }

    /// Like [`Msg::new`] for another family (`NFPROTO_IPV4`, `NFPROTO_IPV6`, 0 for all).
    pub(crate) fn of_family(msg: u8, flags: u16, family: u8) -> Self {
        Self::raw((NFNL_SUBSYS_NFTABLES << 8) | u16::from(msg), flags, family)
    }

    fn raw(ty: u16, flags: u16, family: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq, set when sent
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&0u16.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    /// Raw attribute.
    pub(crate) fn put(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        let aligned = align4(self.buf.len());
        self.buf.resize(aligned, 0);
        self
    }

    /// A NUL-terminated string.
    pub(crate) fn put_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut d = Vec::with_capacity(s.len() + 1);
        d.extend_from_slice(s.as_bytes());
        d.push(0);
        self.put(ty, &d)
    }

    /// A big-endian u32.
    pub(crate) fn put_be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_be_bytes())
    }

    /// Opens a nested attribute; [`Msg::end`] closes it.
    pub(crate) fn begin(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost nested attribute.
    pub(crate) fn end(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            if let Some(slot) = self.buf.get_mut(start..start + 2) {
                slot.copy_from_slice(&len.to_ne_bytes());
            }
        }
        self
    }

    fn finish(mut self, seq: u32) -> Result<Vec<u8>, NftError> {
        while !self.nests.is_empty() {
            self.end();
        }
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        if self.buf.len() > usize::from(u16::MAX) * 16 {
            return Err(NftError::Invalid(format!("message of {len} bytes")));
        }
        if let Some(slot) = self.buf.get_mut(0..4) {
            slot.copy_from_slice(&len.to_ne_bytes());
        }
        if let Some(slot) = self.buf.get_mut(8..12) {
            slot.copy_from_slice(&seq.to_ne_bytes());
        }
        Ok(self.buf)
    }
}

/// Userdata holding one comment TLV (at most 252 bytes of text, no NUL: the kernel keeps 256 bytes of userdata).
pub(crate) fn comment_udata(text: &str) -> Result<Vec<u8>, NftError> {
    if text.len() > 252 || text.contains('\0') {
        return Err(NftError::Invalid(format!(
            "comment {text:?} is longer than 252 bytes or holds a NUL"
        )));
    }
    let mut v = Vec::with_capacity(text.len() + 3);
    v.push(UDATA_COMMENT);
    v.push(u8::try_from(text.len() + 1).unwrap_or(u8::MAX));
    v.extend_from_slice(text.as_bytes());
    v.push(0);
    Ok(v)
}

/// The comment in userdata, if there is one.
pub(crate) fn comment_of(mut udata: &[u8]) -> Option<&str> {
    while let (Some(ty), Some(len)) = (udata.first(), udata.get(1)) {
        let len = usize::from(*len);
        let value = udata.get(2..2 + len)?;
        if *ty == UDATA_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return std::str::from_utf8(text).ok();
        }
        udata = udata.get(2 + len..)?;
    }
    None
}

/// Iterates over netlink attributes: (type without flags, payload); stops with an error on a
/// malformed one.
pub(crate) fn nlas(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), NftError>> {
    let mut rest = buf;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || rest.is_empty() {
            return None;
        }
        let (Some(len), Some(ty)) = (read_u16(rest, 0), read_u16(rest, 2)) else {
            failed = true;
            return Some(Err(NftError::Invalid("truncated attribute".into())));
        };
        let len = usize::from(len);
        let Some(payload) = (len >= 4).then(|| rest.get(4..len)).flatten() else {
            failed = true;
            return Some(Err(NftError::Invalid("bad attribute length".into())));
        };
        rest = rest.get(align4(len).min(rest.len())..).unwrap_or(&[]);
        Some(Ok((ty & NLA_TYPE_MASK, payload)))
    })
}

/// The first attribute of type `ty` in `buf`.
pub(crate) fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    nlas(buf).flatten().find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// A NUL-terminated string attribute.
pub(crate) fn attr_str(buf: &[u8], ty: u16) -> Option<&str> {
    let v = attr(buf, ty)?;
    std::str::from_utf8(v.strip_suffix(&[0]).unwrap_or(v)).ok()
}

/// A big-endian u32 attribute.
pub(crate) fn attr_be32(buf: &[u8], ty: u16) -> Option<u32> {
    let v = attr(buf, ty)?;
    Some(u32::from_be_bytes(v.get(0..4)?.try_into().ok()?))
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One message of a reply.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply<'a> {
    Ack,
    Error(i32),
    Done,
    /// An nf_tables message: its type (low byte) and attributes after nfgenmsg.
    Data {
        msg: u8,
        attrs: &'a [u8],
    },
    Other,
}

/// Splits a datagram into (seq, reply).
pub(crate) fn parse(mut buf: &[u8]) -> Result<Vec<(u32, Reply<'_>)>, NftError> {
    let bad = |m: &str| NftError::Invalid(format!("malformed netlink reply: {m}"));
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len = read_u32(buf, 0).ok_or_else(|| bad("truncated header"))? as usize;
        let ty = read_u16(buf, 4).ok_or_else(|| bad("truncated header"))?;
        let seq = read_u32(buf, 8).ok_or_else(|| bad("truncated header"))?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(bad("bad message length"));
        }
        let payload = buf.get(NLMSG_HDRLEN..len).ok_or_else(|| bad("length"))?;
        let code =
            || read_u32(payload, 0).map(|c| i32::from_ne_bytes(c.to_ne_bytes()).saturating_neg());
        let reply = match ty {
            NLMSG_ERROR => match code() {
                Some(0) => Reply::Ack,
                Some(c) => Reply::Error(c),
                None => return Err(bad("truncated error")),
            },
            NLMSG_DONE => match code() {
                Some(c) if c > 0 => Reply::Error(c),
                _ => Reply::Done,
            },
            t if t >> 8 == NFNL_SUBSYS_NFTABLES => Reply::Data {
                msg: (t & 0xff) as u8,
                attrs: payload.get(NFGENMSG_LEN..).ok_or_else(|| bad("nfgenmsg"))?,
            },
            _ => Reply::Other,
        };
        out.push((seq, reply));
        buf = buf.get(align4(len).min(buf.len())..).unwrap_or(&[]);
    }
    Ok(out)
}

const RECV_BUF: usize = 1 << 20;

/// `NFNLGRP_NFTABLES`: the multicast group of nf_tables change notifications.
const NFNLGRP_NFTABLES: u32 = 7;

/// Netlink ports of our own open nf_tables sockets: what they change is no damage.
static OWN_PORTS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn own_ports() -> std::sync::MutexGuard<'static, Vec<u32>> {
    OWN_PORTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A socket subscribed to nf_tables' change notifications, in the namespace of the thread that
/// opened it.
pub(crate) struct NftMonitor {
    sock: Socket,
    buf: Vec<u8>,
}

impl NftMonitor {
    /// Opens and subscribes.
    pub(crate) fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.add_membership(NFNLGRP_NFTABLES)?;
        let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
        Ok(NftMonitor {
            sock,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Makes [`NftMonitor::wait`] give up after `d` without a notification (`WouldBlock`).
    pub(crate) fn set_timeout(&self, d: std::time::Duration) -> io::Result<()> {
        let tv = nix::sys::time::TimeVal::new(
            d.as_secs() as libc::time_t,
            d.subsec_micros() as libc::suseconds_t,
        );
        nix::sys::socket::setsockopt(&self.sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(io::Error::from)
    }

    /// Blocks until someone other than us changed table `table` of family inet (or the kernel
    /// dropped notifications: ENOBUFS, which may have hidden one).
    pub(crate) fn wait(&mut self, table: &str) -> io::Result<()> {
        loop {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, 0) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if touches(&self.buf, table) {
                return Ok(());
            }
        }
    }
}

/// Does this datagram of notifications change `table` (inet), by someone other than us?
pub(crate) fn touches(mut buf: &[u8], table: &str) -> bool {
    while let (Some(len), Some(ty), Some(pid)) =
        (read_u32(buf, 0), read_u16(buf, 4), read_u32(buf, 12))
    {
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return false;
        }
        let payload = buf.get(NLMSG_HDRLEN..len).unwrap_or(&[]);
        let ours = own_ports().contains(&pid);
        // NEWGEN (15) closes every transaction: no object of its own.
        if ty >> 8 == NFNL_SUBSYS_NFTABLES && ty & 0xff != 15 && !ours {
            let family = payload.first().copied();
            // Attribute 1 is the table's name in table, chain, rule, set and element messages.
            let name = payload.get(NFGENMSG_LEN..).and_then(|a| attr_str(a, 1));
            if family == Some(NFPROTO_INET) && name == Some(table) {
                return true;
            }
        }
        buf = buf.get(align4(len).min(buf.len())..).unwrap_or(&[]);
    }
    false
}

/// A NETLINK_NETFILTER socket in the namespace of the thread that opened it.
pub(crate) struct NftSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Our netlink port (kept in [`OWN_PORTS`] while the socket is open).
    port: u32,
}

impl Drop for NftSocket {
    fn drop(&mut self) {
        let mut p = own_ports();
        if let Some(i) = p.iter().position(|x| *x == self.port) {
            p.swap_remove(i);
        }
    }
}

impl NftSocket {
    /// Opens the socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        let sock = crate::dataplane::netlink::nfnl::request_socket()?;
        // A bulk repair sends a few hundred KiB in one batch.
        let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SndBuf, &(4 << 20));
        let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
        let mut addr = SocketAddr::new(0, 0);
        sock.get_address(&mut addr)?;
        let port = addr.port_number();
        own_ports().push(port);
        Ok(NftSocket {
            sock,
            seq: 1,
            buf: Vec::with_capacity(RECV_BUF),
            port,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn recv(&mut self) -> Result<(), NftError> {
        self.buf.clear();
        let n = self
            .sock
            .recv(&mut self.buf, libc::MSG_TRUNC)
            .map_err(NftError::Io)?;
        if n > self.buf.len() {
            return Err(NftError::Invalid(format!(
                "netlink reply of {n} bytes truncated"
            )));
        }
        Ok(())
    }

    /// Sends `msgs` as one transaction (every message asks for an ACK, and the kernel answers
    /// each once the whole batch is done) and waits for all answers. The first error found is
    /// returned; then nothing of the batch took effect.
    pub(crate) fn batch(&mut self, msgs: Vec<Msg>) -> Result<(), NftError> {
        if msgs.is_empty() {
            return Ok(());
        }
        let begin_seq = self.next_seq();
        let mut req = Msg::raw(NFNL_MSG_BATCH_BEGIN, 0, 0);
        req.buf[16 + 2..16 + 4].copy_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        let mut out = req.finish(begin_seq)?;
        let first = begin_seq.wrapping_add(1);
        let n = msgs.len();
        for mut m in msgs {
            let seq = self.next_seq();
            if let Some(f) = m.buf.get_mut(6..8) {
                let flags = u16::from_ne_bytes([f[0], f[1]]) | NLM_F_ACK;
                f.copy_from_slice(&flags.to_ne_bytes());
            }
            out.extend(m.finish(seq)?);
        }
        let end_seq = self.next_seq();
        let mut end = Msg::raw(NFNL_MSG_BATCH_END, 0, 0);
        end.buf[16 + 2..16 + 4].copy_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        out.extend(end.finish(end_seq)?);
        self.sock.send(&out, 0).map_err(NftError::Io)?;
        let mut answered = 0usize;
        let mut first_err: Option<NftError> = None;
        while answered < n {
            self.recv()?;
            for (seq, r) in parse(&self.buf)? {
                let index = seq.wrapping_sub(first) as usize;
                if seq == begin_seq || seq == end_seq {
                    // The batch as a whole was refused (no nf_tables, say).
                    if let Reply::Error(code) = r {
                        return Err(NftError::Kernel { code, index: None });
                    }
                    continue;
                }
                if index >= n {
                    continue; // a late answer to an earlier request
                }
                match r {
                    Reply::Ack => answered += 1,
                    Reply::Error(code) => {
                        answered += 1;
                        first_err.get_or_insert(NftError::Kernel {
                            code,
                            index: Some(index),
                        });
                    }
                    _ => {}
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends `msg` with `flag` (`NLM_F_DUMP`, `NLM_F_ACK`) added to its flags; its sequence.
    fn send_flagged(&mut self, mut msg: Msg, flag: u16) -> Result<u32, NftError> {
        let seq = self.next_seq();
        if let Some(fl) = msg.buf.get_mut(6..8) {
            let flags = u16::from_ne_bytes([fl[0], fl[1]]) | flag;
            fl.copy_from_slice(&flags.to_ne_bytes());
        }
        let req = msg.finish(seq)?;
        self.sock.send(&req, 0).map_err(NftError::Io)?;
        Ok(seq)
    }

    /// Hands every reply to `seq` to `on` until it says the answer is complete (`Some`); a
    /// kernel error ends it first.
    fn replies<T>(
        &mut self,
        seq: u32,
        mut on: impl FnMut(Reply<'_>) -> Option<T>,
    ) -> Result<T, NftError> {
        loop {
            self.recv()?;
            for (s, r) in parse(&self.buf)? {
                if s != seq {
                    continue;
                }
                if let Reply::Error(code) = r {
                    return Err(NftError::Kernel { code, index: None });
                }
                if let Some(t) = on(r) {
                    return Ok(t);
                }
            }
        }
    }

    /// A dump: hands (message type, attributes) of every data reply to `f`.
    pub(crate) fn dump(&mut self, msg: Msg, mut f: impl FnMut(u8, &[u8])) -> Result<(), NftError> {
        let seq = self.send_flagged(msg, NLM_F_DUMP)?;
        self.replies(seq, |r| match r {
            Reply::Done => Some(()),
            Reply::Data { msg, attrs } => {
                f(msg, attrs);
                None
            }
            _ => None,
        })
    }

    /// One request answered by an ACK or an error (GETGEN: is nf_tables there?).
    pub(crate) fn request(&mut self, msg: Msg) -> Result<(), NftError> {
        let seq = self.send_flagged(msg, NLM_F_ACK)?;
        self.replies(seq, |r| matches!(r, Reply::Ack).then_some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_round_trip() {
        let u = comment_udata("-i istioin -j RETURN").expect("fits");
        assert_eq!(comment_of(&u), Some("-i istioin -j RETURN"));
        assert!(comment_udata(&"x".repeat(253)).is_err());
        assert!(comment_udata(&"x".repeat(252)).is_ok());
        assert_eq!(comment_of(&[0, 200, 1]), None);
        assert_eq!(comment_of(&[]), None);
    }

    #[test]
    fn nested_attributes_decode() {
        let mut m = Msg::new(NFT_MSG_NEWTABLE, 0);
        m.put_str(NFTA_TABLE_NAME, "ambient-cni");
        m.begin(NFTA_CHAIN_HOOK)
            .put_be32(NFTA_HOOK_HOOKNUM, 3)
            .end();
        let b = m.finish(7).expect("encodes");
        let msgs = parse(&b).expect("parses");
        let Some((7, Reply::Data { msg, attrs })) = msgs.first() else {
            panic!("{msgs:?}")
        };
        assert_eq!(*msg, NFT_MSG_NEWTABLE);
        assert_eq!(attr_str(attrs, NFTA_TABLE_NAME), Some("ambient-cni"));
        let hook = attr(attrs, NFTA_CHAIN_HOOK).expect("hook");
        assert_eq!(attr_be32(hook, NFTA_HOOK_HOOKNUM), Some(3));
    }

    #[test]
    fn notifications_of_our_table_by_others_count() {
        let mut m = Msg::new(NFT_MSG_DELCHAIN, 0);
        m.put_str(NFTA_CHAIN_TABLE, "ambient-cni")
            .put_str(NFTA_CHAIN_NAME, "ip-mangle-prerouting");
        let mut b = m.finish(1).expect("encodes");
        b[12..16].copy_from_slice(&4242u32.to_ne_bytes());
        assert!(touches(&b, "ambient-cni"));
        assert!(!touches(&b, "ambient-cni-other"));
        own_ports().push(4242);
        assert!(!touches(&b, "ambient-cni"), "our own change");
        own_ports().retain(|p| *p != 4242);
        for cut in 0..b.len() {
            let _ = touches(&b[..cut], "ambient-cni");
        }
    }

    #[test]
    fn garbage_never_panics() {
        for cut in 0..64 {
            let bytes: Vec<u8> = (0..cut).map(|i| (i * 37) as u8).collect();
            let _ = parse(&bytes);
            let _ = nlas(&bytes).count();
            let _ = comment_of(&bytes);
        }
        assert!(nlas(&[0, 0, 1, 0]).any(|r| r.is_err()));
    }
}
