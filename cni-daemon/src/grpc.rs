//! The daemon's end of the unix socket: an HTTP/2 server for unary gRPC calls.
//!
//! Why by hand and not tonic's server (hyper + tower + h2), which served the socket before: the
//! plugin opens one connection per pod event, so what matters is the cost of one connection with
//! one call. With tonic that was ~100,000 instructions and ~20 system calls in the daemon per call
//! (callgrind and `strace -c` over 300 pod ADDs): protocol sniffing, a task per connection and
//! one per stream, tower layers, h2's stream scheduler, three separate writes. A unary call needs
//! little of that: read the client's frames, decode one header block and one message, answer with
//! one write holding our SETTINGS, the acks and the whole response. The wire format is standard
//! (RFC 9113, gRPC over HTTP/2): the admin commands' tonic client, grpcurl or any gRPC library
//! work against it. The frame and HPACK code is shared with the plugin
//! ([`ambient_cni_proto::h2wire`]).
//!
//! What it does: connection preface and SETTINGS (the peer's window and frame size honoured when
//! sending; every DATA received is given back at once with WINDOW_UPDATE), HEADERS with
//! CONTINUATION, padding and priority fields, PING, RST_STREAM, GOAWAY, several streams per
//! connection (answered one at a time, in the order their requests complete). What it refuses:
//! compressed messages (UNIMPLEMENTED), requests over [`MAX_REQUEST`] (RESOURCE_EXHAUSTED),
//! frames over 16 KiB and protocol errors (GOAWAY, then close). Idle connections are closed after
//! [`IDLE`]. Nothing here panics on any input.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ambient_cni_proto::h2wire::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::daemon::Daemon;
use crate::dataplane::Dataplane;
use crate::server::{self, Code, Status};

/// The largest request accepted (a CNI GC listing every attachment of a big node is ~1 MB).
pub const MAX_REQUEST: usize = 16 << 20;
/// The largest header block accepted.
const MAX_HEADER_BLOCK: usize = 64 << 10;
/// Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
const MAX_STREAMS: u32 = 100;
/// A connection with nothing to read for this long is closed.
pub const IDLE: Duration = Duration::from_secs(300);
/// The longest grpc-message we send, before percent-encoding (at most 3× longer after it).
const MAX_MESSAGE: usize = 4 << 10;
/// Received bytes are given back (WINDOW_UPDATE) in batches of this much: half the initial
/// window, so a sender never runs out while we read.
const CREDIT_BATCH: usize = 32 << 10;
/// How much is read at a time.
const READ_CHUNK: usize = 16 << 10;

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// HTTP/2 error codes we send.
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const COMPRESSION_ERROR: u32 = 0x9;

/// Serves `listener` until `shutdown` resolves. Each connection is a task on the caller's
/// runtime; the peer's uid (SO_PEERCRED) goes with each of its calls.
pub async fn serve<D: Dataplane + 'static>(
    daemon: Arc<Daemon<D>>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_as(daemon, listener, shutdown, Peers::Real).await
}

/// Whose credentials a call carries.
#[derive(Clone, Copy)]
enum Peers {
    /// The connecting process's (SO_PEERCRED).
    Real,
    /// Unit tests run as any user: every peer has this uid.
    #[cfg(test)]
    As(u32),
}

async fn serve_as<D: Dataplane + 'static>(
    daemon: Arc<Daemon<D>>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
    peers: Peers,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok((io, _)) => {
                    let uid = match peers {
                        Peers::Real => io.peer_cred().ok().map(|c| c.uid()),
                        #[cfg(test)]
                        Peers::As(uid) => Some(uid),
                    };
                    let d = daemon.clone();
                    tokio::spawn(async move {
                        let mut c = Conn::new(io, uid);
                        if let Err(e) = c.run(&d).await {
                            debug!(error = %e, "connection ended");
                        }
                    });
                }
                // EMFILE and friends: the listener stays; back off a little.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// Why a connection ended early.
#[derive(Debug)]
enum End {
    Io(std::io::Error),
    /// A connection error: GOAWAY with this code has been queued.
    Protocol(u32, String),
    Idle,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Io(e) => write!(f, "i/o: {e}"),
            End::Protocol(c, m) => write!(f, "protocol error {c:#x}: {m}"),
            End::Idle => write!(f, "idle for {IDLE:?}"),
        }
    }
}

fn proto_err(code: u32, msg: impl Into<String>) -> End {
    End::Protocol(code, msg.into())
}

