//! `ambient-cni`: the chained CNI plugin of ambient-cni.
//!
//! It parses what the runtime gives it (env + stdin), forwards the pod to `ambient-cnid` over a
//! unix socket with one deadline, and answers in CNI terms: the untouched `prevResult` on ADD, an
//! error document with a spec code on failure. DEL always succeeds. See `cni-contract.md` for the
//! rules and [`error`] for the codes.
//!
//! Layout: [`cni::plan`] decides from the input alone (pure, unit-tested); [`run`] executes the
//! plan against the daemon and returns an [`Outcome`] that `main` prints.
#![deny(clippy::unwrap_used)]

pub mod args;
pub mod client;
pub mod cni;
pub mod config;
pub mod error;
pub mod h2;
pub mod logging;

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use ambient_cni_proto::v1::{
    GcReply, PodAddReply, PodCheckReply, PodDelReply, StatusReply, StatusRequest,
};
use serde_json::Value;

use crate::cni::{Plan, Verb};
use crate::config::{NetConf, DEFAULT_TIMEOUT_MS, MAX_STDIN, SUPPORTED_VERSIONS};
use crate::error::{
    CniError, DAEMON_REFUSED, DECODE, FALLBACK_VERSION, NOT_AVAILABLE, PLUGIN_BUG, TRY_AGAIN,
};

/// DEL gives up on the daemon after at most this long (then logs; the daemon reconciles).
pub const DEL_TIMEOUT_CAP: Duration = Duration::from_secs(3);
/// STATUS answers within about this long (cni-contract.md §6).
pub const STATUS_TIMEOUT_CAP: Duration = Duration::from_secs(1);
/// Reading stdin gives up after this long, counted from exec: `timeoutMs` is in the config, so it
/// is only known once stdin is read. A runtime writes the config and closes stdin at once; one
/// that never closes it gets code 6 (DEL: exit 0) instead of a plugin hung forever.
pub const STDIN_TIMEOUT: Duration = Duration::from_millis(DEFAULT_TIMEOUT_MS);

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exactly one JSON document (with a trailing newline), or nothing.
    pub stdout: Option<String>,
    /// Text for stderr (only the about text; logs go through [`logging`]).
    pub stderr: Option<String>,
    /// 0 on success, 1 on a CNI error.
    pub exit: u8,
}

impl Outcome {
    fn json(doc: &Value, exit: u8) -> Outcome {
        Outcome {
            stdout: Some(format!("{doc}\n")),
            stderr: None,
            exit,
        }
    }

    fn error(e: &CniError, version: &str) -> Outcome {
        Outcome::json(&e.to_json(version), 1)
    }

    fn success() -> Outcome {
        Outcome {
            stdout: None,
            stderr: None,
            exit: 0,
        }
    }
}

/// The text a person sees when running the binary without CNI_COMMAND.
pub fn about() -> String {
    format!(
        "ambient-cni {}: chained CNI plugin that enrolls pods with ambient-cnid\n\
         CNI protocol versions supported: {}\n",
        env!("CARGO_PKG_VERSION"),
        SUPPORTED_VERSIONS.join(", ")
    )
}

/// What was read from stdin.
struct Input {
    bytes: Vec<u8>,
    /// A read error, to log.
    warning: Option<String>,
    /// Stdin was not closed within [`STDIN_TIMEOUT`].
    timed_out: bool,
}

/// Reads at most `MAX_STDIN + 1` bytes: enough to tell "too large" (code 6) without reading a
/// hostile stream forever.
fn read_stdin(stdin: &mut dyn Read) -> Input {
    let mut bytes = Vec::new();
    // u64::try_from cannot fail for a usize on the platforms we build for; saturate regardless.
    let cap = u64::try_from(MAX_STDIN + 1).unwrap_or(u64::MAX);
    let warning = stdin
        .take(cap)
        .read_to_end(&mut bytes)
        .err()
        .map(|e| format!("reading stdin failed: {e}"));
    Input {
        bytes,
        warning,
        timed_out: false,
    }
}

/// Reads the process's stdin like [`read_stdin`], giving up at `deadline`: poll(2) for
/// readability with what is left of the deadline, then one read(2), which does not block once poll
/// has said so (a pipe or socket hands out what it holds; a regular file is always ready). No
/// thread: spawning one to block in read(2) cost every call a clone, a stack and a wake-up.
fn read_process_stdin(deadline: Instant) -> Input {
    let mut stdin = std::io::stdin().lock();
    let mut input = Input {
        bytes: Vec::new(),
        warning: None,
        timed_out: false,
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match wait_readable(libc::STDIN_FILENO, deadline) {
            Ok(true) => {}
            Ok(false) => {
                input.timed_out = true;
                break;
            }
            Err(e) => {
                input.warning = Some(format!("reading stdin failed: {e}"));
                break;
            }
        }
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                input.bytes.extend_from_slice(&buf[..n]);
                if input.bytes.len() > MAX_STDIN {
                    // Enough to say "too large" (code 6); the rest is never read.
                    input.bytes.truncate(MAX_STDIN + 1);
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                input.warning = Some(format!("reading stdin failed: {e}"));
                break;
            }
        }
    }
    input
}

