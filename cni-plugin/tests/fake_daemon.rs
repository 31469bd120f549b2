//! The whole plugin (`ambient_cni::run`) against an in-process fake daemon on a temp socket:
//! the client path, status mapping, deadlines, and DEL's unconditional success. No root needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambient_cni_proto::v1::cni_node_server::{CniNode, CniNodeServer};
use ambient_cni_proto::v1::*;
use serde_json::{json, Value};
use tonic::{Request, Response, Status};

struct Shared(Arc<Fake>);

impl std::ops::Deref for Shared {
    type Target = Fake;
    fn deref(&self) -> &Fake {
        &self.0
    }
}

#[derive(Default)]
struct Fake {
    seen: Mutex<Vec<(String, PodRequest)>>,
    gc: Mutex<Vec<GcRequest>>,
    ready: Mutex<bool>,
}

impl Fake {
    /// Behaviour by container ID, so one server serves every case.
    async fn answer(&self, verb: &str, req: &PodRequest) -> Result<(), Status> {
        if let Ok(mut s) = self.seen.lock() {
            s.push((verb.to_string(), req.clone()));
        }
        match req.container_id.as_str() {
            "refuse" => Err(Status::invalid_argument("pod IP outside the node range")),
            "internal" => Err(Status::internal("ipset add failed: EPERM")),
            "unavail" => Err(Status::unavailable("shutting down")),
            "missing" => Err(Status::not_found("no attachment missing/eth0")),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl CniNode for Shared {
    async fn pod_add(&self, r: Request<PodRequest>) -> Result<Response<PodAddReply>, Status> {
        let r = r.into_inner();
        self.answer("add", &r).await?;
        Ok(Response::new(PodAddReply {
            enrolled: true,
            reason: "ambient namespace".into(),
            ztunnel: false,
        }))
    }
    async fn pod_del(&self, r: Request<PodRequest>) -> Result<Response<PodDelReply>, Status> {
        let r = r.into_inner();
        self.answer("del", &r).await?;
        Ok(Response::new(PodDelReply { removed: true }))
    }
    async fn pod_check(&self, r: Request<PodRequest>) -> Result<Response<PodCheckReply>, Status> {
        let r = r.into_inner();
        self.answer("check", &r).await?;
        Ok(Response::new(PodCheckReply {
            enrolled: true,
            detail: String::new(),
        }))
    }
    async fn gc(&self, r: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        if let Ok(mut g) = self.gc.lock() {
            g.push(r.into_inner());
        }
        Ok(Response::new(GcReply {
            removed: 2,
            errors: vec![],
        }))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let ready = self.ready.lock().map(|r| *r).unwrap_or(false);
        Ok(Response::new(StatusReply {
            ready,
            reason: if ready {
                String::new()
            } else {
                "ztunnel missing".into()
            },
            ..Default::default()
        }))
    }
    async fn dump(&self, _: Request<DumpRequest>) -> Result<Response<DumpReply>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn trace(&self, _: Request<TraceRequest>) -> Result<Response<TraceReply>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn enroll(
        &self,
        _: Request<ambient_cni_proto::v1::EnrollRequest>,
    ) -> Result<Response<ambient_cni_proto::v1::EnrollReply>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    fake: Arc<Fake>,
}

fn server() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("cni.sock");
    let fake = Arc::new(Fake::default());
    let (svc, path) = (fake.clone(), socket.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::UnixListener::bind(&path).expect("bind");
            let _ = tx.send(());
            let _ = tonic::transport::Server::builder()
                .add_service(CniNodeServer::new(Shared(svc)))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l))
                .await;
        });
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("server up");
    Server {
        _dir: dir,
        socket,
        fake,
    }
}

