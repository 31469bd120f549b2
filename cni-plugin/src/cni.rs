//! The CNI side: verbs, environment, prevResult reading, and the pure decision of what to do.
//!
//! [`plan`] turns env + stdin into a [`Plan`] without any I/O, so every rule of
//! cni-contract.md §1–7 is unit-testable; `crate::run` then executes the plan against the daemon.

use serde_json::{json, Map, Value};

use ambient_cni_proto::v1::{Attachment, GcRequest, PodIp, PodRequest};
use ambient_cni_proto::CONTRACT_VERSION;

use crate::args::CniArgs;
use crate::config::{
    self, decode, truncate, NetConf, Version, CHECK_SINCE, GC_STATUS_SINCE, SUPPORTED_VERSIONS,
};
use crate::error::{CniError, FALLBACK_VERSION, INCOMPATIBLE_VERSION, INVALID_CONFIG, INVALID_ENV};

/// A CNI verb (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// ADD
    Add,
    /// DEL
    Del,
    /// CHECK (spec ≥ 0.4.0)
    Check,
    /// VERSION
    Version,
    /// GC (spec ≥ 1.1.0)
    Gc,
    /// STATUS (spec ≥ 1.1.0)
    Status,
}

impl Verb {
    /// Parses `CNI_COMMAND` (exact, upper case, as the spec writes it).
    pub fn parse(s: &str) -> Option<Verb> {
        Some(match s {
            "ADD" => Verb::Add,
            "DEL" => Verb::Del,
            "CHECK" => Verb::Check,
            "VERSION" => Verb::Version,
            "GC" => Verb::Gc,
            "STATUS" => Verb::Status,
            _ => return None,
        })
    }
}

/// The environment of one invocation, already validated for its verb.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    /// `CNI_CONTAINERID` (ADD/DEL/CHECK).
    pub container_id: String,
    /// `CNI_NETNS` (may be empty on DEL).
    pub netns: String,
    /// `CNI_IFNAME` (ADD/DEL/CHECK).
    pub ifname: String,
    /// `CNI_ARGS`, raw.
    pub args_raw: String,
    /// `CNI_ARGS`, parsed.
    pub args: CniArgs,
}

/// What to do, decided from the input alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// No CNI_COMMAND: a person ran the binary. About text on stderr, exit 0.
    About,
    /// Print this document on stdout and exit 0 without asking the daemon (VERSION, or an ADD of
    /// a pod that is not a Kubernetes pod).
    Print {
        /// The document.
        doc: Value,
        /// Why, for the log (empty for VERSION).
        note: String,
    },
    /// Exit 0 with empty stdout, without asking the daemon (CHECK of a non-Kubernetes pod).
    Succeed {
        /// Why, for the log.
        note: String,
    },
    /// Enroll the pod, then print `result` (the untouched prevResult).
    Add {
        /// The request.
        req: PodRequest,
        /// What to print on success.
        result: Value,
    },
    /// Forget the attachment; always exit 0.
    Del {
        /// The request (possibly built from defaults when the config was unreadable).
        req: PodRequest,
        /// Problems with the input, logged but not fatal for DEL.
        warnings: Vec<String>,
    },
    /// Ask the daemon whether the pod is in the state ADD left it.
    Check {
        /// The request.
        req: PodRequest,
    },
    /// Remove state of attachments not in the list.
    Gc {
        /// The request.
        req: GcRequest,
    },
    /// Ask the daemon whether it is ready.
    Status,
}

