//! The admin commands (`status`, `trace`, `dump`): a gRPC client over the daemon's unix socket.

use std::path::Path;
use std::time::Duration;

use ambient_cni_proto::v1::cni_node_client::CniNodeClient;
use ambient_cni_proto::v1::{DumpRequest, EnrollRequest, StatusRequest, TraceRequest};
use ambient_cni_proto::CONTRACT_VERSION;
use anyhow::{bail, Context};
use tonic::transport::{Channel, Endpoint, Uri};

/// Connect to the daemon's socket.
pub async fn connect(socket: &Path) -> anyhow::Result<CniNodeClient<Channel>> {
    let path = socket.to_path_buf();
    let ch = Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("cannot reach the daemon at {}", socket.display()))?;
    // `dump` of a full node is large (~18 MB of JSON at 10,000 pods): no 4 MB default cap.
    Ok(CniNodeClient::new(ch).max_decoding_message_size(usize::MAX))
}

/// `ambient-cnid status`: fails when the daemon is not ready.
pub async fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let s = connect(socket)
        .await?
        .status(StatusRequest {})
        .await
        .context("status")?
        .into_inner();
    let run_json = |r: &Option<ambient_cni_proto::v1::ReconcileRun>| {
        r.as_ref().map(|r| {
            serde_json::json!({"unixMs": r.unix_ms, "kind": r.kind, "changed": r.changed,
                "changes": r.changes, "errors": r.errors, "micros": r.micros})
        })
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"ready": s.ready, "reason": s.reason, "pods": s.pods, "enrolledPods": s.enrolled_pods, "ztunnel": s.ztunnel_present, "ztunnelIps": s.ztunnel_ips, "ipFamilies": s.ip_families, "version": s.version, "runningNotEnrolled": s.running_not_enrolled,
                "lastResync": run_json(&s.last_resync), "lastRepair": run_json(&s.last_repair), "resyncs": s.resyncs})
        );
    } else {
        println!(
            "ready:      {}{}",
            s.ready,
            if s.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.reason)
            }
        );
        println!("pods:       {} ({} enrolled)", s.pods, s.enrolled_pods);
        if s.running_not_enrolled > 0 {
            println!(
                "not enrolled: {} running pods of enrolled namespaces (see the log or `trace --filter skip`)",
                s.running_not_enrolled
            );
        }
        println!(
            "ztunnel:    {}",
            if s.ztunnel_present {
                format!("present ({})", s.ztunnel_ips.join(" "))
            } else {
                "absent".into()
            }
        );
        println!("families:   {}", s.ip_families.join(" "));
        println!("version:    {}", s.version);
        println!("resyncs:    {}", s.resyncs);
        for (what, r) in [
            ("last resync", &s.last_resync),
            ("last repair", &s.last_repair),
        ] {
            match r {
                None => println!("{what}: none"),
                Some(r) => {
                    println!(
                        "{what}: {} ({}, {} changed, {} errors, {} ms)",
                        fmt_ms(r.unix_ms),
                        r.kind,
                        r.changed,
                        r.errors.len(),
                        r.micros / 1000
                    );
                    for c in r.changes.iter().chain(r.errors.iter()) {
                        println!("    {c}");
                    }
                }
            }
        }
    }
    if !s.ready {
        bail!("daemon not ready: {}", s.reason);
    }
    Ok(())
}

fn fmt_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ms % 1000)
}

/// `ambient-cnid trace`.
pub async fn trace(
    socket: &Path,
    filter: &str,
    limit: u32,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = connect(socket).await?;
    let mut last = 0u64;
    loop {
        let events = client
            .trace(TraceRequest {
                filter: filter.into(),
                limit,
            })
            .await
            .context("trace")?
            .into_inner()
            .events;
        let since = last;
        for e in events.into_iter().filter(|e| e.unix_ms > since || !follow) {
            last = last.max(e.unix_ms);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"unixMs": e.unix_ms, "kind": e.kind, "message": e.message})
                );
            } else {
                println!("{} {:<8} {}", fmt_ms(e.unix_ms), e.kind, e.message);
            }
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `ambient-cnid dump`.
pub async fn dump(socket: &Path) -> anyhow::Result<()> {
    let d = connect(socket)
        .await?
        .dump(DumpRequest {})
        .await
        .context("dump")?
        .into_inner();
    println!("{}", d.json);
    Ok(())
}

/// What `ambient-cnid enroll` asks for.
#[derive(Clone, Debug, Default)]
pub struct EnrollArgs {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID.
    pub uid: String,
    /// Pod addresses, either family.
    pub ips: Vec<std::net::IpAddr>,
    /// Release the pod with `uid` instead.
    pub release: bool,
}

/// `ambient-cnid enroll` / `enroll --release`: fails when the daemon refuses (the message says why).
pub async fn enroll(socket: &Path, a: EnrollArgs, json: bool) -> anyhow::Result<()> {
    let r = connect(socket)
        .await?
        .enroll(EnrollRequest {
            contract_version: CONTRACT_VERSION,
            pod_namespace: a.namespace,
            pod_name: a.pod,
            pod_uid: a.uid,
            ips: a.ips.iter().map(ToString::to_string).collect(),
            release: a.release,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context(if a.release { "release" } else { "enroll" })?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({"enrolled": r.enrolled, "detail": r.detail})
        );
    } else {
        println!("{}", r.detail);
    }
    Ok(())
}
