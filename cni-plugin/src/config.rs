//! The network configuration on stdin: our keys, typed; everything else kept as raw JSON.
//!
//! Never `deny_unknown_fields`: the runtime injects `name`, `cniVersion`, `prevResult`,
//! `runtimeConfig`, `args`, `cni.dev/*`, and other plugins' conventions may add more.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::{CniError, DECODE, INCOMPATIBLE_VERSION, INVALID_CONFIG, UNSUPPORTED_FIELD};

/// The versions VERSION announces. Not 0.1.0/0.2.0: their result layout (`ip4`/`ip6`) differs.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// One overall deadline for connect + call, unless `timeoutMs` says otherwise.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// `timeoutMs` above this is refused (code 2): kubelet gives a whole sandbox 4 minutes.
pub const MAX_TIMEOUT_MS: u64 = 120_000;
/// Stdin beyond this is refused with code 6 (a conflist plus prevResult is a few KiB).
pub const MAX_STDIN: usize = 1 << 20;

/// How much the plugin logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// `error`
    Error,
    /// `warn`
    Warn,
    /// `info` (the default)
    Info,
    /// `debug`
    Debug,
    /// `trace`
    Trace,
}

impl LogLevel {
    fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }
}

/// A parsed plugin configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    /// The whole object as received.
    pub raw: Map<String, Value>,
    /// `cniVersion` as given (not yet checked, see [`NetConf::check_version`]).
    pub cni_version: Option<String>,
    /// `name`: the network name the runtime injected ("" if absent).
    pub name: String,
    /// `socket`: the daemon's unix socket.
    pub socket: PathBuf,
    /// `logFile`: append logs here instead of stderr.
    pub log_file: Option<PathBuf>,
    /// `logLevel`.
    pub log_level: LogLevel,
    /// `timeoutMs`: one deadline for connect + call.
    pub timeout: Duration,
    /// `prevResult`, raw and untouched.
    pub prev_result: Option<Value>,
}

/// A `major.minor.patch` version, comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// Parses `a.b.c` (also `a.b`, as some old configs write it).
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        let patch = match it.next() {
            Some(p) => p.parse().ok()?,
            None => 0,
        };
        if it.next().is_some() {
            return None;
        }
        Some(Version(major, minor, patch))
    }
}

/// The first version with CHECK.
pub const CHECK_SINCE: Version = Version(0, 4, 0);
/// The first version with GC and STATUS.
pub const GC_STATUS_SINCE: Version = Version(1, 1, 0);

fn opt_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_type(key, "a string", other)),
    }
}

fn wrong_type(key: &str, want: &str, got: &Value) -> CniError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    CniError::new(
        INVALID_CONFIG,
        format!("invalid network config: {key:?} must be {want}"),
        format!("{key:?} is {kind}: {}", truncate(&got.to_string(), 120)),
    )
}

fn absolute_path(key: &str, s: String) -> Result<PathBuf, CniError> {
    let p = PathBuf::from(&s);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(CniError::new(
            UNSUPPORTED_FIELD,
            format!("unsupported field {key}={s:?}"),
            format!("{key} must be an absolute path: the runtime runs plugins in an unspecified directory"),
        ))
    }
}

/// Shortens `s` to at most `max` bytes (on a char boundary) for messages.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Decodes stdin into a JSON object (code 6 if it is not one).
pub fn decode(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    if stdin.len() > MAX_STDIN {
        return Err(CniError::new(
            DECODE,
            "network config too large",
            format!("stdin holds more than {MAX_STDIN} bytes"),
        ));
    }
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(CniError::new(
            DECODE,
            "failed to decode network config",
            "stdin is empty",
        ));
    }
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(CniError::new(
            DECODE,
            "failed to decode network config",
            format!(
                "expected a JSON object, got {}",
                truncate(&other.to_string(), 80)
            ),
        )),
        Err(e) => Err(CniError::new(
            DECODE,
            "failed to decode network config",
            e.to_string(),
        )),
    }
}