/// The result of [`plan`]: the plan, the config if it was readable, and the version to stamp on
/// errors.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The verb, if CNI_COMMAND was a known one.
    pub verb: Option<Verb>,
    /// The decoded config, if any.
    pub conf: Option<NetConf>,
    /// `cniVersion` for error documents: the config's if it had a string, else "1.0.0".
    pub error_version: String,
    /// What to do, or the error to report.
    pub plan: Result<Plan, CniError>,
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]*`, as libcni's `ValidateContainerID`.
pub fn valid_container_id(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// libcni's `ValidateInterfaceName`: 1–15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub fn valid_ifname(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("is empty");
    }
    if s.len() > 15 {
        return Err("is longer than 15 bytes");
    }
    if s == "." || s == ".." {
        return Err("is '.' or '..'");
    }
    if s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err("contains '/', ':' or whitespace");
    }
    Ok(())
}

fn env_error(name: &str, what: &str) -> CniError {
    CniError::new(
        INVALID_ENV,
        format!("invalid environment variable {name}"),
        format!("{name} {what}"),
    )
}

/// Reads and validates the env an ADD/DEL/CHECK needs. Empty counts as unset.
fn read_env(lookup: &dyn Fn(&str) -> Option<String>, verb: Verb) -> Result<Env, CniError> {
    let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
    let container_id =
        get("CNI_CONTAINERID").ok_or_else(|| env_error("CNI_CONTAINERID", "is not set"))?;
    if !valid_container_id(&container_id) {
        return Err(env_error(
            "CNI_CONTAINERID",
            &format!(
                "{:?} is invalid: must match [A-Za-z0-9][A-Za-z0-9_.-]*",
                truncate(&container_id, 80)
            ),
        ));
    }
    let ifname = get("CNI_IFNAME").ok_or_else(|| env_error("CNI_IFNAME", "is not set"))?;
    if let Err(why) = valid_ifname(&ifname) {
        return Err(env_error(
            "CNI_IFNAME",
            &format!("{:?} is invalid: {why}", truncate(&ifname, 40)),
        ));
    }
    let netns = get("CNI_NETNS").unwrap_or_default();
    if netns.is_empty() && verb != Verb::Del {
        return Err(env_error("CNI_NETNS", "is not set"));
    }
    let args_raw = get("CNI_ARGS").unwrap_or_default();
    let args = CniArgs::parse(&args_raw);
    Ok(Env {
        container_id,
        netns,
        ifname,
        args_raw,
        args,
    })
}

/// The pod's addresses and host-side interface, read from a prevResult.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrevInfo {
    /// `ips[]` in the pod (CIDR plus gateway).
    pub ips: Vec<PodIp>,
    /// The host-side interface (an `interfaces[]` entry without `sandbox`), "" if none.
    pub host_interface: String,
}

fn parse_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    let Ok(addr) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    matches!(len.parse::<u8>(), Ok(l) if l <= max) && !len.starts_with('+')
}

/// Reads pod IPs and the host interface out of a prevResult (0.3.x, 0.4.0, 1.0.0, 1.1.0 layouts
/// all have `ips[].address`, optional `ips[].gateway` and `ips[].interface`, and
/// `interfaces[].{name,sandbox}`; 0.3.x adds `ips[].version`, which we ignore).
///
/// IPs whose `interface` points at a host-side entry are not the pod's and are skipped. The host
/// interface is the non-sandbox entry right before the sandbox entry named `ifname` (ptp and bridge
/// list the host veth just before the container side, and bridge lists the bridge itself first);
/// failing that, the last non-sandbox entry.
///
/// Malformed entries are errors (code 7): a pod IP we cannot read would leave the pod half
/// enrolled, which is worse than failing closed.
pub fn read_prev_result(prev: &Value, ifname: &str) -> Result<PrevInfo, CniError> {
    let bad = |what: String| CniError::new(INVALID_CONFIG, "invalid prevResult", what);
    let Some(obj) = prev.as_object() else {
        return Err(bad("prevResult is not an object".into()));
    };
    let empty = Vec::new();
    let interfaces = match obj.get("interfaces") {
        None | Some(Value::Null) => &empty,
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("prevResult.interfaces is not an array".into())),
    };
    // (name, in sandbox)
    let mut ifaces: Vec<(String, bool)> = Vec::with_capacity(interfaces.len());
    for (i, entry) in interfaces.iter().enumerate() {
        let Some(e) = entry.as_object() else {
            return Err(bad(format!("prevResult.interfaces[{i}] is not an object")));
        };
        let name = match e.get("name") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => String::new(),
            Some(_) => {
                return Err(bad(format!(
                    "prevResult.interfaces[{i}].name is not a string"
                )))
            }
        };
        let sandbox = match e.get("sandbox") {
            Some(Value::String(s)) => !s.is_empty(),
            None | Some(Value::Null) => false,
            Some(_) => {
                return Err(bad(format!(
                    "prevResult.interfaces[{i}].sandbox is not a string"
                )))
            }
        };
        ifaces.push((name, sandbox));
    }

    let ips_val = match obj.get("ips") {
        None | Some(Value::Null) => &empty,
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("prevResult.ips is not an array".into())),
    };
    let mut ips = Vec::with_capacity(ips_val.len());
    for (i, entry) in ips_val.iter().enumerate() {
        let Some(e) = entry.as_object() else {
            return Err(bad(format!("prevResult.ips[{i}] is not an object")));
        };
        let address = match e.get("address") {
            Some(Value::String(s)) if parse_cidr(s) => s.clone(),
            Some(other) => {
                return Err(bad(format!(
                    "prevResult.ips[{i}].address {} is not an address in CIDR form",
                    truncate(&other.to_string(), 60)
                )))
            }
            None => return Err(bad(format!("prevResult.ips[{i}].address is missing"))),
        };
        let gateway = match e.get("gateway") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) if s.is_empty() || s.parse::<std::net::IpAddr>().is_ok() => {
                s.clone()
            }
            Some(other) => {
                return Err(bad(format!(
                    "prevResult.ips[{i}].gateway {} is not an IP address",
                    truncate(&other.to_string(), 60)
                )))
            }
        };
        let on_host = match e.get("interface") {
            None | Some(Value::Null) => false,
            Some(Value::Number(n)) => match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(idx) => ifaces.get(idx).is_some_and(|(_, sandbox)| !sandbox),
                None => {
                    return Err(bad(format!(
                        "prevResult.ips[{i}].interface is not an index"
                    )))
                }
            },
            Some(_) => {
                return Err(bad(format!(
                    "prevResult.ips[{i}].interface is not a number"
                )))
            }
        };
        if !on_host {
            ips.push(PodIp { address, gateway });
        }
    }

    let pod_side = ifaces
        .iter()
        .position(|(n, sandbox)| *sandbox && n == ifname);
    let host_interface = pod_side
        .and_then(|p| p.checked_sub(1))
        .and_then(|p| ifaces.get(p))
        .filter(|(_, sandbox)| !sandbox)
        .or_else(|| ifaces.iter().rev().find(|(_, sandbox)| !sandbox))
        .map(|(n, _)| n.clone())
        .unwrap_or_default();
    Ok(PrevInfo {
        ips,
        host_interface,
    })
}

/// The attachment list of a GC config: the union of `cni.dev/valid-attachments` and the older
/// `cni.dev/attachments` (runtimes ship one or the other, current libcni both). `None` when
/// neither key is present (`cnitool gc`).
pub fn read_gc_attachments(raw: &Map<String, Value>) -> Result<Option<Vec<Attachment>>, CniError> {
    let mut out: Option<Vec<Attachment>> = None;
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        let list = match raw.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(CniError::new(
                    INVALID_CONFIG,
                    format!("invalid network config: {key:?} must be an array"),
                    String::new(),
                ))
            }
        };
        let acc = out.get_or_insert_with(Vec::new);
        for (i, item) in list.iter().enumerate() {
            let field = |f: &str| item.get(f).and_then(Value::as_str).map(str::to_owned);
            let (Some(container_id), Some(ifname)) = (field("containerID"), field("ifname")) else {
                return Err(CniError::new(
                    INVALID_CONFIG,
                    format!("invalid network config: {key:?}[{i}]"),
                    "each attachment needs string containerID and ifname",
                ));
            };
            let a = Attachment {
                container_id,
                ifname,
            };
            if !acc.contains(&a) {
                acc.push(a);
            }
        }
    }
    Ok(out)
}

fn pod_request(conf: Option<&NetConf>, env: &Env, prev: PrevInfo) -> PodRequest {
    let pod = env.args.pod();
    PodRequest {
        contract_version: CONTRACT_VERSION,
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        pod_namespace: pod
            .as_ref()
            .map(|p| p.namespace.clone())
            .unwrap_or_default(),
        pod_name: pod.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
        pod_uid: pod.map(|p| p.uid).unwrap_or_default(),
        cni_args: env.args_raw.clone(),
        network_name: conf.map(|c| c.name.clone()).unwrap_or_default(),
        cni_version: conf.and_then(|c| c.cni_version.clone()).unwrap_or_default(),
        ips: prev.ips,
        host_interface: prev.host_interface,
    }
}

fn verb_needs(
    version: Version,
    since: Version,
    verb: &str,
    conf: &NetConf,
) -> Result<(), CniError> {
    if version < since {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            format!(
                "config version {:?} does not allow {verb} (needs {}.{}.{} or later)",
                conf.output_version(),
                since.0,
                since.1,
                since.2
            ),
        ));
    }
    Ok(())
}

/// The VERSION reply: echo the input's version (or "1.0.0"), list ours. Never fails: libcni sends
/// `{"cniVersion":"X"}`, some callers send nothing.
pub fn version_reply(stdin: &[u8]) -> Value {
    let v = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| FALLBACK_VERSION.to_owned());
    json!({ "cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS })
}

/// Decides what to do from the environment (`lookup`) and stdin. `stdin` is `None` when it was
/// not read (no CNI_COMMAND) or could not be read. Pure: no I/O.
pub fn plan(lookup: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Invocation {
    let command = lookup("CNI_COMMAND").filter(|c| !c.is_empty());
    // Best-effort version for error documents, before anything can fail.
    let decoded = decode(stdin);
    let error_version = decoded
        .as_ref()
        .ok()
        .and_then(config::version_hint)
        .unwrap_or_else(|| FALLBACK_VERSION.to_owned());
    let mut inv = Invocation {
        verb: None,
        conf: None,
        error_version,
        plan: Ok(Plan::About),
    };
    let Some(command) = command else {
        return inv;
    };
    let Some(verb) = Verb::parse(&command) else {
        inv.plan = Err(env_error(
            "CNI_COMMAND",
            &format!(
                "{:?} is not a CNI command (ADD, DEL, CHECK, VERSION, GC, STATUS)",
                truncate(&command, 40)
            ),
        ));
        return inv;
    };
    inv.verb = Some(verb);
    // The config, read before env so that a DEL can still learn the socket.
    let conf = decoded.and_then(NetConf::from_object);
    if let Ok(c) = &conf {
        inv.conf = Some(c.clone());
    }

    inv.plan = match verb {
        Verb::Del => plan_del(lookup, conf),
        Verb::Add => conf.and_then(|c| plan_add(lookup, &c)),
        Verb::Check => conf.and_then(|c| plan_check(lookup, &c)),
        Verb::Gc => conf.and_then(|c| {
            verb_needs(c.check_version()?, GC_STATUS_SINCE, "GC", &c)?;
            let list = read_gc_attachments(&c.raw)?;
            Ok(Plan::Gc {
                req: GcRequest {
                    contract_version: CONTRACT_VERSION,
                    network_name: c.name.clone(),
                    has_valid_list: list.is_some(),
                    valid: list.unwrap_or_default(),
                },
            })
        }),
        Verb::Status => conf.and_then(|c| {
            verb_needs(c.check_version()?, GC_STATUS_SINCE, "STATUS", &c)?;
            Ok(Plan::Status)
        }),
        Verb::Version => Ok(Plan::Print {
            doc: version_reply(stdin),
            note: String::new(),
        }),
    };
    inv
}

fn plan_add(lookup: &dyn Fn(&str) -> Option<String>, conf: &NetConf) -> Result<Plan, CniError> {
    conf.check_version()?;
    let env = read_env(lookup, Verb::Add)?;
    let Some(prev) = &conf.prev_result else {
        return Err(CniError::new(
            INVALID_CONFIG,
            "invalid network config: missing prevResult",
            "ambient-cni is a chained plugin and must come after the plugin that creates the \
             pod's interface and addresses (e.g. ptp or bridge) in the conflist",
        ));
    };
    let mut result = prev.clone();
    if let Value::Object(m) = &mut result {
        if !m.contains_key("cniVersion") {
            m.insert(
                "cniVersion".into(),
                Value::String(conf.output_version().to_owned()),
            );
        }
    }
    if env.args.pod().is_none() {
        return Ok(Plan::Print {
            doc: result,
            note: "not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS): passing prevResult through".into(),
        });
    }
    let info = read_prev_result(prev, &env.ifname)?;
    Ok(Plan::Add {
        req: pod_request(Some(conf), &env, info),
        result,
    })
}

fn plan_check(lookup: &dyn Fn(&str) -> Option<String>, conf: &NetConf) -> Result<Plan, CniError> {
    verb_needs(conf.check_version()?, CHECK_SINCE, "CHECK", conf)?;
    let env = read_env(lookup, Verb::Check)?;
    if env.args.pod().is_none() {
        return Ok(Plan::Succeed {
            note: "not a Kubernetes pod: nothing to check".into(),
        });
    }
    let info = match &conf.prev_result {
        Some(prev) => read_prev_result(prev, &env.ifname)?,
        None => PrevInfo::default(),
    };
    Ok(Plan::Check {
        req: pod_request(Some(conf), &env, info),
    })
}

/// DEL is strict only about what it cannot work without (container ID and ifname: code 4).
/// Everything else (an unreadable config, an unsupported version, a malformed prevResult) is
/// logged and the cleanup still goes to the daemon, keyed by (container ID, ifname).
fn plan_del(
    lookup: &dyn Fn(&str) -> Option<String>,
    conf: Result<NetConf, CniError>,
) -> Result<Plan, CniError> {
    let env = read_env(lookup, Verb::Del)?;
    let mut warnings = Vec::new();
    let conf = match conf {
        Ok(c) => Some(c),
        Err(e) => {
            warnings.push(format!("config unreadable, using defaults: {e}"));
            None
        }
    };
    if let Some(c) = &conf {
        if let Err(e) = c.check_version() {
            warnings.push(format!("cleaning up anyway: {e}"));
        }
    }
    let info = match conf.as_ref().and_then(|c| c.prev_result.as_ref()) {
        Some(prev) => read_prev_result(prev, &env.ifname).unwrap_or_else(|e| {
            warnings.push(format!("ignoring prevResult: {e}"));
            PrevInfo::default()
        }),
        None => PrevInfo::default(),
    };
    Ok(Plan::Del {
        req: pod_request(conf.as_ref(), &env, info),
        warnings,
    })
}

#[cfg(test)]
#[path = "cni_tests.rs"]
mod tests;
