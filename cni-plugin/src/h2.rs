//! One unary gRPC call over HTTP/2 on a unix socket: blocking I/O, one deadline, no runtime.
//!
//! Why by hand: the plugin is a process per pod event, so what it costs is mostly start-up. tonic
//! brings a tokio runtime, hyper, tower and h2 along, and with them a larger binary with more
//! pages to fault in and more work before the first byte goes out. A unary call needs a small
//! part of HTTP/2: the client preface, SETTINGS, one request (HEADERS + DATA) sent in one write,
//! then reading frames until the stream ends, answering SETTINGS and PING, honouring flow control
//! for large requests, and decoding HPACK (static and dynamic table, Huffman) in the replies.
//! The wire format is unchanged: the daemon's tonic server (and any gRPC tool) sees a normal
//! client. Everything received is bounds-checked; nothing here panics on bad input.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// gRPC status codes, named as tonic names them (their `Debug` text is part of our error details).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 0
    Ok,
    /// 1
    Cancelled,
    /// 2
    Unknown,
    /// 3
    InvalidArgument,
    /// 4
    DeadlineExceeded,
    /// 5
    NotFound,
    /// 6
    AlreadyExists,
    /// 7
    PermissionDenied,
    /// 8
    ResourceExhausted,
    /// 9
    FailedPrecondition,
    /// 10
    Aborted,
    /// 11
    OutOfRange,
    /// 12
    Unimplemented,
    /// 13
    Internal,
    /// 14
    Unavailable,
    /// 15
    DataLoss,
    /// 16
    Unauthenticated,
}

impl Code {
    /// The code of a `grpc-status` value; unknown numbers are `Unknown`, as the spec says.
    pub fn from_i32(n: i32) -> Code {
        use Code::*;
        match n {
            0 => Ok,
            1 => Cancelled,
            3 => InvalidArgument,
            4 => DeadlineExceeded,
            5 => NotFound,
            6 => AlreadyExists,
            7 => PermissionDenied,
            8 => ResourceExhausted,
            9 => FailedPrecondition,
            10 => Aborted,
            11 => OutOfRange,
            12 => Unimplemented,
            13 => Internal,
            14 => Unavailable,
            15 => DataLoss,
            16 => Unauthenticated,
            _ => Unknown,
        }
    }
}

/// A gRPC status other than OK (or a transport failure expressed as one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The code.
    pub code: Code,
    /// The message (percent-decoded `grpc-message`).
    pub message: String,
}

impl Status {
    /// A status with this code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }
}

/// Why a call did not return a reply.
#[derive(Debug)]
pub enum CallError {
    /// The socket could not be dialled.
    Connect(io::Error),
    /// The deadline passed.
    Deadline,
    /// The daemon answered with a status, or the connection failed after it was made.
    Status(Status),
}

// ---------------------------------------------------------------------------------------------
// Frames

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// The spec's initial flow-control window and frame size.
const DEFAULT_WINDOW: i64 = 65_535;
const DEFAULT_MAX_FRAME: usize = 16_384;
/// Our (default) HPACK table size: what the daemon's encoder may use.
const HPACK_TABLE: usize = 4096;
/// A reply larger than this is refused (the plugin's replies are a few bytes).
const MAX_REPLY: usize = 16 << 20;

/// The only stream we open.
const STREAM: u32 = 1;

fn frame_header(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).min(0x00ff_ffff);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    frame_header(out, payload.len(), ty, flags, stream);
    out.extend_from_slice(payload);
}

// ---------------------------------------------------------------------------------------------
// HPACK (RFC 7541)

/// An HPACK integer with an `n`-bit prefix; `first` holds the bits above the prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// "Literal header field without indexing" with a static-table name (`idx`) or a new name.
fn hpack_literal(out: &mut Vec<u8>, idx: usize, name: &str, value: &str) {
    hpack_int(out, 0, 4, idx);
    if idx == 0 {
        hpack_str(out, name.as_bytes());
    }
    hpack_str(out, value.as_bytes());
}

