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
mod tests {
    use super::*;
    use crate::error::{DECODE, UNSUPPORTED_FIELD};
    use proptest::prelude::*;
    use std::collections::HashMap;

    // ptp 1.1.1 output, as libcni hands it to the next plugin, per version.
    fn ptp_result(version: &str) -> Value {
        let mut ip = json!({"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1});
        if version.starts_with("0.3") {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": version,
            "interfaces": [
                {"name": "veth1a2b3c4d", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/pod1"}
            ],
            "ips": [ip],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn k8s_env(cmd: &str) -> HashMap<String, String> {
        env(&[
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/var/run/netns/pod1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u",
            ),
        ])
    }

    fn run_plan(e: &HashMap<String, String>, stdin: &str) -> Invocation {
        plan(&|k| e.get(k).cloned(), stdin.as_bytes())
    }

    fn conf_with_prev(version: &str) -> String {
        json!({"cniVersion": version, "name": "net1", "type": "ambient-cni", "prevResult": ptp_result(version)})
            .to_string()
    }

    #[test]
    fn prev_result_ips_and_host_interface_for_every_version() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let info = read_prev_result(&ptp_result(v), "eth0").expect("valid");
            assert_eq!(
                info.ips,
                vec![PodIp {
                    address: "10.244.1.5/24".into(),
                    gateway: "10.244.1.1".into()
                }],
                "{v}"
            );
            assert_eq!(info.host_interface, "veth1a2b3c4d", "{v}");
        }
    }

    #[test]
    fn bridge_result_picks_the_veth_not_the_bridge_and_dual_stack_ips() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:00:00:00:00:01"},
                {"name": "vethb", "mac": "aa:00:00:00:00:02"},
                {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/proc/1/ns/net"}
            ],
            "ips": [
                {"address": "10.1.0.7/16", "gateway": "10.1.0.1", "interface": 2},
                {"address": "fd00::7/64", "interface": 2},
                {"address": "10.1.0.1/16", "interface": 0}
            ]
        });
        let info = read_prev_result(&prev, "eth0").expect("valid");
        assert_eq!(info.host_interface, "vethb");
        let addrs: Vec<_> = info.ips.iter().map(|i| i.address.as_str()).collect();
        assert_eq!(addrs, ["10.1.0.7/16", "fd00::7/64"]);
        assert_eq!(info.ips[1].gateway, "");
    }

    /// ptp + host-local with an IPv6 range (and a dual-stack range set): both families reach
    /// the daemon with their own gateways; an IPv6-only result gives the IPv6 address alone.
    #[test]
    fn ptp_ipv6_only_and_dual_stack_results_give_every_address() {
        let ptp = |ips: serde_json::Value| {
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "veth1234", "mac": "aa:00:00:00:00:02"},
                    {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/var/run/netns/p"}
                ],
                "ips": ips
            })
        };
        let v6 = json!({"address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1});
        let v4 = json!({"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1});
        let only6 = read_prev_result(&ptp(json!([v6.clone()])), "eth0").expect("valid");
        assert_eq!(
            only6.ips,
            vec![PodIp {
                address: "fd00:10:244:1::5/64".into(),
                gateway: "fd00:10:244:1::1".into()
            }]
        );
        assert_eq!(only6.host_interface, "veth1234");
        let dual = read_prev_result(&ptp(json!([v4, v6])), "eth0").expect("valid");
        let got: Vec<(&str, &str)> = dual
            .ips
            .iter()
            .map(|i| (i.address.as_str(), i.gateway.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.244.1.5/24", "10.244.1.1"),
                ("fd00:10:244:1::5/64", "fd00:10:244:1::1")
            ]
        );
        assert!(read_prev_result(
            &ptp(json!([{"address": "fd00::5/129", "interface": 1}])),
            "eth0"
        )
        .is_err());
    }

    #[test]
    fn prev_result_without_interfaces_still_gives_ips() {
        let prev = json!({"cniVersion": "1.1.0", "ips": [{"address": "192.168.0.2/32"}]});
        let info = read_prev_result(&prev, "eth0").expect("valid");
        assert_eq!(info.ips.len(), 1);
        assert_eq!(info.host_interface, "");
    }

    #[test]
    fn malformed_prev_result_ips_are_code_7() {
        for bad in [
            json!({"ips": "x"}),
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/33"}]}),
            json!({"ips": [{"address": 5}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "gateway": "nope"}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "interface": -1}]}),
            json!({"interfaces": [1]}),
        ] {
            let e = read_prev_result(&bad, "eth0").expect_err("must fail");
            assert_eq!(e.code, INVALID_CONFIG, "{bad}");
        }
    }

    #[test]
    fn add_forwards_pod_and_prints_prev_result_unchanged() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let inv = run_plan(&k8s_env("ADD"), &conf_with_prev(v));
            let Ok(Plan::Add { req, result }) = inv.plan else {
                panic!("expected Add for {v}, got {:?}", inv.plan);
            };
            assert_eq!(result, ptp_result(v));
            assert_eq!(req.pod_namespace, "ns");
            assert_eq!(req.pod_name, "p");
            assert_eq!(req.pod_uid, "u");
            assert_eq!(req.container_id, "c0ffee");
            assert_eq!(req.netns, "/var/run/netns/pod1");
            assert_eq!(req.network_name, "net1");
            assert_eq!(req.cni_version, v);
            assert_eq!(req.host_interface, "veth1a2b3c4d");
            assert_eq!(req.contract_version, CONTRACT_VERSION);
            assert!(req.cni_args.contains("K8S_POD_UID=u"));
        }
    }

    #[test]
    fn add_keeps_unknown_keys_and_order_and_fills_a_missing_version() {
        let raw = r#"{"cniVersion":"1.0.0","name":"n","prevResult":{"zeta":1,"ips":[],"alpha":{"x":[1,2]}}}"#;
        let inv = run_plan(&k8s_env("ADD"), raw);
        let Ok(Plan::Add { result, .. }) = inv.plan else {
            panic!("{:?}", inv.plan)
        };
        assert_eq!(
            serde_json::to_string(&result).unwrap_or_default(),
            r#"{"zeta":1,"ips":[],"alpha":{"x":[1,2]},"cniVersion":"1.0.0"}"#
        );
    }

    #[test]
    fn add_of_non_k8s_pod_passes_through_without_the_daemon() {
        let mut e = k8s_env("ADD");
        e.insert("CNI_ARGS".into(), "IgnoreUnknown=1;FOO=bar".into());
        let inv = run_plan(&e, &conf_with_prev("1.0.0"));
        assert!(
            matches!(&inv.plan, Ok(Plan::Print { doc, .. }) if *doc == ptp_result("1.0.0")),
            "{:?}",
            inv.plan
        );
        e.remove("CNI_ARGS");
        let inv = run_plan(&e, &conf_with_prev("1.0.0"));
        assert!(matches!(inv.plan, Ok(Plan::Print { .. })));
    }

    #[test]
    fn add_without_prev_result_is_code_7() {
        let inv = run_plan(&k8s_env("ADD"), r#"{"cniVersion":"0.4.0","name":"n"}"#);
        let e = inv.plan.expect_err("must fail");
        assert_eq!(e.code, INVALID_CONFIG);
        assert!(e.msg.contains("prevResult"));
        assert_eq!(inv.error_version, "0.4.0");
    }

    #[test]
    fn bad_env_is_code_4_naming_the_variable() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("CNI_CONTAINERID", None, "CNI_CONTAINERID"),
            ("CNI_CONTAINERID", Some("-bad"), "CNI_CONTAINERID"),
            ("CNI_CONTAINERID", Some("a/b"), "CNI_CONTAINERID"),
            ("CNI_IFNAME", None, "CNI_IFNAME"),
            ("CNI_IFNAME", Some("eth0:1"), "CNI_IFNAME"),
            ("CNI_IFNAME", Some("a/b"), "CNI_IFNAME"),
            ("CNI_IFNAME", Some("a b"), "CNI_IFNAME"),
            ("CNI_IFNAME", Some("sixteen-bytes-xx"), "CNI_IFNAME"),
            ("CNI_IFNAME", Some(".."), "CNI_IFNAME"),
            ("CNI_NETNS", None, "CNI_NETNS"),
            ("CNI_NETNS", Some(""), "CNI_NETNS"),
            ("CNI_COMMAND", Some("FROB"), "CNI_COMMAND"),
        ];
        for (key, val, named) in cases {
            let mut e = k8s_env("ADD");
            match val {
                Some(v) => e.insert(key.to_string(), v.to_string()),
                None => e.remove(*key),
            };
            let err = run_plan(&e, &conf_with_prev("1.0.0"))
                .plan
                .expect_err("must fail");
            assert_eq!(err.code, INVALID_ENV, "{key}={val:?}");
            assert!(err.msg.contains(named), "{err:?}");
        }
    }

    #[test]
    fn container_id_and_ifname_rules() {
        assert!(valid_container_id("cnitool-0123abcd"));
        assert!(valid_container_id("A.b_c-9"));
        assert!(!valid_container_id(""));
        assert!(!valid_container_id("_x"));
        assert!(!valid_container_id("a b"));
        assert!(valid_ifname("eth0").is_ok());
        assert!(valid_ifname("fifteen-bytes-x").is_ok());
        assert!(valid_ifname("").is_err());
        assert!(valid_ifname("a\tb").is_err());
    }

    #[test]
    fn add_of_unsupported_version_is_code_1_but_del_cleans_up() {
        for v in ["0.1.0", "0.2.0", "9.9.9"] {
            let raw = conf_with_prev(v);
            let e = run_plan(&k8s_env("ADD"), &raw).plan.expect_err("must fail");
            assert_eq!(e.code, INCOMPATIBLE_VERSION);
            let inv = run_plan(&k8s_env("DEL"), &raw);
            assert!(matches!(&inv.plan, Ok(Plan::Del { warnings, .. }) if !warnings.is_empty()));
        }
        let e = run_plan(&k8s_env("ADD"), r#"{"name":"n","prevResult":{}}"#)
            .plan
            .expect_err("no version");
        assert_eq!(e.code, INCOMPATIBLE_VERSION);
    }

    #[test]
    fn del_works_without_prev_result_netns_or_readable_config() {
        let mut e = k8s_env("DEL");
        e.insert("CNI_NETNS".into(), String::new());
        for stdin in [
            r#"{"cniVersion":"0.3.1","name":"n"}"#,
            "garbage",
            "",
            r#"{"socket":5}"#,
        ] {
            let inv = run_plan(&e, stdin);
            let Ok(Plan::Del { req, .. }) = inv.plan else {
                panic!("{stdin}: {:?}", inv.plan)
            };
            assert_eq!(req.container_id, "c0ffee");
            assert_eq!(req.ifname, "eth0");
            assert_eq!(req.netns, "");
            assert!(req.ips.is_empty());
        }
        let inv = run_plan(&k8s_env("DEL"), &conf_with_prev("1.0.0"));
        let Ok(Plan::Del { req, warnings }) = inv.plan else {
            panic!()
        };
        assert_eq!(req.ips.len(), 1);
        assert!(warnings.is_empty());
    }

    #[test]
    fn del_without_container_id_is_code_4() {
        let mut e = k8s_env("DEL");
        e.remove("CNI_CONTAINERID");
        assert_eq!(
            run_plan(&e, "{}").plan.map_err(|e| e.code).err(),
            Some(INVALID_ENV)
        );
    }

    #[test]
    fn check_needs_0_4_0_and_skips_non_k8s_pods() {
        let e = run_plan(&k8s_env("CHECK"), &conf_with_prev("0.3.1"))
            .plan
            .expect_err("0.3.1");
        assert_eq!(e.code, INCOMPATIBLE_VERSION);
        assert!(matches!(
            run_plan(&k8s_env("CHECK"), &conf_with_prev("0.4.0")).plan,
            Ok(Plan::Check { .. })
        ));
        let mut e = k8s_env("CHECK");
        e.remove("CNI_ARGS");
        assert!(matches!(
            run_plan(&e, &conf_with_prev("1.0.0")).plan,
            Ok(Plan::Succeed { .. })
        ));
    }

    #[test]
    fn version_echoes_input_and_works_with_nothing() {
        let e = env(&[("CNI_COMMAND", "VERSION")]);
        let all = json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
        for (stdin, want) in [
            ("", "1.0.0"),
            (r#"{"cniVersion":"0.3.1"}"#, "0.3.1"),
            (r#"{"cniVersion":"9.9.9"}"#, "9.9.9"),
            ("junk", "1.0.0"),
        ] {
            let inv = run_plan(&e, stdin);
            let Ok(Plan::Print { doc, .. }) = inv.plan else {
                panic!()
            };
            assert_eq!(doc, json!({"cniVersion": want, "supportedVersions": all}));
        }
    }

    #[test]
    fn no_command_is_about() {
        assert!(matches!(
            run_plan(&HashMap::new(), "").plan,
            Ok(Plan::About)
        ));
    }

    #[test]
    fn gc_reads_both_keys_and_none() {
        let e = env(&[("CNI_COMMAND", "GC")]);
        let inv = run_plan(
            &e,
            r#"{"cniVersion":"1.1.0","name":"n",
                "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],
                "cni.dev/attachments":[{"containerID":"a","ifname":"eth0"},{"containerID":"b","ifname":"net1"}]}"#,
        );
        let Ok(Plan::Gc { req }) = inv.plan else {
            panic!("{:?}", inv.plan)
        };
        assert!(req.has_valid_list);
        assert_eq!(req.network_name, "n");
        assert_eq!(
            req.valid,
            vec![
                Attachment {
                    container_id: "a".into(),
                    ifname: "eth0".into()
                },
                Attachment {
                    container_id: "b".into(),
                    ifname: "net1".into()
                }
            ]
        );
        let inv = run_plan(
            &e,
            r#"{"cniVersion":"1.1.0","name":"n","cni.dev/attachments":[]}"#,
        );
        assert!(
            matches!(inv.plan, Ok(Plan::Gc { req }) if req.has_valid_list && req.valid.is_empty())
        );
        let inv = run_plan(&e, r#"{"cniVersion":"1.1.0","name":"n"}"#);
        assert!(matches!(inv.plan, Ok(Plan::Gc { req }) if !req.has_valid_list));
        let inv = run_plan(&e, r#"{"cniVersion":"1.0.0","name":"n"}"#);
        assert_eq!(
            inv.plan.map_err(|e| e.code).err(),
            Some(INCOMPATIBLE_VERSION)
        );
        let inv = run_plan(
            &e,
            r#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"containerID":1}]}"#,
        );
        assert_eq!(inv.plan.map_err(|e| e.code).err(), Some(INVALID_CONFIG));
    }

    #[test]
    fn status_needs_1_1_0() {
        let e = env(&[("CNI_COMMAND", "STATUS")]);
        assert!(matches!(
            run_plan(&e, r#"{"cniVersion":"1.1.0"}"#).plan,
            Ok(Plan::Status)
        ));
        let err = run_plan(&e, r#"{"cniVersion":"0.4.0"}"#)
            .plan
            .expect_err("old");
        assert_eq!(err.code, INCOMPATIBLE_VERSION);
    }

    #[test]
    fn decode_errors_are_code_6_and_stamped_with_fallback_version() {
        let inv = run_plan(&k8s_env("ADD"), "{{{");
        assert_eq!(inv.plan.map_err(|e| e.code).err(), Some(DECODE));
        assert_eq!(inv.error_version, "1.0.0");
        let inv = run_plan(&k8s_env("ADD"), r#"{"cniVersion":"0.4.0","logLevel":"x"}"#);
        assert_eq!(inv.plan.map_err(|e| e.code).err(), Some(UNSUPPORTED_FIELD));
        assert_eq!(inv.error_version, "0.4.0");
    }

    fn arb_env() -> impl Strategy<Value = HashMap<String, String>> {
        let cmd = prop_oneof![
            Just("ADD".to_string()),
            Just("DEL".to_string()),
            Just("CHECK".to_string()),
            Just("VERSION".to_string()),
            Just("GC".to_string()),
            Just("STATUS".to_string()),
            ".{0,8}",
        ];
        (
            proptest::option::of(cmd),
            proptest::option::of(".{0,20}"),
            proptest::option::of(".{0,20}"),
            proptest::option::of(".{0,20}"),
            proptest::option::of(".{0,60}"),
        )
            .prop_map(|(c, id, ns, ifn, args)| {
                let mut m = HashMap::new();
                for (k, v) in [
                    ("CNI_COMMAND", c),
                    ("CNI_CONTAINERID", id),
                    ("CNI_NETNS", ns),
                    ("CNI_IFNAME", ifn),
                    ("CNI_ARGS", args),
                ] {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                }
                m
            })
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::vec(
                    (
                        prop_oneof![
                            Just("cniVersion".to_string()),
                            Just("prevResult".to_string()),
                            Just("ips".to_string()),
                            Just("interfaces".to_string()),
                            Just("address".to_string()),
                            Just("gateway".to_string()),
                            Just("interface".to_string()),
                            Just("sandbox".to_string()),
                            Just("socket".to_string()),
                            Just("timeoutMs".to_string()),
                            Just("cni.dev/valid-attachments".to_string()),
                            ".{0,6}",
                        ],
                        inner
                    ),
                    0..6
                )
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn plan_never_panics_on_any_bytes(e in arb_env(), stdin in proptest::collection::vec(any::<u8>(), 0..256)) {
            let inv = plan(&|k| e.get(k).cloned(), &stdin);
            if let Err(err) = inv.plan {
                prop_assert!(err.code < 100);
            }
        }

        #[test]
        fn plan_never_panics_on_any_json(e in arb_env(), doc in arb_json()) {
            let stdin = doc.to_string();
            let inv = plan(&|k| e.get(k).cloned(), stdin.as_bytes());
            if let Err(err) = inv.plan {
                prop_assert!(err.code < 100);
            }
        }

        #[test]
        fn add_output_equals_prev_result(prev in arb_json()) {
            let mut prev = prev;
            if let Value::Object(m) = &mut prev {
                m.insert("cniVersion".into(), json!("1.0.0"));
            }
            let stdin = json!({"cniVersion": "1.0.0", "name": "n", "prevResult": prev}).to_string();
            let e = k8s_env("ADD");
            let inv = plan(&|k| e.get(k).cloned(), stdin.as_bytes());
            match inv.plan {
                Ok(Plan::Add { result, .. }) => prop_assert_eq!(result, prev),
                Ok(other) => prop_assert!(false, "unexpected {:?}", other),
                Err(err) => prop_assert!(err.code == INVALID_CONFIG),
            }
        }
    }
}
