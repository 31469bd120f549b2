//! One unary gRPC call over HTTP/2 on a unix socket: blocking I/O, one deadline, no runtime.
//!
//! Why by hand: the plugin is a process per pod event, so what it costs is mostly start-up. tonic
//! brings a tokio runtime, hyper, tower and h2 along, and with them a larger binary with more
//! pages to fault in and more work before the first byte goes out. A unary call needs a small
//! part of HTTP/2: the client preface, SETTINGS, one request (HEADERS + DATA) sent in one write,
//! then reading frames until the stream ends, answering SETTINGS and PING, honouring flow control
//! for large requests, and decoding HPACK (static and dynamic table, Huffman) in the replies.
//! The wire format is standard: the daemon's tonic server (and any gRPC tool) sees a normal
//! client; `cni-daemon/src/server_tests.rs` tests this client against that server, and the root
//! tests in `tests/` drive it through the real binaries. Everything received is bounds-checked
//! and bounded (frames, header blocks, decoded header lists, replies), nothing here panics on bad
//! input, and one deadline covers the whole call.

use ambient_cni_proto::h2wire::*;
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

/// A reply larger than this is refused (the plugin's replies are a few bytes).
const MAX_REPLY: usize = 16 << 20;
/// A header block (HEADERS and its CONTINUATION frames) larger than this is refused, and so is
/// its decoded list past [`MAX_HEADER_LIST`]: a daemon's replies carry ~100 bytes of headers.
/// (We never raise SETTINGS_MAX_FRAME_SIZE, so no frame may be over 16 KiB either.)
const MAX_HEADER_BLOCK: usize = 64 << 10;

/// The only stream we open.
const STREAM: u32 = 1;

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
        if len > DEFAULT_MAX_FRAME {
            return Err(protocol(format!(
                "frame of {len} bytes (over our SETTINGS_MAX_FRAME_SIZE)"
            )));
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
    let head = FrameHead {
        len: f.payload.len(),
        ty: f.ty,
        flags: f.flags,
        stream: 0,
    };
    frame_body(&head, &f.payload).map_err(protocol)
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
        (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
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
                    if block.len() + k.payload.len() > MAX_HEADER_BLOCK {
                        return Err(protocol(format!(
                            "header block over {MAX_HEADER_BLOCK} bytes"
                        )));
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

    /// A server that answers every connection with `reply` (raw frames after its SETTINGS),
    /// then `forever` repeated until the client goes away.
    fn hostile_server(reply: Vec<u8>, forever: Vec<u8>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let (reply, forever) = (reply.clone(), forever.clone());
                std::thread::spawn(move || {
                    let mut first = Vec::new();
                    frame(&mut first, SETTINGS, 0, 0, &[]);
                    first.extend_from_slice(&reply);
                    if s.write_all(&first).is_err() {
                        return;
                    }
                    while !forever.is_empty() && s.write_all(&forever).is_ok() {}
                    // Close only once the client has: closing first could reset the connection
                    // while the client is still writing its request (EPIPE instead of the
                    // protocol error under test).
                    let mut sink = [0u8; 4096];
                    while matches!(std::io::Read::read(&mut s, &mut sink), Ok(n) if n > 0) {}
                });
            }
        });
        (dir, path)
    }

    #[test]
    fn an_endless_header_block_is_refused_at_its_bound() {
        // HEADERS without END_HEADERS, then CONTINUATION frames of 16 KiB forever.
        let mut start = Vec::new();
        frame(&mut start, HEADERS, 0, STREAM, &[0x88]);
        let mut cont = Vec::new();
        frame(&mut cont, CONTINUATION, 0, STREAM, &[0x88; 16_384]);
        let (_dir, path) = hostile_server(start, cont);
        let t = Instant::now();
        let r = unary(
            &path,
            "/x/y",
            &[],
            Duration::from_secs(10),
            Instant::now() + Duration::from_secs(10),
        );
        println!("endless header block refused after {:?}", t.elapsed());
        match r {
            Err(CallError::Status(s)) => {
                assert!(s.message.contains("header block over"), "{s:?}")
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_frame_over_our_max_frame_size_is_refused() {
        let mut big = Vec::new();
        frame_header(&mut big, DEFAULT_MAX_FRAME + 1, DATA, 0, STREAM);
        big.extend(std::iter::repeat_n(0u8, DEFAULT_MAX_FRAME + 1));
        let (_dir, path) = hostile_server(big, Vec::new());
        let r = unary(
            &path,
            "/x/y",
            &[],
            Duration::from_secs(5),
            Instant::now() + Duration::from_secs(5),
        );
        match r {
            Err(CallError::Status(s)) => assert!(s.message.contains("frame of"), "{s:?}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }
}
