//! Unit tests of the plugin's decisions ([`super::plan`] and its parts), without a daemon.

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
    let v6 =
        json!({"address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1});
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
    let raw =
        r#"{"cniVersion":"1.0.0","name":"n","prevResult":{"zeta":1,"ips":[],"alpha":{"x":[1,2]}}}"#;
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
    assert!(matches!(inv.plan, Ok(Plan::Gc { req }) if req.has_valid_list && req.valid.is_empty()));
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
