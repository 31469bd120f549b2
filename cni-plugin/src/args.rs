//! CNI_ARGS: `K=V;K=V` pairs from the runtime.
//!
//! Lenient on purpose (cni-contract.md §7): split on `;`, split each pair at the *first* `=`, skip
//! empty segments and segments without `=`, keys are case-sensitive, a repeated key's last value
//! wins, and unknown keys are never an error (unlike Go's `types.LoadArgs`). containerd and CRI-O
//! send `IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_INFRA_CONTAINER_ID=..;
//! K8S_POD_UID=..` in varying order.

/// The parsed pairs, in the order given (duplicates kept; [`CniArgs::get`] returns the last).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pairs: Vec<(String, String)>,
}

/// The Kubernetes identity of a pod, from `K8S_POD_*` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// `K8S_POD_NAMESPACE`, non-empty.
    pub namespace: String,
    /// `K8S_POD_NAME`, non-empty.
    pub name: String,
    /// `K8S_POD_UID`, may be empty.
    pub uid: String,
}

impl CniArgs {
    /// Parses a CNI_ARGS string. Never fails.
    pub fn parse(raw: &str) -> Self {
        let pairs = raw
            .split(';')
            .filter_map(|seg| seg.split_once('='))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        CniArgs { pairs }
    }

    /// The value of `key` (the last one if repeated).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All pairs in input order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// The pod's identity when both `K8S_POD_NAMESPACE` and `K8S_POD_NAME` are set and non-empty;
    /// `None` means "not a Kubernetes pod" (plain cnitool, podman, nerdctl).
    pub fn pod(&self) -> Option<PodIdentity> {
        let namespace = self.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty())?;
        let name = self.get("K8S_POD_NAME").filter(|v| !v.is_empty())?;
        Some(PodIdentity {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: self.get("K8S_POD_UID").unwrap_or_default().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn containerd_style_args_give_the_pod() {
        let a = CniArgs::parse(
            "K8S_POD_UID=u-1;IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=abc",
        );
        assert_eq!(
            a.pod(),
            Some(PodIdentity {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u-1".into()
            })
        );
        assert_eq!(a.get("IgnoreUnknown"), Some("1"));
    }

    #[test]
    fn value_splits_at_first_equals_only() {
        let a = CniArgs::parse("K8S_POD_NAME=a=b=c;X==");
        assert_eq!(a.get("K8S_POD_NAME"), Some("a=b=c"));
        assert_eq!(a.get("X"), Some("="));
    }

    #[test]
    fn empty_segments_and_bare_words_are_skipped() {
        let a = CniArgs::parse(";;A=1;;bare;=nokey;B=;");
        assert_eq!(
            a.pairs(),
            &[("A".into(), "1".into()), ("B".into(), String::new())]
        );
    }

    #[test]
    fn last_duplicate_wins_and_keys_are_case_sensitive() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;IgnoreUnknown=1;K8S_POD_NAME=a;k8s_pod_name=z;K8S_POD_NAME=b",
        );
        assert_eq!(a.get("K8S_POD_NAME"), Some("b"));
        assert_eq!(a.get("k8s_pod_name"), Some("z"));
    }

    #[test]
    fn missing_or_empty_k8s_keys_mean_no_pod() {
        assert_eq!(CniArgs::parse("").pod(), None);
        assert_eq!(CniArgs::parse("K8S_POD_NAME=p").pod(), None);
        assert_eq!(
            CniArgs::parse("K8S_POD_NAMESPACE=;K8S_POD_NAME=p").pod(),
            None
        );
        let p = CniArgs::parse("K8S_POD_NAMESPACE=n;K8S_POD_NAME=p").pod();
        assert_eq!(p.map(|p| p.uid), Some(String::new()));
    }

    proptest! {
        #[test]
        fn parser_never_panics(raw in ".*") {
            let a = CniArgs::parse(&raw);
            let _ = a.pod();
            for (k, _) in a.pairs() {
                prop_assert!(!k.is_empty());
                prop_assert!(!k.contains(';'));
                prop_assert!(!k.contains('='));
            }
        }

        #[test]
        fn format_then_parse_round_trips(
            pairs in proptest::collection::vec(("[A-Za-z_][A-Za-z0-9_]{0,8}", "[^;]{0,12}"), 0..8)
        ) {
            let raw = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";");
            let a = CniArgs::parse(&raw);
            prop_assert_eq!(a.pairs(), pairs.as_slice());
            for (k, _) in &pairs {
                let last = pairs.iter().rev().find(|(k2, _)| k2 == k).map(|(_, v)| v.as_str());
                prop_assert_eq!(a.get(k), last);
            }
        }
    }
}
