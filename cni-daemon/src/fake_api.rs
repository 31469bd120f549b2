//! A fake Kubernetes API server (feature `fake-api`, and the crate's own tests): namespaces and
//! pods, list and watch (newline-delimited JSON on a streaming body), the `spec.nodeName` field
//! selector, resourceVersions and injected failures. The watcher's unit tests call it in process
//! ([`FakeApi::client`], on paused time); the root tests serve it over TCP ([`FakeApi::serve_tcp`])
//! to an `ambient-cnid --kube --kubeconfig` in a test namespace.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::StreamBody;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::k8s::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, REDIRECTION_ANNOTATION, REDIRECTION_DISABLED,
};

pub const AMBIENT: (&str, &str) = (DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT);
pub const DISABLED: (&str, &str) = (REDIRECTION_ANNOTATION, REDIRECTION_DISABLED);

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn map(kv: &[(&str, &str)]) -> Value {
    Value::Object(kv.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

pub fn ns_json(name: &str, labels: &[(&str, &str)]) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": map(labels)}})
}

pub fn pod_json(
    ns: &str,
    name: &str,
    node: &str,
    host_network: bool,
    annotations: &[(&str, &str)],
) -> Value {
    running_pod_json(ns, name, node, host_network, annotations, &[])
}

/// A Running pod with UID `uid-<name>` and `status.podIPs` = `ips`.
pub fn running_pod_json(
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

// ---------------------------------------------------------------------------------------------
// A fake API server: namespaces and pods, list and watch (newline-delimited JSON on a streaming
// body), field selector on spec.nodeName, resourceVersions, injected failures.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
}

pub type Chunk = Result<Frame<Bytes>, Infallible>;
pub type FakeBody = StreamBody<UnboundedReceiverStream<Chunk>>;

pub struct Change {
    rv: u64,
    kind: Kind,
    ty: &'static str,
    obj: Value,
}

pub struct Watcher {
    kind: Kind,
    node: Option<String>,
    tx: mpsc::UnboundedSender<Chunk>,
}

#[derive(Default)]
pub struct ApiState {
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    history: Vec<Change>,
    watches: Vec<Watcher>,
    fail: VecDeque<(Kind, bool, u16)>,
    requests: Vec<String>,
}

#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<ApiState>>);

/// The fake's request handler for a body type (it reads no body).
fn handler<B>(
    api: FakeApi,
) -> impl FnMut(http::Request<B>) -> std::future::Ready<Result<http::Response<FakeBody>, Infallible>>
       + Clone {
    move |req| std::future::ready(Ok(api.serve(&req)))
}

/// The kubeconfig of a client of the fake server at `addr` (plain HTTP, no credentials).
pub fn kubeconfig(addr: std::net::SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
         current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
    )
}

pub fn selected(kind: Kind, node: &Option<String>, obj: &Value) -> bool {
    kind == Kind::Namespace
        || node
            .as_ref()
            .is_none_or(|n| obj["spec"]["nodeName"] == n.as_str())
}

pub fn frame(v: &Value) -> Chunk {
    Ok(Frame::data(Bytes::from(format!("{v}\n"))))
}

pub fn percent_decode(s: &str) -> String {
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
    pub fn st(&self) -> MutexGuard<'_, ApiState> {
        lock(&self.0)
    }

    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.serve(&req)) }
        });
        kube::Client::new(svc, "default")
    }

    /// Serves this API over HTTP/1.1 and HTTP/2 on `listener` until the task is dropped.
    pub async fn serve_tcp(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::server::conn::auto::Builder;
        use hyper_util::service::TowerToHyperService;
        loop {
            let (stream, _) = listener.accept().await?;
            let api = self.clone();
            tokio::spawn(async move {
                let svc = tower::service_fn(handler(api));
                let builder = Builder::new(TokioExecutor::new());
                let conn =
                    builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                let _ = conn.await;
            });
        }
    }

    pub fn respond(code: u16, rx: mpsc::UnboundedReceiver<Chunk>) -> http::Response<FakeBody> {
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
            .expect("response")
    }

    pub fn serve<B>(&self, req: &http::Request<B>) -> http::Response<FakeBody> {
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

    pub fn change(&self, kind: Kind, key: String, obj: Option<Value>) {
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

    pub fn put_ns(&self, name: &str, labels: &[(&str, &str)]) {
        self.change(Kind::Namespace, name.into(), Some(ns_json(name, labels)));
    }

    pub fn del_ns(&self, name: &str) {
        self.change(Kind::Namespace, name.into(), None);
    }

    pub fn put_pod(
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

    /// Create or replace a pod object as given (phase, IPs, UID of the test's choosing).
    pub fn put_pod_json(&self, ns: &str, name: &str, obj: Value) {
        self.change(Kind::Pod, format!("{ns}/{name}"), Some(obj));
    }

    /// Delete a pod.
    pub fn del_pod(&self, ns: &str, name: &str) {
        self.change(Kind::Pod, format!("{ns}/{name}"), None);
    }

    /// Fail the next list (or watch) of `kind` with `code`.
    pub fn fail_next(&self, kind: Kind, watch: bool, code: u16) {
        self.st().fail.push_back((kind, watch, code));
    }

    /// Close every open watch, as an API server restart or a load balancer would.
    pub fn break_watches(&self) {
        self.st().watches.clear();
    }

    pub fn requests(&self, path: &str, watch: bool) -> Vec<String> {
        self.st()
            .requests
            .iter()
            .filter(|r| r.starts_with(&format!("{path}?")) && r.contains("watch=true") == watch)
            .cloned()
            .collect()
    }
}
