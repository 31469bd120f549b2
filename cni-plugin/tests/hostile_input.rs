//! Hostile input to the whole plugin, in process (`ambient_cni::run`, what `main` calls): random
//! and mutated stdin, environment and CNI_ARGS, against daemons that are absent, a regular file,
//! hang up at once, or answer random bytes. Every outcome must be a valid CNI answer: exit 0 or 1,
//! at most one JSON document on stdout, and on failure exactly `{cniVersion, code, msg, details}`
//! with a known code — never 102, the caught panic. Names that libcni would refuse (container ID,
//! interface) must be refused with code 4 (or an earlier config error) before any daemon is
//! dialled, and DEL must succeed whenever its names are valid.
//!
//! - `make test`: `hostile_input_short`, a few thousand cases (`ACNI_FUZZ_CASES` to change).
//! - `make fuzz`: `hostile_input_million` (ignored by default), ≥ 1,000,000 cases, prints the
//!   count, the time and the outcome histogram. `ACNI_FUZZ_SEED` replays a run.
//!
//! A DEL whose config cannot be read dials the default socket `/run/ambient-cni/cni.sock`. As
//! root that could reach a real daemon on this machine, so the cases run in a child process in a
//! private mount namespace with a tmpfs over `/run` (`unshare --mount`); as another user the
//! daemon's 0700 directory and SO_PEERCRED check refuse us anyway, and the cases run in process.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Codes the plugin may answer with (cni-contract.md §4 and `ambient_cni::error`).
const KNOWN_CODES: [u64; 9] = [1, 2, 4, 6, 7, 11, 50, 100, 101];
/// Codes that mean "refused from the input alone, no daemon dialled".
const INPUT_CODES: [u64; 5] = [1, 2, 4, 6, 7];

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v.get(self.below(v.len())).copied().unwrap_or_default()
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| (self.next() & 0xff) as u8).collect()
    }
    /// A string of random characters: mostly printable ASCII, some separators, control
    /// characters and non-ASCII.
    fn string(&mut self, max: usize) -> String {
        let n = self.below(max + 1);
        (0..n)
            .map(|_| match self.below(10) {
                0 => self
                    .pick(&[
                        ";", "=", "/", ":", " ", "\"", "\\", "\n", "\t", "\0", "$(", "`", "..",
                        "é", "𝄞", "\u{202e}",
                    ])
                    .to_string(),
                1 => char::from_u32((self.next() % 0x11_0000) as u32)
                    .map(String::from)
                    .unwrap_or_default(),
                _ => char::from(b' ' + (self.next() % 95) as u8).to_string(),
            })
            .collect()
    }
}

/// Sockets the configs point at.
struct Sockets {
    _dir: tempfile::TempDir,
    missing: PathBuf,
    file: PathBuf,
    closer: PathBuf,
    garbage: PathBuf,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Sockets {
    fn new(seed: u64) -> Sockets {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file.sock");
        std::fs::write(&file, b"not a socket").expect("regular file");
        let (closer, garbage) = (
            dir.path().join("closer.sock"),
            dir.path().join("garbage.sock"),
        );
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // Hangs up as soon as it has accepted.
        serve(&closer, &stop, &accepted, |_| Vec::new());
        // Answers with random bytes: sometimes an HTTP/2-looking preface and frame headers,
        // mostly noise, then hangs up.
        let mut rng = Rng(seed ^ 0x5eed);
        let replies: Vec<Vec<u8>> = (0..256)
            .map(|i| {
                let mut r = Vec::new();
                if i % 3 == 0 {
                    // SETTINGS, then a HEADERS frame of random length and flags, then noise.
                    r.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
                    r.extend_from_slice(&[
                        0,
                        (rng.next() & 0xff) as u8,
                        (rng.next() & 0xff) as u8,
                        1,
                        (rng.next() & 0xff) as u8,
                        0,
                        0,
                        0,
                        1,
                    ]);
                }
                r.extend(rng.bytes(96));
                r
            })
            .collect();
        serve(&garbage, &stop, &accepted, move |n| {
            replies[(n % 256) as usize].clone()
        });
        Sockets {
            missing: dir.path().join("no").join("such.sock"),
            _dir: dir,
            file,
            closer,
            garbage,
            accepted,
            stop,
        }
    }

    fn pick(&self, rng: &mut Rng) -> &Path {
        match rng.below(20) {
            0..=7 => &self.missing,
            8..=10 => &self.file,
            11..=14 => &self.closer,
            _ => &self.garbage,
        }
    }
}

impl Drop for Sockets {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    path: &Path,
    stop: &Arc<AtomicBool>,
    accepted: &Arc<AtomicU64>,
    reply: impl Fn(u64) -> Vec<u8> + Send + 'static,
) {
    let l = UnixListener::bind(path).expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let (stop, accepted) = (stop.clone(), accepted.clone());
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let n = accepted.fetch_add(1, Ordering::SeqCst);
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(5)));
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(&reply(n));
                }
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    });
}

