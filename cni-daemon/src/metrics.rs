//! Prometheus metrics (`ambient-cnid run --metrics-addr 127.0.0.1:15014`): what the daemon did,
//! counted where it happens (requests in the socket's tonic handlers, `crate::server`;
//! reconciles, repairs and running-pod enrollments in the daemon; kernel events in
//! `crate::events`), and what it holds, read when scraped. Served as text on `GET /metrics` by
//! [`serve`].
//!
//! Cardinality is bounded: labels are verbs, result codes, reconcile kinds, object kinds and
//! namespace roles, never a pod, an IP or an interface name.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tracing::{debug, info, warn};

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    /// add, del, check, gc, status, enroll, release, dump, trace.
    verb: &'static str,
    /// ok, invalid_argument, failed_precondition, internal, resource_exhausted, other (the gRPC
    /// code the server answers); cancelled (the client went away first); partial (a GC answered
    /// with errors for some attachments).
    code: &'static str,
}

/// Labels of a running-pod enrollment change.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Running {
    /// api (the watcher's list of running pods), manual (`ambient-cnid enroll`).
    origin: &'static str,
    /// enrolled, released.
    change: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Origin {
    /// api, manual.
    origin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Verb {
    verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    /// start, resync, ztunnel, event.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Object {
    /// ipset, route, rule, link, iptables, sysctl.
    object: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Netns {
    /// node, ztunnel.
    netns: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    /// known, enrolled.
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: &'static str,
}

/// What a scrape reads from the daemon at that moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    /// Pod records.
    pub pods: usize,
    /// Enrolled records.
    pub enrolled: usize,
    /// A live ztunnel.
    pub ztunnel: bool,
    /// Initial reconcile done.
    pub ready: bool,
    /// Size of the state dir's journal, bytes.
    pub journal_bytes: u64,
    /// Records of running pods enrolled without a CNI ADD: (from the API, by hand).
    pub running: (usize, usize),
    /// Running pods of enrolled namespaces that could not be enrolled.
    pub running_not_enrolled: usize,
}

impl Snapshot {
    /// What a scrape reads from the daemon's status and the journal's size.
    pub fn of(s: &crate::daemon::StatusView, journal_bytes: u64) -> Snapshot {
        Snapshot {
            pods: s.pods,
            enrolled: s.enrolled,
            ztunnel: s.ztunnel.is_some(),
            ready: s.ready,
            journal_bytes,
            running: s.running,
            running_not_enrolled: s.not_enrolled,
        }
    }
}

/// The daemon's metrics. Every method is cheap (atomics; a family lookup takes a read lock).
pub struct Metrics {
    registry: Registry,
    requests: Family<Request, Counter>,
    latency: Family<Verb, Histogram>,
    reconciles: Family<Kind, Counter>,
    reconcile_seconds: Family<Kind, Histogram>,
    repairs: Family<Object, Counter>,
    apply_errors: Counter,
    kernel_events: Family<Netns, Counter>,
    event_overflows: Family<Netns, Counter>,
    pods: Family<State, Gauge>,
    running: Family<Running, Counter>,
    running_pods: Family<Origin, Gauge>,
    running_not_enrolled: Gauge,
    ztunnel: Gauge,
    ready: Gauge,
    journal_bytes: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The object kind of one applied operation, from its text (see `reconcile::Op::text`): on
/// the nftables firewall the pod set is `nft_set` and the chains `nft_chains`.
pub fn object_of(line: &str) -> &'static str {
    let mut w = line.split_whitespace();
    match (w.next().unwrap_or(""), w.next().unwrap_or("")) {
        ("create", "ipset") | ("ipset", _) => "ipset",
        ("create", "nft") | ("nft", "add" | "delete") => "nft_set",
        ("nft", "batch") => "nft_chains",
        ("create", "tunnel") | ("delete", "link") => "link",
        ("route", _) => "route",
        ("rule", _) => "rule",
        ("iptables-restore" | "ip6tables-restore", _) => "iptables",
        ("sysctl", _) => "sysctl",
        _ => "other",
    }
}

/// The metrics label of a full reconcile's kind as the daemon names it.
fn reconcile_kind(kind: &str) -> &'static str {
    match kind {
        "start" => "start",
        "repair" | "resync" => "resync",
        "event" => "event",
        _ => "ztunnel",
    }
}

