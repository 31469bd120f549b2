//! The plugin binary as the runtime runs it (a process), against inputs that used to hang it
//! forever (issue 17): a `logFile` that is a FIFO without a reader, and a stdin that is never
//! closed. One deadline covers everything from exec to exit. No root, no daemon.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PLUGIN: &str = env!("CARGO_BIN_EXE_ambient-cni");

/// The stdin ceiling of the plugin (`ambient_cni::STDIN_TIMEOUT`).
const STDIN_TIMEOUT: Duration = ambient_cni::STDIN_TIMEOUT;

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Waits for `child` at most `limit` (then kills it and fails).
fn wait(mut child: Child, started: Instant, limit: Duration, what: &str) -> Ran {
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => break,
            None if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what}: the plugin still runs after {limit:?}");
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let took = started.elapsed();
    let out = child.wait_with_output().expect("output");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    }
}

fn plugin(verb: &str) -> Command {
    let mut c = Command::new(PLUGIN);
    c.env_clear()
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", "cid-deadline")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", "/var/run/netns/none")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

#[test]
fn a_fifo_log_file_without_a_reader_does_not_hang_the_plugin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("plugin.log");
    mkfifo(&fifo);
    let socket = dir.path().join("absent.sock");
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "net", "type": "ambient-cni",
        "logFile": fifo, "socket": socket, "timeoutMs": 2000,
    })
    .to_string();
    for verb in ["VERSION", "DEL"] {
        let started = Instant::now();
        let mut child = plugin(verb).spawn().expect("spawn the plugin");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(conf.as_bytes()).expect("write stdin");
        drop(stdin);
        let ran = wait(child, started, Duration::from_secs(10), verb);
        println!(
            "{verb} with a FIFO logFile: exit {:?} in {} ms; stderr: {}",
            ran.code,
            ran.took.as_millis(),
            ran.stderr.trim()
        );
        assert_eq!(ran.code, Some(0), "{verb}: {}", ran.stdout);
        assert!(
            ran.stderr.contains("is a FIFO, not a regular file"),
            "{verb}: the refusal is logged to stderr: {}",
            ran.stderr
        );
        match verb {
            "VERSION" => {
                let v: Value = serde_json::from_str(&ran.stdout).expect("VERSION JSON");
                assert!(v["supportedVersions"].is_array(), "{v}");
            }
            _ => assert!(ran.stdout.is_empty(), "DEL prints nothing: {}", ran.stdout),
        }
    }
}

#[test]
fn a_stdin_that_is_never_closed_ends_within_the_ceiling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("absent.sock");
    // Part of a config, then nothing: the runtime keeps the pipe open.
    let partial = format!(
        r#"{{"cniVersion":"1.0.0","name":"net","type":"ambient-cni","socket":{}"#,
        serde_json::to_string(&socket).expect("json")
    );
    let limit = STDIN_TIMEOUT + Duration::from_secs(5);
    // All three at once (each waits out the ceiling); every stdin stays open until its plugin
    // has exited.
    let running: Vec<_> = [
        ("ADD", partial.as_str()),
        ("CHECK", ""),
        ("DEL", partial.as_str()),
    ]
    .into_iter()
    .map(|(verb, input)| {
        let started = Instant::now();
        let mut child = plugin(verb).spawn().expect("spawn the plugin");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write stdin");
        (verb, input, started, child, stdin)
    })
    .collect();
    for (verb, input, started, child, stdin) in running {
        let ran = wait(child, started, limit, verb);
        drop(stdin);
        println!(
            "{verb} with stdin never closed ({} bytes sent): exit {:?} in {} ms (ceiling {} ms); stdout: {}",
            input.len(),
            ran.code,
            ran.took.as_millis(),
            STDIN_TIMEOUT.as_millis(),
            ran.stdout.trim()
        );
        if verb == "DEL" {
            // DEL always exits 0; the deadline is used up, so the daemon is not even dialled.
            assert_eq!(ran.code, Some(0), "{}", ran.stderr);
            assert!(ran.stdout.is_empty(), "{}", ran.stdout);
            continue;
        }
        assert_eq!(ran.code, Some(1), "{verb}: {}", ran.stderr);
        let v: Value = serde_json::from_str(&ran.stdout).expect("one CNI error document");
        assert_eq!(v["code"], 6, "{v}");
        assert!(
            v["msg"]
                .as_str()
                .is_some_and(|m| m.contains("stdin was not closed")),
            "{v}"
        );
        assert_eq!(v["cniVersion"], "1.0.0");
    }
}

/// The stdin reader waits with poll(2) (no thread): every kind of stdin a runtime or a person
/// can hand the plugin ends at once with an answer. A regular file is always "ready" (VERSION
/// answers); /dev/null gives ADD an empty config (code 6); a closed fd 0 is a read error (ADD:
/// code 6), not a wait or a panic.
#[test]
fn every_kind_of_stdin_ends_at_once_with_an_answer() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("conf.json");
    std::fs::write(
        &file,
        r#"{"cniVersion":"1.0.0","name":"net","type":"ambient-cni"}"#,
    )
    .expect("write conf");
    type Setup<'a> = Box<dyn Fn(&mut Command) + 'a>;
    let cases: [(&str, &str, Setup, i32); 3] = [
        (
            "VERSION",
            "a regular file",
            Box::new(|c: &mut Command| {
                c.stdin(std::fs::File::open(&file).expect("open conf"));
            }),
            0,
        ),
        (
            "ADD",
            "/dev/null",
            Box::new(|c: &mut Command| {
                c.stdin(Stdio::null());
            }),
            1,
        ),
        (
            "ADD",
            "a closed fd 0",
            Box::new(|c: &mut Command| {
                // SAFETY: close(2) only, between fork and exec.
                unsafe {
                    c.pre_exec(|| {
                        libc::close(0);
                        Ok(())
                    });
                }
            }),
            1,
        ),
    ];
    for (verb, what, setup, want) in cases {
        let mut cmd = plugin(verb);
        setup(&mut cmd);
        let started = Instant::now();
        let child = cmd.spawn().expect("spawn the plugin");
        let ran = wait(child, started, Duration::from_secs(5), what);
        println!(
            "{verb} with stdin {what}: exit {:?} in {} ms; stdout: {}",
            ran.code,
            ran.took.as_millis(),
            ran.stdout.trim()
        );
        assert!(
            ran.took < STDIN_TIMEOUT,
            "{what}: answered before the stdin ceiling"
        );
        assert_eq!(ran.code, Some(want), "{what}: {}", ran.stdout);
        let v: Value = serde_json::from_str(&ran.stdout).expect("one JSON document");
        if want == 0 {
            assert!(v["supportedVersions"].is_array(), "{what}: {v}");
        } else {
            assert_eq!(v["code"], 6, "{what}: a decode error: {v}");
        }
    }
}
