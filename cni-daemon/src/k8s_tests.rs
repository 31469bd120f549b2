//! The enrollment watcher without a cluster: the pure policy, the event loop on scripted watcher
//! streams, and the whole watch end to end against a fake API server behind `kube::Client::new`
//! (list, watch, field selector, injected errors), feeding the daemon on the fake dataplane.
//! Everything runs on paused tokio time, so backoff and debounce cost no wall time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::StreamBody;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::watcher::{self, Event};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;
use crate::config::Config;
use crate::daemon::{Daemon, Policy};
use crate::dataplane::fake::FakeDataplane;
use crate::reconcile::ApplyReport;
use crate::registry::Registry;

const NODE: &str = "node-1";
const AMBIENT: (&str, &str) = (DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT);
const DISABLED: (&str, &str) = (REDIRECTION_ANNOTATION, REDIRECTION_DISABLED);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn map(kv: &[(&str, &str)]) -> Value {
    Value::Object(kv.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

fn ns_json(name: &str, labels: &[(&str, &str)]) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": map(labels)}})
}

fn pod_json(
    ns: &str,
    name: &str,
    node: &str,
    host_network: bool,
    annotations: &[(&str, &str)],
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "annotations": map(annotations)},
        "spec": {"nodeName": node, "hostNetwork": host_network, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"}
    })
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    serde_json::from_value(ns_json(name, labels)).expect("namespace JSON")
}

fn pod(ns: &str, name: &str, host_network: bool, annotations: &[(&str, &str)]) -> Pod {
    serde_json::from_value(pod_json(ns, name, NODE, host_network, annotations)).expect("pod JSON")
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn keys(v: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Pure parts.

#[test]
fn policy_enrolls_labelled_namespaces_and_excludes_opted_out_pods() {
    let nss: Namespaces = [
        namespace("shop", &[AMBIENT]),
        namespace("plain", &[]),
        namespace("off", &[(DATAPLANE_MODE_LABEL, "none")]),
        namespace("case", &[(DATAPLANE_MODE_LABEL, "Ambient")]),
        namespace("other-label", &[("dataplane-mode", "ambient")]),
    ]
    .iter()
    .filter_map(NamespaceFacts::of)
    .collect();
    let pods: Pods = [
        pod("shop", "a", false, &[]),
        pod("shop", "b", false, &[DISABLED]),
        pod("shop", "c", false, &[(REDIRECTION_ANNOTATION, "enabled")]),
        pod("kube-system", "kube-proxy", true, &[]),
        // Opted out in a namespace that only the static list may enroll: excluded all the same.
        pod("static", "d", false, &[DISABLED]),
    ]
    .iter()
    .filter_map(PodFacts::of)
    .collect();
    let p = policy_from(&nss, &pods);
    assert_eq!(p.namespaces, names(&["shop"]));
    assert_eq!(
        p.excluded_pods,
        keys(&[
            ("shop", "b"),
            ("kube-system", "kube-proxy"),
            ("static", "d")
        ])
    );
    assert_eq!(policy_from(&nss, &pods), p, "pure");
    assert_eq!(
        policy_from(&Namespaces::new(), &Pods::new()),
        Policy::default()
    );
}

#[test]
fn objects_without_names_are_skipped() {
    let n: Namespace =
        serde_json::from_value(json!({"metadata": {"labels": map(&[AMBIENT])}})).expect("json");
    assert!(NamespaceFacts::of(&n).is_none());
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "x"}})).expect("json");
    assert!(PodFacts::of(&p).is_none(), "no namespace");
    let p: Pod =
        serde_json::from_value(json!({"metadata": {"name": "x", "namespace": "y"}})).expect("json");
    assert_eq!(
        PodFacts::of(&p),
        Some((("y".into(), "x".into()), PodFacts::default())),
        "no spec: not excluded"
    );
}

