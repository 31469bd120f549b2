//! Offline validation of install/kubernetes/*.yaml: every document parses into its typed
//! k8s-openapi struct, serializes back to the same JSON (so no misspelled or misplaced field was
//! silently dropped), and the DaemonSet has the mounts, propagation, security context and
//! tolerations that cni-contract.md §10 asks for. No cluster is needed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, ServiceAccount, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const NS: &str = "ambient-cni";
const SOCKET: &str = "/run/ambient-cni/cni.sock";

fn load(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("kubernetes")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `v` as `T`; `None` when it does not parse or loses a field on the way back.
fn round_trip<T: DeserializeOwned + Serialize>(v: &Value) -> Option<T> {
    let t: T = serde_json::from_value(v.clone()).ok()?;
    (serde_json::to_value(&t).ok()? == *v).then_some(t)
}

/// Parses `v` as `T` and checks that nothing was lost on the way.
fn typed<T: DeserializeOwned + Serialize>(v: &Value) -> T {
    round_trip(v).unwrap_or_else(|| {
        panic!("does not survive the typed round trip (typo or wrong place?): {v}")
    })
}

#[test]
fn the_round_trip_catches_misspelled_fields() {
    let good = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "volumeMounts": [
            {"name": "n", "mountPath": "/x", "mountPropagation": "HostToContainer"}]}]}});
    assert!(round_trip::<k8s_openapi::api::core::v1::Pod>(&good).is_some());
    let typo = serde_json::from_str(
        &good
            .to_string()
            .replace("mountPropagation", "mountPropogation"),
    )
    .unwrap();
    assert!(round_trip::<k8s_openapi::api::core::v1::Pod>(&typo).is_none());
    // hostNetwork belongs in the pod spec, not in a container.
    let mut misplaced = good.clone();
    misplaced["spec"]["containers"][0]["hostNetwork"] = serde_json::json!(true);
    assert!(round_trip::<k8s_openapi::api::core::v1::Pod>(&misplaced).is_none());
}

struct Docs {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn docs(file: &str) -> Docs {
    let mut d = Docs {
        namespaces: vec![],
        service_accounts: vec![],
        cluster_roles: vec![],
        cluster_role_bindings: vec![],
        roles: vec![],
        role_bindings: vec![],
        config_maps: vec![],
        daemon_sets: vec![],
    };
    for v in load(file) {
        match (
            v["apiVersion"].as_str().unwrap(),
            v["kind"].as_str().unwrap(),
        ) {
            ("v1", "Namespace") => d.namespaces.push(typed(&v)),
            ("v1", "ServiceAccount") => d.service_accounts.push(typed(&v)),
            ("v1", "ConfigMap") => d.config_maps.push(typed(&v)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => d.cluster_roles.push(typed(&v)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                d.cluster_role_bindings.push(typed(&v))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => d.roles.push(typed(&v)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => d.role_bindings.push(typed(&v)),
            ("apps/v1", "DaemonSet") => d.daemon_sets.push(typed(&v)),
            (a, k) => panic!("{file}: unexpected {a} {k}"),
        }
    }
    d
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn container<'a>(list: Option<&'a Vec<Container>>, name: &str) -> &'a Container {
    list.unwrap()
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn mount<'a>(c: &'a Container, path: &str) -> &'a VolumeMount {
    c.volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == path)
        .unwrap_or_else(|| panic!("{}: no mount at {path}", c.name))
}

/// volume name -> (host path, type)
fn host_paths(spec: &PodSpec) -> BTreeMap<String, (String, String)> {
    spec.volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| {
            let hp = v
                .host_path
                .as_ref()
                .unwrap_or_else(|| panic!("volume {} is not a hostPath", v.name));
            (
                v.name.clone(),
                (hp.path.clone(), hp.type_.clone().unwrap_or_default()),
            )
        })
        .collect()
}

fn host_path_of(spec: &PodSpec, m: &VolumeMount) -> String {
    host_paths(spec)[&m.name].0.clone()
}

fn env<'a>(c: &'a Container, name: &str) -> &'a str {
    c.env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
        .unwrap_or_else(|| panic!("{}: no env {name}", c.name))
}

