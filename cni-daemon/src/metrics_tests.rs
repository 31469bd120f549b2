use super::*;
use std::sync::Arc;

use crate::config::Config;
use crate::daemon::Daemon;
use crate::dataplane::fake::FakeDataplane;
use crate::registry::Registry;
use ambient_cni_proto::v1::*;
use ambient_cni_proto::CONTRACT_VERSION;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut out = String::new();
    c.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_string(), body.to_string())
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .and_then(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

fn pod_request(cid: &str, name: &str, ip: &str, ifname: &str) -> PodRequest {
    PodRequest {
        contract_version: CONTRACT_VERSION,
        container_id: cid.into(),
        ifname: ifname.into(),
        netns: format!("/tmp/acni-fake-netns-{cid}"),
        pod_namespace: "default".into(),
        pod_name: name.into(),
        pod_uid: format!("uid-{cid}"),
        network_name: "k8s".into(),
        ips: vec![PodIp {
            address: format!("{ip}/24"),
            gateway: "10.244.1.1".into(),
        }],
        host_interface: "vetha".into(),
        ..PodRequest::default()
    }
}

fn enroll_request(name: &str, ip: &str, release: bool) -> EnrollRequest {
    EnrollRequest {
        contract_version: CONTRACT_VERSION,
        pod_namespace: "default".into(),
        pod_name: name.into(),
        pod_uid: format!("uid-{name}"),
        ips: vec![ip.into()],
        release,
    }
}

/// The requests go through the socket's tonic service (where they are counted), then a scrape
/// of `/metrics` is parsed with a Prometheus text parser.
#[tokio::test]
async fn a_scrape_parses_and_counts_what_the_daemon_did() {
    let dp = Arc::new(FakeDataplane::new());
    {
        let mut k = dp.kernel();
        k.add_host_link("vetha");
        k.add_host_link("vethr");
        k.host_routes
            .insert("10.244.1.7".parse().expect("ip"), "vethr".into());
    }
    let mut cfg = Config::default();
    cfg.ambient_namespaces.insert("default".into());
    let d = Arc::new(Daemon::new(Arc::new(cfg), dp, None, Registry::default()));
    assert!(d.resync().await.ok());
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let l = crate::server::bind(&sock).expect("bind");
    tokio::spawn(crate::server::serve_as(
        d.clone(),
        l,
        std::future::pending(),
        crate::conn::Peers::As(0),
    ));
    let mut c = crate::admin::connect(&sock).await.expect("connect");
    c.pod_add(pod_request("c1", "a", "10.244.1.5", "eth0"))
        .await
        .expect("add");
    let e = c
        .pod_add(pod_request("c2", "b", "10.244.1.6", "eth0 bad"))
        .await
        .expect_err("a bad ifname");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    c.pod_del(pod_request("c9", "z", "10.244.1.9", "eth0"))
        .await
        .expect("del of an unknown pod");
    c.status(StatusRequest {}).await.expect("status");
    // A running pod enrolled by hand, one refused (no route to its IP), then a release.
    c.enroll(enroll_request("r", "10.244.1.7", false))
        .await
        .expect("enroll");
    let e = c
        .enroll(enroll_request("s", "10.244.1.8", false))
        .await
        .expect_err("no host interface");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");

    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let dd = d.clone();
    tokio::spawn(serve(
        l,
        move || {
            let d = dd.clone();
            async move { d.metrics().render(&Snapshot::of(&d.status().await, 123)) }
        },
        std::future::pending(),
    ));
    let (head, body) = get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("openmetrics-text"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("a Prometheus text scrape");
    let v = |n: &str, l: &[(&str, &str)]| value(&scrape, n, l);
    let req = |verb: &str, code: &str| {
        v(
            "ambient_cni_requests_total",
            &[("verb", verb), ("code", code)],
        )
    };
    assert_eq!(req("add", "ok"), Some(1.0), "{body}");
    assert_eq!(req("add", "invalid_argument"), Some(1.0), "{body}");
    assert_eq!(req("del", "ok"), Some(1.0), "{body}");
    assert_eq!(req("status", "ok"), Some(1.0), "{body}");
    assert_eq!(req("enroll", "ok"), Some(1.0), "{body}");
    assert_eq!(req("enroll", "failed_precondition"), Some(1.0), "{body}");
    assert_eq!(
        v(
            "ambient_cni_running_enrollments_total",
            &[("origin", "manual"), ("change", "enrolled")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        v("ambient_cni_running_pods", &[("origin", "manual")]),
        Some(1.0)
    );
    assert_eq!(
        v("ambient_cni_running_pods", &[("origin", "api")]),
        Some(0.0)
    );
    assert_eq!(v("ambient_cni_running_not_enrolled", &[]), Some(0.0));
    // The CNI pod and the one enrolled by hand.
    assert_eq!(v("ambient_cni_pods", &[("state", "known")]), Some(2.0));
    assert_eq!(v("ambient_cni_pods", &[("state", "enrolled")]), Some(2.0));
    assert_eq!(v("ambient_cni_ztunnel_present", &[]), Some(0.0));
    assert_eq!(v("ambient_cni_ready", &[]), Some(1.0));
    assert_eq!(v("ambient_cni_journal_bytes", &[]), Some(123.0));
    assert_eq!(
        v("ambient_cni_reconciles_total", &[("kind", "start")]),
        Some(1.0)
    );
    assert!(v("ambient_cni_repairs_total", &[("object", "ipset")]).is_some_and(|n| n >= 1.0));
    assert!(body.contains("ambient_cni_build_info{version=\""), "{body}");
    // The latency histogram of ADD holds both requests.
    let h = scrape
        .samples
        .iter()
        .find(|x| {
            x.metric == "ambient_cni_request_duration_seconds"
                && x.labels.get("verb") == Some("add")
        })
        .expect("ADD latency histogram");
    match &h.value {
        prometheus_parse::Value::Histogram(b) => {
            assert_eq!(b.last().map(|c| c.count), Some(2.0), "{body}")
        }
        other => panic!("not a histogram: {other:?}"),
    }
    // No pod name, IP or UID in any label.
    for s in &scrape.samples {
        for (k, val) in s.labels.iter() {
            assert!(
                !val.contains("10.244") && !val.contains("uid-") && val != "a" && val != "r",
                "{k}={val}"
            );
        }
    }
    let (head, _) = get(addr, "/other").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[test]
fn object_kinds_of_applied_lines() {
    for (line, kind) in [
        ("create ipset", "ipset"),
        ("ipset add 10.0.0.1 (owner u)", "ipset"),
        ("create tunnel istioin into /run/netns/z", "link"),
        ("delete link istioout", "link"),
        ("route replace 10.0.0.1/32 table 100 in node", "route"),
        ("rule add 101 in node", "rule"),
        (
            "iptables-restore in node: mangle/ztunnel-PREROUTING",
            "iptables",
        ),
        (
            "ip6tables-restore in node: mangle/ztunnel-PREROUTING",
            "iptables",
        ),
        ("sysctl net/ipv4/conf/x/rp_filter=2 in node", "sysctl"),
        ("create nft set inet ambient-cni pods4", "nft_set"),
        ("nft add element pods6 fd10::2 (owner u)", "nft_set"),
        ("nft delete element pods4 10.0.0.1", "nft_set"),
        (
            "nft batch in node: table inet ambient-cni chains ip-mangle-prerouting",
            "nft_chains",
        ),
    ] {
        assert_eq!(object_of(line), kind, "{line}");
    }
}

#[test]
fn remote_addresses_need_the_flag() {
    let lo: SocketAddr = "127.0.0.1:15014".parse().expect("addr");
    let lo6: SocketAddr = "[::1]:15014".parse().expect("addr");
    let any: SocketAddr = "0.0.0.0:15014".parse().expect("addr");
    assert!(check_addr(lo, false).is_ok());
    assert!(check_addr(lo6, false).is_ok());
    assert!(check_addr(any, false).is_err());
    assert!(check_addr(any, true).is_ok());
}
