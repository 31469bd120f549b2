//! The connections of the daemon's socket, as tonic receives them (`serve_with_incoming`): the
//! peer's credentials read once when a connection is accepted, a cap on open connections, and two
//! deadlines hyper has no setting for.
//!
//! - **Cap**: at most [`max_connections`] (256, or a quarter of RLIMIT_NOFILE if that is less), so
//!   that connections never use up the daemon's descriptors (the resync needs them for netlink and
//!   `iptables-restore`). Past the cap, the connection that has been idle longest — no call in
//!   progress — is closed; when every connection has a call in progress, the new one is.
//! - **Preface deadline**: a connection must send its 24-byte HTTP/2 preface within
//!   [`PREFACE_DEADLINE`].
//! - **Write deadline**: a write that makes no progress for [`WRITE_DEADLINE`] (a peer that never
//!   reads its replies) fails, and the connection is closed.
//!
//! Accept errors (EMFILE, ENFILE, ENOMEM) back off 50 ms and are logged at most once per 10 s.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{Instant, Sleep};
use tracing::warn;

/// The most connections held open at once (lowered to a quarter of RLIMIT_NOFILE).
pub const MAX_CONNECTIONS: usize = 256;
/// A new connection must have sent the HTTP/2 client preface within this.
pub const PREFACE_DEADLINE: Duration = Duration::from_secs(5);
/// A write that cannot make progress for this long closes the connection.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
const PREFACE_LEN: usize = 24;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The cap for this process: [`MAX_CONNECTIONS`], or a quarter of the soft RLIMIT_NOFILE.
pub fn max_connections() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        usize::try_from(r.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    (nofile / 4).clamp(8, MAX_CONNECTIONS)
}

/// Whose credentials a connection carries.
#[derive(Clone, Copy, Debug)]
pub enum Peers {
    /// The connecting process's (SO_PEERCRED).
    Real,
    /// Unit tests run as any user: every peer has this uid.
    #[cfg(test)]
    As(u32),
}

/// A warning that is logged at most once per [`WARN_EVERY`], with the count it stood for.
pub struct RateLimited {
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimited {
    pub const fn new() -> Self {
        RateLimited {
            state: Mutex::new((None, 0)),
        }
    }

    /// Some(n) when the caller should log now: n occurrences since the last log, this included.
    pub fn hit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        let now = std::time::Instant::now();
        match s.0 {
            Some(t) if now.duration_since(t) < WARN_EVERY => None,
            _ => {
                let n = s.1;
                *s = (Some(now), 0);
                Some(n)
            }
        }
    }
}

impl Default for RateLimited {
    fn default() -> Self {
        Self::new()
    }
}

/// The shared state of one open connection.
struct Slot {
    /// Calls in progress (from the request's head to its response).
    calls: AtomicUsize,
    /// Milliseconds since `EPOCH` of the last byte read or written.
    last: AtomicU64,
    evict: AtomicBool,
    closed: AtomicBool,
    waker: AtomicWaker,
}