/// A request stream being received or answered.
#[derive(Default)]
struct Stream {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Our send window on this stream.
    window: i64,
    /// The request is complete (END_STREAM seen).
    complete: bool,
    /// Over MAX_REQUEST: the rest of the body is dropped and the call refused.
    too_large: bool,
    /// Bytes received and not yet given back with WINDOW_UPDATE.
    unacked: usize,
}

/// One HTTP/2 connection.
struct Conn {
    io: UnixStream,
    uid: Option<u32>,
    rbuf: Vec<u8>,
    /// Start of the unparsed bytes in `rbuf`.
    at: usize,
    out: Vec<u8>,
    hpack: Decoder,
    streams: HashMap<u32, Stream>,
    /// Requests complete and waiting for their answer, in order.
    ready: VecDeque<u32>,
    /// A header block still waiting for CONTINUATION frames: stream, block, END_STREAM.
    partial: Option<(u32, Vec<u8>, bool)>,
    last_stream: u32,
    /// Our connection-level send window, and the peer's settings for our sending.
    window: i64,
    initial_window: i64,
    max_frame: usize,
    /// The peer said GOAWAY, or closed its side.
    closing: bool,
    /// Connection-level bytes received and not yet given back.
    unacked: usize,
}

impl Conn {
    fn new(io: UnixStream, uid: Option<u32>) -> Self {
        let mut out = Vec::with_capacity(512);
        // Our SETTINGS lead everything we send; the rest are defaults.
        let mut s = Vec::with_capacity(6);
        s.extend_from_slice(&SETTINGS_MAX_CONCURRENT_STREAMS.to_be_bytes());
        s.extend_from_slice(&MAX_STREAMS.to_be_bytes());
        frame(&mut out, SETTINGS, 0, 0, &s);
        Conn {
            io,
            uid,
            rbuf: Vec::with_capacity(READ_CHUNK),
            at: 0,
            out,
            hpack: Decoder::default(),
            streams: HashMap::new(),
            ready: VecDeque::new(),
            partial: None,
            last_stream: 0,
            window: DEFAULT_WINDOW,
            initial_window: DEFAULT_WINDOW,
            max_frame: DEFAULT_MAX_FRAME,
            closing: false,
            unacked: 0,
        }
    }

    async fn run<D: Dataplane>(&mut self, daemon: &Daemon<D>) -> Result<(), End> {
        let r = self.serve(daemon).await;
        if let Err(End::Protocol(code, msg)) = &r {
            let mut p = Vec::with_capacity(8 + msg.len());
            p.extend_from_slice(&self.last_stream.to_be_bytes());
            p.extend_from_slice(&code.to_be_bytes());
            p.extend_from_slice(msg.as_bytes());
            frame(&mut self.out, GOAWAY, 0, 0, &p);
            let _ = self.flush().await;
        }
        r
    }

    async fn serve<D: Dataplane>(&mut self, daemon: &Daemon<D>) -> Result<(), End> {
        while self.rbuf.len() < PREFACE.len() {
            if !self.fill().await? {
                return Ok(());
            }
        }
        if self.rbuf.get(..PREFACE.len()) != Some(PREFACE) {
            return Err(proto_err(PROTOCOL_ERROR, "not an HTTP/2 client preface"));
        }
        self.at = PREFACE.len();
        loop {
            self.parse()?;
            while let Some(id) = self.ready.pop_front() {
                self.answer(daemon, id).await?;
            }
            // Everything goes out before we wait: a client may wait for our SETTINGS.
            self.flush().await?;
            if self.closing && self.streams.is_empty() {
                return Ok(());
            }
            if !self.fill().await? {
                return Ok(());
            }
        }
    }

