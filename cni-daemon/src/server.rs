//! The calls of the gRPC service on the unix socket: decodes each request, calls [`Daemon`],
//! encodes the reply; and the peer check the transport makes first. The HTTP/2 side is
//! [`crate::grpc`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ambient_cni_proto::v1::*;
use ambient_cni_proto::CONTRACT_VERSION;
use prost::Message;
use tracing::warn;

use crate::daemon::{Daemon, PodEvent, RequestError};
use crate::dataplane::Dataplane;

/// The `:path` prefix of our service's methods.
pub const SERVICE_PATH: &str = "/ambientcni.v1.CniNode/";

/// The gRPC status codes we answer with (their numbers are the wire values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    InvalidArgument = 3,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Unimplemented = 12,
    Internal = 13,
}

/// A refused call: the code and the message sent as `grpc-message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }
}

/// Refuse every peer that is not root: the socket is a privilege boundary.
pub fn check_peer(uid: Option<u32>) -> Result<(), Status> {
    match uid {
        Some(0) => Ok(()),
        Some(u) => {
            warn!(uid = u, "refused a peer that is not root");
            Err(Status::new(
                Code::PermissionDenied,
                format!("peer uid {u} is not root"),
            ))
        }
        None => Err(Status::new(
            Code::PermissionDenied,
            "peer credentials unavailable",
        )),
    }
}

fn check_version(v: u32) -> Result<(), Status> {
    if v == CONTRACT_VERSION {
        Ok(())
    } else {
        Err(Status::new(
            Code::FailedPrecondition,
            format!("contract version {v} not supported (daemon speaks {CONTRACT_VERSION})"),
        ))
    }
}

fn to_status(e: RequestError) -> Status {
    match e {
        RequestError::Invalid(m) => Status::new(Code::InvalidArgument, m),
        RequestError::Precondition(m) => Status::new(Code::FailedPrecondition, m),
        e @ RequestError::Kernel(_) => Status::new(Code::Internal, e.to_string()),
        e @ RequestError::State(_) => Status::new(Code::Internal, e.to_string()),
    }
}

fn decode<M: Message + Default>(msg: &[u8]) -> Result<M, Status> {
    M::decode(msg).map_err(|e| Status::new(Code::InvalidArgument, format!("bad request: {e}")))
}

fn event(r: PodRequest) -> PodEvent {
    PodEvent {
        container_id: r.container_id,
        ifname: r.ifname,
        netns: r.netns,
        namespace: r.pod_namespace,
        name: r.pod_name,
        uid: r.pod_uid,
        network: r.network_name,
        ips: r.ips.into_iter().map(|i| (i.address, i.gateway)).collect(),
        host_if: r.host_interface,
    }
}

/// A full reconcile's summary as the STATUS reply carries it.
pub fn reconcile_run(r: &crate::daemon::ResyncSummary) -> ReconcileRun {
    ReconcileRun {
        unix_ms: r.unix_ms,
        kind: r.kind.clone(),
        changed: u32::try_from(r.repaired).unwrap_or(u32::MAX),
        changes: r.changed.clone(),
        errors: r.errors.clone(),
        micros: r.micros,
    }
}

/// A pod request, once its peer and contract version are checked.
fn pod_request(msg: &[u8]) -> Result<PodRequest, Status> {
    let r: PodRequest = decode(msg)?;
    check_version(r.contract_version)?;
    Ok(r)
}

/// One call of method `method` (the last part of its `:path`) with its encoded request `msg`,
/// from a peer the transport has already checked with [`check_peer`]: the encoded reply, or the
/// status refusing it.
pub async fn call<D: Dataplane>(
    daemon: &Daemon<D>,
    method: &str,
    msg: &[u8],
) -> Result<Vec<u8>, Status> {
    let reply = match method {
        "PodAdd" => {
            let out = daemon
                .add(event(pod_request(msg)?))
                .await
                .map_err(to_status)?;
            PodAddReply {
                enrolled: out.enrolled,
                reason: out.reason,
                ztunnel: out.ztunnel,
            }
            .encode_to_vec()
        }
        "PodDel" => {
            let r = pod_request(msg)?;
            let removed = daemon
                .del(&r.container_id, &r.ifname)
                .await
                .map_err(to_status)?;
            PodDelReply { removed }.encode_to_vec()
        }
        "PodCheck" => {
            let r = pod_request(msg)?;
            let (enrolled, detail) = daemon
                .check(&r.container_id, &r.ifname)
                .await
                .map_err(to_status)?;
            PodCheckReply { enrolled, detail }.encode_to_vec()
        }
        "Gc" => {
            let r: GcRequest = decode(msg)?;
            check_version(r.contract_version)?;
            let valid: Vec<(String, String)> = r
                .valid
                .into_iter()
                .map(|a| (a.container_id, a.ifname))
                .collect();
            let (removed, errors) = daemon
                .gc(
                    &r.network_name,
                    r.has_valid_list.then_some(valid.as_slice()),
                )
                .await;
            GcReply { removed, errors }.encode_to_vec()
        }
        "Status" => {
            let _: StatusRequest = decode(msg)?;
            let s = daemon.status().await;
            let reason = if s.ready {
                String::new()
            } else {
                match &s.last_resync {
                    Some(r) if !r.errors.is_empty() => {
                        format!("last reconcile failed: {}", r.errors.join("; "))
                    }
                    _ => "initial reconcile has not completed".into(),
                }
            };
            StatusReply {
                ready: s.ready,
                reason,
                pods: s.pods as u32,
                enrolled_pods: s.enrolled as u32,
                ztunnel_present: s.ztunnel.is_some(),
                version: env!("CARGO_PKG_VERSION").into(),
                last_resync: s.last_resync.as_ref().map(reconcile_run),
                last_repair: s.last_repair.as_ref().map(reconcile_run),
                resyncs: s.resyncs,
            }
            .encode_to_vec()
        }
        "Dump" => {
            let _: DumpRequest = decode(msg)?;
            let v = daemon.dump().await;
            DumpReply {
                json: serde_json::to_string_pretty(&v).unwrap_or_default(),
            }
            .encode_to_vec()
        }
        "Trace" => {
            let r: TraceRequest = decode(msg)?;
            let limit = if r.limit == 0 { 200 } else { r.limit as usize };
            let events = daemon
                .trace(&r.filter, limit)
                .into_iter()
                .map(|e| TraceEvent {
                    unix_ms: e.unix_ms,
                    kind: e.kind,
                    message: e.message,
                })
                .collect();
            TraceReply { events }.encode_to_vec()
        }
        other => {
            return Err(Status::new(
                Code::Unimplemented,
                format!("unknown method {other:?}"),
            ))
        }
    };
    Ok(reply)
}

/// Bind the socket: its directory 0700, the socket 0600, a stale socket file removed first.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}