/// The request's header block: every field literal or statically indexed, so the daemon's
/// decoder table is never touched.
fn request_headers(method: &str, timeout: Duration) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    b.push(0x80 | 3); // :method POST
    b.push(0x80 | 6); // :scheme http
    hpack_literal(&mut b, 4, ":path", method);
    hpack_literal(&mut b, 1, ":authority", "localhost");
    hpack_literal(&mut b, 31, "content-type", "application/grpc");
    hpack_literal(&mut b, 0, "te", "trailers");
    // At most 8 digits (the gRPC spec); milliseconds cover our 2-minute cap.
    let ms = timeout.as_millis().clamp(1, 99_999_999);
    hpack_literal(&mut b, 0, "grpc-timeout", &format!("{ms}m"));
    hpack_literal(&mut b, 58, "user-agent", "ambient-cni");
    b
}

const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Code lengths of the HPACK Huffman code for symbols 0..=255 (EOS, 256, is 30 bits). The code is
/// canonical (RFC 7541 Appendix B assigns codes in order of length, then symbol), so the lengths
/// define it; a unit test checks samples of the RFC's table.
const HUFFMAN_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];
const EOS: u16 = 256;
const EOS_LEN: usize = 30;

fn huffman_len(sym: u16) -> usize {
    if sym == EOS {
        EOS_LEN
    } else {
        usize::from(HUFFMAN_LENGTHS.get(usize::from(sym)).copied().unwrap_or(30))
    }
}

/// The canonical decoding tables: symbols ordered by (length, symbol), and per length the count.
fn huffman_tables() -> ([u16; 257], [u16; EOS_LEN + 1]) {
    let mut syms = [0u16; 257];
    for (i, s) in syms.iter_mut().enumerate() {
        *s = i as u16;
    }
    syms.sort_by_key(|s| (huffman_len(*s), *s));
    let mut counts = [0u16; EOS_LEN + 1];
    for s in 0..=EOS {
        if let Some(c) = counts.get_mut(huffman_len(s)) {
            *c += 1;
        }
    }
    (syms, counts)
}

/// Decodes a Huffman-coded string. Padding must be at most 7 one-bits (the EOS prefix).
pub(crate) fn huffman_decode(input: &[u8]) -> Result<Vec<u8>, String> {
    let (syms, counts) = huffman_tables();
    let mut out = Vec::with_capacity(input.len() * 8 / 5);
    // Canonical decoding: `code` holds the bits read for the current symbol, `first` the first
    // code of the current length, `index` the position of that length's first symbol.
    let (mut code, mut first, mut index, mut len) = (0u32, 0u32, 0u32, 0usize);
    let mut ones = true;
    for byte in input {
        for bit in (0..8).rev() {
            let b = u32::from((byte >> bit) & 1);
            code |= b;
            ones &= b == 1;
            len += 1;
            let count = u32::from(counts.get(len).copied().unwrap_or(0));
            if code.wrapping_sub(first) < count && code >= first {
                let pos = (index + code - first) as usize;
                let sym = syms.get(pos).copied().ok_or("huffman: bad code")?;
                if sym == EOS {
                    return Err("huffman: EOS in a string".into());
                }
                out.push(sym as u8);
                (code, first, index, len) = (0, 0, 0, 0);
                ones = true;
                continue;
            }
            if len >= EOS_LEN {
                return Err("huffman: code longer than 30 bits".into());
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
    }
    if len > 7 || !ones {
        return Err("huffman: bad padding".into());
    }
    Ok(out)
}

/// An HPACK decoder with its dynamic table.
pub(crate) struct Decoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max: HPACK_TABLE,
        }
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.at).ok_or("hpack: truncated block")?;
        self.at += 1;
        Ok(v)
    }

    fn int(&mut self, n: u32) -> Result<usize, String> {
        let max = (1usize << n) - 1;
        let mut v = usize::from(self.byte()?) & max;
        if v < max {
            return Ok(v);
        }
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            let add = usize::from(b & 0x7f)
                .checked_shl(shift)
                .filter(|_| shift <= 28)
                .ok_or("hpack: integer overflow")?;
            v = v.checked_add(add).ok_or("hpack: integer overflow")?;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
        }
    }

    fn string(&mut self) -> Result<Vec<u8>, String> {
        let huff = self.b.get(self.at).ok_or("hpack: truncated block")? & 0x80 != 0;
        let len = self.int(7)?;
        let end = self.at.checked_add(len).ok_or("hpack: bad length")?;
        let raw = self.b.get(self.at..end).ok_or("hpack: truncated string")?;
        self.at = end;
        if huff {
            huffman_decode(raw)
        } else {
            Ok(raw.to_vec())
        }
    }
}

