//! The daemon's gRPC service on its unix socket, served by tonic (hyper + h2) on the daemon's one
//! runtime thread.
//!
//! Every limit is one of tonic's, hyper's or h2's, set in [`serve_as`]; what they do not offer is
//! in [`crate::conn`] (the connection cap, the preface and write deadlines) and here (the peer
//! gate, the budget of request bytes in flight). Each call's peer is checked (SO_PEERCRED, read
//! once per connection when it is accepted) before its request is decoded: a peer that is not
//! root gets PERMISSION_DENIED and its body is never read.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ambient_cni_proto::v1::cni_node_server::{CniNode, CniNodeServer};
use ambient_cni_proto::v1::*;
use ambient_cni_proto::CONTRACT_VERSION;
use tonic::body::Body;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::conn::{Incoming, PeerInfo, Peers, RateLimited};
use crate::daemon::{Daemon, PodEvent, RequestError, RunningPod};
use crate::dataplane::Dataplane;

/// The largest request message accepted (a CNI GC listing every attachment of a big node is
/// ~1 MB); larger ones get RESOURCE_EXHAUSTED before their body is read.
pub const MAX_REQUEST: usize = 16 << 20;
/// What all calls in flight together may have read of their request bodies (DATA bytes), so that
/// many streams at the size limit cannot add up: past it a call fails with RESOURCE_EXHAUSTED.
pub const BODY_BUDGET: usize = 64 << 20;
/// Streams a client may have open on one connection (SETTINGS_MAX_CONCURRENT_STREAMS). The
/// plugin uses one; a tonic client opens its calls before it has our SETTINGS, and gets
/// REFUSED_STREAM for those over the limit, so it is not lower than what a client may start at once.
pub const MAX_STREAMS: u32 = 100;
/// The largest header list accepted (RFC 7541 size; h2 also bounds CONTINUATION frames by it).
/// Our requests carry ~300 bytes of headers.
pub const MAX_HEADER_LIST: u32 = 16 << 10;
/// A call's deadline when the client sends no shorter `grpc-timeout` (tonic takes the smaller
/// of the two); past it the client gets CANCELLED ("Timeout expired").
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 PING sent after this long without one, on every connection; a peer that does not
/// answer within [`KEEPALIVE_TIMEOUT`] is dropped (a dead or never-reading peer).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Flow-control windows we grant: what h2 buffers for a stream, and for a connection, before the
/// request is read. Bodies are read as they come, so this bounds a peer that sends and stalls.
const STREAM_WINDOW: u32 = 256 << 10;
const CONN_WINDOW: u32 = 512 << 10;
/// Streams a client may reset before we accept them, and errors we may answer with a reset,
/// before the connection is closed (h2's defences against rapid reset).
const MAX_PENDING_RESETS: usize = 20;
const MAX_LOCAL_RESETS: usize = 256;
/// On shutdown, how long open connections get to finish their calls.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The service.
pub struct Service<D> {
    daemon: Arc<Daemon<D>>,
}

impl<D> Service<D> {
    /// Serve this daemon.
    pub fn new(daemon: Arc<Daemon<D>>) -> Self {
        Service { daemon }
    }
}

fn check_version(v: u32) -> Result<(), Status> {
    if v == CONTRACT_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "contract version {v} not supported (daemon speaks {CONTRACT_VERSION})"
        )))
    }
}

fn to_status(e: RequestError) -> Status {
    match e {
        RequestError::Invalid(m) => Status::invalid_argument(m),
        RequestError::Precondition(m) => Status::failed_precondition(m),
        e @ RequestError::Kernel(_) => Status::internal(e.to_string()),
        e @ RequestError::State(_) => Status::internal(e.to_string()),
    }
}

fn event(r: PodRequest) -> PodEvent {
    PodEvent {
        container_id: r.container_id,
        ifname: r.ifname,
        netns: r.netns,
        namespace: r.pod_namespace,
        name: r.pod_name,
        uid: r.pod_uid,
        network: r.network_name,
        ips: r.ips.into_iter().map(|i| (i.address, i.gateway)).collect(),
        host_if: r.host_interface,
    }
}