impl Metrics {
    /// Every metric registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ambient_cni");
        // 50 µs .. ~1.6 s: a pod ADD is ~0.1-1 ms, a full reconcile at 10,000 pods ~100 ms.
        let fast = || Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        let requests = Family::<Request, Counter>::default();
        let latency = Family::<Verb, Histogram>::new_with_constructor(fast);
        let reconciles = Family::<Kind, Counter>::default();
        let reconcile_seconds = Family::<Kind, Histogram>::new_with_constructor(fast);
        let repairs = Family::<Object, Counter>::default();
        let apply_errors = Counter::default();
        let kernel_events = Family::<Netns, Counter>::default();
        let event_overflows = Family::<Netns, Counter>::default();
        let pods = Family::<State, Gauge>::default();
        let running = Family::<Running, Counter>::default();
        let running_pods = Family::<Origin, Gauge>::default();
        let running_not_enrolled = Gauge::default();
        let ztunnel = Gauge::default();
        let ready = Gauge::default();
        let journal_bytes = Gauge::default();
        registry.register(
            "requests",
            "CNI and admin requests handled, by verb and result code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time the daemon took to answer a request (from the call to the answer), by verb",
            latency.clone(),
        );
        registry.register(
            "reconciles",
            "Full reconciles (read back, plan, apply), by what started them",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a full reconcile took, by what started it",
            reconcile_seconds.clone(),
        );
        registry.register(
            "repairs",
            "Kernel objects a full reconcile had to change (drift repaired), by object kind",
            repairs.clone(),
        );
        registry.register(
            "apply_errors",
            "Kernel operations that failed (any apply)",
            apply_errors.clone(),
        );
        registry.register(
            "kernel_events",
            "rtnetlink notifications about our objects that asked for a repair, by namespace",
            kernel_events.clone(),
        );
        registry.register(
            "kernel_event_overflows",
            "Times the notification socket overflowed (events lost: a repair was run)",
            event_overflows.clone(),
        );
        registry.register("pods", "Pod records, known and enrolled", pods.clone());
        registry.register(
            "running_enrollments",
            "Running pods enrolled or released without a CNI ADD, by origin",
            running.clone(),
        );
        registry.register(
            "running_pods",
            "Records of running pods enrolled without a CNI ADD, by origin",
            running_pods.clone(),
        );
        registry.register(
            "running_not_enrolled",
            "Running pods of enrolled namespaces (from the API) that could not be enrolled",
            running_not_enrolled.clone(),
        );
        registry.register(
            "ztunnel_present",
            "1 when a live ztunnel is known",
            ztunnel.clone(),
        );
        registry.register(
            "ready",
            "1 once the initial reconcile succeeded",
            ready.clone(),
        );
        registry.register(
            "journal_bytes",
            "Size of the state dir's registry journal",
            journal_bytes.clone(),
        );
        registry.register(
            "build",
            "The daemon's build",
            Info::new(Build {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        Metrics {
            registry,
            requests,
            latency,
            reconciles,
            reconcile_seconds,
            repairs,
            apply_errors,
            kernel_events,
            event_overflows,
            pods,
            running,
            running_pods,
            running_not_enrolled,
            ztunnel,
            ready,
            journal_bytes,
        }
    }

    /// One request of `verb` answered with `code` after `took`.
    pub fn request(&self, verb: &'static str, code: &'static str, took: Duration) {
        self.requests.get_or_create(&Request { verb, code }).inc();
        self.latency
            .get_or_create(&Verb { verb })
            .observe(took.as_secs_f64());
    }

    /// One full reconcile of `kind` (as the daemon names it) that applied `applied`.
    pub fn reconcile<'a>(
        &self,
        kind: &str,
        applied: impl IntoIterator<Item = &'a String>,
        took: Duration,
    ) {
        let kind = reconcile_kind(kind);
        self.reconciles.get_or_create(&Kind { kind }).inc();
        self.reconcile_seconds
            .get_or_create(&Kind { kind })
            .observe(took.as_secs_f64());
        for line in applied {
            self.repairs
                .get_or_create(&Object {
                    object: object_of(line),
                })
                .inc();
        }
    }

    /// A running pod of `origin` (api, manual) was enrolled or released (`change`) without a
    /// CNI ADD.
    pub fn running(&self, origin: &'static str, change: &'static str) {
        self.running
            .get_or_create(&Running { origin, change })
            .inc();
    }

    /// `n` kernel operations failed.
    pub fn apply_errors(&self, n: usize) {
        if n > 0 {
            self.apply_errors.inc_by(n as u64);
        }
    }

    /// A notification about our objects in `netns` (node, ztunnel) asked for a repair.
    pub fn kernel_event(&self, netns: &'static str) {
        self.kernel_events.get_or_create(&Netns { netns }).inc();
    }

    /// The notification socket of `netns` overflowed.
    pub fn event_overflow(&self, netns: &'static str) {
        self.event_overflows.get_or_create(&Netns { netns }).inc();
    }

    /// The text exposition (OpenMetrics text, which Prometheus scrapes) with the gauges set
    /// from `s`.
    pub fn render(&self, s: &Snapshot) -> String {
        let g = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.pods
            .get_or_create(&State { state: "known" })
            .set(g(s.pods));
        self.pods
            .get_or_create(&State { state: "enrolled" })
            .set(g(s.enrolled));
        for (origin, n) in [("api", s.running.0), ("manual", s.running.1)] {
            self.running_pods
                .get_or_create(&Origin { origin })
                .set(g(n));
        }
        self.running_not_enrolled.set(g(s.running_not_enrolled));
        self.ztunnel.set(i64::from(s.ztunnel));
        self.ready.set(i64::from(s.ready));
        self.journal_bytes
            .set(i64::try_from(s.journal_bytes).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing into a String does not fail; say so if it ever does.
            warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The size of the registry journal in `state_dir` (0 when there is none).
pub fn journal_bytes(state_dir: &Path) -> u64 {
    std::fs::metadata(state_dir.join(crate::store::JOURNAL))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Refuses an address the node's neighbours could reach unless `allow_remote`: the port never
/// leaves the node without a flag.
pub fn check_addr(addr: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(format!(
            "--metrics-addr {addr} is not a loopback address: pass --metrics-allow-remote to \
             serve metrics beyond this node"
        ))
    }
}

/// Serves `GET /metrics` on `listener` with what `render` returns, until `shutdown` resolves.
/// Each connection is its own task on the daemon's runtime; a scrape never blocks a CNI call
/// longer than `render` takes.
pub async fn serve<R, F>(
    listener: tokio::net::TcpListener,
    render: R,
    shutdown: impl Future<Output = ()>,
) where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = String> + Send + 'static,
{
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};

    tokio::pin!(shutdown);
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "serving metrics on /metrics");
    }
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics: accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let render = render.clone();
                    async move {
                        let resp = if req.method() == Method::GET && req.uri().path() == "/metrics"
                        {
                            let body = render().await;
                            Response::builder()
                                .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
                                .body(Full::new(Bytes::from(body)))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"only GET /metrics\n")))
                        };
                        resp
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            // A client that stops reading is dropped after 10 s.
            match tokio::time::timeout(Duration::from_secs(10), conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(peer = %peer, error = %e, "metrics connection"),
                Err(_) => debug!(peer = %peer, "metrics connection timed out"),
            }
        });
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
