//! Every interface's IPv4 `rp_filter` in one netlink dump (RTM_GETNETCONF), written by hand as
//! `netlink-packet-route` has no netconf messages.
//!
//! Why: the resync checks the rp_filter of each enrolled pod's host interface. Through /proc/sys
//! that is an open, a read and a close per pod, a path walk through the sysctl tree each time:
//! at 10,000 pods ~50–100 ms and the largest part of the daemon's resync CPU (acni-bench with
//! perf). The kernel hands out the same values for all interfaces in one dump of small messages.
//! The dump names interfaces by index; the caller maps names to indexes.
//!
//! The same socket sends batches of ready-made requests (route adds of a bulk repair): many per
//! `send`, answers matched by sequence number.

use std::collections::HashMap;
use std::io;

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

const RTM_NEWNETCONF: u16 = 80;
const RTM_GETNETCONF: u16 = 82;
const NETCONFA_IFINDEX: u16 = 1;
const NETCONFA_RP_FILTER: u16 = 3;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct netconfmsg` (one byte of family), padded.
const NETCONFMSG_LEN: usize = 4;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The dump request for AF_INET.
pub(crate) fn encode_dump(seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NETCONFMSG_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETNETCONF.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    m
}

/// What one datagram of the answer held.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Part {
    /// (ifindex, rp_filter) of real interfaces (the "all"/"default" pseudo-entries have negative
    /// indexes and are left out).
    pub(crate) entries: Vec<(u32, i32)>,
    /// The dump ended (DONE).
    pub(crate) done: bool,
}

/// Decodes one datagram of the dump answer; messages of other sequence numbers are skipped.
pub(crate) fn decode(mut buf: &[u8], seq: u32) -> io::Result<Part> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netconf: {m}"));
    let mut part = Part::default();
    while !buf.is_empty() {
        let len = u32_at(buf, 0).ok_or_else(|| bad("truncated header"))? as usize;
        let ty = u16_at(buf, 4).ok_or_else(|| bad("truncated header"))?;
        let mseq = u32_at(buf, 8).ok_or_else(|| bad("truncated header"))?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(bad("bad message length"));
        }
        let body = buf.get(NLMSG_HDRLEN..len).unwrap_or(&[]);
        buf = buf.get(align4(len).min(buf.len())..).unwrap_or(&[]);
        if mseq != seq {
            continue;
        }
        match ty {
            NLMSG_DONE => part.done = true,
            NLMSG_ERROR => {
                let code = i32_at(body, 0).ok_or_else(|| bad("truncated error"))?;
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(
                        code.checked_neg().unwrap_or(code),
                    ));
                }
            }
            RTM_NEWNETCONF => {
                let mut attrs = body.get(NETCONFMSG_LEN..).unwrap_or(&[]);
                let (mut ifindex, mut rp) = (None, None);
                while attrs.len() >= 4 {
                    let alen = usize::from(u16_at(attrs, 0).unwrap_or(0));
                    let aty = u16_at(attrs, 2).unwrap_or(0) & 0x3fff;
                    if alen < 4 || alen > attrs.len() {
                        return Err(bad("bad attribute length"));
                    }
                    match aty {
                        NETCONFA_IFINDEX => ifindex = i32_at(attrs, 4),
                        NETCONFA_RP_FILTER => rp = i32_at(attrs, 4),
                        _ => {}
                    }
                    attrs = attrs.get(align4(alen).min(attrs.len())..).unwrap_or(&[]);
                }
                if let (Some(i), Some(v)) = (ifindex, rp) {
                    if let Ok(i) = u32::try_from(i) {
                        part.entries.push((i, v));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(part)
}

/// Requests per `send` in [`NetconfSocket::acked_batch`]. Only failures and the last request of a
/// `send` are answered, each answer in its own buffer of ~1 KiB of the socket's ~208 KiB receive
/// budget: more at once could overflow it if every request failed.
const BATCH: usize = 128;

/// A NETLINK_ROUTE socket for netconf dumps and request batches, bound to the netns of the thread
/// that opened it.
pub(crate) struct NetconfSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl NetconfSocket {
    /// Opens the socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Dumps filtered by the kernel (route dumps by table and protocol in the header), as the
        // rtnetlink connection is; a kernel without it answers with everything, which the
        // callers filter again.
        let _ = sock.set_netlink_get_strict_chk(true);
        let tv = nix::sys::time::TimeVal::new(5, 0);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(io::Error::from)?;
        Ok(NetconfSocket {
            sock,
            seq: 1,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Sends `msgs` (complete netlink requests that ask for an ACK; their sequence numbers and ACK
    /// flags are overwritten) [`BATCH`] per `send` and returns each one's answer in order: 0, or
    /// the positive errno the kernel gave.
    ///
    /// Only the last request of a `send` keeps NLM_F_ACK. The kernel handles the requests of one
    /// `send` in order and answers a request without that flag only when it fails, so once the
    /// last one's answer is in, every failure before it is too, and silence means success. At
    /// 10,000 route adds that is ~80 answers to read instead of 10,000, and as many fewer
    /// acknowledgements the kernel builds (acni-bench with perf: the `recv`s of a restore were
    /// ~17% of the daemon's CPU in it).
    pub(crate) fn acked_batch(&mut self, msgs: &mut [Vec<u8>]) -> io::Result<Vec<i32>> {
        let mut codes = vec![0i32; msgs.len()];
        let mut at = 0;
        let mut req = Vec::new();
        for chunk in msgs.chunks_mut(BATCH) {
            let base = at;
            at += chunk.len();
            // Contiguous sequence numbers for the chunk, never wrapping inside it.
            if self.seq > u32::MAX - BATCH as u32 - 1 {
                self.seq = 0;
            }
            let first_seq = self.seq + 1;
            let last = chunk.len().saturating_sub(1);
            req.clear();
            for (i, m) in chunk.iter_mut().enumerate() {
                self.seq += 1;
                if let Some(slot) = m.get_mut(8..12) {
                    slot.copy_from_slice(&self.seq.to_ne_bytes());
                }
                if let Some(flags) = u16_at(m, 6) {
                    let flags = if i == last {
                        flags | NLM_F_ACK
                    } else {
                        flags & !NLM_F_ACK
                    };
                    if let Some(slot) = m.get_mut(6..8) {
                        slot.copy_from_slice(&flags.to_ne_bytes());
                    }
                }
                req.extend_from_slice(m);
            }
            // Which request of this chunk a sequence number is.
            let index_of = |seq: u32| -> Option<usize> {
                let d = seq.checked_sub(first_seq)? as usize;
                (d <= last).then_some(d)
            };
            self.sock.send(&req, 0)?;
            let mut done = false;
            while !done {
                self.buf.clear();
                let n = self.sock.recv(&mut self.buf, libc::MSG_TRUNC)?;
                let mut b: &[u8] = self.buf.get(..n.min(self.buf.len())).unwrap_or(&[]);
                while b.len() >= NLMSG_HDRLEN {
                    let len = u32_at(b, 0).unwrap_or(0) as usize;
                    if len < NLMSG_HDRLEN || len > b.len() {
                        break;
                    }
                    if u16_at(b, 4) == Some(NLMSG_ERROR) {
                        let seq = u32_at(b, 8).unwrap_or(0);
                        let code = i32_at(b, NLMSG_HDRLEN).unwrap_or(-libc::EIO);
                        if let Some(i) = index_of(seq) {
                            if let Some(c) = codes.get_mut(base + i) {
                                *c = code.checked_neg().unwrap_or(i32::MAX);
                            }
                            done |= i == last;
                        }
                    }
                    b = b.get(align4(len).min(b.len())..).unwrap_or(&[]);
                }
            }
        }
        Ok(codes)
    }

    /// Sends the dump request `req` (its sequence number is overwritten) and hands the type and
    /// body of each message of the answer to `each`, one datagram at a time (in a buffer reused
    /// from dump to dump: nothing per message is kept).
    pub(crate) fn dump(
        &mut self,
        req: &mut [u8],
        mut each: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        if let Some(slot) = req.get_mut(8..12) {
            slot.copy_from_slice(&seq.to_ne_bytes());
        }
        self.sock.send(req, 0)?;
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, format!("dump: {m}"));
        loop {
            self.buf.clear();
            let n = self.sock.recv(&mut self.buf, libc::MSG_TRUNC)?;
            if n > self.buf.len() {
                return Err(bad(format!("reply of {n} bytes truncated")));
            }
            let mut b: &[u8] = &self.buf;
            while !b.is_empty() {
                let len = u32_at(b, 0).ok_or_else(|| bad("truncated header".into()))? as usize;
                let ty = u16_at(b, 4).ok_or_else(|| bad("truncated header".into()))?;
                let mseq = u32_at(b, 8).ok_or_else(|| bad("truncated header".into()))?;
                if len < NLMSG_HDRLEN || len > b.len() {
                    return Err(bad("bad message length".into()));
                }
                let body = b.get(NLMSG_HDRLEN..len).unwrap_or(&[]);
                b = b.get(align4(len).min(b.len())..).unwrap_or(&[]);
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = i32_at(body, 0).ok_or_else(|| bad("truncated error".into()))?;
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(
                                code.checked_neg().unwrap_or(code),
                            ));
                        }
                    }
                    _ => each(ty, body),
                }
            }
        }
    }

    /// rp_filter of every interface, by index.
    pub(crate) fn rp_filters(&mut self) -> io::Result<HashMap<u32, i32>> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        self.sock.send(&encode_dump(seq), 0)?;
        let mut out = HashMap::new();
        loop {
            self.buf.clear();
            let n = self.sock.recv(&mut self.buf, libc::MSG_TRUNC)?;
            if n > self.buf.len() {
                // The kernel sizes dump datagrams to at most 32 KiB, half our buffer.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("netconf: reply of {n} bytes truncated"),
                ));
            }
            let part = decode(&self.buf, seq)?;
            out.extend(part.entries);
            if part.done {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(align4(m.len()), 0);
        m
    }

    fn netconf(ifindex: i32, rp: i32) -> Vec<u8> {
        let mut b = vec![libc::AF_INET as u8, 0, 0, 0];
        for (ty, v) in [
            (NETCONFA_IFINDEX, ifindex),
            (2, 1),
            (NETCONFA_RP_FILTER, rp),
        ] {
            b.extend_from_slice(&8u16.to_ne_bytes());
            b.extend_from_slice(&ty.to_ne_bytes());
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b
    }

    #[test]
    fn request_layout() {
        let m = encode_dump(9);
        assert_eq!(m.len(), 20);
        assert_eq!(u32_at(&m, 0), Some(20));
        assert_eq!(u16_at(&m, 4), Some(RTM_GETNETCONF));
        assert_eq!(u16_at(&m, 6), Some(NLM_F_REQUEST | NLM_F_DUMP));
        assert_eq!(m[16], libc::AF_INET as u8);
    }

    #[test]
    fn decodes_entries_skips_pseudo_interfaces_and_other_sequences() {
        let mut d = msg(RTM_NEWNETCONF, 7, &netconf(-1, 1));
        d.extend(msg(RTM_NEWNETCONF, 7, &netconf(3, 2)));
        d.extend(msg(RTM_NEWNETCONF, 6, &netconf(4, 0)));
        d.extend(msg(RTM_NEWNETCONF, 7, &netconf(5, 0)));
        let p = decode(&d, 7).expect("decodes");
        assert_eq!(p.entries, vec![(3, 2), (5, 0)]);
        assert!(!p.done);
        let p = decode(&msg(NLMSG_DONE, 7, &0i32.to_ne_bytes()), 7).expect("done");
        assert!(p.done);
        let e = decode(&msg(NLMSG_ERROR, 7, &(-libc::EPERM).to_ne_bytes()), 7).expect_err("error");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            if bytes.len() >= 4 && seed & 1 == 0 {
                let l = (bytes.len() as u32).to_ne_bytes();
                bytes[..4].copy_from_slice(&l);
            }
            let _ = decode(&bytes, 7);
        }
    }
}