impl Decoder {
    fn entry(&self, idx: usize) -> Result<(Vec<u8>, Vec<u8>), String> {
        if idx == 0 {
            return Err("hpack: index 0".into());
        }
        if let Some((n, v)) = STATIC_TABLE.get(idx - 1) {
            return Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        self.table
            .get(idx - STATIC_TABLE.len() - 1)
            .cloned()
            .ok_or_else(|| format!("hpack: index {idx} out of range"))
    }

    fn evict(&mut self) {
        while self.size > self.max {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => self.size = 0,
            }
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        self.size += name.len() + value.len() + 32;
        self.table.push_front((name, value));
        self.evict();
    }

    /// Decodes one header block into (name, value) pairs.
    pub(crate) fn decode(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, String> {
        let mut c = Cursor { b: block, at: 0 };
        let mut out = Vec::new();
        while c.at < block.len() {
            let b = block.get(c.at).copied().unwrap_or(0);
            let (name, value) = if b & 0x80 != 0 {
                self.entry(c.int(7)?)?
            } else if b & 0xc0 == 0x40 {
                let idx = c.int(6)?;
                let name = if idx == 0 {
                    c.string()?
                } else {
                    self.entry(idx)?.0
                };
                let value = c.string()?;
                self.insert(name.clone(), value.clone());
                (name, value)
            } else if b & 0xe0 == 0x20 {
                let max = c.int(5)?;
                if max > HPACK_TABLE {
                    return Err(format!("hpack: table size {max} above ours"));
                }
                self.max = max;
                self.evict();
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001): 4-bit name index.
                let idx = c.int(4)?;
                let name = if idx == 0 {
                    c.string()?
                } else {
                    self.entry(idx)?.0
                };
                (name, c.string()?)
            };
            out.push((
                String::from_utf8_lossy(&name).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            ));
        }
        Ok(out)
    }
}

/// `grpc-message` is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = |j: usize| b.get(j).and_then(|h| (*h as char).to_digit(16));
        match (c, hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The connection

fn remaining(deadline: Instant) -> Result<Duration, CallError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(CallError::Deadline)
    } else {
        Ok(left)
    }
}

fn broken(e: io::Error) -> CallError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CallError::Deadline,
        _ => CallError::Status(Status::new(
            Code::Unavailable,
            format!("connection to the daemon failed: {e}"),
        )),
    }
}