fn epoch() -> Instant {
    static E: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Slot {
    fn touch(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }

    fn evict(&self) {
        self.evict.store(true, Ordering::Relaxed);
        self.waker.wake();
    }
}

/// What each request of a connection carries (tonic's connect info, a request extension).
#[derive(Clone)]
pub struct PeerInfo {
    /// SO_PEERCRED's uid, None when the kernel would not say.
    pub uid: Option<u32>,
    slot: Arc<Slot>,
}

/// A call in progress on its connection (the connection is not evicted meanwhile).
pub struct CallGuard(Arc<Slot>);

impl PeerInfo {
    pub fn begin_call(&self) -> CallGuard {
        self.slot.calls.fetch_add(1, Ordering::Relaxed);
        self.slot.touch();
        CallGuard(self.slot.clone())
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The listener as a stream of checked connections.
pub struct Incoming {
    listener: UnixListener,
    peers: Peers,
    cap: usize,
    open: Vec<Arc<Slot>>,
    backoff: Option<Pin<Box<Sleep>>>,
}

static ACCEPT_FAILED: RateLimited = RateLimited::new();
static OVER_CAP: RateLimited = RateLimited::new();

impl Incoming {
    pub fn new(listener: UnixListener, peers: Peers) -> Self {
        Incoming::with_cap(listener, peers, max_connections())
    }

    pub fn with_cap(listener: UnixListener, peers: Peers, cap: usize) -> Self {
        Incoming {
            listener,
            peers,
            cap,
            open: Vec::with_capacity(cap + 1),
            backoff: None,
        }
    }

    /// Makes room for one more connection: false when every open one has a call in progress.
    fn make_room(&mut self) -> bool {
        self.open.retain(|s| !s.closed.load(Ordering::Relaxed));
        let live = self
            .open
            .iter()
            .filter(|s| !s.evict.load(Ordering::Relaxed))
            .count();
        if live < self.cap {
            return true;
        }
        let victim = self
            .open
            .iter()
            .filter(|s| !s.evict.load(Ordering::Relaxed) && s.calls.load(Ordering::Relaxed) == 0)
            .min_by_key(|s| s.last.load(Ordering::Relaxed));
        match victim {
            Some(v) => {
                v.evict();
                true
            }
            None => false,
        }
    }
}

impl futures::Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(b) = self.backoff.as_mut() {
                if b.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.backoff = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    if let Some(n) = ACCEPT_FAILED.hit() {
                        warn!(error = %e, times = n, "accepting a connection failed; backing off");
                    }
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
                Poll::Ready(Ok((io, _))) => {
                    if !self.make_room() {
                        if let Some(n) = OVER_CAP.hit() {
                            warn!(
                                cap = self.cap,
                                times = n,
                                "every connection has a call in progress: a new one was closed"
                            );
                        }
                        drop(io);
                        continue;
                    }
                    let uid = match self.peers {
                        Peers::Real => io.peer_cred().ok().map(|c| c.uid()),
                        #[cfg(test)]
                        Peers::As(u) => Some(u),
                    };
                    let slot = Arc::new(Slot {
                        calls: AtomicUsize::new(0),
                        last: AtomicU64::new(now_ms()),
                        evict: AtomicBool::new(false),
                        closed: AtomicBool::new(false),
                        waker: AtomicWaker::new(),
                    });
                    self.open.push(slot.clone());
                    return Poll::Ready(Some(Ok(Conn {
                        io,
                        info: PeerInfo { uid, slot },
                        read: 0,
                        preface: Some(Box::pin(tokio::time::sleep(PREFACE_DEADLINE))),
                        write_stall: None,
                    })));
                }
            }
        }
    }
}

/// One accepted connection: the socket, its peer and its deadlines.
pub struct Conn {
    io: UnixStream,
    info: PeerInfo,
    read: usize,
    preface: Option<Pin<Box<Sleep>>>,
    /// Armed while a write cannot make progress.
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.info.slot.closed.store(true, Ordering::Relaxed);
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl Conn {
    /// The result of a write attempt, with the write deadline applied to a blocked one.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Pending => {
                let t = self
                    .write_stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_DEADLINE)));
                if t.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer has not read for the write deadline",
                    )));
                }
                Poll::Pending
            }
            Poll::Ready(r) => {
                self.write_stall = None;
                if matches!(r, Ok(n) if n > 0) {
                    self.info.slot.touch();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.info.slot.waker.register(cx.waker());
        if this.info.slot.evict.load(Ordering::Relaxed) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for a new connection",
            )));
        }
        if let Some(t) = this.preface.as_mut() {
            if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the deadline",
                )));
            }
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.info.slot.touch();
            this.read += n;
            if this.read >= PREFACE_LEN {
                this.preface = None;
            }
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.after_write(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.after_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
