//! The fake API server of the watcher's tests (namespaces and pods, list and watch, field
//! selector, injected failures) and a node: the daemon on the fake dataplane, fed by the watcher.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::StreamBody;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;
use crate::config::Config;
use crate::daemon::{Daemon, Policy};
use crate::dataplane::fake::FakeDataplane;
use crate::registry::Registry;

pub(super) const NODE: &str = "node-1";
pub(super) const AMBIENT: (&str, &str) = (DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT);
pub(super) const DISABLED: (&str, &str) = (REDIRECTION_ANNOTATION, REDIRECTION_DISABLED);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn map(kv: &[(&str, &str)]) -> Value {
    Value::Object(kv.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

pub(super) fn ns_json(name: &str, labels: &[(&str, &str)]) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": map(labels)}})
}

pub(super) fn pod_json(
    ns: &str,
    name: &str,
    node: &str,
    host_network: bool,
    annotations: &[(&str, &str)],
) -> Value {
    running_pod_json(ns, name, node, host_network, annotations, &[])
}

/// A Running pod with UID `uid-<name>` and `status.podIPs` = `ips`.
pub(super) fn running_pod_json(
    ns: &str,
    name: &str,
    node: &str,
    host_network: bool,
    annotations: &[(&str, &str)],
    ips: &[&str],
) -> Value {
    let mut status = json!({"phase": "Running"});
    if !ips.is_empty() {
        status["podIP"] = json!(ips[0]);
        status["podIPs"] = Value::Array(ips.iter().map(|i| json!({"ip": i})).collect());
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"), "annotations": map(annotations)},
        "spec": {"nodeName": node, "hostNetwork": host_network, "containers": [{"name": "app", "image": "app"}]},
        "status": status
    })
}

pub(super) fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    serde_json::from_value(ns_json(name, labels)).expect("namespace JSON")
}

pub(super) fn pod(ns: &str, name: &str, host_network: bool, annotations: &[(&str, &str)]) -> Pod {
    serde_json::from_value(pod_json(ns, name, NODE, host_network, annotations)).expect("pod JSON")
}

pub(super) fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub(super) fn keys(v: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A fake API server: namespaces and pods, list and watch (newline-delimited JSON on a streaming
// body), field selector on spec.nodeName, resourceVersions, injected failures.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    Namespace,
    Pod,
}

pub(super) type Chunk = Result<Frame<Bytes>, Infallible>;
pub(super) type FakeBody = StreamBody<UnboundedReceiverStream<Chunk>>;

pub(super) struct Change {
    rv: u64,
    kind: Kind,
    ty: &'static str,
    obj: Value,
}

pub(super) struct Watcher {
    kind: Kind,
    node: Option<String>,
    tx: mpsc::UnboundedSender<Chunk>,
}

#[derive(Default)]
pub(super) struct ApiState {
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    history: Vec<Change>,
    watches: Vec<Watcher>,
    fail: VecDeque<(Kind, bool, u16)>,
    requests: Vec<String>,
}

#[derive(Clone, Default)]
pub(super) struct FakeApi(Arc<Mutex<ApiState>>);

pub(super) fn selected(kind: Kind, node: &Option<String>, obj: &Value) -> bool {
    kind == Kind::Namespace
        || node
            .as_ref()
            .is_none_or(|n| obj["spec"]["nodeName"] == n.as_str())
}

pub(super) fn frame(v: &Value) -> Chunk {
    Ok(Frame::data(Bytes::from(format!("{v}\n"))))
}

pub(super) fn percent_decode(s: &str) -> String {
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
    pub(super) fn st(&self) -> MutexGuard<'_, ApiState> {
        lock(&self.0)
    }

    pub(super) fn client(&self) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.serve(&req)) }
        });
        kube::Client::new(svc, "default")
    }

    pub(super) fn respond(
        code: u16,
        rx: mpsc::UnboundedReceiver<Chunk>,
    ) -> http::Response<FakeBody> {
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
            .expect("response")
    }

    pub(super) fn serve<B>(&self, req: &http::Request<B>) -> http::Response<FakeBody> {
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

    pub(super) fn change(&self, kind: Kind, key: String, obj: Option<Value>) {
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

    pub(super) fn put_ns(&self, name: &str, labels: &[(&str, &str)]) {
        self.change(Kind::Namespace, name.into(), Some(ns_json(name, labels)));
    }

    pub(super) fn del_ns(&self, name: &str) {
        self.change(Kind::Namespace, name.into(), None);
    }

    pub(super) fn put_pod(
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
    /// Create or replace a pod object as given (phase, IPs, UID of the test's choosing).
    pub(super) fn put_pod_json(&self, ns: &str, name: &str, obj: Value) {
        self.change(Kind::Pod, format!("{ns}/{name}"), Some(obj));
    }

    /// Delete a pod.
    pub(super) fn del_pod(&self, ns: &str, name: &str) {
        self.change(Kind::Pod, format!("{ns}/{name}"), None);
    }

    pub(super) fn fail_next(&self, kind: Kind, watch: bool, code: u16) {
        self.st().fail.push_back((kind, watch, code));
    }

    /// Close every open watch, as an API server restart or a load balancer would.
    pub(super) fn break_watches(&self) {
        self.st().watches.clear();
    }

    pub(super) fn requests(&self, path: &str, watch: bool) -> Vec<String> {
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

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// A node: the daemon on the fake dataplane, pods added through the CNI path.
pub(super) struct Node {
    pub(super) dp: Arc<FakeDataplane>,
    pub(super) daemon: Arc<Daemon<FakeDataplane>>,
    pub(super) policies: Arc<Mutex<Vec<Policy>>>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    pub(super) async fn new(cfg: Config) -> Node {
        Node::boot(cfg, Arc::new(FakeDataplane::new()), None).await
    }

    /// A daemon on `dp`, with its registry persisted in `state_dir` (restored if there is one).
    pub(super) async fn boot(
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
    pub(super) fn watch(&mut self, api: &FakeApi) {
        let (d, rec, client) = (self.daemon.clone(), self.policies.clone(), api.client());
        self.task = Some(tokio::spawn(async move {
            let apply = move |v: View| {
                lock(&rec).push(v.policy.clone());
                let d = d.clone();
                async move { apply_view(&d, v).await }
            };
            let Err(e) = watch_with(client, WatchConfig::new(NODE), apply).await;
            panic!("watcher stopped: {e}");
        }));
    }

    /// The CNI ADD of a pod.
    pub(super) async fn add(&self, cid: &str, ns: &str, name: &str, addr: &str, hif: &str) -> bool {
        let ev = crate::daemon::test_event(cid, ns, name, addr, hif);
        self.daemon.add(ev).await.expect("CNI ADD").enrolled
    }

    /// Pod IPs in the ipset: what is redirected.
    pub(super) fn captured(&self) -> BTreeSet<IpAddr> {
        self.dp
            .kernel()
            .ipset
            .as_ref()
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default()
    }

    pub(super) fn policies(&self) -> Vec<Policy> {
        lock(&self.policies).clone()
    }

    /// Wait (virtual time) until `f` holds; the watcher's backoff is at most 30 s.
    pub(super) async fn until(&self, what: &str, f: impl Fn(&Node) -> bool) {
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

pub(super) fn set(v: &[&str]) -> BTreeSet<IpAddr> {
    v.iter().map(|s| ip(s)).collect()
}
