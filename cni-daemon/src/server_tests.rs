//! The socket's tonic server against tonic's client (what the admin commands use), the plugin's
//! blocking client, and raw frames (limits, deadlines, hostile input), on the fake dataplane.
//! The same server in the real daemon, as root, against hostile clients: tests/tests/hostile_socket.rs.

use std::sync::Arc;
use std::time::Duration;

use ambient_cni_proto::h2wire::*;
use ambient_cni_proto::v1::cni_node_client::CniNodeClient;
use ambient_cni_proto::v1::*;
use ambient_cni_proto::CONTRACT_VERSION;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::Channel;

use super::{serve_as, MAX_REQUEST};
use crate::config::Config;
use crate::conn::Peers;
use crate::daemon::Daemon;
use crate::dataplane::fake::FakeDataplane;
use crate::registry::Registry;

struct Server {
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Server {
    async fn start() -> Server {
        Server::start_as(0).await
    }

    /// A server whose every peer has `uid`.
    async fn start_as(uid: u32) -> Server {
        let mut c = Config::default();
        c.ambient_namespaces.insert("default".into());
        let dp = Arc::new(FakeDataplane::new());
        for i in 0..8 {
            dp.kernel().add_host_link(&format!("veth{i}"));
        }
        let d = Arc::new(Daemon::new(Arc::new(c), dp, None, Registry::default()));
        assert!(d.resync().await.ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let l = crate::server::bind(&dir.path().join("s.sock")).expect("bind");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_as(
            d,
            l,
            async {
                let _ = rx.await;
            },
            Peers::As(uid),
        ));
        Server {
            dir,
            _stop: tx,
            task,
        }
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("s.sock")
    }

    async fn client(&self) -> CniNodeClient<Channel> {
        crate::admin::connect(&self.path()).await.expect("connect")
    }

    async fn raw(&self) -> UnixStream {
        UnixStream::connect(self.path()).await.expect("raw connect")
    }
}

fn pod(i: u32) -> PodRequest {
    PodRequest {
        contract_version: CONTRACT_VERSION,
        container_id: format!("c{i:04}"),
        ifname: "eth0".into(),
        netns: "/proc/self/ns/net".into(),
        pod_namespace: "default".into(),
        pod_name: format!("p{i}"),
        pod_uid: format!("u{i}"),
        network_name: "k8s".into(),
        ips: vec![PodIp {
            address: format!("10.244.{}.{}/24", i / 200, i % 200 + 2),
            gateway: "10.244.0.1".into(),
        }],
        host_interface: format!("veth{}", i % 8),
        ..PodRequest::default()
    }
}

#[tokio::test]
async fn every_call_works_through_tonic_and_errors_keep_their_codes() {
    let s = Server::start().await;
    let mut c = s.client().await;
    let st = c
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(st.ready);
    let add = c.pod_add(pod(1)).await.expect("add").into_inner();
    assert!(add.enrolled, "{}", add.reason);
    let chk = c.pod_check(pod(1)).await.expect("check").into_inner();
    assert!(chk.enrolled, "{}", chk.detail);
    let tr = c
        .trace(TraceRequest {
            filter: "c0001".into(),
            limit: 0,
        })
        .await
        .expect("trace")
        .into_inner();
    assert!(!tr.events.is_empty());
    let dump = c.dump(DumpRequest {}).await.expect("dump").into_inner();
    assert!(dump.json.contains("c0001"));
    let del = c.pod_del(pod(1)).await.expect("del").into_inner();
    assert!(del.removed);
    // The daemon's refusals arrive with their codes and (non-ASCII) messages intact.
    let mut bad = pod(2);
    bad.ifname = "eth0 ✓".into();
    let e = c.pod_add(bad).await.expect_err("bad ifname");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("eth0 ✓"), "{}", e.message());
    let mut old = pod(3);
    old.contract_version = 99;
    let e = c.pod_add(old).await.expect_err("old contract");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let g = c
        .gc(GcRequest {
            contract_version: CONTRACT_VERSION,
            network_name: "k8s".into(),
            valid: vec![],
            has_valid_list: true,
        })
        .await
        .expect("gc")
        .into_inner();
    assert!(g.errors.is_empty(), "{:?}", g.errors);
    s.task.abort();
}