fn exec(p: Option<&k8s_openapi::api::core::v1::Probe>) -> Vec<String> {
    p.unwrap().exec.as_ref().unwrap().command.clone().unwrap()
}

fn caps(c: &Container) -> (Vec<String>, Vec<String>) {
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    (
        caps.drop.clone().unwrap_or_default(),
        caps.add.clone().unwrap_or_default(),
    )
}

/// Every mount names a defined volume and every volume is mounted.
fn volumes_consistent(spec: &PodSpec) {
    let defined: Vec<_> = host_paths(spec).into_keys().collect();
    let mut used = std::collections::BTreeSet::new();
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                defined.contains(&m.name),
                "{}: mount of undefined volume {}",
                c.name,
                m.name
            );
            used.insert(m.name.clone());
        }
    }
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        defined,
        "unused volume"
    );
}

/// The API server rejects allowPrivilegeEscalation=false together with privileged or SYS_ADMIN.
fn passes_escalation_rule(c: &Container) {
    let sc = c.security_context.as_ref().unwrap();
    if sc.allow_privilege_escalation == Some(false) {
        assert_ne!(sc.privileged, Some(true), "{}", c.name);
        assert!(
            !caps(c)
                .1
                .iter()
                .any(|a| a == "SYS_ADMIN" || a == "CAP_SYS_ADMIN"),
            "{}",
            c.name
        );
    }
}

#[test]
fn every_document_is_a_known_typed_object() {
    let d = docs("ambient-cni.yaml");
    assert_eq!(d.namespaces.len(), 1);
    assert_eq!(d.service_accounts.len(), 1);
    assert_eq!(d.cluster_roles.len(), 1);
    assert_eq!(d.cluster_role_bindings.len(), 1);
    assert_eq!(d.roles.len(), 1);
    assert_eq!(d.role_bindings.len(), 1);
    assert_eq!(d.config_maps.len(), 1);
    assert_eq!(d.daemon_sets.len(), 1);
    let u = docs("ambient-cni-uninstall.yaml");
    assert_eq!(u.daemon_sets.len(), 1);
}

#[test]
fn namespace_allows_privileged_pods_and_everything_lives_in_it() {
    let d = docs("ambient-cni.yaml");
    let ns = &d.namespaces[0];
    assert_eq!(ns.metadata.name.as_deref(), Some(NS));
    let labels = ns.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "privileged");
    let namespaced = d
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(d.roles.iter().map(|o| &o.metadata))
        .chain(d.role_bindings.iter().map(|o| &o.metadata))
        .chain(d.config_maps.iter().map(|o| &o.metadata))
        .chain(d.daemon_sets.iter().map(|o| &o.metadata));
    for m in namespaced {
        assert_eq!(m.namespace.as_deref(), Some(NS), "{:?}", m.name);
    }
}

#[test]
fn rbac_reads_pods_namespaces_nodes_and_binds_our_service_account() {
    let d = docs("ambient-cni.yaml");
    let rules = d.cluster_roles[0].rules.as_ref().unwrap();
    for res in ["pods", "namespaces", "nodes"] {
        let rule = rules
            .iter()
            .find(|r| r.resources.iter().flatten().any(|x| x == res))
            .unwrap_or_else(|| panic!("no rule for {res}"));
        assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
        assert_eq!(rule.verbs, ["get", "list", "watch"], "{res}: read-only");
    }
    let all_verbs: Vec<_> = rules.iter().flat_map(|r| r.verbs.iter()).collect();
    assert!(all_verbs
        .iter()
        .all(|v| ["get", "list", "watch"].contains(&v.as_str())));

    let sa = d.service_accounts[0].metadata.name.clone().unwrap();
    let crb = &d.cluster_role_bindings[0];
    assert_eq!(crb.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&crb.role_ref.name),
        d.cluster_roles[0].metadata.name.as_ref()
    );
    let s = &crb.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
        ("ServiceAccount", sa.as_str(), Some(NS))
    );

    let role_rule = &d.roles[0].rules.as_ref().unwrap()[0];
    assert_eq!(
        role_rule.resources.as_deref(),
        Some(&["daemonsets".to_owned()][..])
    );
    assert_eq!(
        role_rule.resource_names.as_deref(),
        Some(&["ambient-cni-node".to_owned()][..])
    );
    assert_eq!(role_rule.verbs, ["get"]);
    assert_eq!(
        d.daemon_sets[0].metadata.name.as_deref(),
        Some("ambient-cni-node")
    );
    let pod = pod_spec(&d.daemon_sets[0]);
    assert_eq!(pod.service_account_name.as_deref(), Some(sa.as_str()));
}