/// A full reconcile's summary as the STATUS reply carries it.
pub fn reconcile_run(r: &crate::daemon::ResyncSummary) -> ReconcileRun {
    ReconcileRun {
        unix_ms: r.unix_ms,
        kind: r.kind.clone(),
        changed: u32::try_from(r.repaired).unwrap_or(u32::MAX),
        changes: r.changed.clone(),
        errors: r.errors.clone(),
        micros: r.micros,
    }
}

/// The metrics label of the gRPC code a handler answers with (a bounded set).
fn code_label(c: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match c {
        C::Ok => "ok",
        C::InvalidArgument => "invalid_argument",
        C::FailedPrecondition => "failed_precondition",
        C::Internal => "internal",
        C::ResourceExhausted => "resource_exhausted",
        C::Cancelled => "cancelled",
        _ => "other",
    }
}

/// Counts one call of `verb` in the metrics when it is answered, with its code and the time from
/// the handler's start; a call whose future tonic drops first (the client went away, or its
/// deadline passed) is counted as `cancelled`.
struct Counted<'a> {
    metrics: &'a crate::metrics::Metrics,
    verb: &'static str,
    start: Instant,
    code: Option<&'static str>,
}

impl<'a> Counted<'a> {
    fn new(metrics: &'a crate::metrics::Metrics, verb: &'static str) -> Self {
        Counted {
            metrics,
            verb,
            start: Instant::now(),
            code: None,
        }
    }

    /// The answer: counted with its code.
    fn done<T>(mut self, r: Result<T, Status>) -> Result<T, Status> {
        self.code = Some(match &r {
            Ok(_) => "ok",
            Err(st) => code_label(st.code()),
        });
        r
    }

    /// An answer with another label than its gRPC code (GC's `partial`).
    fn done_as<T>(mut self, code: &'static str, r: T) -> T {
        self.code = Some(code);
        r
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let code = self.code.unwrap_or("cancelled");
        self.metrics.request(self.verb, code, self.start.elapsed());
    }
}

/// Runs a call that changes state in its own task: when the client goes away or its deadline
/// passes, tonic drops the call's future, and a change must not stop half-way.
async fn detached<T: Send + 'static>(
    f: impl Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(f)
        .await
        .map_err(|e| Status::internal(format!("the call's task failed: {e}")))
}

#[tonic::async_trait]
impl<D: Dataplane> CniNode for Service<D> {
    async fn pod_add(&self, req: Request<PodRequest>) -> Result<Response<PodAddReply>, Status> {
        let c = Counted::new(self.daemon.metrics(), "add");
        c.done(self.pod_add_call(req.into_inner()).await)
    }

    async fn pod_del(&self, req: Request<PodRequest>) -> Result<Response<PodDelReply>, Status> {
        let c = Counted::new(self.daemon.metrics(), "del");
        c.done(self.pod_del_call(req.into_inner()).await)
    }

    async fn pod_check(&self, req: Request<PodRequest>) -> Result<Response<PodCheckReply>, Status> {
        let c = Counted::new(self.daemon.metrics(), "check");
        c.done(self.pod_check_call(req.into_inner()).await)
    }

    async fn gc(&self, req: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        let c = Counted::new(self.daemon.metrics(), "gc");
        match self.gc_call(req.into_inner()).await {
            // Answered OK, with errors for some attachments.
            Ok(r) if !r.get_ref().errors.is_empty() => c.done_as("partial", Ok(r)),
            r => c.done(r),
        }
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let c = Counted::new(self.daemon.metrics(), "status");
        c.done(Ok(Response::new(status_reply(&*self.daemon).await)))
    }

    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<EnrollReply>, Status> {
        let r = req.into_inner();
        let verb = if r.release { "release" } else { "enroll" };
        let c = Counted::new(self.daemon.metrics(), verb);
        let out = async {
            check_version(r.contract_version)?;
            let d = self.daemon.clone();
            let out = detached(async move { enroll(&d, r).await }).await??;
            Ok(Response::new(out))
        };
        c.done(out.await)
    }

    async fn dump(&self, _req: Request<DumpRequest>) -> Result<Response<DumpReply>, Status> {
        let c = Counted::new(self.daemon.metrics(), "dump");
        let v = self.daemon.dump().await;
        c.done(Ok(Response::new(DumpReply {
            json: serde_json::to_string_pretty(&v).unwrap_or_default(),
        })))
    }