#[tokio::test]
async fn big_requests_big_replies_and_concurrent_calls_on_one_connection() {
    let s = Server::start().await;
    let mut c = s.client().await;
    // Concurrent calls share one HTTP/2 connection: answered one at a time, all answered.
    let calls = (0..40).map(|i| {
        let mut c = c.clone();
        async move { c.pod_add(pod(i)).await.map(|r| r.into_inner().enrolled) }
    });
    for r in futures::future::join_all(calls).await {
        assert!(matches!(r, Ok(true)), "{r:?}");
    }
    // A request far above the 64 KiB windows: we give credit back as it arrives.
    let valid: Vec<Attachment> = (0..20_000)
        .map(|i| Attachment {
            container_id: format!("{i:064}"),
            ifname: "eth0".into(),
        })
        .collect();
    let g = c
        .gc(GcRequest {
            contract_version: CONTRACT_VERSION,
            network_name: "k8s".into(),
            valid,
            has_valid_list: true,
        })
        .await
        .expect("gc of 1.4 MB")
        .into_inner();
    // None of the 40 pods is in that list: all are collected.
    assert_eq!(g.removed, 40, "{:?}", g.errors);
    // A reply far above the windows (the trace ring): sent as the client gives credit.
    for i in 100..400 {
        c.pod_add(pod(i)).await.expect("add");
    }
    let tr = c
        .trace(TraceRequest {
            filter: String::new(),
            limit: 100_000,
        })
        .await
        .expect("big trace")
        .into_inner();
    assert!(tr.encoded_len() > 65_535, "{}", tr.encoded_len());
    s.task.abort();
}

/// A raw HTTP/2 client: frames written by hand, answers collected.
struct Raw {
    io: UnixStream,
    buf: Vec<u8>,
    /// The connection's HPACK decoder (h2's encoder indexes across responses).
    dec: Decoder,
}