#[test]
fn relist_replaces_the_store_only_when_complete() {
    let mut c: Cache<String, NamespaceFacts> = Cache::default();
    let f = NamespaceFacts::of;
    assert!(!c.apply(Event::Init, f));
    assert!(!c.apply(Event::InitApply(namespace("a", &[AMBIENT])), f));
    assert!(
        !c.synced && c.live.is_empty(),
        "nothing live before InitDone"
    );
    assert!(
        c.apply(Event::InitDone, f),
        "the first list counts as a change"
    );
    assert!(c.synced && c.live["a"].ambient);
    // A relist after a watch error: the old state stays live until it completes.
    c.apply(Event::Init, f);
    c.apply(Event::InitApply(namespace("b", &[])), f);
    assert!(c.live.contains_key("a") && !c.live.contains_key("b"));
    assert!(c.apply(Event::InitDone, f));
    assert_eq!(
        c.live.keys().cloned().collect::<Vec<_>>(),
        vec!["b".to_string()],
        "a was deleted meanwhile"
    );
    // The same relist again changes nothing.
    c.apply(Event::Init, f);
    c.apply(Event::InitApply(namespace("b", &[])), f);
    assert!(!c.apply(Event::InitDone, f));
    // Updates that do not touch the facts (other labels, status) change nothing.
    assert!(!c.apply(Event::Apply(namespace("b", &[("team", "x")])), f));
    assert!(c.apply(Event::Apply(namespace("b", &[AMBIENT])), f));
    assert!(c.apply(Event::Delete(namespace("b", &[])), f));
    assert!(
        !c.apply(Event::Delete(namespace("b", &[])), f),
        "deleting twice"
    );
}

#[test]
fn node_name_is_required_and_checked() {
    assert!(matches!(
        WatchConfig::new("").validate(),
        Err(Error::NoNodeName)
    ));
    for bad in ["node,spec.nodeName!=x", "a=b", "Node-1", "-n", "n-", "a b"] {
        assert!(
            matches!(
                WatchConfig::new(bad).validate(),
                Err(Error::InvalidNodeName(_))
            ),
            "{bad}"
        );
    }
    for good in ["node-1", "ip-10-0-0-1.eu-west-1.compute.internal", "k"] {
        assert!(WatchConfig::new(good).validate().is_ok(), "{good}");
    }
    assert_eq!(
        WatchConfig::new("node-1").pod_selector(),
        "spec.nodeName=node-1"
    );
}

// ---------------------------------------------------------------------------------------------
// The event loop on scripted watcher streams, with a recording `set_policy`.

type NsEvents = mpsc::UnboundedSender<watcher::Result<Event<Namespace>>>;
type PodEvents = mpsc::UnboundedSender<watcher::Result<Event<Pod>>>;

struct Loop {
    ns: Option<NsEvents>,
    pods: Option<PodEvents>,
    calls: Arc<Mutex<Vec<Policy>>>,
    task: tokio::task::JoinHandle<Watch>,
}

impl Loop {
    fn start() -> Loop {
        let (ns_tx, ns_rx) = mpsc::unbounded_channel();
        let (pod_tx, pod_rx) = mpsc::unbounded_channel();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let rec = calls.clone();
        let task = tokio::spawn(async move {
            let mut w = Watch::default();
            let mut apply = move |p: Policy| {
                lock(&rec).push(p);
                async { ApplyReport::default() }
            };
            let (ns, pods) = (
                UnboundedReceiverStream::new(ns_rx),
                UnboundedReceiverStream::new(pod_rx),
            );
            drive(&mut w, ns, pods, DEFAULT_DEBOUNCE, &mut apply).await;
            w
        });
        Loop {
            ns: Some(ns_tx),
            pods: Some(pod_tx),
            calls,
            task,
        }
    }

    fn ns(&self, ev: watcher::Result<Event<Namespace>>) {
        self.ns
            .as_ref()
            .expect("open")
            .send(ev)
            .expect("loop running");
    }

    fn pod(&self, ev: watcher::Result<Event<Pod>>) {
        self.pods
            .as_ref()
            .expect("open")
            .send(ev)
            .expect("loop running");
    }

    fn ns_list(&self, items: Vec<Namespace>) {
        self.ns(Ok(Event::Init));
        for n in items {
            self.ns(Ok(Event::InitApply(n)));
        }
        self.ns(Ok(Event::InitDone));
    }