#[test]
fn config_map_feeds_both_containers() {
    let d = docs("ambient-cni.yaml");
    let cm = &d.config_maps[0];
    let data = cm.data.as_ref().unwrap();
    assert!(data.contains_key("AMBIENT_CNI_PLUGIN_TIMEOUT_MS"));
    assert!(
        data.keys()
            .all(|k| k.chars().all(|c| c.is_ascii_uppercase() || c == '_')),
        "env-var names"
    );
    let pod = pod_spec(&d.daemon_sets[0]);
    for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
        let from = c.env_from.as_ref().unwrap();
        assert_eq!(
            from[0].config_map_ref.as_ref().unwrap().name,
            cm.metadata.name.clone().unwrap(),
            "{}",
            c.name
        );
    }
}

#[test]
fn daemonset_runs_on_every_node_on_the_host_network() {
    let d = docs("ambient-cni.yaml");
    let ds = &d.daemon_sets[0];
    let spec = ds.spec.as_ref().unwrap();
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy.rolling_update.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(1))
    );
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
        assert_eq!(labels.get(k), Some(v), "selector matches the template");
    }
    let pod = pod_spec(ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );
    volumes_consistent(pod);
}

#[test]
fn installer_sidecar_mounts_the_cni_dirs_and_gates_the_daemon() {
    let d = docs("ambient-cni.yaml");
    let pod = pod_spec(&d.daemon_sets[0]);
    let inst = container(pod.init_containers.as_ref(), "install-cni");
    assert_eq!(
        inst.restart_policy.as_deref(),
        Some("Always"),
        "native sidecar: keeps watching"
    );
    assert_eq!(
        inst.command.as_deref().unwrap(),
        ["ambient-cnid", "install", "--watch"]
    );

    let bin = mount(inst, "/host/opt/cni/bin");
    let net = mount(inst, "/host/etc/cni/net.d");
    assert_ne!(bin.read_only, Some(true));
    assert_ne!(net.read_only, Some(true));
    assert_eq!(host_path_of(pod, bin), "/opt/cni/bin");
    assert_eq!(host_path_of(pod, net), "/etc/cni/net.d");
    assert_eq!(env(inst, "AMBIENT_CNI_BIN_DIRS"), bin.mount_path);
    assert_eq!(env(inst, "AMBIENT_CNI_CONF_DIR"), net.mount_path);
    assert_eq!(env(inst, "AMBIENT_CNI_SOCKET"), SOCKET);

    assert_eq!(
        exec(inst.startup_probe.as_ref()),
        ["ambient-cnid", "install", "--check"]
    );
    assert_eq!(
        exec(inst.readiness_probe.as_ref()),
        ["ambient-cnid", "install", "--check"]
    );
    let startup = inst.startup_probe.as_ref().unwrap();
    let budget = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
    assert!(
        budget >= 300,
        "a fresh node may wait minutes for its primary CNI: {budget}s"
    );

    let sc = inst.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let (drop, add) = caps(inst);
    assert_eq!(drop, ["ALL"]);
    assert_eq!(add, ["CHOWN", "DAC_OVERRIDE", "FOWNER"]);
    assert_eq!(
        sc.se_linux_options.as_ref().unwrap().type_.as_deref(),
        Some("spc_t")
    );
    passes_escalation_rule(inst);
}