    async fn trace(&self, req: Request<TraceRequest>) -> Result<Response<TraceReply>, Status> {
        let c = Counted::new(self.daemon.metrics(), "trace");
        let r = req.into_inner();
        let limit = if r.limit == 0 { 200 } else { r.limit as usize };
        let events = self
            .daemon
            .trace(&r.filter, limit)
            .into_iter()
            .map(|e| TraceEvent {
                unix_ms: e.unix_ms,
                kind: e.kind,
                message: e.message,
            })
            .collect();
        c.done(Ok(Response::new(TraceReply { events })))
    }
}

/// The calls' bodies, apart from their counting.
impl<D: Dataplane> Service<D> {
    async fn pod_add_call(&self, r: PodRequest) -> Result<Response<PodAddReply>, Status> {
        check_version(r.contract_version)?;
        let d = self.daemon.clone();
        let out = detached(async move { d.add(event(r)).await })
            .await?
            .map_err(to_status)?;
        Ok(Response::new(PodAddReply {
            enrolled: out.enrolled,
            reason: out.reason,
            ztunnel: out.ztunnel,
        }))
    }

    async fn pod_del_call(&self, r: PodRequest) -> Result<Response<PodDelReply>, Status> {
        check_version(r.contract_version)?;
        let d = self.daemon.clone();
        let removed = detached(async move { d.del(&r.container_id, &r.ifname).await })
            .await?
            .map_err(to_status)?;
        Ok(Response::new(PodDelReply { removed }))
    }

    async fn pod_check_call(&self, r: PodRequest) -> Result<Response<PodCheckReply>, Status> {
        check_version(r.contract_version)?;
        let (enrolled, detail) = self
            .daemon
            .check(&r.container_id, &r.ifname)
            .await
            .map_err(to_status)?;
        Ok(Response::new(PodCheckReply { enrolled, detail }))
    }

    async fn gc_call(&self, r: GcRequest) -> Result<Response<GcReply>, Status> {
        check_version(r.contract_version)?;
        let valid: Vec<(String, String)> = r
            .valid
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        let d = self.daemon.clone();
        let (removed, errors) = detached(async move {
            d.gc(
                &r.network_name,
                r.has_valid_list.then_some(valid.as_slice()),
            )
            .await
        })
        .await?;
        Ok(Response::new(GcReply { removed, errors }))
    }
}

/// The STATUS reply.
async fn status_reply<D: Dataplane>(daemon: &Daemon<D>) -> StatusReply {
    let s = daemon.status().await;
    let reason = if s.ready {
        String::new()
    } else {
        match &s.last_resync {
            Some(r) if !r.errors.is_empty() => {
                format!("last reconcile failed: {}", r.errors.join("; "))
            }
            _ => "initial reconcile has not completed".into(),
        }
    };
    StatusReply {
        ready: s.ready,
        reason,
        pods: s.pods as u32,
        enrolled_pods: s.enrolled as u32,
        ztunnel_present: s.ztunnel.is_some(),
        version: env!("CARGO_PKG_VERSION").into(),
        ip_families: s.ip_families.clone(),
        ztunnel_ips: s.ztunnel_ips(),
        running_not_enrolled: s.not_enrolled as u32,
        last_resync: s.last_resync.as_ref().map(reconcile_run),
        last_repair: s.last_repair.as_ref().map(reconcile_run),
        resyncs: s.resyncs,
    }
}

/// `ambient-cnid enroll` (and `--release`): a running pod enrolled without a CNI ADD.
async fn enroll<D: Dataplane>(daemon: &Daemon<D>, r: EnrollRequest) -> Result<EnrollReply, Status> {
    let out = if r.release {
        daemon.release_running(&r.pod_uid).await
    } else {
        let mut ips = Vec::with_capacity(r.ips.len());
        for a in &r.ips {
            let ip = a
                .parse()
                .map_err(|_| Status::invalid_argument(format!("not an IP address: {a:?}")))?;
            ips.push(ip);
        }
        daemon
            .enroll_running(RunningPod {
                namespace: r.pod_namespace,
                name: r.pod_name,
                uid: r.pod_uid,
                ips,
                host_network: false,
            })
            .await
    }
    .map_err(to_status)?;
    Ok(EnrollReply {
        enrolled: out.enrolled,
        detail: out.detail,
    })
}

