//! The ipset socket: one NETLINK_NETFILTER socket per netns worker, requests and dumps over it
//! (the codec is in the parent module).

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;

use netlink_sys::Socket;

use super::*;
use crate::model::Family;

/// A NETLINK_NETFILTER socket, bound to the netns of the thread that opened it.
pub(crate) struct IpsetSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// Requests per `send` in [`IpsetSocket::add_many`]. The kernel queues all their
/// acknowledgements before `send` returns, each in its own buffer (~1 KiB of the socket's receive
/// budget, ~208 KiB by default): more at once would overflow it and lose answers.
const ADD_BATCH: usize = 128;

/// Receive buffer: large enough for any dump message the kernel builds (it sizes them to at most
/// 32 KiB plus one entry, or to what we read before).
const RECV_BUF: usize = 256 * 1024;

impl IpsetSocket {
    /// Opens the socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        let sock = crate::dataplane::netlink::nfnl::request_socket()?;
        Ok(IpsetSocket {
            sock,
            seq: 1,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends one request and collects the attribute blocks of its data replies until the ACK
    /// (or DONE for a dump). A kernel error ends it with `IpsetError::Kernel`.
    fn transact(&mut self, msg: &[u8], seq: u32, dump: bool) -> Result<Vec<Vec<u8>>, IpsetError> {
        let mut data = Vec::new();
        self.exchange(msg, seq, dump, |attrs| {
            data.push(attrs.to_vec());
            Ok(())
        })?;
        Ok(data)
    }

    /// Sends one request and hands the attribute block of each of its data replies to `on_data`,
    /// one reply datagram at a time, until the ACK (or DONE for a dump). A kernel error ends it
    /// with `IpsetError::Kernel`, an error of `on_data` with that error.
    fn exchange(
        &mut self,
        msg: &[u8],
        seq: u32,
        dump: bool,
        mut on_data: impl FnMut(&[u8]) -> Result<(), IpsetError>,
    ) -> Result<(), IpsetError> {
        self.sock.send(msg, 0).map_err(IpsetError::Io)?;
        loop {
            self.buf.clear();
            let n = self
                .sock
                .recv(&mut self.buf, libc::MSG_TRUNC)
                .map_err(IpsetError::Io)?;
            if n > self.buf.len() {
                return Err(IpsetError::Invalid(format!(
                    "netlink reply of {n} bytes truncated"
                )));
            }
            for m in parse_messages(&self.buf)? {
                if m.seq != seq {
                    continue; // a late answer to an earlier (timed out) request
                }
                match m.reply {
                    Reply::Ack if !dump => return Ok(()),
                    Reply::Ack | Reply::Other => {}
                    Reply::Error(code) => return Err(IpsetError::Kernel(code)),
                    Reply::Done => return Ok(()),
                    Reply::Data { attrs, .. } => on_data(attrs)?,
                }
            }
        }
    }

    /// Creates the set (hash:ip, inet or inet6, comments). Existing with the same parameters is
    /// success. Tries the newest revision first and falls back while the kernel does not know it.
    pub(crate) fn create(&mut self, name: &str, family: Family) -> Result<u8, IpsetError> {
        let mut last = IpsetError::Kernel(IPSET_ERR_FIND_TYPE);
        for rev in HASH_IP_REVISIONS {
            let seq = self.next_seq();
            let msg = encode_create(seq, name, rev, family)?;
            match self.transact(&msg, seq, false) {
                Ok(_) => return Ok(rev),
                Err(IpsetError::Kernel(IPSET_ERR_FIND_TYPE)) => {
                    last = IpsetError::Kernel(IPSET_ERR_FIND_TYPE)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Type name, revision and family of an existing set.
    pub(crate) fn header(&mut self, name: &str) -> Result<SetChunk, IpsetError> {
        let seq = self.next_seq();
        let msg = encode_header(seq, name)?;
        let data = self.transact(&msg, seq, false)?;
        match data.first() {
            Some(attrs) => decode_set_msg(attrs),
            None => Err(IpsetError::Invalid("HEADER answered without data".into())),
        }
    }

    /// Destroys the set.
    pub(crate) fn destroy(&mut self, name: &str) -> Result<(), IpsetError> {
        let seq = self.next_seq();
        let msg = encode_destroy(seq, name)?;
        self.transact(&msg, seq, false).map(drop)
    }

    /// Adds (or updates the comment of) one entry.
    pub(crate) fn add(&mut self, name: &str, ip: IpAddr, comment: &str) -> Result<(), IpsetError> {
        let seq = self.next_seq();
        let msg = encode_adt(seq, name, ip, Some(comment))?;
        self.transact(&msg, seq, false).map(drop)
    }

    /// Adds (or updates) many entries, pipelined: up to [`ADD_BATCH`] requests go out in one
    /// `send`, and only the last of them asks for an acknowledgement. The kernel handles the
    /// requests of one `send` in order and answers one without NLM_F_ACK only when it fails, so
    /// once the last answer is in, every failure is known and silence means success (10,000 adds:
    /// ~80 answers to read instead of 10,000). One result per entry, in order; a failure of one
    /// entry does not stop the others.
    pub(crate) fn add_many(
        &mut self,
        name: &str,
        entries: &[(IpAddr, String)],
    ) -> Vec<Result<(), IpsetError>> {
        let mut out: Vec<Result<(), IpsetError>> = Vec::with_capacity(entries.len());
        let mut req = Vec::with_capacity(ADD_BATCH * 96);
        for chunk in entries.chunks(ADD_BATCH) {
            // seq → index in `out` of the requests sent; entries that do not encode fail at once.
            let mut pending = std::collections::HashMap::with_capacity(chunk.len());
            req.clear();
            // (offset in `req`, seq) of the last request.
            let mut last = None;
            for (ip, comment) in chunk {
                let seq = self.next_seq();
                match encode_adt(seq, name, *ip, Some(comment)) {
                    Ok(mut m) => {
                        if let Some(flags) = m.get_mut(6..8) {
                            let f = u16::from_ne_bytes([flags[0], flags[1]]) & !NLM_F_ACK;
                            flags.copy_from_slice(&f.to_ne_bytes());
                        }
                        last = Some((req.len(), seq));
                        req.extend_from_slice(&m);
                        pending.insert(seq, out.len());
                        out.push(Ok(()));
                    }
                    Err(e) => out.push(Err(e)),
                }
            }
            let Some((last_at, last_seq)) = last else {
                continue;
            };
            if let Some(flags) = req.get_mut(last_at + 6..last_at + 8) {
                let f = u16::from_ne_bytes([flags[0], flags[1]]) | NLM_F_ACK;
                flags.copy_from_slice(&f.to_ne_bytes());
            }
            let fail_all = |out: &mut Vec<Result<(), IpsetError>>, e: &dyn Fn() -> IpsetError| {
                for i in pending.values() {
                    if let Some(r) = out.get_mut(*i) {
                        *r = Err(e());
                    }
                }
            };
            if let Err(e) = self.sock.send(&req, 0) {
                fail_all(&mut out, &|| {
                    IpsetError::Io(io::Error::new(e.kind(), e.to_string()))
                });
                continue;
            }
            let mut done = false;
            while !done {
                self.buf.clear();
                let n = match self.sock.recv(&mut self.buf, libc::MSG_TRUNC) {
                    Ok(n) => n,
                    Err(e) => {
                        // Unknown which requests took effect: all of the chunk count as failed
                        // (the caller retries; adds are idempotent).
                        fail_all(&mut out, &|| {
                            IpsetError::Io(io::Error::new(e.kind(), e.to_string()))
                        });
                        break;
                    }
                };
                let msgs = if n > self.buf.len() {
                    Err(IpsetError::Invalid(format!(
                        "netlink reply of {n} bytes truncated"
                    )))
                } else {
                    parse_messages(&self.buf)
                };
                let msgs = match msgs {
                    Ok(m) => m,
                    Err(e) => {
                        let text = e.to_string();
                        fail_all(&mut out, &|| IpsetError::Invalid(text.clone()));
                        break;
                    }
                };
                for m in msgs {
                    let res = match m.reply {
                        Reply::Ack => Ok(()),
                        Reply::Error(code) => Err(IpsetError::Kernel(code)),
                        _ => continue,
                    };
                    if let Some(i) = pending.get(&m.seq) {
                        if let Some(r) = out.get_mut(*i) {
                            *r = res;
                        }
                        done |= m.seq == last_seq;
                    }
                }
            }
        }
        out
    }

    /// Deletes one entry.
    pub(crate) fn del(&mut self, name: &str, ip: IpAddr) -> Result<(), IpsetError> {
        let seq = self.next_seq();
        let msg = encode_adt(seq, name, ip, None)?;
        self.transact(&msg, seq, false).map(drop)
    }

    /// Hands each entry of set `name` to `f`, one reply datagram at a time: nothing per entry is
    /// kept (a resync compares 10,000 entries with what it wants; as a map of owner strings, plus
    /// a copy of every reply message, the list was ~2 MB per resync).
    pub(crate) fn list_visit(
        &mut self,
        name: &str,
        mut f: impl FnMut(IpAddr, &str),
    ) -> Result<(), IpsetError> {
        let seq = self.next_seq();
        let msg = encode_list(seq, name)?;
        self.exchange(&msg, seq, true, |attrs| {
            let chunk = decode_set_msg(attrs)?;
            if chunk.setname.as_deref().is_none_or(|n| n == name) {
                for (ip, owner) in &chunk.entries {
                    f(*ip, owner);
                }
            }
            Ok(())
        })
    }

    /// All entries with their comments.
    pub(crate) fn list(&mut self, name: &str) -> Result<BTreeMap<IpAddr, String>, IpsetError> {
        let seq = self.next_seq();
        let msg = encode_list(seq, name)?;
        let mut out = BTreeMap::new();
        for attrs in self.transact(&msg, seq, true)? {
            let chunk = decode_set_msg(&attrs)?;
            if chunk.setname.as_deref().is_some_and(|n| n != name) {
                continue;
            }
            out.extend(chunk.entries);
        }
        Ok(out)
    }
}