#[test]
fn daemon_has_the_netns_propagation_socket_dir_and_capabilities() {
    let d = docs("ambient-cni.yaml");
    let pod = pod_spec(&d.daemon_sets[0]);
    let cnid = container(Some(&pod.containers), "ambient-cnid");

    let netns = mount(cnid, "/var/run/netns");
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(host_path_of(pod, netns), "/var/run/netns");

    // The plugin on the host dials the socket path from its entry: same path on both sides.
    let run = mount(cnid, "/run/ambient-cni");
    assert_eq!(host_path_of(pod, run), "/run/ambient-cni");
    assert!(SOCKET.starts_with(&format!("{}/", run.mount_path)));
    let args = cnid.args.as_ref().unwrap();
    assert!(args.contains(&format!("--socket={SOCKET}")), "{args:?}");
    assert_eq!(cnid.command.as_deref().unwrap(), ["ambient-cnid", "run"]);

    let xt = mount(cnid, "/run/xtables.lock");
    assert_eq!(
        host_paths(pod)[&xt.name],
        ("/run/xtables.lock".to_owned(), "FileOrCreate".to_owned())
    );
    let proc_ = mount(cnid, "/host/proc");
    assert_eq!(proc_.read_only, Some(true));
    assert_eq!(host_path_of(pod, proc_), "/proc");
    assert_eq!(env(cnid, "AMBIENT_CNI_HOST_PROC"), "/host/proc");

    assert_eq!(
        exec(cnid.readiness_probe.as_ref()),
        ["ambient-cnid", "status", "--socket", SOCKET]
    );

    let sc = cnid.security_context.as_ref().unwrap();
    assert_ne!(
        sc.privileged,
        Some(true),
        "capabilities instead of privileged"
    );
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let (drop, add) = caps(cnid);
    assert_eq!(drop, ["ALL"]);
    assert_eq!(
        add,
        [
            "NET_ADMIN",
            "NET_RAW",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "DAC_OVERRIDE"
        ]
    );
    assert_eq!(
        sc.se_linux_options.as_ref().unwrap().type_.as_deref(),
        Some("spc_t")
    );
    assert_eq!(sc.app_armor_profile.as_ref().unwrap().type_, "Unconfined");
    passes_escalation_rule(cnid);

    // The daemon never needs the CNI dirs; only the installer writes there.
    for m in cnid.volume_mounts.iter().flatten() {
        assert!(!["/opt/cni/bin", "/etc/cni/net.d"].contains(&host_path_of(pod, m).as_str()));
    }
}

#[test]
fn uninstall_daemonset_touches_the_cni_dirs_and_cleans_the_kernel() {
    let u = docs("ambient-cni-uninstall.yaml");
    let ds = &u.daemon_sets[0];
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let pod = pod_spec(ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert!(pod
        .tolerations
        .as_ref()
        .unwrap()
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists")));
    let un = container(pod.init_containers.as_ref(), "uninstall-cni");
    assert_eq!(un.restart_policy, None, "a plain init container: runs once");
    assert_eq!(
        un.command.as_deref().unwrap(),
        ["ambient-cnid", "uninstall"]
    );
    assert_eq!(
        host_path_of(pod, mount(un, "/host/etc/cni/net.d")),
        "/etc/cni/net.d"
    );
    assert_eq!(
        host_path_of(pod, mount(un, "/host/opt/cni/bin")),
        "/opt/cni/bin"
    );
    assert_eq!(env(un, "AMBIENT_CNI_CONF_DIR"), "/host/etc/cni/net.d");
    passes_escalation_rule(un);
    // Then the kernel objects go, in the node's netns, from the daemon's state on the host: no
    // enrolled pod's TCP stays held closed after uninstall.
    let inits: Vec<&str> = pod
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        inits,
        ["uninstall-cni", "cleanup-kernel"],
        "entry first, then the kernel"
    );
    let cl = container(pod.init_containers.as_ref(), "cleanup-kernel");
    assert_eq!(
        cl.command.as_deref().unwrap(),
        [
            "ambient-cnid",
            "cleanup",
            "--state-dir",
            "/run/ambient-cni/state"
        ]
    );
    assert_eq!(
        host_path_of(pod, mount(cl, "/run/ambient-cni")),
        "/run/ambient-cni"
    );
    assert_eq!(
        host_path_of(pod, mount(cl, "/var/run/netns")),
        "/var/run/netns"
    );
    assert_eq!(host_path_of(pod, mount(cl, "/host/proc")), "/proc");
    assert!(caps(cl).1.contains(&"NET_ADMIN".to_string()));
    passes_escalation_rule(cl);
    let pause = container(Some(&pod.containers), "pause");
    assert!(pause.volume_mounts.is_none());
    assert_eq!(caps(pause).1, Vec::<String>::new());
    passes_escalation_rule(pause);
    volumes_consistent(pod);
}