/// Waits until `fd` is readable (data, end of file or an error to read) or `deadline` passes:
/// `Ok(false)` on the deadline. A closed or invalid fd is an error, not a wait.
fn wait_readable(fd: libc::c_int, deadline: Instant) -> std::io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up: a wait of 0 ms with time left would spin until the deadline.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            if left.is_zero() {
                return Ok(false);
            }
            continue;
        }
        if pfd.revents & libc::POLLNVAL != 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        }
        // POLLIN, POLLHUP (writer gone: read gives 0) or POLLERR (read gives the error).
        return Ok(true);
    }
}

fn about_outcome() -> Outcome {
    Outcome {
        stdout: None,
        stderr: Some(about()),
        exit: 0,
    }
}

/// The whole plugin: env via `lookup`, stdin, and whether to install the global logger (tests
/// pass false). Never panics: a panic in the handler becomes error code 102. The deadline
/// (`timeoutMs`) counts from the call; `stdin` is read to its end (see [`run_process`]).
pub fn run(
    lookup: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    init_logging: bool,
) -> Outcome {
    let start = Instant::now();
    if lookup("CNI_COMMAND").is_none_or(|c| c.is_empty()) {
        return about_outcome();
    }
    let input = read_stdin(stdin);
    handle(lookup, input, start, init_logging)
}

/// What `main` runs: [`run`] on the process's stdin, under ONE deadline from exec to exit.
/// Reading stdin may take up to [`STDIN_TIMEOUT`] (the config's `timeoutMs` is not known before);
/// the daemon call then gets what is left of `timeoutMs`, counted from `start` (exec).
pub fn run_process(
    lookup: &dyn Fn(&str) -> Option<String>,
    start: Instant,
    init_logging: bool,
) -> Outcome {
    if lookup("CNI_COMMAND").is_none_or(|c| c.is_empty()) {
        return about_outcome();
    }
    let input = read_process_stdin(start + STDIN_TIMEOUT);
    handle(lookup, input, start, init_logging)
}

fn handle(
    lookup: &dyn Fn(&str) -> Option<String>,
    input: Input,
    start: Instant,
    init_logging: bool,
) -> Outcome {
    let Input {
        bytes,
        warning: read_warning,
        timed_out,
    } = input;
    let handled = catch_unwind(AssertUnwindSafe(|| {
        let inv = cni::plan(lookup, &bytes);
        if init_logging {
            let (file, level) = match &inv.conf {
                Some(c) => (c.log_file.as_deref(), c.log_level),
                None => (None, config::LogLevel::Info),
            };
            if let Some(w) = logging::init(file, level) {
                plog!(Warn, "{w}");
            }
        }
        if let Some(w) = &read_warning {
            plog!(Warn, "{w}");
        }
        let version = inv.error_version.clone();
        // Stdin not closed in time: the config may be incomplete. Code 6 (it could not be read
        // whole; a retry by the runtime meets the same stdin). DEL still does what it can with
        // what came (it always exits 0), within what is left of the deadline.
        if timed_out && inv.verb != Some(Verb::Del) {
            let e = CniError::new(
                DECODE,
                format!(
                    "stdin was not closed within {} ms",
                    STDIN_TIMEOUT.as_millis()
                ),
                format!(
                    "{} bytes read; the runtime must close stdin after writing the network config",
                    bytes.len()
                ),
            );
            return (Err(e), version);
        }
        (execute(inv, start), version)
    }));
    match handled {
        Ok((Ok(out), _)) => out,
        Ok((Err(e), version)) => {
            plog!(Error, "{} code={} details={}", e.msg, e.code, e.details);
            Outcome::error(&e, &version)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let e = CniError::new(
                PLUGIN_BUG,
                "ambient-cni internal error",
                format!("panic: {what}"),
            );
            Outcome::error(&e, FALLBACK_VERSION)
        }
    }
}

/// What is left of the one deadline (`timeoutMs`, counted from `start`: exec), at most `cap`;
/// an error (code 11) when nothing is.
fn budget(
    conf: &NetConf,
    start: Instant,
    cap: Duration,
    socket: &std::path::Path,
) -> Result<Duration, CniError> {
    let spent = start.elapsed();
    let left = conf.timeout.saturating_sub(spent).min(cap);
    if left.is_zero() {
        return Err(CniError::new(
            TRY_AGAIN,
            format!("no time left to ask ambient-cnid at {}", socket.display()),
            format!(
                "timeoutMs={} counts from exec; {} ms were spent before the call (reading stdin)",
                conf.timeout.as_millis(),
                spent.as_millis()
            ),
        ));
    }
    Ok(left)
}