fn prev() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "veth9", "mac": "aa:aa:aa:aa:aa:aa"},
                       {"name": "eth0", "mac": "bb:bb:bb:bb:bb:bb", "sandbox": "/var/run/netns/x"}],
        "ips": [{"address": "10.244.1.9/24", "gateway": "10.244.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn conf(socket: &Path, extra: Value) -> String {
    let mut c = json!({"cniVersion": "1.0.0", "name": "testnet", "type": "ambient-cni",
        "socket": socket, "prevResult": prev()});
    if let (Some(m), Value::Object(e)) = (c.as_object_mut(), extra) {
        m.extend(e);
    }
    c.to_string()
}

fn run(cmd: &str, cid: &str, stdin: &str) -> ambient_cni::Outcome {
    let env: HashMap<&str, String> = [
        ("CNI_COMMAND", cmd.to_string()),
        ("CNI_CONTAINERID", cid.to_string()),
        ("CNI_NETNS", "/var/run/netns/x".to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        (
            "CNI_ARGS",
            "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=uid-1".to_string(),
        ),
    ]
    .into_iter()
    .collect();
    ambient_cni::run(&|k| env.get(k).cloned(), &mut stdin.as_bytes(), false)
}

fn err_json(o: &ambient_cni::Outcome) -> Value {
    assert_eq!(o.exit, 1, "{o:?}");
    serde_json::from_str(o.stdout.as_deref().unwrap_or("")).expect("one JSON document")
}

#[test]
fn add_forwards_the_pod_and_prints_prev_result() {
    let s = server();
    let o = run("ADD", "c1", &conf(&s.socket, json!({})));
    assert_eq!(o.exit, 0, "{o:?}");
    let out: Value = serde_json::from_str(o.stdout.as_deref().unwrap_or("")).expect("json");
    assert_eq!(out, prev());
    let seen = s.fake.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    let (verb, req) = &seen[0];
    assert_eq!(verb, "add");
    assert_eq!(req.container_id, "c1");
    assert_eq!(req.pod_uid, "uid-1");
    assert_eq!(req.network_name, "testnet");
    assert_eq!(req.host_interface, "veth9");
    assert_eq!(req.ips[0].address, "10.244.1.9/24");
}

#[test]
fn daemon_statuses_map_to_codes() {
    let s = server();
    let c = conf(&s.socket, json!({}));
    let j = err_json(&run("ADD", "refuse", &c));
    assert_eq!(j["code"], 100);
    assert_eq!(j["cniVersion"], "1.0.0");
    assert_eq!(
        j["details"],
        "InvalidArgument: pod IP outside the node range"
    );
    assert_eq!(err_json(&run("ADD", "internal", &c))["code"], 101);
    assert_eq!(err_json(&run("ADD", "unavail", &c))["code"], 11);
    let j = err_json(&run("CHECK", "missing", &c));
    assert_eq!(j["code"], 100);
    assert!(
        j["msg"].as_str().unwrap_or("").contains("not enrolled"),
        "{j}"
    );
    assert_eq!(run("CHECK", "c2", &c).exit, 0);
    // DEL succeeds whatever the daemon says.
    for cid in ["refuse", "internal", "unavail", "missing", "c3"] {
        let o = run("DEL", cid, &c);
        assert_eq!((o.exit, o.stdout.clone()), (0, None), "{cid}");
    }
}

#[test]
fn deadline_gives_code_11_in_time_and_del_gives_up_quietly() {
    let s = server();
    let c = conf(&s.socket, json!({"timeoutMs": 300}));
    let t = Instant::now();
    let j = err_json(&run("ADD", "slow", &c));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(j["code"], 11);
    assert!(j["msg"]
        .as_str()
        .unwrap_or("")
        .contains(&s.socket.display().to_string()));
    let t = Instant::now();
    assert_eq!(run("DEL", "slow", &c).exit, 0);
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn missing_socket_is_code_11_naming_it_and_del_still_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("absent.sock");
    let c = conf(&sock, json!({}));
    let j = err_json(&run("ADD", "c1", &c));
    assert_eq!(j["code"], 11);
    assert!(
        j["msg"].as_str().unwrap_or("").contains("absent.sock"),
        "{j}"
    );
    assert_eq!(run("DEL", "c1", &c).exit, 0);
    assert_eq!(err_json(&run("CHECK", "c1", &c))["code"], 11);
}

#[test]
fn gc_and_status() {
    let s = server();
    let base = json!({"cniVersion": "1.1.0", "name": "testnet", "socket": s.socket});
    let mut gc = base.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
    let env: HashMap<&str, String> = [("CNI_COMMAND", "GC".to_string())].into_iter().collect();
    let o = ambient_cni::run(
        &|k| env.get(k).cloned(),
        &mut gc.to_string().as_bytes(),
        false,
    );
    assert_eq!(o.exit, 0, "{o:?}");
    let o = ambient_cni::run(
        &|k| env.get(k).cloned(),
        &mut base.to_string().as_bytes(),
        false,
    );
    assert_eq!(o.exit, 0, "{o:?}");
    let reqs = s.fake.gc.lock().expect("lock").clone();
    assert_eq!(reqs.len(), 2);
    assert!(reqs[0].has_valid_list && reqs[0].valid.len() == 1);
    assert!(!reqs[1].has_valid_list && reqs[1].valid.is_empty());

    let env: HashMap<&str, String> = [("CNI_COMMAND", "STATUS".to_string())]
        .into_iter()
        .collect();
    let status = || {
        ambient_cni::run(
            &|k| env.get(k).cloned(),
            &mut base.to_string().as_bytes(),
            false,
        )
    };
    let j = err_json(&status());
    assert_eq!(j["code"], 50);
    assert_eq!(j["cniVersion"], "1.1.0");
    if let Ok(mut r) = s.fake.ready.lock() {
        *r = true;
    }
    assert_eq!(
        status(),
        ambient_cni::Outcome {
            stdout: None,
            stderr: None,
            exit: 0
        }
    );
}

/// A GC list far larger than HTTP/2's initial 64 KiB windows: the client must wait for the
/// daemon's WINDOW_UPDATEs (and its SETTINGS) instead of overrunning them.
#[test]
fn large_gc_request_respects_flow_control() {
    let s = server();
    let valid: Vec<Value> = (0..6000)
        .map(|i| json!({"containerID": format!("container-{i:08}-{}", "x".repeat(32)), "ifname": "eth0"}))
        .collect();
    let gc = json!({"cniVersion": "1.1.0", "name": "testnet", "socket": s.socket,
        "cni.dev/valid-attachments": valid});
    let env: HashMap<&str, String> = [("CNI_COMMAND", "GC".to_string())].into_iter().collect();
    let o = ambient_cni::run(
        &|k| env.get(k).cloned(),
        &mut gc.to_string().as_bytes(),
        false,
    );
    assert_eq!(o.exit, 0, "{o:?}");
    let reqs = s.fake.gc.lock().expect("lock").clone();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].valid.len(), 6000);
    assert_eq!(
        reqs[0].valid[5999].container_id,
        format!("container-{:08}-{}", 5999, "x".repeat(32))
    );
}