/// Refuse every peer that is not root: the socket is a privilege boundary.
pub fn check_peer(uid: Option<u32>) -> Result<(), Status> {
    match uid {
        Some(0) => Ok(()),
        Some(u) => {
            static REFUSED: RateLimited = RateLimited::new();
            if let Some(n) = REFUSED.hit() {
                warn!(uid = u, times = n, "refused a peer that is not root");
            }
            Err(Status::permission_denied(format!(
                "peer uid {u} is not root"
            )))
        }
        None => Err(Status::permission_denied("peer credentials unavailable")),
    }
}

/// The tower layer in front of tonic's router: the peer check (before the body is read), the
/// connection's count of calls in progress (a connection with one is never evicted), and the
/// body budget.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    budget: Arc<AtomicUsize>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let peer = req.extensions().get::<PeerInfo>().cloned();
        if let Err(st) = check_peer(peer.as_ref().and_then(|p| p.uid)) {
            // The request, body unread, is dropped here: h2 resets the stream.
            drop(req);
            return Box::pin(async move { Ok(st.into_http()) });
        }
        let busy = peer.map(|p| p.begin_call());
        let budget = self.budget.clone();
        let req = req.map(|b| {
            Body::new(Budgeted {
                inner: b,
                counted: 0,
                budget,
            })
        });
        // The clone that was made ready is the one called (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(busy);
            r
        })
    }
}

/// A request body that counts its DATA bytes against the daemon-wide [`BODY_BUDGET`] while the
/// call holds it.
struct Budgeted {
    inner: Body,
    counted: usize,
    budget: Arc<AtomicUsize>,
}

impl http_body::Body for Budgeted {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        if let Some(Ok(f)) = &r {
            if let Some(d) = f.data_ref() {
                let n = d.len();
                let before = self.budget.fetch_add(n, Ordering::Relaxed);
                self.counted += n;
                if before + n > BODY_BUDGET {
                    return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                        "the daemon is reading {BODY_BUDGET} bytes of requests already"
                    )))));
                }
            }
        }
        Poll::Ready(r.map(|r| r.map_err(|e| Status::internal(format!("request body: {e}")))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Budgeted {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.counted, Ordering::Relaxed);
    }
}

/// Bind the socket, 0600, after removing a stale socket at its path (only a socket: any other
/// file there is an error and stays). Its directory is created 0700 when missing; an existing
/// directory keeps its mode (`--socket /run/x.sock` must not chmod `/run`), except the daemon's
/// own default directory, which is made 0700.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let own_default = Path::new(ambient_cni_proto::DEFAULT_SOCKET).parent() == Some(dir);
    if !dir.exists() {
        // Every directory this creates is 0700 (umask can only narrow it).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    } else if own_default {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves `listener` until `shutdown` resolves, then gives open calls [`SHUTDOWN_GRACE`].
pub async fn serve<D: Dataplane>(
    daemon: Arc<Daemon<D>>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_as(daemon, listener, shutdown, Peers::Real).await
}

pub(crate) async fn serve_as<D: Dataplane>(
    daemon: Arc<Daemon<D>>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
    peers: Peers,
) -> Result<(), tonic::transport::Error> {
    let budget = Arc::new(AtomicUsize::new(0));
    let svc = CniNodeServer::new(Service::new(daemon))
        .max_decoding_message_size(MAX_REQUEST)
        // A dump of a full node is ~18 MB of JSON.
        .max_encoding_message_size(usize::MAX);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .accept_http1(false)
        .timeout(CALL_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .layer(tower::layer::layer_fn(move |inner| Gate {
            inner,
            budget: budget.clone(),
        }))
        // One service: no router (the generated service answers UNIMPLEMENTED for other paths).
        .serve_with_incoming_shutdown(svc, Incoming::new(listener, peers), async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r,
        _ = shutdown => {}
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(r) => r,
        Err(_) => {
            debug!("connections still open after the shutdown grace: closed");
            Ok(())
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