/// The `cniVersion` string of a config, if stdin is an object holding one; used to stamp errors
/// even when the rest of the config is invalid.
pub fn version_hint(obj: &Map<String, Value>) -> Option<String> {
    obj.get("cniVersion")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

impl NetConf {
    /// Reads our keys from a decoded object, checking their types (code 7) and values (code 2).
    pub fn from_object(raw: Map<String, Value>) -> Result<NetConf, CniError> {
        let cni_version = opt_string(&raw, "cniVersion")?;
        let name = opt_string(&raw, "name")?.unwrap_or_default();
        let socket = match opt_string(&raw, "socket")? {
            Some(s) if !s.is_empty() => absolute_path("socket", s)?,
            _ => PathBuf::from(ambient_cni_proto::DEFAULT_SOCKET),
        };
        let log_file = match opt_string(&raw, "logFile")? {
            Some(s) if !s.is_empty() => Some(absolute_path("logFile", s)?),
            _ => None,
        };
        let log_level = match opt_string(&raw, "logLevel")? {
            None => LogLevel::Info,
            Some(s) if s.is_empty() => LogLevel::Info,
            Some(s) => LogLevel::parse(&s).ok_or_else(|| {
                CniError::new(
                    UNSUPPORTED_FIELD,
                    format!("unsupported field logLevel={s:?}"),
                    "logLevel must be one of error, warn, info, debug, trace",
                )
            })?,
        };
        let timeout_ms = match raw.get("timeoutMs") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT_MS,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => ms,
                _ => {
                    return Err(CniError::new(
                        UNSUPPORTED_FIELD,
                        format!("unsupported field timeoutMs={n}"),
                        format!("timeoutMs must be a whole number from 1 to {MAX_TIMEOUT_MS}"),
                    ))
                }
            },
            Some(other) => return Err(wrong_type("timeoutMs", "a number", other)),
        };
        let prev_result = match raw.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => return Err(wrong_type("prevResult", "an object", other)),
        };
        Ok(NetConf {
            cni_version,
            name,
            socket,
            log_file,
            log_level,
            timeout: Duration::from_millis(timeout_ms),
            prev_result,
            raw,
        })
    }

    /// The config's version if we speak it (code 1 otherwise, and when it is missing).
    pub fn check_version(&self) -> Result<Version, CniError> {
        let Some(v) = &self.cni_version else {
            return Err(CniError::new(
                INCOMPATIBLE_VERSION,
                "incompatible CNI versions",
                format!(
                    "the config has no cniVersion; supported: {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        };
        match Version::parse(v) {
            Some(parsed) if SUPPORTED_VERSIONS.contains(&v.as_str()) => Ok(parsed),
            _ => Err(CniError::new(
                INCOMPATIBLE_VERSION,
                "incompatible CNI versions",
                format!(
                    "config is {:?}, plugin supports {}",
                    truncate(v, 40),
                    SUPPORTED_VERSIONS.join(", ")
                ),
            )),
        }
    }

    /// The version to stamp on outputs: the config's, else the fallback.
    pub fn output_version(&self) -> &str {
        self.cni_version
            .as_deref()
            .unwrap_or(crate::error::FALLBACK_VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(v: Value) -> Result<NetConf, CniError> {
        match v {
            Value::Object(m) => NetConf::from_object(m),
            _ => panic!("test config must be an object"),
        }
    }

    #[test]
    fn defaults_apply_and_unknown_keys_are_kept() {
        let c =
            conf(json!({"cniVersion": "1.0.0", "name": "n", "type": "ambient-cni", "x": {"y": 1}}))
                .expect("valid");
        assert_eq!(c.socket, PathBuf::from(ambient_cni_proto::DEFAULT_SOCKET));
        assert_eq!(c.timeout, Duration::from_millis(5000));
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.log_file, None);
        assert_eq!(c.raw.get("x"), Some(&json!({"y": 1})));
        assert_eq!(c.check_version(), Ok(Version(1, 0, 0)));
    }

    #[test]
    fn our_keys_are_read() {
        let c = conf(
            json!({"cniVersion": "0.3.1", "socket": "/tmp/s.sock", "logFile": "/tmp/l",
            "logLevel": "debug", "timeoutMs": 250}),
        )
        .expect("valid");
        assert_eq!(c.socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.log_file, Some(PathBuf::from("/tmp/l")));
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.timeout, Duration::from_millis(250));
    }

    #[test]
    fn wrong_types_are_code_7() {
        for bad in [
            json!({"cniVersion": "1.0.0", "socket": 5}),
            json!({"cniVersion": "1.0.0", "timeoutMs": "5000"}),
            json!({"cniVersion": "1.0.0", "logFile": []}),
            json!({"cniVersion": "1.0.0", "prevResult": "x"}),
            json!({"cniVersion": 1}),
            json!({"cniVersion": "1.0.0", "name": {}}),
        ] {
            let e = conf(bad.clone()).expect_err("must fail");
            assert_eq!(e.code, INVALID_CONFIG, "{bad}");
        }
    }

    #[test]
    fn unsupported_values_are_code_2() {
        for bad in [
            json!({"cniVersion": "1.0.0", "socket": "relative.sock"}),
            json!({"cniVersion": "1.0.0", "timeoutMs": 0}),
            json!({"cniVersion": "1.0.0", "timeoutMs": -1}),
            json!({"cniVersion": "1.0.0", "timeoutMs": 1.5}),
            json!({"cniVersion": "1.0.0", "logLevel": "loud"}),
        ] {
            let e = conf(bad.clone()).expect_err("must fail");
            assert_eq!(e.code, UNSUPPORTED_FIELD, "{bad}");
        }
    }

    #[test]
    fn versions_outside_the_list_are_code_1() {
        for v in ["0.1.0", "0.2.0", "9.9.9", "1.0", "banana", ""] {
            let c = conf(json!({"cniVersion": v})).expect("decodes");
            assert_eq!(
                c.check_version().map_err(|e| e.code),
                Err(INCOMPATIBLE_VERSION),
                "{v}"
            );
        }
        let c = conf(json!({})).expect("decodes");
        assert_eq!(
            c.check_version().map_err(|e| e.code),
            Err(INCOMPATIBLE_VERSION)
        );
        assert_eq!(c.output_version(), "1.0.0");
    }

    #[test]
    fn decode_refuses_garbage_non_objects_empty_and_huge() {
        assert_eq!(decode(b"{not json").map_err(|e| e.code), Err(DECODE));
        assert_eq!(decode(b"[1,2]").map_err(|e| e.code), Err(DECODE));
        assert_eq!(decode(b"  \n").map_err(|e| e.code), Err(DECODE));
        let huge = vec![b' '; MAX_STDIN + 1];
        assert_eq!(decode(&huge).map_err(|e| e.code), Err(DECODE));
        assert!(decode(br#"{"a":1}"#).is_ok());
    }

    #[test]
    fn version_parse_orders() {
        assert!(Version::parse("0.3.1") < Version::parse("0.4.0"));
        assert!(Version::parse("1.0.0") < Version::parse("1.1.0"));
        assert_eq!(Version::parse("1.1"), Some(Version(1, 1, 0)));
        assert_eq!(Version::parse("1.1.0.0"), None);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("ééé", 3), "é…");
        assert_eq!(truncate("abc", 3), "abc");
    }
}
