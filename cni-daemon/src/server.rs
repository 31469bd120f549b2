//! The gRPC service on the unix socket: decodes requests, checks the peer, calls [`Daemon`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use ambient_cni_proto::v1::cni_node_server::{CniNode, CniNodeServer};
use ambient_cni_proto::v1::*;
use ambient_cni_proto::CONTRACT_VERSION;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::daemon::{Daemon, PodEvent, RequestError};
use crate::dataplane::Dataplane;

/// The service.
pub struct Service<D> {
    daemon: Arc<Daemon<D>>,
}

impl<D> Service<D> {
    /// Serve this daemon.
    pub fn new(daemon: Arc<Daemon<D>>) -> Self {
        Service { daemon }
    }
}

/// Refuse every peer that is not root: the socket is a privilege boundary.
fn check_peer<T>(req: &Request<T>) -> Result<(), Status> {
    let uid = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid());
    match uid {
        Some(0) => Ok(()),
        Some(u) => {
            warn!(uid = u, "refused a peer that is not root");
            Err(Status::permission_denied(format!(
                "peer uid {u} is not root"
            )))
        }
        None => Err(Status::permission_denied("peer credentials unavailable")),
    }
}

fn check_version(v: u32) -> Result<(), Status> {
    if v == CONTRACT_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "contract version {v} not supported (daemon speaks {CONTRACT_VERSION})"
        )))
    }
}

fn to_status(e: RequestError) -> Status {
    match e {
        RequestError::Invalid(m) => Status::invalid_argument(m),
        RequestError::Precondition(m) => Status::failed_precondition(m),
        e @ RequestError::Kernel(_) => Status::internal(e.to_string()),
        e @ RequestError::State(_) => Status::internal(e.to_string()),
    }
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

#[tonic::async_trait]
impl<D: Dataplane> CniNode for Service<D> {
    async fn pod_add(&self, req: Request<PodRequest>) -> Result<Response<PodAddReply>, Status> {
        check_peer(&req)?;
        let r = req.into_inner();
        check_version(r.contract_version)?;
        let out = self.daemon.add(event(r)).await.map_err(to_status)?;
        Ok(Response::new(PodAddReply {
            enrolled: out.enrolled,
            reason: out.reason,
            ztunnel: out.ztunnel,
        }))
    }

    async fn pod_del(&self, req: Request<PodRequest>) -> Result<Response<PodDelReply>, Status> {
        check_peer(&req)?;
        let r = req.into_inner();
        check_version(r.contract_version)?;
        let removed = self
            .daemon
            .del(&r.container_id, &r.ifname)
            .await
            .map_err(to_status)?;
        Ok(Response::new(PodDelReply { removed }))
    }

    async fn pod_check(&self, req: Request<PodRequest>) -> Result<Response<PodCheckReply>, Status> {
        check_peer(&req)?;
        let r = req.into_inner();
        check_version(r.contract_version)?;
        let (enrolled, detail) = self
            .daemon
            .check(&r.container_id, &r.ifname)
            .await
            .map_err(to_status)?;
        Ok(Response::new(PodCheckReply { enrolled, detail }))
    }

    async fn gc(&self, req: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        check_peer(&req)?;
        let r = req.into_inner();
        check_version(r.contract_version)?;
        let valid: Vec<(String, String)> = r
            .valid
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        let (removed, errors) = self
            .daemon
            .gc(
                &r.network_name,
                r.has_valid_list.then_some(valid.as_slice()),
            )
            .await;
        Ok(Response::new(GcReply { removed, errors }))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        check_peer(&req)?;
        let s = self.daemon.status().await;
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
        Ok(Response::new(StatusReply {
            ready: s.ready,
            reason,
            pods: s.pods as u32,
            enrolled_pods: s.enrolled as u32,
            ztunnel_present: s.ztunnel.is_some(),
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn dump(&self, req: Request<DumpRequest>) -> Result<Response<DumpReply>, Status> {
        check_peer(&req)?;
        let v = self.daemon.dump().await;
        Ok(Response::new(DumpReply {
            json: serde_json::to_string_pretty(&v).unwrap_or_default(),
        }))
    }

    async fn trace(&self, req: Request<TraceRequest>) -> Result<Response<TraceReply>, Status> {
        check_peer(&req)?;
        let r = req.into_inner();
        let limit = if r.limit == 0 { 200 } else { r.limit as usize };
        let events = self
            .daemon
            .trace(&r.filter, limit)
            .into_iter()
            .map(|e| TraceEvent {
                unix_ms: e.unix_ms,
                kind: e.kind,
                message: e.message,
            })
            .collect();
        Ok(Response::new(TraceReply { events }))
    }
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

/// Serve until `shutdown` resolves.
pub async fn serve<D: Dataplane>(
    daemon: Arc<Daemon<D>>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(CniNodeServer::new(Service::new(daemon)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
}