    fn pod_list(&self, items: Vec<Pod>) {
        self.pod(Ok(Event::Init));
        for p in items {
            self.pod(Ok(Event::InitApply(p)));
        }
        self.pod(Ok(Event::InitDone));
    }

    fn calls(&self) -> Vec<Policy> {
        lock(&self.calls).clone()
    }

    /// Let the loop take everything sent and its debounce timer fire (paused time: instant).
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn no_set_policy_before_both_initial_lists() {
    let l = Loop::start();
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.settle().await;
    assert!(l.calls().is_empty(), "namespaces listed, pods not yet");
    l.ns(Ok(Event::Apply(namespace("bank", &[AMBIENT]))));
    l.pod(Ok(Event::Init));
    l.pod(Ok(Event::InitApply(pod("shop", "b", false, &[DISABLED]))));
    l.settle().await;
    assert!(l.calls().is_empty(), "the pod list is not complete");
    l.pod(Ok(Event::InitDone));
    l.settle().await;
    let calls = l.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].namespaces, names(&["bank", "shop"]));
    assert_eq!(calls[0].excluded_pods, keys(&[("shop", "b")]));
}

#[tokio::test(start_paused = true)]
async fn empty_cluster_still_sends_one_policy_once_listed() {
    let l = Loop::start();
    l.pod_list(vec![]);
    l.ns_list(vec![]);
    l.settle().await;
    assert_eq!(
        l.calls(),
        vec![Policy::default()],
        "in sync: the API says nothing is ambient"
    );
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_events_gives_one_set_policy() {
    let l = Loop::start();
    l.ns_list(vec![]);
    l.pod_list(vec![]);
    l.settle().await;
    assert_eq!(l.calls().len(), 1);
    for i in 0..20 {
        l.ns(Ok(Event::Apply(namespace(&format!("ns{i}"), &[AMBIENT]))));
        l.pod(Ok(Event::Apply(pod(
            &format!("ns{i}"),
            "p",
            false,
            &[DISABLED],
        ))));
    }
    // Changes trickling in within the window join the same call.
    tokio::time::sleep(DEFAULT_DEBOUNCE / 2).await;
    l.ns(Ok(Event::Apply(namespace("late", &[AMBIENT]))));
    l.settle().await;
    let calls = l.calls();
    assert_eq!(calls.len(), 2, "one call for the whole burst");
    assert_eq!(calls[1].namespaces.len(), 21);
    assert_eq!(calls[1].excluded_pods.len(), 20);
}

#[tokio::test(start_paused = true)]
async fn constant_churn_does_not_starve_the_policy() {
    let l = Loop::start();
    l.ns_list(vec![]);
    l.pod_list(vec![]);
    l.settle().await;
    // A change every 50 ms for 2 s: the window opens at the first change and does not slide.
    for i in 0..40 {
        l.ns(Ok(Event::Apply(namespace(&format!("ns{i}"), &[AMBIENT]))));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = l.calls().len();
    assert!(during >= 10, "policies sent while churning: {during}");
    l.settle().await;
    assert_eq!(l.calls().last().map(|p| p.namespaces.len()), Some(40));
}

#[tokio::test(start_paused = true)]
async fn unchanged_policy_is_not_sent_again() {
    let l = Loop::start();
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.pod_list(vec![pod("shop", "a", false, &[])]);
    l.settle().await;
    assert_eq!(l.calls().len(), 1);
    // Status and unrelated label updates; a change reverted within the window.
    l.pod(Ok(Event::Apply(pod(
        "shop",
        "a",
        false,
        &[("kubectl.kubernetes.io/restartedAt", "now")],
    ))));
    l.ns(Ok(Event::Apply(namespace(
        "shop",
        &[AMBIENT, ("team", "web")],
    ))));
    l.ns(Ok(Event::Apply(namespace("shop", &[]))));
    l.ns(Ok(Event::Apply(namespace("shop", &[AMBIENT]))));
    l.pod(Ok(Event::Apply(pod("other", "x", false, &[]))));
    l.settle().await;
    assert_eq!(l.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn watch_errors_keep_the_last_policy_and_relists_do_not_flap() {
    let l = Loop::start();
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.pod_list(vec![pod("shop", "b", false, &[DISABLED])]);
    l.settle().await;
    assert_eq!(l.calls().len(), 1);
    // The API goes away: errors on both streams, a relist that breaks half way.
    l.ns(Err(watcher::Error::NoResourceVersion));
    l.pod(Err(watcher::Error::NoResourceVersion));
    l.ns(Ok(Event::Init));
    l.ns(Err(watcher::Error::NoResourceVersion));
    l.settle().await;
    assert_eq!(l.calls().len(), 1, "errors change nothing");
    // It comes back: full relists with the same content change nothing either.
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.pod_list(vec![pod("shop", "b", false, &[DISABLED])]);
    l.settle().await;
    assert_eq!(
        l.calls().len(),
        1,
        "a relist of the same state is not a change"
    );
    // Something changed while we were away: the relist brings it, once.
    l.ns_list(vec![
        namespace("shop", &[AMBIENT]),
        namespace("bank", &[AMBIENT]),
    ]);
    l.pod_list(vec![]);
    l.settle().await;
    let calls = l.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].namespaces, names(&["bank", "shop"]));
    assert!(calls[1].excluded_pods.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_pending_change_is_applied_when_a_stream_ends() {
    let mut l = Loop::start();
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.pod_list(vec![]);
    // Let the loop take the events, not yet its debounce timer.
    tokio::time::sleep(DEFAULT_DEBOUNCE / 3).await;
    assert!(l.calls().is_empty(), "still debouncing");
    l.ns = None;
    let w = (&mut l.task).await.expect("loop ends without panicking");
    assert_eq!(w.applied.map(|p| p.namespaces), Some(names(&["shop"])));
    assert_eq!(l.calls().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// A fake API server: namespaces and pods, list and watch (newline-delimited JSON on a streaming
// body), field selector on spec.nodeName, resourceVersions, injected failures.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Namespace,
    Pod,
}

type Chunk = Result<Frame<Bytes>, Infallible>;
type FakeBody = StreamBody<UnboundedReceiverStream<Chunk>>;

struct Change {
    rv: u64,
    kind: Kind,
    ty: &'static str,
    obj: Value,
}

struct Watcher {
    kind: Kind,
    node: Option<String>,
    tx: mpsc::UnboundedSender<Chunk>,
}

#[derive(Default)]
struct ApiState {
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    history: Vec<Change>,
    watches: Vec<Watcher>,
    fail: VecDeque<(Kind, bool, u16)>,
    requests: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<ApiState>>);

fn selected(kind: Kind, node: &Option<String>, obj: &Value) -> bool {
    kind == Kind::Namespace
        || node
            .as_ref()
            .is_none_or(|n| obj["spec"]["nodeName"] == n.as_str())
}

fn frame(v: &Value) -> Chunk {
    Ok(Frame::data(Bytes::from(format!("{v}\n"))))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(c)) => {
                out.push(c);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeApi {
    fn st(&self) -> MutexGuard<'_, ApiState> {
        lock(&self.0)
    }

    fn client(&self) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.serve(&req)) }
        });
        kube::Client::new(svc, "default")
    }

    fn respond(code: u16, rx: mpsc::UnboundedReceiver<Chunk>) -> http::Response<FakeBody> {
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
            .expect("response")
    }

    fn serve<B>(&self, req: &http::Request<B>) -> http::Response<FakeBody> {
        let mut st = self.st();
        let uri = req.uri();
        st.requests.push(percent_decode(&uri.to_string()));
        let (tx, rx) = mpsc::unbounded_channel();
        let kind = match uri.path() {
            "/api/v1/namespaces" => Kind::Namespace,
            "/api/v1/pods" => Kind::Pod,
            _ => {
                let _ = tx.send(frame(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not here"})));
                return Self::respond(404, rx);
            }
        };
        let q: BTreeMap<String, String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        let watch = q.get("watch").is_some_and(|v| v == "true");
        if let Some(i) = st
            .fail
            .iter()
            .position(|(k, w, _)| *k == kind && *w == watch)
        {
            let (_, _, code) = st.fail.remove(i).expect("index from position");
            let _ = tx.send(frame(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": "InternalError", "message": "injected failure"})));
            return Self::respond(code, rx);
        }
        let node = q.get("fieldSelector").map(|s| {
            s.strip_prefix("spec.nodeName=")
                .expect("only a nodeName selector")
                .to_string()
        });
        if watch {
            let since: u64 = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            for c in st
                .history
                .iter()
                .filter(|c| c.rv > since && c.kind == kind && selected(kind, &node, &c.obj))
            {
                let _ = tx.send(frame(&json!({"type": c.ty, "object": c.obj})));
            }
            st.watches.push(Watcher { kind, node, tx });
        } else {
            let items: Vec<&Value> = st
                .objects
                .iter()
                .filter(|((k, _), o)| *k == kind && selected(kind, &node, o))
                .map(|(_, o)| o)
                .collect();
            let list_kind = if kind == Kind::Pod {
                "PodList"
            } else {
                "NamespaceList"
            };
            let _ = tx.send(frame(&json!({"apiVersion": "v1", "kind": list_kind, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})));
        }
        Self::respond(200, rx)
    }

    fn change(&self, kind: Kind, key: String, obj: Option<Value>) {
        let mut st = self.st();
        st.rv += 1;
        let rv = st.rv;
        let (ty, mut obj) = match obj {
            Some(o) => (
                if st.objects.contains_key(&(kind, key.clone())) {
                    "MODIFIED"
                } else {
                    "ADDED"
                },
                o,
            ),
            None => (
                "DELETED",
                st.objects
                    .remove(&(kind, key.clone()))
                    .expect("deleting an object that exists"),
            ),
        };
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if ty != "DELETED" {
            st.objects.insert((kind, key), obj.clone());
        }
        for w in st
            .watches
            .iter()
            .filter(|w| w.kind == kind && selected(kind, &w.node, &obj))
        {
            let _ = w.tx.send(frame(&json!({"type": ty, "object": obj})));
        }
        st.watches.retain(|w| !w.tx.is_closed());
        st.history.push(Change { rv, kind, ty, obj });
    }

    fn put_ns(&self, name: &str, labels: &[(&str, &str)]) {
        self.change(Kind::Namespace, name.into(), Some(ns_json(name, labels)));
    }

    fn del_ns(&self, name: &str) {
        self.change(Kind::Namespace, name.into(), None);
    }

    fn put_pod(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        host_network: bool,
        annotations: &[(&str, &str)],
    ) {
        self.change(
            Kind::Pod,
            format!("{ns}/{name}"),
            Some(pod_json(ns, name, node, host_network, annotations)),
        );
    }

    /// Fail the next list (or watch) of `kind` with `code`.
    fn fail_next(&self, kind: Kind, watch: bool, code: u16) {
        self.st().fail.push_back((kind, watch, code));
    }

    /// Close every open watch, as an API server restart or a load balancer would.
    fn break_watches(&self) {
        self.st().watches.clear();
    }

    fn requests(&self, path: &str, watch: bool) -> Vec<String> {
        self.st()
            .requests
            .iter()
            .filter(|r| r.starts_with(&format!("{path}?")) && r.contains("watch=true") == watch)
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// End to end: fake API -> watcher -> Daemon::set_policy -> fake dataplane.

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// A node: the daemon on the fake dataplane, pods added through the CNI path.
struct Node {
    dp: Arc<FakeDataplane>,
    daemon: Arc<Daemon<FakeDataplane>>,
    policies: Arc<Mutex<Vec<Policy>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    async fn new(cfg: Config) -> Node {
        Node::boot(cfg, Arc::new(FakeDataplane::new()), None).await
    }

    /// A daemon on `dp`, with its registry persisted in `state_dir` (restored if there is one).
    async fn boot(
        cfg: Config,
        dp: Arc<FakeDataplane>,
        state_dir: Option<&std::path::Path>,
    ) -> Node {
        for l in ["vetha", "vethb", "vethc"] {
            dp.kernel().add_host_link(l);
        }
        let (store, reg) = match state_dir {
            Some(dir) => {
                let (store, reg, _) = crate::store::Store::open(dir).expect("state dir");
                (Some(store), reg)
            }
            None => (None, Registry::default()),
        };
        let daemon = Arc::new(Daemon::new(Arc::new(cfg), dp.clone(), store, reg));
        let r = daemon.resync().await;
        assert!(r.ok(), "{:?}", r.errors);
        Node {
            dp,
            daemon,
            policies: Arc::new(Mutex::new(Vec::new())),
            task: None,
        }
    }

    /// Start the watcher against `api`, recording each policy on its way to `set_policy`.
    fn watch(&mut self, api: &FakeApi) {
        let (d, rec, client) = (self.daemon.clone(), self.policies.clone(), api.client());
        self.task = Some(tokio::spawn(async move {
            let apply = move |p: Policy| {
                lock(&rec).push(p.clone());
                let d = d.clone();
                async move { d.set_policy(p).await }
            };
            let Err(e) = watch_with(client, WatchConfig::new(NODE), apply).await;
            panic!("watcher stopped: {e}");
        }));
    }

    /// The CNI ADD of a pod.
    async fn add(&self, cid: &str, ns: &str, name: &str, addr: &str, hif: &str) -> bool {
        let ev = crate::daemon::test_event(cid, ns, name, addr, hif);
        self.daemon.add(ev).await.expect("CNI ADD").enrolled
    }

    /// Pod IPs in the ipset: what is redirected.
    fn captured(&self) -> BTreeSet<IpAddr> {
        self.dp
            .kernel()
            .ipset
            .as_ref()
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default()
    }

    fn policies(&self) -> Vec<Policy> {
        lock(&self.policies).clone()
    }

    /// Wait (virtual time) until `f` holds; the watcher's backoff is at most 30 s.
    async fn until(&self, what: &str, f: impl Fn(&Node) -> bool) {
        for _ in 0..600 {
            if f(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "timed out waiting for: {what}; policies: {:?}",
            self.policies()
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

fn set(v: &[&str]) -> BTreeSet<IpAddr> {
    v.iter().map(|s| ip(s)).collect()
}

#[tokio::test(start_paused = true)]
async fn labelled_namespace_enrolls_its_pods_and_unlabelling_releases_them() {
    let api = FakeApi::default();
    api.put_ns("shop", &[]);
    api.put_ns("kube-system", &[]);
    let mut n = Node::new(Config::default()).await;
    assert!(
        !n.add("a", "shop", "a", "10.244.1.5", "vetha").await,
        "not ambient yet"
    );
    assert!(!n.add("b", "shop", "b", "10.244.1.6", "vethb").await);
    n.watch(&api);
    n.until("in sync", |n| n.policies().len() == 1).await;
    assert!(n.captured().is_empty());

    api.put_ns("shop", &[AMBIENT]);
    n.until("shop enrolled", |n| {
        n.captured() == set(&["10.244.1.5", "10.244.1.6"])
    })
    .await;
    // A pod added later through the CNI path follows the policy.
    assert!(n.add("c", "shop", "c", "10.244.1.7", "vethc").await);

    api.put_ns("shop", &[(DATAPLANE_MODE_LABEL, "none")]);
    n.until("shop released", |n| n.captured().is_empty()).await;
    api.put_ns("shop", &[AMBIENT]);
    n.until("shop back", |n| n.captured().len() == 3).await;
    api.del_ns("shop");
    n.until("deleted namespace released", |n| n.captured().is_empty())
        .await;
    assert_eq!(
        n.policies().len(),
        5,
        "one set_policy per change: {:?}",
        n.policies()
    );

    // Only this node's pods are watched, by field selector, on the list and on the watch.
    let pod_requests = [
        api.requests("/api/v1/pods", false),
        api.requests("/api/v1/pods", true),
    ]
    .concat();
    assert!(pod_requests.len() >= 2);
    for r in &pod_requests {
        assert!(r.contains("fieldSelector=spec.nodeName=node-1"), "{r}");
    }
    assert!(api
        .requests("/api/v1/namespaces", false)
        .iter()
        .all(|r| !r.contains("fieldSelector")));
}

#[tokio::test(start_paused = true)]
async fn annotated_and_host_network_pods_are_excluded() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.put_pod("shop", "a", NODE, false, &[]);
    api.put_pod("shop", "b", NODE, false, &[DISABLED]);
    api.put_pod("shop", "h", NODE, true, &[]);
    // Another node's pod never reaches this node's policy.
    api.put_pod("shop", "far", "node-2", false, &[DISABLED]);
    let mut n = Node::new(Config::default()).await;
    n.add("a", "shop", "a", "10.244.1.5", "vetha").await;
    n.add("b", "shop", "b", "10.244.1.6", "vethb").await;
    n.watch(&api);
    n.until("in sync", |n| !n.policies().is_empty()).await;
    let p = n.policies()[0].clone();
    assert_eq!(p.namespaces, names(&["shop"]));
    assert_eq!(p.excluded_pods, keys(&[("shop", "b"), ("shop", "h")]));
    assert_eq!(n.captured(), set(&["10.244.1.5"]), "b opted out");

    // The annotation is read live: removing it enrolls b, setting it again releases it.
    api.put_pod("shop", "b", NODE, false, &[]);
    n.until("b joins", |n| {
        n.captured() == set(&["10.244.1.5", "10.244.1.6"])
    })
    .await;
    api.put_pod("shop", "b", NODE, false, &[DISABLED]);
    n.until("b leaves", |n| n.captured() == set(&["10.244.1.5"]))
        .await;
    // A pod opting out before its CNI ADD is never enrolled.
    api.put_pod("shop", "c", NODE, false, &[DISABLED]);
    n.until("c excluded", |n| {
        n.policies()
            .last()
            .is_some_and(|p| p.excluded_pods.contains(&("shop".into(), "c".into())))
    })
    .await;
    assert!(!n.add("c", "shop", "c", "10.244.1.7", "vethc").await);
    assert_eq!(n.captured(), set(&["10.244.1.5"]));
}

#[tokio::test(start_paused = true)]
async fn list_errors_are_retried_with_backoff() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.fail_next(Kind::Pod, false, 500);
    api.fail_next(Kind::Pod, false, 503);
    let mut n = Node::new(Config::default()).await;
    n.add("a", "shop", "a", "10.244.1.5", "vetha").await;
    let t0 = tokio::time::Instant::now();
    n.watch(&api);
    n.until("enrolled after the retries", |n| {
        n.captured() == set(&["10.244.1.5"])
    })
    .await;
    assert_eq!(
        api.requests("/api/v1/pods", false).len(),
        3,
        "two failed lists, then one that worked"
    );
    assert_eq!(n.policies().len(), 1, "nothing before the good list");
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "backed off: {:?}",
        t0.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn broken_watches_reconnect_without_flapping() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.put_pod("shop", "b", NODE, false, &[DISABLED]);
    let mut n = Node::new(Config::default()).await;
    n.add("a", "shop", "a", "10.244.1.5", "vetha").await;
    n.add("b", "shop", "b", "10.244.1.6", "vethb").await;
    n.watch(&api);
    n.until("in sync", |n| n.captured() == set(&["10.244.1.5"]))
        .await;
    let writes = n.dp.kernel().writes;
    let watches = api.requests("/api/v1/namespaces", true).len();

    // The connections drop, a change happens while we are away, the next watch fails too.
    api.break_watches();
    api.fail_next(Kind::Namespace, true, 500);
    api.put_ns("bank", &[AMBIENT]);
    n.until("re-watched", |n| {
        n.policies()
            .last()
            .is_some_and(|p| p.namespaces.contains("bank"))
            && api.requests("/api/v1/namespaces", true).len() >= watches + 2
    })
    .await;
    assert_eq!(
        n.policies().len(),
        2,
        "only the real change was sent: {:?}",
        n.policies()
    );
    assert_eq!(n.captured(), set(&["10.244.1.5"]));
    assert_eq!(
        n.dp.kernel().writes,
        writes,
        "no pod was released and re-enrolled on the way"
    );

    // And the watch is live again.
    api.put_pod("shop", "b", NODE, false, &[]);
    n.until("b joins", |n| {
        n.captured() == set(&["10.244.1.5", "10.244.1.6"])
    })
    .await;
}

/// `run` itself, across a daemon restart with the API out at first: the restarted daemon keeps the
/// enrollment it restored from its state dir (a pod enrolled by label, one by the static list)
/// until both lists are in, instead of releasing the labelled pod and enrolling it again.
#[tokio::test(start_paused = true)]
async fn api_outage_after_restart_keeps_the_restored_enrollment() {
    let state = tempfile::tempdir().expect("state dir");
    let mut cfg = Config::default();
    cfg.ambient_namespaces.insert("static".into());
    let n = Node::boot(
        cfg.clone(),
        Arc::new(FakeDataplane::new()),
        Some(state.path()),
    )
    .await;
    let mut before = Policy::default();
    before.namespaces.insert("shop".into());
    n.daemon.set_policy(before).await;
    assert!(n.add("a", "shop", "a", "10.244.1.5", "vetha").await);
    assert!(n.add("s", "static", "s", "10.244.1.6", "vethb").await);
    let dp = n.dp.clone();
    drop(n);

    // The restart: same kernel, registry from the state dir, empty policy.
    let n = Node::boot(cfg, dp, Some(state.path())).await;
    assert_eq!(
        n.captured(),
        set(&["10.244.1.5", "10.244.1.6"]),
        "the restart itself keeps both"
    );
    let writes = n.dp.kernel().writes;
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    for _ in 0..3 {
        api.fail_next(Kind::Namespace, false, 503);
    }
    let task = tokio::spawn(run(n.daemon.clone(), api.client(), WatchConfig::new(NODE)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !api.requests("/api/v1/pods", false).is_empty(),
        "pods listed"
    );
    assert!(
        api.requests("/api/v1/namespaces", false).len() < 4,
        "namespaces still failing"
    );
    assert_eq!(
        n.captured(),
        set(&["10.244.1.5", "10.244.1.6"]),
        "nothing released while the API is out"
    );
    assert_eq!(n.dp.kernel().writes, writes);
    n.until("namespace list in", |_| {
        api.requests("/api/v1/namespaces", false).len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        n.captured(),
        set(&["10.244.1.5", "10.244.1.6"]),
        "the API agrees: nothing to change"
    );
    assert_eq!(
        n.dp.kernel().writes,
        writes,
        "no release and re-enroll on the way"
    );

    api.put_ns("shop", &[]);
    n.until("shop released", |n| n.captured() == set(&["10.244.1.6"]))
        .await;
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn run_refuses_an_empty_node_name() {
    let n = Node::new(Config::default()).await;
    let r = run(
        n.daemon.clone(),
        FakeApi::default().client(),
        WatchConfig::new(""),
    )
    .await;
    assert!(matches!(r, Err(Error::NoNodeName)));
}

// ---------------------------------------------------------------------------------------------
// Building the client.

#[tokio::test]
async fn client_from_a_kubeconfig_builds_with_the_ring_provider() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
         clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: t}}]\n\
         contexts: [{name: c, context: {cluster: k, user: u, namespace: shop}}]\n",
    )
    .expect("write kubeconfig");
    let mut cfg = WatchConfig::new(NODE);
    cfg.kubeconfig = Some(path);
    // Building the TLS config panics when rustls has no (or two) process-wide providers.
    let c = client(&cfg).await.expect("client from kubeconfig");
    assert_eq!(c.default_namespace(), "shop");
}

#[tokio::test]
async fn missing_kubeconfig_names_the_file() {
    let mut cfg = WatchConfig::new(NODE);
    cfg.kubeconfig = Some("/nonexistent/acni-kubeconfig".into());
    let Err(e) = client(&cfg).await else {
        panic!("a client from a missing kubeconfig");
    };
    assert!(matches!(e, Error::Kubeconfig { .. }));
    assert!(
        e.to_string().contains("/nonexistent/acni-kubeconfig"),
        "{e}"
    );
}
