//! Prometheus metrics (`ambient-cnid run --metrics-addr 127.0.0.1:15014`): what the daemon did,
//! counted where it happens ([`crate::daemon::Daemon`]'s methods, whatever server called them),
//! and what it holds, read when scraped. Served as text on `GET /metrics` by [`serve`].
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
    /// add, del, check, gc, status.
    verb: &'static str,
    /// ok, invalid_argument, failed_precondition, internal (the gRPC code the server answers).
    code: &'static str,
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

/// The gRPC code name of a request's outcome (what the server maps a [`RequestError`] to).
///
/// [`RequestError`]: crate::daemon::RequestError
pub fn code_of<T>(r: &Result<T, crate::daemon::RequestError>) -> &'static str {
    use crate::daemon::RequestError as E;
    match r {
        Ok(_) => "ok",
        Err(E::Invalid(_)) => "invalid_argument",
        Err(E::Precondition(_)) => "failed_precondition",
        Err(E::Kernel(_) | E::State(_)) => "internal",
    }
}

/// The object kind of one applied operation, from its text (see `reconcile::Op`'s Display).
pub fn object_of(line: &str) -> &'static str {
    let mut w = line.split_whitespace();
    match (w.next().unwrap_or(""), w.next().unwrap_or("")) {
        ("create", "ipset") | ("ipset", _) => "ipset",
        ("create", "tunnel") | ("delete", "link") => "link",
        ("route", _) => "route",
        ("rule", _) => "rule",
        ("iptables-restore", _) => "iptables",
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
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::config::Config;
    use crate::daemon::{test_event, Daemon};
    use crate::dataplane::fake::FakeDataplane;
    use crate::registry::Registry;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
        let mut out = String::new();
        c.read_to_string(&mut out).await.expect("read");
        let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
        (head.to_string(), body.to_string())
    }

    fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        s.samples
            .iter()
            .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .and_then(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    #[tokio::test]
    async fn a_scrape_parses_and_counts_what_the_daemon_did() {
        let dp = Arc::new(FakeDataplane::new());
        dp.kernel().add_host_link("vetha");
        let mut cfg = Config::default();
        cfg.ambient_namespaces.insert("default".into());
        let d = Arc::new(Daemon::new(Arc::new(cfg), dp, None, Registry::default()));
        assert!(d.resync().await.ok());
        d.add(test_event("c1", "default", "a", "10.244.1.5", "vetha"))
            .await
            .expect("add");
        assert!(d
            .add(test_event("bad id!", "default", "b", "10.244.1.6", "vetha"))
            .await
            .is_err());
        d.del("c9", "eth0").await.expect("del of an unknown pod");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let dd = d.clone();
        tokio::spawn(serve(
            l,
            move || {
                let d = dd.clone();
                async move {
                    let s = d.snapshot().await;
                    d.metrics().render(&Snapshot {
                        pods: s.pods,
                        enrolled: s.enrolled,
                        ztunnel: s.ztunnel.is_some(),
                        ready: s.ready,
                        journal_bytes: 123,
                    })
                }
            },
            std::future::pending(),
        ));
        let (head, body) = get(addr, "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("openmetrics-text"), "{head}");
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
            .expect("a Prometheus text scrape");
        let v = |n: &str, l: &[(&str, &str)]| value(&scrape, n, l);
        assert_eq!(
            v(
                "ambient_cni_requests_total",
                &[("verb", "add"), ("code", "ok")]
            ),
            Some(1.0),
            "{body}"
        );
        assert_eq!(
            v(
                "ambient_cni_requests_total",
                &[("verb", "add"), ("code", "invalid_argument")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "ambient_cni_requests_total",
                &[("verb", "del"), ("code", "ok")]
            ),
            Some(1.0)
        );
        assert_eq!(v("ambient_cni_pods", &[("state", "known")]), Some(1.0));
        assert_eq!(v("ambient_cni_pods", &[("state", "enrolled")]), Some(1.0));
        assert_eq!(v("ambient_cni_ztunnel_present", &[]), Some(0.0));
        assert_eq!(v("ambient_cni_ready", &[]), Some(1.0));
        assert_eq!(v("ambient_cni_journal_bytes", &[]), Some(123.0));
        assert_eq!(
            v("ambient_cni_reconciles_total", &[("kind", "start")]),
            Some(1.0)
        );
        assert!(v("ambient_cni_repairs_total", &[("object", "ipset")]).is_some_and(|n| n >= 1.0));
        assert!(body.contains("ambient_cni_build_info{version=\""), "{body}");
        // The latency histogram of ADD holds both requests.
        let h = scrape
            .samples
            .iter()
            .find(|x| {
                x.metric == "ambient_cni_request_duration_seconds"
                    && x.labels.get("verb") == Some("add")
            })
            .expect("ADD latency histogram");
        match &h.value {
            prometheus_parse::Value::Histogram(b) => {
                assert_eq!(b.last().map(|c| c.count), Some(2.0), "{body}")
            }
            other => panic!("not a histogram: {other:?}"),
        }
        // No pod name, IP or UID in any label.
        for s in &scrape.samples {
            for (k, val) in s.labels.iter() {
                assert!(
                    !val.contains("10.244") && !val.contains("uid-") && val != "a",
                    "{k}={val}"
                );
            }
        }
        let (head, _) = get(addr, "/other").await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    }

    #[test]
    fn object_kinds_of_applied_lines() {
        for (line, kind) in [
            ("create ipset", "ipset"),
            ("ipset add 10.0.0.1 (owner u)", "ipset"),
            ("create tunnel istioin into /run/netns/z", "link"),
            ("delete link istioout", "link"),
            ("route replace 10.0.0.1/32 table 100 in node", "route"),
            ("rule add 101 in node", "rule"),
            (
                "iptables-restore in node: mangle/ztunnel-PREROUTING",
                "iptables",
            ),
            ("sysctl net/ipv4/conf/x/rp_filter=2 in node", "sysctl"),
        ] {
            assert_eq!(object_of(line), kind, "{line}");
        }
    }

    #[test]
    fn remote_addresses_need_the_flag() {
        let lo: SocketAddr = "127.0.0.1:15014".parse().expect("addr");
        let lo6: SocketAddr = "[::1]:15014".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:15014".parse().expect("addr");
        assert!(check_addr(lo, false).is_ok());
        assert!(check_addr(lo6, false).is_ok());
        assert!(check_addr(any, false).is_err());
        assert!(check_addr(any, true).is_ok());
    }
}