impl Raw {
    async fn new(s: &Server, settings: &[(u16, u32)]) -> Raw {
        let mut io = s.raw().await;
        let mut out = PREFACE.to_vec();
        let mut p = Vec::new();
        for (id, v) in settings {
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&v.to_be_bytes());
        }
        frame(&mut out, SETTINGS, 0, 0, &p);
        io.write_all(&out).await.expect("preface");
        Raw {
            io,
            buf: Vec::new(),
            dec: Decoder::default(),
        }
    }

    async fn send(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut out = Vec::new();
        frame(&mut out, ty, flags, stream, payload);
        self.io.write_all(&out).await.expect("send");
    }

    /// The HEADERS of a call (no END_STREAM), with `extra` fields.
    async fn headers(&mut self, stream: u32, method: &str, extra: &[(&str, &str)]) {
        let mut b = vec![0x80 | 3, 0x80 | 6];
        hpack_literal(
            &mut b,
            4,
            ":path",
            &format!("/ambientcni.v1.CniNode/{method}"),
        );
        hpack_literal(&mut b, 1, ":authority", "localhost");
        hpack_literal(&mut b, 31, "content-type", "application/grpc");
        hpack_literal(&mut b, 0, "te", "trailers");
        for (n, v) in extra {
            hpack_literal(&mut b, 0, n, v);
        }
        self.send(HEADERS, END_HEADERS, stream, &b).await;
    }

    async fn request(&mut self, stream: u32, method: &str, msg: &[u8], flag: u8) {
        self.headers(stream, method, &[]).await;
        let mut body = vec![flag];
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(msg);
        for (i, chunk) in body.chunks(16_384).enumerate() {
            let last = (i + 1) * 16_384 >= body.len();
            let fl = if last { END_STREAM } else { 0 };
            self.send(DATA, fl, stream, chunk).await;
        }
    }

    /// Next frame, or None at EOF / after 5 s.
    async fn next(&mut self) -> Option<(FrameHead, Vec<u8>)> {
        loop {
            if let Some(h) = frame_head(&self.buf) {
                if self.buf.len() >= FRAME_HEAD + h.len {
                    let p = self.buf[FRAME_HEAD..FRAME_HEAD + h.len].to_vec();
                    self.buf.drain(..FRAME_HEAD + h.len);
                    return Some((h, p));
                }
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(Duration::from_secs(5), self.io.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Frames until stream `id` ends: (header fields of every block, DATA bytes).
    async fn response(&mut self, id: u32) -> (Vec<(String, String)>, Vec<u8>, Vec<FrameHead>) {
        let (mut fields, mut data, mut seen) = (Vec::new(), Vec::new(), Vec::new());
        while let Some((h, p)) = self.next().await {
            seen.push(h);
            if h.stream != id {
                continue;
            }
            match h.ty {
                HEADERS => fields.extend(self.dec.decode(&p).expect("hpack")),
                DATA => data.extend_from_slice(&p),
                _ => {}
            }
            if h.flags & END_STREAM != 0 && (h.ty == HEADERS || h.ty == DATA) {
                break;
            }
        }
        (fields, data, seen)
    }
}

fn status_of(fields: &[(String, String)]) -> Option<&str> {
    fields
        .iter()
        .find(|(n, _)| n == "grpc-status")
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn a_small_client_window_is_honoured() {
    let s = Server::start().await;
    let mut c = s.client().await;
    for i in 0..100 {
        c.pod_add(pod(i)).await.expect("add");
    }
    // Window of 1000 bytes per stream, frames of at most 16 KiB: the reply comes in pieces of
    // at most our credit, and only as we grant more.
    let mut r = Raw::new(&s, &[(SETTINGS_INITIAL_WINDOW_SIZE, 1000)]).await;
    let req = TraceRequest {
        filter: String::new(),
        limit: 100_000,
    };
    r.request(1, "Trace", &req.encode_to_vec(), 0).await;
    let mut data = Vec::new();
    let mut granted = 1000usize;
    let mut dec = Decoder::default();
    let mut fields = Vec::new();
    loop {
        let (h, p) = r.next().await.expect("frame");
        match (h.ty, h.stream) {
            (DATA, 1) => {
                data.extend_from_slice(&p);
                assert!(
                    data.len() <= granted,
                    "{} sent with {granted} granted",
                    data.len()
                );
                if data.len() == granted {
                    r.send(WINDOW_UPDATE, 0, 1, &5000u32.to_be_bytes()).await;
                    granted += 5000;
                }
            }
            (HEADERS, 1) => {
                fields.extend(dec.decode(&p).expect("hpack"));
                if h.flags & END_STREAM != 0 {
                    break;
                }
            }
            _ => {}
        }
    }
    assert_eq!(status_of(&fields), Some("0"));
    let msg = data.get(5..).expect("prefix");
    let tr = TraceReply::decode(msg).expect("reply");
    assert!(tr.events.len() >= 100);
}

#[tokio::test]
async fn refusals_and_hostile_input_never_take_the_server_down() {
    let s = Server::start().await;
    // Unknown method, compressed message without grpc-encoding, bad protobuf: each its status
    // (tonic's codes: UNIMPLEMENTED, INTERNAL as the gRPC spec says, INTERNAL for a decode error).
    let mut r = Raw::new(&s, &[]).await;
    r.request(1, "Nope", &[], 0).await;
    assert_eq!(status_of(&r.response(1).await.0), Some("12"));
    r.request(3, "Status", &[], 1).await;
    assert_eq!(status_of(&r.response(3).await.0), Some("13"));
    r.request(5, "PodAdd", &[0xff, 0xff, 0xff], 0).await;
    assert_eq!(status_of(&r.response(5).await.0), Some("13"));
    // PING is answered, with the same payload.
    r.send(PING, 0, 0, b"12345678").await;
    let mut pong = false;
    while let Some((h, p)) = r.next().await {
        if h.ty == PING && h.flags & ACK != 0 && p == b"12345678" {
            pong = true;
            break;
        }
    }
    assert!(pong);
    // One byte over the limit: refused before its body is read, the connection stays usable.
    let mut c = s.client().await;
    let over = GcRequest {
        contract_version: CONTRACT_VERSION,
        network_name: "x".repeat(MAX_REQUEST - 8),
        valid: vec![],
        has_valid_list: true,
    };
    assert_eq!(over.encoded_len(), MAX_REQUEST + 1);
    let e = c.gc(over).await.expect_err("too large");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    // At the limit: served.
    let at = GcRequest {
        contract_version: CONTRACT_VERSION,
        network_name: "x".repeat(MAX_REQUEST - 7),
        valid: vec![],
        has_valid_list: false,
    };
    assert_eq!(at.encoded_len(), MAX_REQUEST);
    assert!(c.gc(at).await.is_ok());
    assert!(c.status(StatusRequest {}).await.is_ok());
    // Not HTTP/2, or a bad frame: the connection is closed (GOAWAY first for the frame).
    for bad in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0u8; 40][..]] {
        let mut io = s.raw().await;
        io.write_all(bad).await.expect("write");
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "still open after {bad:?}");
    }
    let mut r = Raw::new(&s, &[]).await;
    r.send(DATA, 0, 0, b"x").await;
    let mut goaway = false;
    while let Some((h, _)) = r.next().await {
        goaway |= h.ty == GOAWAY;
    }
    assert!(goaway);
    // Random bytes after a valid preface, many times.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        let mut io = s.raw().await;
        let mut out = PREFACE.to_vec();
        for _ in 0..(seed % 300) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.push(seed as u8);
        }
        let _ = io.write_all(&out).await;
        drop(io);
    }
    // Still serving.
    let mut c = s.client().await;
    assert!(c.status(StatusRequest {}).await.is_ok());
    assert!(!s.task.is_finished());
}

