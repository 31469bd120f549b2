//! Hostile root clients on the daemon's socket (issue 14, and issue 17's CPU stall): the real
//! `ambient-cnid`, in a node namespace of its own with RLIMIT_NOFILE 1024 (its usual limit, set
//! with prlimit before exec), against clients that write HTTP/2 frames by hand. After (or
//! during) each attack a normal STATUS call must answer within 100 ms, and the daemon's resident
//! memory (VmRSS) must stay bounded; both are printed.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_cni_proto::h2wire::*;
use ambient_cni_proto::v1::{PodRequest, StatusReply};
use ambient_cni_tests::{require_root, workspace_bin, TestNet};
use anyhow::{bail, Context, Result};
use prost::Message;

/// What the issue allows a STATUS call while (or after) the daemon is attacked.
const STATUS_BOUND: Duration = Duration::from_millis(100);
/// A generous bound on the daemon's resident memory (it idles at ~10 MB; the hand-written
/// server reached 1.92 GB under header amplification).
const RSS_BOUND_KB: u64 = 256 << 10;
const MAX_REQUEST: usize = 16 << 20;

struct Cnid {
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
}

fn start(net: &TestNet) -> Result<Cnid> {
    net.add_ns("node")?;
    let dir = net.dir().join("d");
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("run").join("cni.sock");
    let log = dir.join("daemon.log");
    let bin = workspace_bin("ambient-cnid")?;
    let (bin, sock, state) = (
        bin.display().to_string(),
        socket.display().to_string(),
        dir.join("state").display().to_string(),
    );
    // `ip netns exec` and prlimit both exec: the pid is the daemon's.
    let pid = net.spawn(
        "node",
        &[
            "prlimit",
            "--nofile=1024:1024",
            &bin,
            "run",
            "--socket",
            &sock,
            "--state-dir",
            &state,
            "--resync-interval-ms",
            "300",
        ],
        &log,
    )?;
    let d = Cnid { pid, socket, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = status(&d.socket) {
            if r.0.ready {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the daemon is not ready:\n{}", d.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "ambient-cnid" {
        bail!("pid {pid} is {comm:?}, not the daemon");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    println!("daemon pid {pid}: {nofile}");
    if !nofile.contains("1024") {
        bail!("the daemon's nofile is not 1024: {nofile}");
    }
    Ok(d)
}

impl Cnid {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn proc_kb(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// STATUS three times: prints the figures and the daemon's RSS, asserts the best call is under
    /// the bound, the daemon ready and its RSS under [`RSS_BOUND_KB`].
    fn check(&self, case: &str) {
        let mut times = Vec::new();
        for _ in 0..3 {
            match status(&self.socket) {
                Ok((r, t)) => {
                    assert!(r.ready, "{case}: not ready: {}", r.reason);
                    times.push(t);
                }
                Err(e) => panic!("{case}: STATUS failed: {e:#}\n{}", self.log_text()),
            }
        }
        let rss = self.proc_kb("VmRSS:");
        println!(
            "{case}: STATUS {:?}; daemon VmRSS {} kB, {} fds open",
            times,
            rss,
            self.open_fds()
        );
        let best = times.iter().min().copied().unwrap_or(Duration::MAX);
        assert!(
            best < STATUS_BOUND,
            "{case}: STATUS took {best:?}\n{}",
            self.log_text()
        );
        assert!(rss < RSS_BOUND_KB, "{case}: daemon VmRSS {rss} kB");
    }
}

fn connect(socket: &Path) -> Result<UnixStream> {
    let s = UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

fn preface() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    out
}

/// A request header block for `method` (statically indexed or literal fields only).
fn headers(method: &str) -> Vec<u8> {
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
    b
}

fn grpc_message(msg: &[u8]) -> Vec<u8> {
    let mut b = vec![0];
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// One unary call on a fresh connection: (header fields of every block, DATA bytes).
fn call(socket: &Path, method: &str, body: &[u8]) -> Result<(Headers, Vec<u8>, Duration)> {
    let t = Instant::now();
    let mut s = connect(socket)?;
    let mut out = preface();
    frame(&mut out, HEADERS, END_HEADERS, 1, &headers(method));
    for (i, chunk) in body.chunks(16_384).enumerate() {
        let last = (i + 1) * 16_384 >= body.len();
        frame(&mut out, DATA, if last { END_STREAM } else { 0 }, 1, chunk);
    }
    s.write_all(&out)?;
    let (fields, data) = read_response(&mut s, 1)?;
    Ok((fields, data, t.elapsed()))
}

/// Header fields of a response, in order.
type Headers = Vec<(String, String)>;

fn read_response(s: &mut UnixStream, id: u32) -> Result<(Headers, Vec<u8>)> {
    let mut dec = Decoder::default();
    let (mut fields, mut data, mut buf) = (Vec::new(), Vec::new(), Vec::new());
    let mut block = Vec::new();
    loop {
        while let Some(h) = frame_head(&buf) {
            if buf.len() < FRAME_HEAD + h.len {
                break;
            }
            let p: Vec<u8> = buf.drain(..FRAME_HEAD + h.len).skip(FRAME_HEAD).collect();
            match h.ty {
                SETTINGS if h.flags & ACK == 0 => {
                    let mut ack = Vec::new();
                    frame(&mut ack, SETTINGS, ACK, 0, &[]);
                    let _ = s.write_all(&ack);
                }
                HEADERS | CONTINUATION if h.stream == id => {
                    let body = frame_body(&h, &p).map_err(anyhow::Error::msg)?;
                    block.extend_from_slice(body);
                    if h.flags & END_HEADERS != 0 {
                        fields.extend(dec.decode(&block).map_err(anyhow::Error::msg)?);
                        block.clear();
                    }
                    if h.flags & END_STREAM != 0 {
                        return Ok((fields, data));
                    }
                }
                DATA if h.stream == id => {
                    data.extend_from_slice(frame_body(&h, &p).map_err(anyhow::Error::msg)?);
                    if h.flags & END_STREAM != 0 {
                        return Ok((fields, data));
                    }
                }
                RST_STREAM if h.stream == id => bail!("stream {id} reset: {p:?}"),
                GOAWAY => bail!("GOAWAY: {p:?}"),
                _ => {}
            }
        }
        let mut chunk = [0u8; 16_384];
        let n = s.read(&mut chunk).context("reading the answer")?;
        if n == 0 {
            bail!("connection closed before stream {id} ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn grpc_status(fields: &[(String, String)]) -> Option<&str> {
    fields
        .iter()
        .find(|(n, _)| n == "grpc-status")
        .map(|(_, v)| v.as_str())
}

/// A STATUS call: the reply and how long it took.
fn status(socket: &Path) -> Result<(StatusReply, Duration)> {
    let (fields, data, t) = call(socket, "Status", &grpc_message(&[]))?;
    if grpc_status(&fields) != Some("0") {
        bail!("STATUS answered {fields:?}");
    }
    let r = StatusReply::decode(data.get(5..).unwrap_or(&[]))?;
    Ok((r, t))
}

/// True when the daemon has closed `s` (POLLRDHUP/POLLHUP), waiting at most `wait`.
fn closed_by_peer(s: &UnixStream, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Runs `attack` on a thread, over and over on fresh connections, until the returned guard
/// stops it; counts bytes sent.
struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(
        socket: &Path,
        attack: impl Fn(&mut UnixStream, &AtomicBool, &AtomicU64) + Send + 'static,
    ) -> Flood {
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (st, se, path) = (stop.clone(), sent.clone(), socket.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok(mut s) = connect(&path) else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if s.write_all(&preface()).is_ok() {
                    attack(&mut s, &st, &se);
                }
            }
        });
        Flood {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

fn send(s: &mut UnixStream, sent: &AtomicU64, b: &[u8]) -> bool {
    let ok = s.write_all(b).is_ok();
    if ok {
        sent.fetch_add(b.len() as u64, Ordering::Relaxed);
    }
    ok
}

/// Lets the flood run, checking STATUS while it does.
fn under_flood(d: &Cnid, case: &str, f: Flood) {
    std::thread::sleep(Duration::from_millis(700));
    d.check(&format!("{case} (during)"));
    std::thread::sleep(Duration::from_millis(700));
    let sent = f.stop();
    println!("{case}: {sent} bytes sent");
    d.check(&format!("{case} (after)"));
}

fn raise_own_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on our own process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

#[test]
fn hostile_clients_neither_stall_the_daemon_nor_grow_it() {
    if !require_root() {
        return;
    }
    raise_own_nofile();
    let net = TestNet::new("hostile");
    let d = start(&net).expect("daemon");
    d.check("baseline");
    let sock = d.socket.clone();

    // 1. 1,000 idle connections (preface and SETTINGS sent, then nothing), held open.
    let idle: Vec<UnixStream> = (0..1000)
        .filter_map(|_| {
            let mut s = connect(&sock).ok()?;
            s.write_all(&preface()).ok()?;
            Some(s)
        })
        .collect();
    println!("1,000 idle: {} connected", idle.len());
    d.check("1,000 idle connections held");
    let open = idle
        .iter()
        .filter(|s| !closed_by_peer(s, Duration::ZERO))
        .count();
    println!("1,000 idle: {open} still open on the daemon's side");
    drop(idle);

    // 2. ~1,020 connections that send nothing, with the daemon's nofile at 1024: no EMFILE storm,
    // the resync keeps working (STATUS ready after several 300 ms resyncs), the warning is rare.
    let silent: Vec<UnixStream> = (0..1020).filter_map(|_| connect(&sock).ok()).collect();
    println!("1,020 silent: {} connected", silent.len());
    std::thread::sleep(Duration::from_millis(1500));
    d.check("1,020 silent connections held, nofile 1024");
    drop(silent);
    let log = d.log_text();
    let accept_warnings = log.matches("accepting a connection failed").count();
    let fd_errors = log.matches("Too many open files").count();
    println!("1,020 silent: {accept_warnings} accept warnings, {fd_errors} 'Too many open files'");
    assert!(accept_warnings <= 3, "{log}");
    // Nothing else (the resync's iptables-save, the journal) ran out of descriptors.
    assert!(fd_errors <= accept_warnings, "{log}");

    // 3. A partial preface that never completes: held, then closed at the preface deadline.
    let mut partial: Vec<UnixStream> = (0..50).filter_map(|_| connect(&sock).ok()).collect();
    for s in &mut partial {
        let _ = s.write_all(&PREFACE[..16]);
    }
    let t = Instant::now();
    d.check("50 partial prefaces held");
    let all_closed = partial
        .iter()
        .all(|s| closed_by_peer(s, Duration::from_secs(15).saturating_sub(t.elapsed())));
    println!(
        "partial preface: closed by the daemon after {:?}",
        t.elapsed()
    );
    assert!(all_closed, "partial prefaces still open after 15 s");
    drop(partial);

    // 4. CONTINUATION flood: a header block that never ends.
    let f = Flood::start(&sock, |s, stop, sent| {
        let mut out = Vec::new();
        frame(&mut out, HEADERS, 0, 1, &headers("Status"));
        if !send(s, sent, &out) {
            return;
        }
        let mut cont = Vec::new();
        let mut junk = Vec::new();
        hpack_literal(&mut junk, 0, "x-flood", &"a".repeat(16_000));
        frame(&mut cont, CONTINUATION, 0, 1, &junk);
        while !stop.load(Ordering::Relaxed) && send(s, sent, &cont) {}
    });
    under_flood(&d, "CONTINUATION flood", f);

    // 5. Rapid HEADERS + RST_STREAM.
    let f = Flood::start(&sock, |s, stop, sent| {
        let h = headers("Status");
        let mut id = 1u32;
        while !stop.load(Ordering::Relaxed) && id < 0x7fff_0000 {
            let mut out = Vec::new();
            for _ in 0..64 {
                frame(&mut out, HEADERS, END_HEADERS, id, &h);
                frame(&mut out, RST_STREAM, 0, id, &8u32.to_be_bytes());
                id += 2;
            }
            if !send(s, sent, &out) {
                return;
            }
        }
    });
    under_flood(&d, "rapid HEADERS+RST_STREAM", f);

    // 6. A body one byte over the limit: refused (OUT_OF_RANGE) on its message header.
    let mut s = connect(&sock).expect("connect");
    let mut out = preface();
    frame(&mut out, HEADERS, END_HEADERS, 1, &headers("Gc"));
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&((MAX_REQUEST + 1) as u32).to_be_bytes());
    prefix.extend_from_slice(&[b'x'; 4096]);
    frame(&mut out, DATA, 0, 1, &prefix);
    s.write_all(&out).expect("write");
    let (fields, _) = read_response(&mut s, 1).expect("answer");
    println!("one byte over: grpc-status {:?}", grpc_status(&fields));
    assert_eq!(grpc_status(&fields), Some("11"), "{fields:?}");
    drop(s);
    d.check("a body one byte over the limit");

    // 7. Invalid protobuf: refused, nothing recorded.
    let (fields, _, _) = call(&sock, "PodAdd", &grpc_message(&[0xff; 100])).expect("answer");
    println!("invalid protobuf: grpc-status {:?}", grpc_status(&fields));
    assert!(
        !matches!(grpc_status(&fields), Some("0") | None),
        "{fields:?}"
    );
    // A valid request that the daemon refuses still keeps its own code.
    let bad = PodRequest {
        contract_version: 99,
        ..PodRequest::default()
    };
    let (fields, _, _) = call(&sock, "PodAdd", &grpc_message(&bad.encode_to_vec())).expect("ok");
    assert_eq!(grpc_status(&fields), Some("9"), "{fields:?}");
    d.check("invalid protobuf");

    // 8. A peer that never reads its replies: closed at the write deadline, not held for minutes.
    let mut s = connect(&sock).expect("connect");
    s.set_nonblocking(true).expect("nonblocking");
    // Ten calls, then PINGs: every PING is answered (17 bytes each), none of it is read.
    let mut out = preface();
    let msg = grpc_message(&[]);
    let h = headers("Status");
    for k in 0..10u32 {
        frame(&mut out, HEADERS, END_HEADERS, 2 * k + 1, &h);
        frame(&mut out, DATA, END_STREAM, 2 * k + 1, &msg);
    }
    for k in 0..200_000u64 {
        frame(&mut out, PING, 0, 0, &k.to_be_bytes());
    }
    let (mut at, t) = (0usize, Instant::now());
    let mut stalled_since = Instant::now();
    while at < out.len() && stalled_since.elapsed() < Duration::from_secs(1) {
        match s.write(&out[at..]) {
            Ok(n) => {
                at += n;
                stalled_since = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => break,
        }
    }
    println!("never reads: {at} bytes of requests written before the daemon stopped reading");
    d.check("a peer that never reads (held)");
    let closed = closed_by_peer(&s, Duration::from_secs(60));
    println!(
        "never reads: closed by the daemon {:?} after its last write",
        t.elapsed()
    );
    assert!(closed, "a never-reading peer held for 60 s");
    drop(s);
    d.check("a peer that never reads (closed)");

    // 9. Header amplification: one 3.9 KB HPACK entry of 0xff, referenced 62 times per block,
    // 100 streams left open per connection, 20 connections.
    let mut conns = Vec::new();
    let mut total = 0usize;
    for _ in 0..20 {
        let Ok(mut s) = connect(&sock) else { continue };
        let mut out = preface();
        for k in 0..100u32 {
            let mut b = headers("Status");
            if k == 0 {
                b.push(0x40);
                hpack_str(&mut b, b"x-amp");
                hpack_str(&mut b, &[0xff; 3900]);
            }
            b.extend(std::iter::repeat_n(0x80 | 62, 62));
            frame(&mut out, HEADERS, END_HEADERS, 2 * k + 1, &b);
        }
        total += out.len();
        let _ = s.write_all(&out);
        conns.push(s);
    }
    println!(
        "header amplification: {total} bytes sent on {} connections",
        conns.len()
    );
    std::thread::sleep(Duration::from_millis(300));
    d.check("header amplification");
    drop(conns);

    // 10. Issue 17's CPU stall: HEADERS of 6,000 empty Huffman strings, then RST_STREAM, in a loop.
    let f = Flood::start(&sock, |s, stop, sent| {
        let mut block = headers("Status");
        for _ in 0..6000 {
            block.extend_from_slice(&[0x00, 0x80, 0x80]);
        }
        let (first, rest) = block.split_at(16_000);
        let mut id = 1u32;
        while !stop.load(Ordering::Relaxed) && id < 0x7fff_0000 {
            let mut out = Vec::new();
            frame(&mut out, HEADERS, 0, id, first);
            frame(&mut out, CONTINUATION, END_HEADERS, id, rest);
            frame(&mut out, RST_STREAM, 0, id, &8u32.to_be_bytes());
            id += 2;
            if !send(s, sent, &out) {
                return;
            }
        }
    });
    under_flood(&d, "6,000 empty Huffman strings + RST_STREAM", f);

    println!(
        "daemon high-water mark: VmHWM {} kB; {} fds open at the end",
        d.proc_kb("VmHWM:"),
        d.open_fds()
    );
    net.kill(d.pid);
}