/// A prevResult as ptp writes it.
fn ptp_result(version: &str, netns: &str) -> Value {
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "veth1a2b3c4d", "mac": "aa:bb:cc:dd:ee:01"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": netns}
        ],
        "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 7 } else { 9 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(50)),
        2 => json!(rng.next() as i64),
        3 => json!(f64::from_bits(rng.next()) % 1e12),
        4 => json!(rng
            .pick(&["0", "-1", "1e400", "18446744073709551616", "1.5"])
            .parse::<f64>()
            .unwrap_or(0.0)),
        5 | 6 => Value::String(rng.string(40)),
        7 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|_| (rng.string(8), random_value(rng, depth - 1)))
                .collect::<Map<_, _>>(),
        ),
    }
}

/// Replaces a random node of `v`, at most `depth` levels down, with `new`.
fn replace_somewhere(rng: &mut Rng, v: &mut Value, new: Value, depth: usize) {
    if depth > 0 {
        match v {
            Value::Object(m) if !m.is_empty() => {
                let k = m
                    .keys()
                    .nth(rng.below(m.len()))
                    .cloned()
                    .unwrap_or_default();
                if let Some(child) = m.get_mut(&k) {
                    return replace_somewhere(rng, child, new, depth - 1);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                if let Some(child) = a.get_mut(i) {
                    return replace_somewhere(rng, child, new, depth - 1);
                }
            }
            _ => {}
        }
    }
    *v = new;
}

/// Sets the node at `path` (object keys, array indexes) if its parent exists; else nothing.
fn set_at(v: &mut Value, path: &[&str], new: Value) {
    let Some((first, rest)) = path.split_first() else {
        *v = new;
        return;
    };
    let child = match v {
        Value::Object(m) if rest.is_empty() => {
            m.insert(first.to_string(), new);
            return;
        }
        Value::Object(m) => m.get_mut(*first),
        Value::Array(a) => first.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    };
    if let Some(c) = child {
        set_at(c, rest, new);
    }
}

/// One hostile value for one of our config keys or prevResult fields.
fn hostile_field(rng: &mut Rng, conf: &mut Value) {
    let s = |v: &str| Value::String(v.to_string());
    match rng.below(12) {
        0 => {
            let v = match rng.below(3) {
                0 => s(rng.pick(&[
                    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.2.0", "2",
                    "", "1.0.0.0", "01.0.0", "1.0", "-1.0.0",
                ])),
                1 => json!(1.0),
                _ => Value::Null,
            };
            set_at(conf, &["cniVersion"], v)
        }
        1 => set_at(
            conf,
            &["timeoutMs"],
            json!(rng
                .pick(&["0", "-1", "1.5", "1e30", "120001", "5"])
                .parse::<f64>()
                .unwrap_or(0.0)),
        ),
        2 => set_at(conf, &["timeoutMs"], s("5000")),
        3 => set_at(
            conf,
            &["socket"],
            s(rng.pick(&[
                "",
                "relative.sock",
                "/",
                "/dev/null",
                "/proc/self/fd/0",
                "\0",
            ])),
        ),
        4 => set_at(
            conf,
            &["prevResult", "ips", "0", "address"],
            s(rng.pick(&[
                "10.0.0.1/33",
                "::1/129",
                "1.2.3.4",
                "a/24",
                "10.0.0.1/-1",
                "10.0.0.1/+8",
                "10.0.0.1/24; reboot",
                "",
                "10.0.0.256/24",
                "fd00::7/64",
            ])),
        ),
        5 => set_at(
            conf,
            &["prevResult", "ips", "0", "gateway"],
            s(rng.pick(&["$(id)", "10.0.0.1;x", "", "::", "1.1.1.1.1"])),
        ),
        6 => set_at(
            conf,
            &["prevResult", "ips", "0", "interface"],
            json!(rng
                .pick(&["-1", "99", "1.5", "1e20"])
                .parse::<f64>()
                .unwrap_or(0.0)),
        ),
        7 => set_at(
            conf,
            &["prevResult", "interfaces", "0", "name"],
            s(rng.pick(&[
                "../../x",
                "a b",
                "x;reboot",
                "",
                "0123456789abcdefg",
                "é",
                "$(id)",
            ])),
        ),
        8 => set_at(conf, &["prevResult", "interfaces"], random_value(rng, 2)),
        9 => {
            let v = match rng.below(3) {
                0 => json!([{"containerID": rng.string(20), "ifname": rng.string(20)}]),
                1 => json!([{"containerID": 5}]),
                _ => random_value(rng, 2),
            };
            set_at(conf, &["cni.dev/valid-attachments"], v)
        }
        10 => set_at(conf, &["logLevel"], s(&rng.string(8))),
        _ => set_at(conf, &["prevResult"], random_value(rng, 2)),
    }
}

fn stdin_for(rng: &mut Rng, socks: &Sockets, netns: &str) -> Vec<u8> {
    match rng.below(20) {
        0 => return rng.bytes(300),
        1 => return Vec::new(),
        2 => return b"[".repeat(rng.below(3000)),
        _ => {}
    }
    let version = rng.pick(&["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
    let mut conf = json!({
        "cniVersion": version,
        "name": "fuzz",
        "type": "ambient-cni",
        "socket": socks.pick(rng),
        "timeoutMs": 1 + rng.below(150),
        "prevResult": ptp_result(version, netns),
    });
    if rng.chance(10) {
        set_at(
            &mut conf,
            &["cni.dev/valid-attachments"],
            json!([{"containerID": "abc", "ifname": "eth0"}]),
        );
    }
    for _ in 0..rng.below(3) {
        match rng.below(4) {
            0 => {
                let (v, depth) = (random_value(rng, 3), rng.below(5));
                replace_somewhere(rng, &mut conf, v, depth);
            }
            1 => {
                if let Some(m) = conf.as_object_mut() {
                    let k = m
                        .keys()
                        .nth(rng.below(m.len()))
                        .cloned()
                        .unwrap_or_default();
                    m.remove(&k);
                }
            }
            _ => hostile_field(rng, &mut conf),
        }
    }
    let mut text = conf.to_string().into_bytes();
    match rng.below(30) {
        0 if !text.is_empty() => text.truncate(rng.below(text.len())),
        1 if !text.is_empty() => {
            let i = rng.below(text.len());
            text[i] = (rng.next() & 0xff) as u8;
        }
        2 => {
            // A duplicate key ahead of the real one (serde_json keeps the last).
            let dup = format!("{{\"cniVersion\":{},", Value::String(rng.string(8)));
            if text.first() == Some(&b'{') {
                text.splice(0..1, dup.into_bytes());
            }
        }
        3 => text.extend_from_slice(b" {}"),
        _ => {}
    }
    text
}

fn env_for(rng: &mut Rng) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    let cmd = match rng.below(100) {
        0..=29 => "ADD".to_string(),
        30..=54 => "DEL".to_string(),
        55..=64 => "CHECK".to_string(),
        65..=72 => "VERSION".to_string(),
        73..=80 => "GC".to_string(),
        81..=87 => "STATUS".to_string(),
        88..=90 => String::new(),
        91..=93 => "none".to_string(),
        _ => match rng.below(3) {
            0 => rng
                .pick(&["add", "Add", "ADD ", " DEL", "FROB", "del\0"])
                .to_string(),
            _ => rng.string(10),
        },
    };
    if cmd != "none" {
        set("CNI_COMMAND", cmd);
    }
    if rng.chance(95) {
        let v = if rng.chance(75) {
            let n = 1 + rng.below(64);
            (0..n)
                .map(|_| char::from(b"0123456789abcdef"[rng.below(16)]))
                .collect()
        } else {
            match rng.below(3) {
                0 => rng
                    .pick(&[
                        "",
                        "../../etc/passwd",
                        "a/b",
                        "a b",
                        "-abc",
                        ".hidden",
                        "ü",
                        "a\0b",
                        "a;reboot",
                        "$(id)",
                    ])
                    .to_string(),
                1 => "a".repeat(1 + rng.below(3000)),
                _ => rng.string(30),
            }
        };
        set("CNI_CONTAINERID", v);
    }
    if rng.chance(95) {
        let v = if rng.chance(75) {
            rng.pick(&["eth0", "net1", "eth0.100"]).to_string()
        } else if rng.chance(50) {
            rng.pick(&[
                "",
                ".",
                "..",
                "a/b",
                "a:b",
                "a b",
                "0123456789abcdef",
                "ethé",
                "\t",
                "é123456789abcde",
            ])
            .to_string()
        } else {
            rng.string(20)
        };
        set("CNI_IFNAME", v);
    }
    if rng.chance(90) {
        let v = if rng.chance(80) {
            "/var/run/netns/acni-fuzz".to_string()
        } else {
            rng.pick(&["", "relative", "/proc/1/ns/net", "../x", "/dev/null"])
                .to_string()
        };
        set("CNI_NETNS", v);
    }
    if rng.chance(90) {
        let v = if rng.chance(80) {
            let keys = [
                "K8S_POD_NAMESPACE",
                "K8S_POD_NAME",
                "K8S_POD_UID",
                "K8S_POD_INFRA_CONTAINER_ID",
                "IgnoreUnknown",
                "IP",
            ];
            let mut pairs: Vec<String> = Vec::new();
            if rng.chance(60) {
                pairs.push(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;K8S_POD_UID=0b1c"
                        .into(),
                );
            }
            for _ in 0..rng.below(8) {
                let k = if rng.chance(85) {
                    rng.pick(&keys).to_string()
                } else {
                    rng.string(6)
                };
                let v = match rng.below(6) {
                    0 => String::new(),
                    1 => rng
                        .pick(&["a=b", "x;y", "../../x", "$(reboot)", "é", "a b"])
                        .to_string(),
                    2 => "u".repeat(1 + rng.below(600)),
                    3 => rng.string(20),
                    _ => rng
                        .pick(&[
                            "default",
                            "istio-system",
                            "ztunnel-abc",
                            "pod-1",
                            "0b1c-uid",
                            "1",
                        ])
                        .to_string(),
                };
                pairs.push(format!("{k}={v}"));
            }
            pairs.join(rng.pick(&[";", ";", ";", ";;", "="]))
        } else {
            rng.string(60)
        };
        set("CNI_ARGS", v);
    }
    if rng.chance(50) {
        set(
            "CNI_PATH",
            if rng.chance(80) {
                "/opt/cni/bin".into()
            } else {
                rng.string(20)
            },
        );
    }
    env
}

/// libcni's container ID rule.
fn libcni_container_id(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// libcni's interface name rule.
fn libcni_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Checks one outcome; returns a label for the histogram.
fn check(
    env: &BTreeMap<String, String>,
    stdin: &[u8],
    o: &ambient_cni::Outcome,
) -> Result<String, String> {
    let verb = env
        .get("CNI_COMMAND")
        .map(String::as_str)
        .unwrap_or_default();
    let label = if ["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"].contains(&verb) {
        verb
    } else {
        "other verb"
    };
    let ctx = || {
        format!(
            "env {env:?}\nstdin {:?}\noutcome {o:?}",
            String::from_utf8_lossy(stdin)
        )
    };
    if o.exit > 1 {
        return Err(format!("exit status {}: {}", o.exit, ctx()));
    }
    if verb.is_empty() {
        return if o.exit == 0 && o.stdout.is_none() && o.stderr.is_some() {
            Ok("about".into())
        } else {
            Err(format!(
                "no CNI_COMMAND must print the about text: {}",
                ctx()
            ))
        };
    }
    let doc = match &o.stdout {
        None => None,
        Some(out) => {
            if !out.ends_with('\n') {
                return Err(format!("stdout without a final newline: {}", ctx()));
            }
            let docs: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(out)
                .into_iter::<Value>()
                .collect();
            match docs {
                Ok(d) if d.len() == 1 => d.into_iter().next(),
                _ => {
                    return Err(format!(
                        "stdout is not exactly one JSON document: {}",
                        ctx()
                    ))
                }
            }
        }
    };
    if o.exit == 1 {
        let Some(Value::Object(m)) = &doc else {
            return Err(format!("a failure without an error document: {}", ctx()));
        };
        let code = m.get("code").and_then(Value::as_u64);
        let shape = m.len() == 4
            && m.get("cniVersion").is_some_and(Value::is_string)
            && m.get("msg").is_some_and(Value::is_string)
            && m.get("details").is_some_and(Value::is_string);
        let Some(code) = code.filter(|_| shape) else {
            return Err(format!("malformed error document: {}", ctx()));
        };
        if code == 102 {
            return Err(format!("the plugin panicked (code 102): {}", ctx()));
        }
        if !KNOWN_CODES.contains(&code) {
            return Err(format!("unknown error code {code}: {}", ctx()));
        }
        let names_valid = env
            .get("CNI_CONTAINERID")
            .is_some_and(|c| libcni_container_id(c))
            && env.get("CNI_IFNAME").is_some_and(|i| libcni_ifname(i));
        if verb == "DEL" && (code != 4 || names_valid) {
            return Err(format!(
                "DEL must succeed unless its names are invalid (code 4): {}",
                ctx()
            ));
        }
        if ["ADD", "CHECK"].contains(&verb) && !names_valid && !INPUT_CODES.contains(&code) {
            return Err(format!(
                "invalid names reached the daemon stage (code {code}): {}",
                ctx()
            ));
        }
        if verb == "VERSION" {
            return Err(format!("VERSION must not fail: {}", ctx()));
        }
        return Ok(format!("{label} code {code}"));
    }
    // Success.
    match verb {
        "DEL" | "CHECK" | "GC" | "STATUS" if doc.is_some() => {
            Err(format!("{verb} printed a document on success: {}", ctx()))
        }
        "ADD" | "VERSION" if !matches!(doc, Some(Value::Object(_))) => Err(format!(
            "{verb} succeeded without a result object: {}",
            ctx()
        )),
        "ADD" | "CHECK" => {
            let names_valid = env
                .get("CNI_CONTAINERID")
                .is_some_and(|c| libcni_container_id(c))
                && env.get("CNI_IFNAME").is_some_and(|i| libcni_ifname(i));
            if names_valid {
                Ok(format!("{verb} ok"))
            } else {
                Err(format!("{verb} succeeded with invalid names: {}", ctx()))
            }
        }
        "DEL" | "VERSION" | "GC" | "STATUS" => Ok(format!("{verb} ok")),
        _ => Err(format!("an unknown verb succeeded: {}", ctx())),
    }
}

/// Runs `cases` cases from `seed` in this process; panics on the first bad outcome.
fn fuzz_here(cases: u64, seed: u64) {
    let socks = Sockets::new(seed);
    let mut rng = Rng(seed);
    let mut hist: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    for i in 0..cases {
        let env = env_for(&mut rng);
        let netns = env.get("CNI_NETNS").cloned().unwrap_or_default();
        let stdin = stdin_for(&mut rng, &socks, &netns);
        let lookup = |k: &str| env.get(k).cloned();
        let o = ambient_cni::run(&lookup, &mut &stdin[..], false);
        match check(&env, &stdin, &o) {
            Ok(label) => *hist.entry(label).or_default() += 1,
            Err(e) => panic!("case {i} of seed {seed} (ACNI_FUZZ_SEED={seed}): {e}"),
        }
    }
    let took = start.elapsed();
    println!(
        "hostile input: {cases} cases in {:.1} s ({:.0} cases/s), seed {seed}, daemon sockets dialled {} times; outcomes:",
        took.as_secs_f64(),
        cases as f64 / took.as_secs_f64().max(1e-9),
        socks.accepted.load(Ordering::SeqCst)
    );
    for (label, n) in &hist {
        println!("  {label:<16} {n}");
    }
}

fn env_u64(var: &str) -> Option<u64> {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs the cases: as root in a child in a private mount namespace with a tmpfs over /run (see
/// the module docs), else here.
fn fuzz(default_cases: u64) {
    let cases = env_u64("ACNI_FUZZ_CASES").unwrap_or(default_cases);
    let seed = env_u64("ACNI_FUZZ_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        t ^ u64::from(std::process::id())
    });
    if !is_root() {
        println!(
            "hostile input: not root, running in process (the default socket is out of our reach)"
        );
        fuzz_here(cases, seed);
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            "mount -t tmpfs acni-fuzz /run && exec \"$@\"",
            "sh",
        ])
        .arg(&exe)
        .args([
            "hostile_input_worker",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ACNI_FUZZ_WORKER", "1")
        .env("ACNI_FUZZ_CASES", cases.to_string())
        .env("ACNI_FUZZ_SEED", seed.to_string())
        .output()
        .expect("unshare (util-linux) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: String = text
        .lines()
        .filter_map(|l| match l.find("hostile input:") {
            Some(i) => l.get(i..),
            None => l.starts_with("  ").then_some(l),
        })
        .map(|l| format!("{l}\n"))
        .collect();
    print!("{report}");
    assert!(
        out.status.success() && report.contains(&format!("{cases} cases")),
        "the fuzz worker failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The worker the parents start in a private mount namespace; does nothing when run by itself.
#[test]
#[ignore = "started by hostile_input_short / hostile_input_million"]
fn hostile_input_worker() {
    if std::env::var_os("ACNI_FUZZ_WORKER").is_none() {
        return;
    }
    assert!(
        !Path::new(ambient_cni_proto::DEFAULT_SOCKET).exists(),
        "the default socket must be out of reach in the sandbox"
    );
    fuzz_here(
        env_u64("ACNI_FUZZ_CASES").unwrap_or(1000),
        env_u64("ACNI_FUZZ_SEED").unwrap_or(1),
    );
}

/// A short run for `make test`.
#[test]
fn hostile_input_short() {
    fuzz(10_000);
}

/// The long run for `make fuzz` (≥ 1,000,000 cases).
#[test]
#[ignore = "long: make fuzz"]
fn hostile_input_million() {
    fuzz(1_000_000);
}

#[test]
fn the_checker_rejects_bad_outcomes() {
    let env: BTreeMap<String, String> = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_IFNAME", "eth0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let fail = |code: u64| ambient_cni::Outcome {
        stdout: Some(format!(
            "{}\n",
            json!({"cniVersion": "1.0.0", "code": code, "msg": "m", "details": "d"})
        )),
        stderr: None,
        exit: 1,
    };
    assert!(
        check(&env, b"", &fail(11)).is_err(),
        "a failing DEL with valid names"
    );
    let mut add = env.clone();
    add.insert("CNI_COMMAND".into(), "ADD".into());
    assert!(check(&add, b"", &fail(11)).is_ok());
    assert!(check(&add, b"", &fail(102)).is_err(), "a caught panic");
    assert!(check(&add, b"", &fail(3)).is_err(), "an unknown code");
    add.insert("CNI_IFNAME".into(), "a/b".into());
    assert!(
        check(&add, b"", &fail(11)).is_err(),
        "invalid names dialled the daemon"
    );
    assert!(check(&add, b"", &fail(4)).is_ok());
    let two = ambient_cni::Outcome {
        stdout: Some("{}{}\n".into()),
        stderr: None,
        exit: 0,
    };
    assert!(check(&add, b"", &two).is_err(), "two documents");
}