#[tokio::test]
async fn a_peer_that_is_not_root_is_refused_whatever_it_sends() {
    let s = Server::start_as(65534).await;
    let mut c = s.client().await;
    let e = c.pod_add(pod(1)).await.expect_err("not root");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("65534"), "{}", e.message());
    let e = c.status(StatusRequest {}).await.expect_err("not root");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // Garbage that would not decode, and a message header announcing 16 MiB: refused as a
    // peer, before either is read.
    let mut r = Raw::new(&s, &[]).await;
    r.request(1, "PodAdd", &[0xff; 100], 0).await;
    assert_eq!(status_of(&r.response(1).await.0), Some("7"));
    r.headers(3, "PodAdd", &[]).await;
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(MAX_REQUEST as u32).to_be_bytes());
    r.send(DATA, 0, 3, &prefix).await;
    assert_eq!(status_of(&r.response(3).await.0), Some("7"));
    // The plugin's client says so too.
    let e = plugin_call(&s, "Status", &StatusRequest {}, Duration::from_secs(2))
        .await
        .expect_err("not root");
    assert_eq!(e.code, ambient_cni::h2::Code::PermissionDenied, "{e:?}");
    assert!(e.message.contains("not root"), "{e:?}");
}

#[tokio::test]
async fn grpc_timeout_is_honoured_and_a_stalled_body_is_cancelled() {
    let s = Server::start().await;
    // A request whose body never comes, with a 50 ms grpc-timeout: CANCELLED at once, not after
    // the server's own 30 s.
    let mut r = Raw::new(&s, &[]).await;
    let t = std::time::Instant::now();
    r.headers(1, "Status", &[("grpc-timeout", "50m")]).await;
    let (fields, _, _) = r.response(1).await;
    println!(
        "stalled body with grpc-timeout 50m: answered in {:?}",
        t.elapsed()
    );
    assert_eq!(status_of(&fields), Some("1"), "{fields:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

/// One call with the plugin's blocking client (on the blocking pool: it blocks).
async fn plugin_call<M: Message>(
    s: &Server,
    method: &str,
    msg: &M,
    timeout: Duration,
) -> Result<Vec<u8>, ambient_cni::h2::Status> {
    use ambient_cni::h2::{unary, CallError, Code, Status};
    let path = s.path();
    let body = msg.encode_to_vec();
    let method = format!("/ambientcni.v1.CniNode/{method}");
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + timeout;
        unary(&path, &method, &body, timeout, deadline).map_err(|e| match e {
            CallError::Status(s) => s,
            other => Status::new(Code::Unavailable, format!("{other:?}")),
        })
    })
    .await
    .unwrap_or_else(|e| Err(Status::new(Code::Internal, format!("client task: {e}"))))
}