fn execute(inv: cni::Invocation, start: Instant) -> Result<Outcome, CniError> {
    let plan = inv.plan?;
    let default_conf;
    let conf = match &inv.conf {
        Some(c) => c,
        None => {
            default_conf = config::NetConf::from_object(serde_json::Map::new())?;
            &default_conf
        }
    };
    let socket = conf.socket.as_path();
    match plan {
        Plan::About => Ok(Outcome {
            stdout: None,
            stderr: Some(about()),
            exit: 0,
        }),
        Plan::Print { doc, note } => {
            if !note.is_empty() {
                plog!(Info, "{note} verb={:?}", inv.verb);
            }
            Ok(Outcome::json(&doc, 0))
        }
        Plan::Succeed { note } => {
            plog!(Info, "{note} verb={:?}", inv.verb);
            Ok(Outcome::success())
        }
        Plan::Add { req, result } => {
            let timeout = budget(conf, start, Duration::MAX, socket)?;
            let reply: PodAddReply =
                client::call(socket, timeout, "PodAdd", "enroll the pod", &req)?;
            plog!(
                Info,
                "ADD done container_id={} pod={}/{} enrolled={} ztunnel={} reason={}",
                req.container_id,
                req.pod_namespace,
                req.pod_name,
                reply.enrolled,
                reply.ztunnel,
                reply.reason
            );
            Ok(Outcome::json(&result, 0))
        }
        Plan::Del { req, warnings } => {
            for w in &warnings {
                plog!(Warn, "DEL: {w} container_id={}", req.container_id);
            }
            let res: Result<PodDelReply, CniError> = budget(conf, start, DEL_TIMEOUT_CAP, socket)
                .and_then(|timeout| {
                    client::call(socket, timeout, "PodDel", "remove the pod", &req)
                });
            match res {
                Ok(reply) => plog!(
                    Info,
                    "DEL done container_id={} ifname={} removed={}",
                    req.container_id,
                    req.ifname,
                    reply.removed
                ),
                // DEL must succeed (spec; and containerd turns a DEL error into a pod stuck
                // Terminating). The daemon sweeps attachments whose netns is gone on reconcile.
                Err(e) => plog!(
                    Warn,
                    "DEL not confirmed by ambient-cnid, returning success anyway: {} container_id={} ifname={} code={} details={}",
                    e.msg,
                    req.container_id,
                    req.ifname,
                    e.code,
                    e.details
                ),
            }
            Ok(Outcome::success())
        }
        Plan::Check { req } => {
            let reply: PodCheckReply = budget(conf, start, Duration::MAX, socket)
                .and_then(|timeout| {
                    client::call(socket, timeout, "PodCheck", "check the pod", &req)
                })
                .map_err(|mut e| {
                    if e.code == DAEMON_REFUSED {
                        e.msg = "pod not enrolled as ADD left it".into();
                    }
                    e
                })?;
            plog!(
                Info,
                "CHECK ok container_id={} enrolled={} detail={}",
                req.container_id,
                reply.enrolled,
                reply.detail
            );
            Ok(Outcome::success())
        }
        Plan::Gc { req } => {
            let (n, has) = (req.valid.len(), req.has_valid_list);
            if !has {
                plog!(
                    Info,
                    "GC without a valid-attachments list: the daemon removes nothing"
                );
            }
            let timeout = budget(conf, start, Duration::MAX, socket)?;
            let reply: GcReply = client::call(socket, timeout, "Gc", "garbage-collect", &req)?;
            for e in &reply.errors {
                plog!(Warn, "GC: {e}");
            }
            plog!(
                Info,
                "GC done valid={n} removed={} errors={}",
                reply.removed,
                reply.errors.len()
            );
            if reply.errors.is_empty() {
                Ok(Outcome::success())
            } else {
                Err(CniError::new(
                    error::DAEMON_INTERNAL,
                    "ambient-cnid GC incomplete",
                    reply.errors.join("; "),
                ))
            }
        }
        Plan::Status => {
            let not_available = |details: String| {
                CniError::new(
                    NOT_AVAILABLE,
                    format!("ambient-cnid at {} not available", socket.display()),
                    details,
                )
            };
            let reply: StatusReply = budget(conf, start, STATUS_TIMEOUT_CAP, socket)
                .and_then(|timeout| {
                    client::call(
                        socket,
                        timeout,
                        "Status",
                        "report status",
                        &StatusRequest {},
                    )
                })
                .map_err(|e| not_available(format!("{}: {}", e.msg, e.details)))?;
            if !reply.ready {
                return Err(not_available(format!("not ready: {}", reply.reason)));
            }
            Ok(Outcome::success())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn check_shape(o: &Outcome) -> Result<(), TestCaseError> {
        prop_assert!(o.exit == 0 || o.exit == 1);
        if let Some(out) = &o.stdout {
            prop_assert!(out.ends_with('\n'));
            // Exactly one JSON document: a stream deserializer finds one value and nothing else.
            let docs: Vec<Value> = serde_json::Deserializer::from_str(out)
                .into_iter::<Value>()
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(docs.len(), 1);
            if o.exit == 1 {
                let code = docs[0].get("code").and_then(Value::as_u64);
                prop_assert!(code.is_some());
                prop_assert!(code != Some(u64::from(PLUGIN_BUG)), "panic caught: {}", out);
                prop_assert!(docs[0].get("cniVersion").is_some_and(Value::is_string));
                prop_assert!(docs[0].get("msg").is_some_and(Value::is_string));
            }
        } else {
            prop_assert_eq!(o.exit, 0);
        }
        Ok(())
    }

    fn env_strategy() -> impl Strategy<Value = HashMap<String, String>> {
        (
            prop_oneof![
                Just("ADD"),
                Just("CHECK"),
                Just("VERSION"),
                Just("GC"),
                Just("STATUS"),
                Just("FROB"),
                Just("")
            ],
            proptest::option::of("[a-z0-9_.-]{0,10}"),
            proptest::option::of("[a-z0-9:/ ]{0,17}"),
            proptest::option::of(".{0,40}"),
        )
            .prop_map(|(cmd, id, ifname, args)| {
                let mut m = HashMap::new();
                m.insert("CNI_COMMAND".to_string(), cmd.to_string());
                m.insert("CNI_NETNS".to_string(), "/var/run/netns/none".to_string());
                if let Some(v) = id {
                    m.insert("CNI_CONTAINERID".into(), v);
                }
                if let Some(v) = ifname {
                    m.insert("CNI_IFNAME".into(), v);
                }
                if let Some(v) = args {
                    m.insert("CNI_ARGS".into(), v);
                }
                m
            })
    }

    #[test]
    fn no_command_prints_about_on_stderr_only() {
        let o = run(&|_| None, &mut &b""[..], false);
        assert_eq!(o.exit, 0);
        assert_eq!(o.stdout, None);
        assert!(o.stderr.unwrap_or_default().contains("1.1.0"));
    }

    #[test]
    fn huge_stdin_is_code_6() {
        let big = vec![b'{'; MAX_STDIN + 10];
        let env: HashMap<_, _> = [("CNI_COMMAND", "ADD")].into_iter().collect();
        let o = run(&|k| env.get(k).map(|v| v.to_string()), &mut &big[..], false);
        assert_eq!(o.exit, 1);
        let v: Value = serde_json::from_str(o.stdout.as_deref().unwrap_or("")).unwrap_or_default();
        assert_eq!(v["code"], 6);
    }

    proptest! {
        // DEL is left out here: with garbage stdin it would dial the default socket. Its plan is
        // covered in cni.rs, its execution in tests/fake_daemon.rs.
        #[test]
        fn whole_handling_never_panics_on_bytes(
            env in env_strategy(),
            stdin in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let o = run(&|k| env.get(k).cloned(), &mut &stdin[..], false);
            check_shape(&o)?;
        }

        #[test]
        fn whole_handling_never_panics_on_configs(
            env in env_strategy(),
            version in prop_oneof![Just(json_str("1.0.0")), Just(json_str("0.3.1")), Just(json_str("1.1.0")), Just("7".to_string()), Just(json_str("x"))],
            prev in prop_oneof![Just("null".to_string()), Just("{}".to_string()), Just("[]".to_string()),
                Just(r#"{"ips":[{"address":"10.0.0.2/24","interface":0}],"interfaces":[{"name":"eth0","sandbox":"/x"}]}"#.to_string()),
                Just(r#"{"ips":[{"address":"bad"}]}"#.to_string())],
            timeout in prop_oneof![Just("1".to_string()), Just("\"x\"".to_string()), Just("0".to_string())],
        ) {
            let stdin = format!(
                r#"{{"cniVersion":{version},"name":"n","socket":"/nonexistent/acni.sock","timeoutMs":{timeout},"prevResult":{prev}}}"#
            );
            let o = run(&|k| env.get(k).cloned(), &mut stdin.as_bytes(), false);
            check_shape(&o)?;
        }
    }

    fn json_str(s: &str) -> String {
        Value::String(s.to_string()).to_string()
    }
}