/// Dials `path` within the deadline. The socket's send timeout also bounds a connect that waits
/// for room in the listener's backlog (a daemon that stopped accepting).
pub fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, CallError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(CallError::Connect(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or not a path",
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(CallError::Connect(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    stream
        .set_write_timeout(Some(remaining(deadline)?))
        .map_err(CallError::Connect)?;
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
        let r = unsafe {
            libc::connect(
                stream.as_raw_fd(),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Err(CallError::Deadline),
            _ => return Err(CallError::Connect(e)),
        }
    }
}

struct Conn {
    s: UnixStream,
    deadline: Instant,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    at: usize,
    /// The socket timeouts in force (read, write): re-armed only when the time left has become
    /// noticeably shorter, which saves a setsockopt per I/O on the usual sub-millisecond call.
    armed: [Option<Duration>; 2],
}

/// Slack before a socket timeout is re-armed to the time left.
const REARM_SLACK: Duration = Duration::from_millis(5);

struct Frame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Conn {
    /// Makes the read (0) or write (1) timeout end no later than the deadline (plus the slack).
    fn arm(&mut self, which: usize) -> Result<(), CallError> {
        let left = remaining(self.deadline)?;
        let stale = match self.armed.get(which).copied().flatten() {
            Some(t) => t > left + REARM_SLACK,
            None => true,
        };
        if stale {
            let r = if which == 0 {
                self.s.set_read_timeout(Some(left))
            } else {
                self.s.set_write_timeout(Some(left))
            };
            r.map_err(broken)?;
            if let Some(a) = self.armed.get_mut(which) {
                *a = Some(left);
            }
        }
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<(), CallError> {
        self.arm(1)?;
        self.s.write_all(data).map_err(broken)
    }

    /// Makes `n` unread bytes available.
    fn fill(&mut self, n: usize) -> Result<(), CallError> {
        while self.buf.len() - self.at < n {
            if self.at > 0 {
                self.buf.drain(..self.at);
                self.at = 0;
            }
            self.arm(0)?;
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) => {
                    return Err(CallError::Status(Status::new(
                        Code::Unavailable,
                        "the daemon closed the connection before answering",
                    )))
                }
                Ok(k) => self.buf.extend_from_slice(chunk.get(..k).unwrap_or(&[])),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(broken(e)),
            }
        }
        Ok(())
    }

    fn frame(&mut self) -> Result<Frame, CallError> {
        self.fill(9)?;
        let h = self.buf.get(self.at..self.at + 9).unwrap_or(&[0; 9]);
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let (ty, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        if len > MAX_REPLY {
            return Err(protocol(format!("frame of {len} bytes")));
        }
        self.fill(9 + len)?;
        let payload = self
            .buf
            .get(self.at + 9..self.at + 9 + len)
            .unwrap_or(&[])
            .to_vec();
        self.at += 9 + len;
        Ok(Frame {
            ty,
            flags,
            stream,
            payload,
        })
    }
}

fn protocol(what: impl std::fmt::Display) -> CallError {
    CallError::Status(Status::new(
        Code::Unknown,
        format!("HTTP/2 protocol error from the daemon: {what}"),
    ))
}

/// Strips the padding (and priority fields) of a DATA or HEADERS payload.
fn unpad(f: &Frame) -> Result<&[u8], CallError> {
    let mut p: &[u8] = &f.payload;
    let mut pad = 0;
    if f.flags & PADDED != 0 {
        pad = usize::from(*p.first().ok_or_else(|| protocol("empty padded frame"))?);
        p = p.get(1..).unwrap_or(&[]);
    }
    if f.ty == HEADERS && f.flags & PRIORITY != 0 {
        p = p
            .get(5..)
            .ok_or_else(|| protocol("short priority fields"))?;
    }
    let end = p
        .len()
        .checked_sub(pad)
        .ok_or_else(|| protocol("padding longer than the frame"))?;
    Ok(p.get(..end).unwrap_or(&[]))
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The status tonic reports for a non-200 HTTP answer.
fn http_status(s: &str) -> Code {
    match s {
        "400" => Code::Internal,
        "401" => Code::Unauthenticated,
        "403" => Code::PermissionDenied,
        "404" => Code::Unimplemented,
        "429" | "502" | "503" | "504" => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Calls `method` (e.g. `/ambientcni.v1.CniNode/PodAdd`) with the encoded request `msg` and
/// returns the encoded reply. `timeout` is sent as `grpc-timeout`; `deadline` bounds everything.
pub fn unary(
    socket: &Path,
    method: &str,
    msg: &[u8],
    timeout: Duration,
    deadline: Instant,
) -> Result<Vec<u8>, CallError> {
    let s = connect(socket, deadline)?;
    let mut c = Conn {
        s,
        deadline,
        buf: Vec::with_capacity(1024),
        at: 0,
        // connect() set the write timeout to the time left.
        armed: [None, Some(remaining(deadline)?)],
    };

    // The gRPC message: uncompressed flag, length, bytes.
    let mut body = Vec::with_capacity(msg.len() + 5);
    body.push(0);
    body.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    body.extend_from_slice(msg);

    // Preface, our SETTINGS (no push), the request headers and as much of the body as the
    // initial windows allow: one write.
    let mut out = Vec::with_capacity(256 + body.len().min(DEFAULT_WINDOW as usize));
    out.extend_from_slice(PREFACE);
    let mut settings = Vec::new();
    for (id, v) in [
        (SETTINGS_ENABLE_PUSH, 0u32),
        (SETTINGS_HEADER_TABLE_SIZE, HPACK_TABLE as u32),
    ] {
        settings.extend_from_slice(&id.to_be_bytes());
        settings.extend_from_slice(&v.to_be_bytes());
    }
    frame(&mut out, SETTINGS, 0, 0, &settings);
    frame(
        &mut out,
        HEADERS,
        END_HEADERS,
        STREAM,
        &request_headers(method, timeout),
    );
    let (mut conn_window, mut stream_window, mut peer_initial) =
        (DEFAULT_WINDOW, DEFAULT_WINDOW, DEFAULT_WINDOW);
    let mut max_frame = DEFAULT_MAX_FRAME;
    let mut sent = 0usize;
    let mut send_body = |out: &mut Vec<u8>, conn: &mut i64, stream: &mut i64, max_frame: usize| {
        while sent < body.len() {
            let room = (*conn).min(*stream);
            if room <= 0 {
                break;
            }
            let n = (body.len() - sent).min(room as usize).min(max_frame);
            let last = sent + n == body.len();
            frame(
                out,
                DATA,
                if last { END_STREAM } else { 0 },
                STREAM,
                body.get(sent..sent + n).unwrap_or(&[]),
            );
            sent += n;
            *conn -= n as i64;
            *stream -= n as i64;
        }
        sent == body.len()
    };
    let mut body_done = send_body(&mut out, &mut conn_window, &mut stream_window, max_frame);
    c.write(&out)?;

    let mut hpack = Decoder::default();
    let mut headers: Option<Vec<(String, String)>> = None;
    let mut trailers: Option<Vec<(String, String)>> = None;
    let mut data = Vec::new();
    let mut unacked = 0usize;
    loop {
        let f = c.frame()?;
        let mut reply = Vec::new();
        let mut ended = false;
        match f.ty {
            DATA if f.stream == STREAM => {
                let p = unpad(&f)?;
                if data.len() + p.len() > MAX_REPLY {
                    return Err(protocol("reply too large"));
                }
                data.extend_from_slice(p);
                // Give the window back once a good part of it is used.
                unacked += f.payload.len();
                if unacked >= 16_384 {
                    let inc = (unacked as u32).to_be_bytes();
                    frame(&mut reply, WINDOW_UPDATE, 0, 0, &inc);
                    frame(&mut reply, WINDOW_UPDATE, 0, STREAM, &inc);
                    unacked = 0;
                }
                ended = f.flags & END_STREAM != 0;
            }
            HEADERS if f.stream == STREAM => {
                let mut block = unpad(&f)?.to_vec();
                let mut flags = f.flags;
                while flags & END_HEADERS == 0 {
                    let k = c.frame()?;
                    if k.ty != CONTINUATION || k.stream != STREAM {
                        return Err(protocol("header block not continued"));
                    }
                    block.extend_from_slice(&k.payload);
                    flags = k.flags;
                }
                let fields = hpack.decode(&block).map_err(protocol)?;
                if headers.is_none() {
                    headers = Some(fields);
                } else {
                    trailers = Some(fields);
                }
                ended = f.flags & END_STREAM != 0;
            }
            RST_STREAM if f.stream == STREAM => {
                let code = f
                    .payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                let c = if code == 0x8 {
                    Code::Cancelled
                } else {
                    Code::Unavailable
                };
                return Err(CallError::Status(Status::new(
                    c,
                    format!("the daemon reset the request (HTTP/2 error {code})"),
                )));
            }
            SETTINGS if f.flags & ACK == 0 => {
                for s in f.payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([s[0], s[1]]);
                    let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                    match id {
                        SETTINGS_INITIAL_WINDOW_SIZE => {
                            stream_window += i64::from(v) - peer_initial;
                            peer_initial = i64::from(v);
                        }
                        SETTINGS_MAX_FRAME_SIZE => {
                            max_frame = (v as usize).clamp(DEFAULT_MAX_FRAME, 1 << 24)
                        }
                        _ => {}
                    }
                }
                frame(&mut reply, SETTINGS, ACK, 0, &[]);
            }
            PING if f.flags & ACK == 0 => frame(&mut reply, PING, ACK, 0, &f.payload),
            GOAWAY => {
                let last = f
                    .payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                    .unwrap_or(0);
                if last < STREAM {
                    return Err(CallError::Status(Status::new(
                        Code::Unavailable,
                        "the daemon is going away and did not take the request",
                    )));
                }
            }
            WINDOW_UPDATE => {
                let inc = f
                    .payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                    .unwrap_or(0);
                match f.stream {
                    0 => conn_window += i64::from(inc),
                    STREAM => stream_window += i64::from(inc),
                    _ => {}
                }
            }
            PUSH_PROMISE => return Err(protocol("push promise although push is off")),
            _ => {}
        }
        if !body_done {
            body_done = send_body(&mut reply, &mut conn_window, &mut stream_window, max_frame);
        }
        if !reply.is_empty() && !ended {
            c.write(&reply)?;
        }
        if ended {
            break;
        }
    }

    let headers = headers.unwrap_or_default();
    let http = field(&headers, ":status").unwrap_or("");
    if http != "200" {
        return Err(CallError::Status(Status::new(
            http_status(http),
            format!("the daemon answered HTTP status {http:?}"),
        )));
    }
    // Trailers, or the headers of a trailers-only answer (how errors usually come).
    let end = trailers.as_deref().unwrap_or(&headers);
    let code = match field(end, "grpc-status").map(str::parse::<i32>) {
        Some(Ok(n)) => Code::from_i32(n),
        _ => {
            return Err(CallError::Status(Status::new(
                Code::Unknown,
                "the daemon's answer has no grpc-status",
            )))
        }
    };
    if code != Code::Ok {
        let message = field(end, "grpc-message")
            .map(percent_decode)
            .unwrap_or_default();
        return Err(CallError::Status(Status { code, message }));
    }
    let Some(&[flag, a, b, c2, d]) = data.get(..5) else {
        return Err(CallError::Status(Status::new(
            Code::Internal,
            "the daemon's answer has no message",
        )));
    };
    if flag != 0 {
        return Err(CallError::Status(Status::new(
            Code::Internal,
            "the daemon's answer is compressed",
        )));
    }
    let len = u32::from_be_bytes([a, b, c2, d]) as usize;
    data.get(5..5 + len).map(<[u8]>::to_vec).ok_or_else(|| {
        CallError::Status(Status::new(
            Code::Internal,
            "the daemon's answer is truncated",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        // Canonical codes from the lengths, as the decoder derives them.
        let (syms, counts) = huffman_tables();
        let mut codes = [0u32; 257];
        let (mut code, mut i) = (0u32, 0usize);
        for count in counts.iter().skip(1) {
            for _ in 0..*count {
                codes[usize::from(syms[i])] = code;
                code += 1;
                i += 1;
            }
            code <<= 1;
        }
        let (mut acc, mut nbits, mut out) = (0u64, 0u32, Vec::new());
        for &b in s {
            let len = huffman_len(u16::from(b)) as u32;
            acc = (acc << len) | u64::from(codes[usize::from(b)]);
            nbits += len;
            while nbits >= 8 {
                out.push((acc >> (nbits - 8)) as u8);
                nbits -= 8;
            }
        }
        if nbits > 0 {
            out.push(((acc << (8 - nbits)) as u8) | (0xff >> nbits));
        }
        out
    }

    #[test]
    fn huffman_matches_the_rfc() {
        // RFC 7541 C.4.1: "www.example.com".
        let enc = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(huffman_decode(&enc).as_deref(), Ok(&b"www.example.com"[..]));
        // C.4.2: "no-cache"; C.6.1: "302", "private".
        assert_eq!(
            huffman_decode(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]).as_deref(),
            Ok(&b"no-cache"[..])
        );
        assert_eq!(huffman_decode(&[0x64, 0x02]).as_deref(), Ok(&b"302"[..]));
        assert_eq!(
            huffman_decode(&[0xae, 0xc3, 0x77, 0x1a, 0x4b]).as_deref(),
            Ok(&b"private"[..])
        );
        // Every byte value round-trips.
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(huffman_decode(&huffman_encode(&all)), Ok(all));
        // Padding of 8 one-bits, or zero padding, is an error.
        assert!(huffman_decode(&[0x64, 0x02, 0xff]).is_err());
        assert!(huffman_decode(&[0x00]).is_err());
    }

    #[test]
    fn hpack_decodes_rfc_examples_with_the_dynamic_table() {
        // RFC 7541 C.3 (requests without Huffman), three blocks on one decoder.
        let mut d = Decoder::default();
        let b1 = b"\x82\x86\x84\x41\x0fwww.example.com";
        let f = d.decode(b1).expect("c.3.1");
        assert_eq!(f[3], (":authority".into(), "www.example.com".into()));
        let b2 = b"\x82\x86\x84\xbe\x58\x08no-cache";
        let f = d.decode(b2).expect("c.3.2");
        assert_eq!(f[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(f[4], ("cache-control".into(), "no-cache".into()));
        let b3 = b"\x82\x87\x85\xbf\x40\x0acustom-key\x0ccustom-value";
        let f = d.decode(b3).expect("c.3.3");
        assert_eq!(f[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(f[4], ("custom-key".into(), "custom-value".into()));
        // C.6.1 with Huffman: ":status 302".
        let mut d = Decoder::default();
        let f = d.decode(&[0x48, 0x82, 0x64, 0x02]).expect("c.6.1");
        assert_eq!(f[0], (":status".into(), "302".into()));
        // A size update to 0 empties the table; index 62 is then out of range.
        assert!(d.decode(&[0x20]).is_ok());
        assert!(d.decode(&[0xbe]).is_err());
    }

    #[test]
    fn hpack_never_panics_on_garbage() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let _ = Decoder::default().decode(&bytes);
            let _ = huffman_decode(&bytes);
        }
    }

    #[test]
    fn request_headers_decode_to_what_a_server_needs() {
        let block = request_headers("/ambientcni.v1.CniNode/PodAdd", Duration::from_millis(4999));
        let f = Decoder::default().decode(&block).expect("our own block");
        let get = |n: &str| field(&f, n).map(str::to_owned);
        assert_eq!(get(":method").as_deref(), Some("POST"));
        assert_eq!(get(":scheme").as_deref(), Some("http"));
        assert_eq!(
            get(":path").as_deref(),
            Some("/ambientcni.v1.CniNode/PodAdd")
        );
        assert_eq!(get("content-type").as_deref(), Some("application/grpc"));
        assert_eq!(get("te").as_deref(), Some("trailers"));
        assert_eq!(get("grpc-timeout").as_deref(), Some("4999m"));
        // Long values use multi-byte integers.
        let long = "x".repeat(300);
        let mut b = Vec::new();
        hpack_literal(&mut b, 0, "k", &long);
        let f = Decoder::default().decode(&b).expect("long value");
        assert_eq!(f[0].1, long);
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode("ipset%20add%3A 100%"), "ipset add: 100%");
        assert_eq!(percent_decode("%E2%9C%93"), "✓");
    }
}