#[tokio::test]
async fn the_plugins_own_client_works_against_this_server() {
    let s = Server::start().await;
    let st = plugin_call(&s, "Status", &StatusRequest {}, Duration::from_secs(5))
        .await
        .expect("status");
    assert!(StatusReply::decode(st.as_slice()).expect("reply").ready);
    let add = plugin_call(&s, "PodAdd", &pod(7), Duration::from_secs(5))
        .await
        .expect("add");
    let add = PodAddReply::decode(add.as_slice()).expect("reply");
    assert!(add.enrolled, "{}", add.reason);
    // A refusal keeps its code and its (non-ASCII) message through h2's HPACK and our decoder.
    let mut bad = pod(8);
    bad.ifname = "eth0 ✓".into();
    let e = plugin_call(&s, "PodAdd", &bad, Duration::from_secs(5))
        .await
        .expect_err("bad ifname");
    assert_eq!(e.code, ambient_cni::h2::Code::InvalidArgument, "{e:?}");
    assert!(e.message.contains("eth0 ✓"), "{e:?}");
    // A request above the server's 256 KiB windows: the client sends as it gets credit.
    let valid: Vec<Attachment> = (0..20_000)
        .map(|i| Attachment {
            container_id: format!("{i:064}"),
            ifname: "eth0".into(),
        })
        .collect();
    let g = GcRequest {
        contract_version: CONTRACT_VERSION,
        network_name: "k8s".into(),
        valid,
        has_valid_list: true,
    };
    let g = plugin_call(&s, "Gc", &g, Duration::from_secs(10))
        .await
        .expect("gc of 1.4 MB");
    assert_eq!(GcReply::decode(g.as_slice()).expect("reply").removed, 1);
    for i in 100..700 {
        plugin_call(&s, "PodAdd", &pod(i), Duration::from_secs(5))
            .await
            .expect("add");
    }
    let tr = TraceRequest {
        filter: String::new(),
        limit: 100_000,
    };
    let tr = plugin_call(&s, "Trace", &tr, Duration::from_secs(5))
        .await
        .expect("big trace");
    // Above the plugin's 64 KiB receive window: it gives credit back as it reads.
    assert!(tr.len() > 65_535, "{}", tr.len());
    // Many calls in a row, each its own connection, as the plugin makes them.
    let t = std::time::Instant::now();
    for _ in 0..200 {
        plugin_call(&s, "Status", &StatusRequest {}, Duration::from_secs(5))
            .await
            .expect("status");
    }
    println!("200 plugin STATUS calls: {:?}", t.elapsed());
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

#[tokio::test]
async fn bind_only_changes_a_directory_it_created() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().expect("tempdir");
    // A directory that exists (think /run): its mode stays.
    let shared = t.path().join("run");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sock = shared.join("x.sock");
    let l = crate::server::bind(&sock).expect("bind in an existing dir");
    assert_eq!(mode(&shared), 0o755);
    assert_eq!(mode(&sock), 0o600);
    drop(l);
    // A stale socket is replaced.
    let l = crate::server::bind(&sock).expect("rebind over a stale socket");
    drop(l);
    // Directories it creates are 0700, each of them.
    let deep = t.path().join("a").join("b");
    let l = crate::server::bind(&deep.join("s.sock")).expect("bind in new dirs");
    assert_eq!(mode(&deep), 0o700);
    assert_eq!(mode(&t.path().join("a")), 0o700);
    drop(l);
    // Anything but a socket at the path is refused and left alone.
    let file = shared.join("not-a-socket");
    std::fs::write(&file, b"keep me").expect("write");
    let e = crate::server::bind(&file).expect_err("a regular file");
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
    assert_eq!(mode(&shared), 0o755);
}