    /// Reads more; false at EOF.
    async fn fill(&mut self) -> Result<bool, End> {
        if self.at > 0 && self.at == self.rbuf.len() {
            self.rbuf.clear();
            self.at = 0;
        } else if self.at > READ_CHUNK {
            self.rbuf.drain(..self.at);
            self.at = 0;
        }
        self.rbuf.reserve(READ_CHUNK);
        match tokio::time::timeout(IDLE, self.io.read_buf(&mut self.rbuf)).await {
            Err(_) => Err(End::Idle),
            Ok(Err(e)) => Err(End::Io(e)),
            Ok(Ok(0)) => {
                self.closing = true;
                Ok(false)
            }
            Ok(Ok(_)) => Ok(true),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.io.write_all(&self.out).await;
        self.out.clear();
        r.map_err(End::Io)
    }

    /// Handles every complete frame in the buffer.
    fn parse(&mut self) -> Result<(), End> {
        loop {
            let Some(rest) = self.rbuf.get(self.at..) else {
                return Ok(());
            };
            let Some(head) = frame_head(rest) else {
                return Ok(());
            };
            if head.len > DEFAULT_MAX_FRAME {
                return Err(proto_err(
                    FRAME_SIZE_ERROR,
                    format!("frame of {} bytes", head.len),
                ));
            }
            let Some(payload) = rest.get(FRAME_HEAD..FRAME_HEAD + head.len) else {
                return Ok(());
            };
            let payload = payload.to_vec();
            self.at += FRAME_HEAD + head.len;
            self.on_frame(head, &payload)?;
        }
    }

    fn on_frame(&mut self, h: FrameHead, payload: &[u8]) -> Result<(), End> {
        if let Some((id, _, _)) = &self.partial {
            if h.ty != CONTINUATION || h.stream != *id {
                return Err(proto_err(PROTOCOL_ERROR, "expected CONTINUATION"));
            }
        }
        match h.ty {
            DATA => self.on_data(h, payload),
            HEADERS => {
                if h.stream == 0 {
                    return Err(proto_err(PROTOCOL_ERROR, "HEADERS on stream 0"));
                }
                let block = frame_body(&h, payload).map_err(|m| proto_err(PROTOCOL_ERROR, m))?;
                let end_stream = h.flags & END_STREAM != 0;
                if h.flags & END_HEADERS != 0 {
                    self.on_header_block(h.stream, block, end_stream)
                } else {
                    self.partial = Some((h.stream, block.to_vec(), end_stream));
                    Ok(())
                }
            }
            CONTINUATION => {
                let Some((id, mut block, end_stream)) = self.partial.take() else {
                    return Err(proto_err(PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
                };
                block.extend_from_slice(payload);
                if block.len() > MAX_HEADER_BLOCK {
                    return Err(proto_err(PROTOCOL_ERROR, "header block too large"));
                }
                if h.flags & END_HEADERS != 0 {
                    self.on_header_block(id, &block, end_stream)
                } else {
                    self.partial = Some((id, block, end_stream));
                    Ok(())
                }
            }
            SETTINGS => self.on_settings(h, payload),
            PING => {
                if h.stream != 0 || payload.len() != 8 {
                    return Err(proto_err(FRAME_SIZE_ERROR, "bad PING"));
                }
                if h.flags & ACK == 0 {
                    frame(&mut self.out, PING, ACK, 0, payload);
                }
                Ok(())
            }
            WINDOW_UPDATE => {
                let b: [u8; 4] = payload
                    .try_into()
                    .map_err(|_| proto_err(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE"))?;
                let inc = i64::from(u32::from_be_bytes(b) & 0x7fff_ffff);
                if h.stream == 0 {
                    if inc == 0 {
                        return Err(proto_err(PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
                    }
                    self.window += inc;
                    if self.window > i64::from(i32::MAX) {
                        return Err(proto_err(FLOW_CONTROL_ERROR, "window above 2^31-1"));
                    }
                } else if let Some(s) = self.streams.get_mut(&h.stream) {
                    s.window += inc;
                }
                Ok(())
            }
            RST_STREAM => {
                self.streams.remove(&h.stream);
                self.ready.retain(|id| *id != h.stream);
                Ok(())
            }
            GOAWAY => {
                self.closing = true;
                Ok(())
            }
            PUSH_PROMISE => Err(proto_err(PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            // PRIORITY and unknown types are ignored.
            _ => Ok(()),
        }
    }

    fn on_settings(&mut self, h: FrameHead, payload: &[u8]) -> Result<(), End> {
        if h.stream != 0 {
            return Err(proto_err(PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if h.flags & ACK != 0 {
            return Ok(());
        }
        if !payload.len().is_multiple_of(6) {
            return Err(proto_err(FRAME_SIZE_ERROR, "bad SETTINGS length"));
        }
        for e in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([e[0], e[1]]);
            let v = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
            match id {
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    if v > 0x7fff_ffff {
                        return Err(proto_err(FLOW_CONTROL_ERROR, "initial window too large"));
                    }
                    let delta = i64::from(v) - self.initial_window;
                    self.initial_window = i64::from(v);
                    for s in self.streams.values_mut() {
                        s.window += delta;
                    }
                }
                SETTINGS_MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&v) {
                        return Err(proto_err(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE"));
                    }
                    self.max_frame = v as usize;
                }
                // We never index into the peer's decoder table, so its size does not matter.
                _ => {}
            }
        }
        frame(&mut self.out, SETTINGS, ACK, 0, &[]);
        Ok(())
    }

    fn on_header_block(&mut self, id: u32, block: &[u8], end_stream: bool) -> Result<(), End> {
        // Decoded whatever becomes of the stream: the dynamic table must follow every block.
        let fields = self
            .hpack
            .decode(block)
            .map_err(|m| proto_err(COMPRESSION_ERROR, m))?;
        if let Some(s) = self.streams.get_mut(&id) {
            // Trailers of a request: only the end of it matters.
            if !end_stream {
                return Err(proto_err(
                    PROTOCOL_ERROR,
                    "second header block without END_STREAM",
                ));
            }
            if !s.complete {
                s.complete = true;
                self.ready.push_back(id);
            }
            return Ok(());
        }
        if id.is_multiple_of(2) || id <= self.last_stream {
            return Err(proto_err(PROTOCOL_ERROR, format!("bad new stream id {id}")));
        }
        self.last_stream = id;
        if self.streams.len() >= MAX_STREAMS as usize {
            rst(&mut self.out, id, REFUSED_STREAM);
            return Ok(());
        }
        self.streams.insert(
            id,
            Stream {
                headers: fields,
                window: self.initial_window,
                complete: end_stream,
                ..Stream::default()
            },
        );
        if end_stream {
            self.ready.push_back(id);
        }
        Ok(())
    }

    fn on_data(&mut self, h: FrameHead, payload: &[u8]) -> Result<(), End> {
        if h.stream == 0 {
            return Err(proto_err(PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let data = frame_body(&h, payload).map_err(|m| proto_err(PROTOCOL_ERROR, m))?;
        // Credit goes back as soon as half a window is used, for the connection and the stream:
        // requests are read whole as they come, and their size is bounded by MAX_REQUEST, not
        // by the window. (A small request never needs any.)
        self.unacked += h.len;
        if self.unacked >= CREDIT_BATCH {
            let inc = (self.unacked as u32).to_be_bytes();
            frame(&mut self.out, WINDOW_UPDATE, 0, 0, &inc);
            self.unacked = 0;
        }
        let Some(s) = self.streams.get_mut(&h.stream) else {
            // A stream we refused or reset: its data is dropped.
            return Ok(());
        };
        s.unacked += h.len;
        if s.unacked >= CREDIT_BATCH && h.flags & END_STREAM == 0 {
            let inc = (s.unacked as u32).to_be_bytes();
            frame(&mut self.out, WINDOW_UPDATE, 0, h.stream, &inc);
            s.unacked = 0;
        }
        if s.complete {
            return Err(proto_err(PROTOCOL_ERROR, "DATA after END_STREAM"));
        }
        // The bound is on all the connection's unanswered bodies together, and a peer that is
        // not root (refused anyway) gets nothing buffered at all.
        let buffered: usize = self.streams.values().map(|s| s.body.len()).sum();
        let Some(s) = self.streams.get_mut(&h.stream) else {
            return Ok(());
        };
        if buffered + data.len() > MAX_REQUEST {
            s.too_large = true;
            s.body = Vec::new();
        } else if !s.too_large && self.uid == Some(0) {
            s.body.extend_from_slice(data);
        }
        if h.flags & END_STREAM != 0 {
            s.complete = true;
            self.ready.push_back(h.stream);
        }
        Ok(())
    }

    /// Answers the complete request on stream `id`.
    async fn answer<D: Dataplane>(&mut self, daemon: &Daemon<D>, id: u32) -> Result<(), End> {
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        let headers = std::mem::take(&mut s.headers);
        let body = std::mem::take(&mut s.body);
        let too_large = s.too_large;
        // The peer first: a peer that is not root had nothing of its request buffered.
        let reply =
            match server::check_peer(self.uid).and_then(|()| request(&headers, &body, too_large)) {
                Ok((method, msg)) => server::call(daemon, method, msg).await,
                Err(st) => Err(st),
            };
        match reply {
            Ok(msg) => self.send_reply(id, &msg).await?,
            Err(st) => {
                if st.code == Code::Internal {
                    debug!(stream = id, status = %st.message, "call failed");
                }
                trailers_only(&mut self.out, id, &st);
            }
        }
        self.streams.remove(&id);
        Ok(())
    }

    /// HEADERS, the message in DATA frames within the peer's windows, then the trailers.
    async fn send_reply(&mut self, id: u32, msg: &[u8]) -> Result<(), End> {
        let mut block = Vec::with_capacity(32);
        block.push(0x80 | 8); // :status 200
        hpack_literal(&mut block, 31, "content-type", "application/grpc");
        frame(&mut self.out, HEADERS, END_HEADERS, id, &block);
        let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
        let mut data = Vec::with_capacity(5 + msg.len());
        data.push(0);
        data.extend_from_slice(&len.to_be_bytes());
        data.extend_from_slice(msg);
        let mut sent = 0;
        while sent < data.len() {
            let Some(s) = self.streams.get(&id) else {
                // Reset by the client meanwhile.
                return Ok(());
            };
            let room = self.window.min(s.window).min(self.max_frame as i64);
            if room <= 0 {
                // Out of credit: send what we have and wait for WINDOW_UPDATE.
                self.flush().await?;
                if !self.fill().await? {
                    return Ok(());
                }
                self.parse()?;
                continue;
            }
            let n = (room as usize).min(data.len() - sent);
            let chunk = data.get(sent..sent + n).unwrap_or(&[]);
            frame(&mut self.out, DATA, 0, id, chunk);
            sent += n;
            self.window -= n as i64;
            if let Some(s) = self.streams.get_mut(&id) {
                s.window -= n as i64;
            }
        }
        let mut t = Vec::with_capacity(16);
        hpack_literal(&mut t, 0, "grpc-status", "0");
        frame(&mut self.out, HEADERS, END_HEADERS | END_STREAM, id, &t);
        Ok(())
    }
}

fn rst(out: &mut Vec<u8>, id: u32, code: u32) {
    frame(out, RST_STREAM, 0, id, &code.to_be_bytes());
}

/// An error answer: one HEADERS frame with the status (gRPC's "Trailers-Only").
fn trailers_only(out: &mut Vec<u8>, id: u32, st: &Status) {
    let mut b = Vec::with_capacity(64 + st.message.len());
    b.push(0x80 | 8); // :status 200
    hpack_literal(&mut b, 31, "content-type", "application/grpc");
    hpack_literal(&mut b, 0, "grpc-status", &(st.code as i32).to_string());
    // A header must fit one frame: the message is cut (on a character) before it is encoded.
    let mut cut = st.message.len().min(MAX_MESSAGE);
    while !st.message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = percent_encode(st.message.get(..cut).unwrap_or(""));
    if !msg.is_empty() {
        hpack_literal(&mut b, 0, "grpc-message", &msg);
    }
    frame(out, HEADERS, END_HEADERS | END_STREAM, id, &b);
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The method name and the one message of a unary call, or the status refusing it.
fn request<'a>(
    headers: &'a [(String, String)],
    body: &'a [u8],
    too_large: bool,
) -> Result<(&'a str, &'a [u8]), Status> {
    if field(headers, ":method") != Some("POST") {
        return Err(Status::new(Code::Unimplemented, "only POST is served"));
    }
    if !field(headers, "content-type").is_some_and(|c| c.starts_with("application/grpc")) {
        return Err(Status::new(Code::Unimplemented, "not a gRPC request"));
    }
    let method = field(headers, ":path")
        .and_then(|p| p.strip_prefix(server::SERVICE_PATH))
        .ok_or_else(|| {
            Status::new(
                Code::Unimplemented,
                format!("unknown path {:?}", field(headers, ":path").unwrap_or("")),
            )
        })?;
    if too_large {
        return Err(Status::new(
            Code::ResourceExhausted,
            format!("request larger than {MAX_REQUEST} bytes"),
        ));
    }
    let (&flag, rest) = body
        .split_first()
        .ok_or_else(|| Status::new(Code::Internal, "request without a message"))?;
    let len = rest
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(|b| u32::from_be_bytes(b) as usize)
        .ok_or_else(|| Status::new(Code::Internal, "truncated gRPC message prefix"))?;
    if flag != 0 {
        return Err(Status::new(
            Code::Unimplemented,
            "compressed messages are not supported",
        ));
    }
    let msg = rest
        .get(4..)
        .filter(|m| m.len() == len)
        .ok_or_else(|| Status::new(Code::Internal, "a unary call takes exactly one message"))?;
    Ok((method, msg))
}

#[cfg(test)]
#[path = "grpc_tests.rs"]
mod tests;
