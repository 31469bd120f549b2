//! Pure CNI config patching: bytes and `serde_json::Value`s in, `Value`s out, no I/O.
//!
//! The rules follow libcni (`ConfFromBytes` / `ConfListFromBytes`), because a file that libcni
//! rejects is one the runtime rejects too:
//! - a `.conflist` is an object with a string `name`, an optional string `cniVersion` and a
//!   non-empty `plugins` array of objects, each with a non-empty string `type`;
//! - a `.conf` or `.json` is one plugin object with a non-empty string `type`.
//!
//! `serde_json` is built with `preserve_order` (workspace), so keys keep the order the primary CNI
//! wrote them in; removals use `shift_remove` for the same reason.

use serde_json::{Map, Value};

/// The file extensions the runtimes load (containerd, CRI-O and libcni all use these three).
pub const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// Plugin types that mark a Multus meta-plugin config.
pub const MULTUS_TYPES: [&str; 2] = ["multus", "multus-shim"];

/// How a config file is read, decided by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    /// `.conf` or `.json`: one plugin object.
    Single,
    /// `.conflist`: a list with `plugins`.
    List,
}

/// Why a config file is not one we can patch. Wrapped with the path by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON at all (or truncated).
    #[error("not valid JSON: {0}")]
    Json(String),
    /// JSON, but not an object at the top.
    #[error("top level is not a JSON object")]
    NotObject,
    /// A `.conflist` without a string `name` (libcni rejects it).
    #[error("`name` is missing or not a string")]
    Name,
    /// `cniVersion` present but not a string.
    #[error("`cniVersion` is not a string")]
    CniVersion,
    /// A `.conflist` without `plugins`.
    #[error("`plugins` is missing")]
    MissingPlugins,
    /// A `.conflist` whose `plugins` is not an array.
    #[error("`plugins` is not an array (found {0})")]
    PluginsNotArray(&'static str),
    /// A `.conflist` with `plugins: []`.
    #[error("`plugins` is empty")]
    EmptyPlugins,
    /// `plugins[i]` is not an object.
    #[error("plugins[{0}] is not an object")]
    PluginNotObject(usize),
    /// `plugins[i]` (or the single plugin of a `.conf`, index 0) has no usable `type`.
    #[error("plugins[{0}] has no non-empty string `type`")]
    PluginType(usize),
    /// The config holds nothing but our own plugin: it is not a primary network.
    #[error("holds only the `{0}` plugin, no primary network")]
    OnlyOurs(String),
}

/// The extension-based kind of a file name, or `None` when the runtimes do not load it.
///
/// Our temp names never end in a config extension, so they are never candidates.
pub fn kind_of(file_name: &str) -> Option<ConfigKind> {
    let (stem, ext) = file_name.rsplit_once('.')?;
    if stem.is_empty() {
        // A bare ".conf": libcni would load it, but no CNI writes one; treat it as not ours to pick.
        return None;
    }
    match ext {
        "conflist" => Some(ConfigKind::List),
        "conf" | "json" => Some(ConfigKind::Single),
        _ => None,
    }
}

/// Sorts file names the way libcni's `ConfFiles` + `sort.Strings` do: by bytes.
pub fn sort_names(names: &mut [String]) {
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
}

/// The name of the `.conflist` that replaces a `.conf`/`.json` file.
pub fn conflist_name(single_file_name: &str) -> String {
    let stem = single_file_name
        .rsplit_once('.')
        .map_or(single_file_name, |(stem, _)| stem);
    format!("{stem}.conflist")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn plugin_type(plugin: &Map<String, Value>) -> Option<&str> {
    match plugin.get("type") {
        Some(Value::String(t)) if !t.is_empty() => Some(t),
        _ => None,
    }
}

fn is_ours(plugin: &Value, our_type: &str) -> bool {
    plugin
        .as_object()
        .and_then(plugin_type)
        .is_some_and(|t| t == our_type)
}

fn check_version(obj: &Map<String, Value>) -> Result<(), ConfigError> {
    match obj.get("cniVersion") {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(ConfigError::CniVersion),
    }
}

/// Checks the structure libcni requires (see the module doc).
pub fn validate(kind: ConfigKind, v: &Value) -> Result<(), ConfigError> {
    let obj = v.as_object().ok_or(ConfigError::NotObject)?;
    check_version(obj)?;
    match kind {
        ConfigKind::Single => {
            if let Some(name) = obj.get("name") {
                if !name.is_string() {
                    return Err(ConfigError::Name);
                }
            }
            plugin_type(obj).ok_or(ConfigError::PluginType(0))?;
        }
        ConfigKind::List => {
            if !obj.get("name").is_some_and(Value::is_string) {
                return Err(ConfigError::Name);
            }
            let plugins = plugins_of(obj)?;
            if plugins.is_empty() {
                return Err(ConfigError::EmptyPlugins);
            }
            for (i, p) in plugins.iter().enumerate() {
                let p = p.as_object().ok_or(ConfigError::PluginNotObject(i))?;
                plugin_type(p).ok_or(ConfigError::PluginType(i))?;
            }
        }
    }
    Ok(())
}

fn plugins_of(obj: &Map<String, Value>) -> Result<&Vec<Value>, ConfigError> {
    match obj.get("plugins") {
        None => Err(ConfigError::MissingPlugins),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(ConfigError::PluginsNotArray(type_name(other))),
    }
}

/// Parses and validates one config file's bytes.
pub fn parse(kind: ConfigKind, bytes: &[u8]) -> Result<Value, ConfigError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| ConfigError::Json(e.to_string()))?;
    validate(kind, &v)?;
    Ok(v)
}

/// Whether a valid config can serve as the primary network: it has a plugin that is not ours.
pub fn check_primary(kind: ConfigKind, v: &Value, our_type: &str) -> Result<(), ConfigError> {
    validate(kind, v)?;
    let has_other = match kind {
        ConfigKind::Single => !is_ours(v, our_type),
        ConfigKind::List => v
            .get("plugins")
            .and_then(Value::as_array)
            .is_some_and(|ps| ps.iter().any(|p| !is_ours(p, our_type))),
    };
    if has_other {
        Ok(())
    } else {
        Err(ConfigError::OnlyOurs(our_type.to_owned()))
    }
}

/// The Multus plugin type, if this config is a Multus meta-plugin config.
pub fn multus_type(kind: ConfigKind, v: &Value) -> Option<String> {
    let found = |t: &str| MULTUS_TYPES.contains(&t);
    let obj = v.as_object()?;
    match kind {
        ConfigKind::Single => plugin_type(obj).filter(|t| found(t)).map(str::to_owned),
        ConfigKind::List => obj
            .get("plugins")?
            .as_array()?
            .iter()
            .filter_map(|p| p.as_object().and_then(plugin_type))
            .find(|t| found(t))
            .map(str::to_owned),
    }
}

/// Whether a `.conflist` value contains a plugin of our type.
pub fn contains_ours(v: &Value, our_type: &str) -> bool {
    v.get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|ps| ps.iter().any(|p| is_ours(p, our_type)))
}

/// The patched config, always a conflist value:
/// - `List`: every plugin of our type removed, `entry` appended last; everything else untouched.
/// - `Single`: `{"cniVersion": <orig>, "name": <orig>, "plugins": [<orig minus both>, entry]}`.
///   `cniVersion` is carried only when present; `name` defaults to `""` the way libcni's
///   `ConfListFromConf` does, so the libcni cache key (`<name>-<cid>-<ifname>`) stays the same.
///
/// `entry` must carry a `type`; it should carry no `name`/`cniVersion` (the runtime injects them).
pub fn patch(
    kind: ConfigKind,
    orig: &Value,
    entry: &Map<String, Value>,
) -> Result<Value, ConfigError> {
    let our_type = plugin_type(entry).ok_or(ConfigError::PluginType(0))?;
    check_primary(kind, orig, our_type)?;
    let obj = orig.as_object().ok_or(ConfigError::NotObject)?;
    match kind {
        ConfigKind::List => {
            let mut out = obj.clone();
            let plugins = match out.get_mut("plugins") {
                Some(Value::Array(a)) => a,
                Some(other) => return Err(ConfigError::PluginsNotArray(type_name(other))),
                None => return Err(ConfigError::MissingPlugins),
            };
            plugins.retain(|p| !is_ours(p, our_type));
            plugins.push(Value::Object(entry.clone()));
            Ok(Value::Object(out))
        }
        ConfigKind::Single => {
            let mut plugin = obj.clone();
            let version = plugin.shift_remove("cniVersion");
            let name = plugin
                .shift_remove("name")
                .unwrap_or_else(|| Value::String(String::new()));
            let mut out = Map::new();
            if let Some(version) = version {
                out.insert("cniVersion".to_owned(), version);
            }
            out.insert("name".to_owned(), name);
            out.insert(
                "plugins".to_owned(),
                Value::Array(vec![Value::Object(plugin), Value::Object(entry.clone())]),
            );
            Ok(Value::Object(out))
        }
    }
}

/// The key of our entry that remembers the `cniVersion` the status-readiness option replaced,
/// so that turning the option off, or uninstalling, puts it back.
pub const READINESS_FROM_KEY: &str = "statusReadinessFrom";
/// The first `cniVersion` at which runtimes (containerd ≥ 2.0, CRI-O) ask plugins for STATUS.
pub const STATUS_CNI_VERSION: &str = "1.1.0";

/// `a < b` for dotted version numbers (`0.3.1` < `1.1.0`); anything unparsable is not lower.
fn version_lower(a: &str, b: &str) -> bool {
    let nums = |v: &str| -> Option<Vec<u64>> { v.split('.').map(|p| p.parse().ok()).collect() };
    match (nums(a), nums(b)) {
        (Some(x), Some(y)) => x < y,
        _ => false,
    }
}

/// Opt-in readiness through CNI STATUS, applied to a conflist that [`patch`] made from
/// `original`. With `on`, a conflist below 1.1.0 is raised to 1.1.0 (the runtime then asks every
/// plugin, ours included, for STATUS, and holds pod creation while ours says not ready), and our
/// entry records the version it had. The caller asserts that every plugin of the chain
/// implements 1.1.0: the installer cannot ask unknown plugins without running them. A conflist
/// already at 1.1.0 or later is left as it is (STATUS is asked anyway). Without `on`, a version
/// raised earlier is put back. Pure; applying it to its own output changes nothing.
pub fn status_readiness(original: &Value, patched: &mut Value, our_type: &str, on: bool) {
    let prior = original
        .get("plugins")
        .and_then(Value::as_array)
        .and_then(|ps| ps.iter().rev().find(|p| is_ours(p, our_type)))
        .and_then(|p| p.get(READINESS_FROM_KEY))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let current = original.get("cniVersion").and_then(Value::as_str);
    let Some(top) = patched.as_object_mut() else {
        return;
    };
    let from = if on {
        prior.or_else(|| {
            current
                .filter(|v| version_lower(v, STATUS_CNI_VERSION))
                .map(str::to_owned)
        })
    } else {
        if let Some(v) = prior {
            top.insert("cniVersion".into(), Value::String(v));
        }
        return;
    };
    let Some(from) = from else { return };
    top.insert(
        "cniVersion".into(),
        Value::String(STATUS_CNI_VERSION.into()),
    );
    if let Some(Value::Object(ours)) = top
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .and_then(|ps| ps.last_mut())
    {
        ours.insert(READINESS_FROM_KEY.into(), Value::String(from));
    }
}

/// The conflist with every plugin of `our_type` removed, or `None` when it has none.
///
/// Errors when removal would leave `plugins` empty (the file is not a primary network we patched).
pub fn unpatch(list: &Value, our_type: &str) -> Result<Option<Value>, ConfigError> {
    validate(ConfigKind::List, list)?;
    if !contains_ours(list, our_type) {
        return Ok(None);
    }
    let mut out = list.clone();
    let mut raised_from = None;
    if let Some(Value::Array(plugins)) = out.get_mut("plugins") {
        raised_from = plugins
            .iter()
            .filter(|p| is_ours(p, our_type))
            .find_map(|p| p.get(READINESS_FROM_KEY).cloned());
        plugins.retain(|p| !is_ours(p, our_type));
        if plugins.is_empty() {
            return Err(ConfigError::OnlyOurs(our_type.to_owned()));
        }
    }
    // A version raised for STATUS readiness goes back to what it was.
    if let (Some(v @ Value::String(_)), Some(top)) = (raised_from, out.as_object_mut()) {
        top.insert("cniVersion".into(), v);
    }
    Ok(Some(out))
}

/// The bytes we write: pretty JSON (2 spaces) and a final newline. Deterministic, so re-running
/// on our own output yields the same bytes.
pub fn to_bytes(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v)
        .expect("a serde_json::Value always serializes: string keys, no I/O into a Vec");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn entry() -> Map<String, Value> {
        json!({"type": "ambient-cni", "socket": "/run/ambient-cni/cni.sock"})
            .as_object()
            .unwrap()
            .clone()
    }

    fn ptp_list() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "kindnet",
            "plugins": [
                {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local",
                  "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}, "mtu": 1500},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ],
            "x-unknown": {"kept": [1, 2, 3]}
        })
    }

    #[test]
    fn kind_by_extension() {
        assert_eq!(kind_of("10-calico.conflist"), Some(ConfigKind::List));
        assert_eq!(kind_of("10-ptp.conf"), Some(ConfigKind::Single));
        assert_eq!(kind_of("99-x.json"), Some(ConfigKind::Single));
        assert_eq!(kind_of("10-calico.conflist.cilium_bak"), None);
        assert_eq!(kind_of(".10-calico.conflist.acni-tmp-1-2-3"), None);
        assert_eq!(kind_of("README"), None);
        assert_eq!(kind_of(".conf"), None);
    }

    #[test]
    fn names_sort_by_bytes() {
        let mut n = vec![
            "10-b.conf".to_owned(),
            "10-B.conf".to_owned(),
            "05-z.conflist".to_owned(),
            "10-b.conflist".to_owned(),
        ];
        sort_names(&mut n);
        assert_eq!(
            n,
            ["05-z.conflist", "10-B.conf", "10-b.conf", "10-b.conflist"]
        );
    }

    #[test]
    fn conflist_name_replaces_extension() {
        assert_eq!(conflist_name("10-ptp.conf"), "10-ptp.conflist");
        assert_eq!(conflist_name("10-a.b.json"), "10-a.b.conflist");
    }

    #[test]
    fn patch_appends_last_and_keeps_everything_else() {
        let orig = ptp_list();
        let out = patch(ConfigKind::List, &orig, &entry()).unwrap();
        let plugins = out["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2], Value::Object(entry()));
        assert_eq!(plugins[..2], orig["plugins"].as_array().unwrap()[..]);
        assert_eq!(out["name"], "kindnet");
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(out["x-unknown"], orig["x-unknown"]);
        let keys: Vec<_> = out.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["cniVersion", "name", "plugins", "x-unknown"]);
    }

    #[test]
    fn patch_moves_ours_from_the_middle_and_collapses_duplicates() {
        let orig = json!({"cniVersion": "0.3.1", "name": "n", "plugins": [
            {"type": "ambient-cni", "socket": "/old"},
            {"type": "bridge"},
            {"type": "ambient-cni"},
            {"type": "portmap"}
        ]});
        let out = patch(ConfigKind::List, &orig, &entry()).unwrap();
        assert_eq!(
            out["plugins"],
            json!([{"type": "bridge"}, {"type": "portmap"}, Value::Object(entry())])
        );
    }

    #[test]
    fn patch_single_conf_keeps_name_and_version() {
        let orig = json!({"cniVersion": "0.4.0", "name": "mynet", "type": "ptp", "ipMasq": true,
                          "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}});
        let out = patch(ConfigKind::Single, &orig, &entry()).unwrap();
        assert_eq!(
            out,
            json!({"cniVersion": "0.4.0", "name": "mynet", "plugins": [
                {"type": "ptp", "ipMasq": true, "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}},
                Value::Object(entry())
            ]})
        );
        let keys: Vec<_> = out["plugins"][0].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["type", "ipMasq", "ipam"]);
    }

    #[test]
    fn patch_single_without_name_uses_empty_name_like_libcni() {
        let out = patch(ConfigKind::Single, &json!({"type": "ptp"}), &entry()).unwrap();
        assert_eq!(
            out,
            json!({"name": "", "plugins": [{"type": "ptp"}, Value::Object(entry())]})
        );
    }

    #[test]
    fn invalid_shapes_are_rejected() {
        let e = entry();
        let cases = [
            (json!([1]), ConfigError::NotObject),
            (
                json!({"name": "n", "plugins": {"type": "ptp"}}),
                ConfigError::PluginsNotArray("an object"),
            ),
            (json!({"name": "n"}), ConfigError::MissingPlugins),
            (
                json!({"name": "n", "plugins": []}),
                ConfigError::EmptyPlugins,
            ),
            (json!({"plugins": [{"type": "ptp"}]}), ConfigError::Name),
            (
                json!({"name": "n", "cniVersion": 1, "plugins": [{"type": "ptp"}]}),
                ConfigError::CniVersion,
            ),
            (
                json!({"name": "n", "plugins": [{"type": "ptp"}, 3]}),
                ConfigError::PluginNotObject(1),
            ),
            (
                json!({"name": "n", "plugins": [{"type": ""}]}),
                ConfigError::PluginType(0),
            ),
            (
                json!({"name": "n", "plugins": [{"type": "ambient-cni"}]}),
                ConfigError::OnlyOurs("ambient-cni".into()),
            ),
        ];
        for (v, want) in cases {
            assert_eq!(patch(ConfigKind::List, &v, &e), Err(want), "{v}");
        }
        assert_eq!(
            patch(ConfigKind::Single, &json!({"name": "n"}), &e),
            Err(ConfigError::PluginType(0))
        );
        assert!(matches!(
            parse(ConfigKind::List, b"{\"name\": \"n\", \"plu"),
            Err(ConfigError::Json(_))
        ));
    }

    #[test]
    fn multus_is_detected() {
        let thick = json!({"cniVersion": "0.3.1", "name": "multus-cni-network", "type": "multus-shim",
                           "socketDir": "/run/multus/"});
        assert_eq!(
            multus_type(ConfigKind::Single, &thick).as_deref(),
            Some("multus-shim")
        );
        let list = json!({"name": "m", "plugins": [{"type": "multus", "delegates": []}]});
        assert_eq!(
            multus_type(ConfigKind::List, &list).as_deref(),
            Some("multus")
        );
        assert_eq!(multus_type(ConfigKind::List, &ptp_list()), None);
    }

    #[test]
    fn unpatch_removes_only_ours() {
        let orig = ptp_list();
        let patched = patch(ConfigKind::List, &orig, &entry()).unwrap();
        assert_eq!(
            unpatch(&patched, "ambient-cni").unwrap(),
            Some(orig.clone())
        );
        assert_eq!(unpatch(&orig, "ambient-cni").unwrap(), None);
        let only = json!({"name": "n", "plugins": [{"type": "ambient-cni"}]});
        assert!(unpatch(&only, "ambient-cni").is_err());
    }

    #[test]
    fn output_is_deterministic_and_newline_terminated() {
        let out = patch(ConfigKind::List, &ptp_list(), &entry()).unwrap();
        let b = to_bytes(&out);
        assert_eq!(b.last(), Some(&b'\n'));
        let again = parse(ConfigKind::List, &b).unwrap();
        assert_eq!(to_bytes(&again), b);
    }

    // ---- properties ----

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z0-9./:-]{0,12}".prop_map(Value::String),
        ]
    }

    fn any_json() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("[a-zA-Z_]{1,8}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn extra_keys() -> impl Strategy<Value = Map<String, Value>> {
        // Keys that cannot collide with the structural ones (those are set explicitly).
        prop::collection::vec(("x[a-zA-Z_]{0,8}", any_json()), 0..4)
            .prop_map(|kv| kv.into_iter().collect())
    }

    fn plugin() -> impl Strategy<Value = Value> {
        (
            prop_oneof![
                Just("ptp"),
                Just("bridge"),
                Just("portmap"),
                Just("calico"),
                Just("bandwidth"),
                Just("ambient-cni")
            ],
            extra_keys(),
        )
            .prop_map(|(t, mut extra)| {
                extra.insert("type".into(), json!(t));
                Value::Object(extra)
            })
    }

    fn conflist() -> impl Strategy<Value = Value> {
        (
            extra_keys(),
            prop::option::of("[0-9]\\.[0-9]\\.[0-9]"),
            "[a-z-]{0,10}",
            prop::collection::vec(plugin(), 1..6),
        )
            .prop_filter("needs a primary plugin", |(_, _, _, ps)| {
                ps.iter().any(|p| !is_ours(p, "ambient-cni"))
            })
            .prop_map(|(mut top, version, name, plugins)| {
                if let Some(v) = version {
                    top.insert("cniVersion".into(), json!(v));
                }
                top.insert("name".into(), json!(name));
                top.insert("plugins".into(), Value::Array(plugins));
                Value::Object(top)
            })
    }

    fn without_ours(v: &Value) -> Value {
        let mut v = v.clone();
        if let Some(Value::Array(ps)) = v.get_mut("plugins") {
            ps.retain(|p| !is_ours(p, "ambient-cni"));
        }
        v
    }

    proptest! {
        #[test]
        fn patch_is_idempotent(orig in conflist()) {
            let once = patch(ConfigKind::List, &orig, &entry()).unwrap();
            let twice = patch(ConfigKind::List, &once, &entry()).unwrap();
            prop_assert_eq!(&once, &twice);
            prop_assert_eq!(to_bytes(&once), to_bytes(&twice));
            let reparsed = parse(ConfigKind::List, &to_bytes(&once)).unwrap();
            prop_assert_eq!(to_bytes(&reparsed), to_bytes(&once));
        }

        #[test]
        fn ours_is_last_and_only_once(orig in conflist()) {
            let out = patch(ConfigKind::List, &orig, &entry()).unwrap();
            let ps = out["plugins"].as_array().unwrap();
            prop_assert_eq!(ps.iter().filter(|p| is_ours(p, "ambient-cni")).count(), 1);
            prop_assert_eq!(ps.last().unwrap(), &Value::Object(entry()));
        }

        #[test]
        fn unknown_keys_and_other_plugins_survive(orig in conflist()) {
            let out = patch(ConfigKind::List, &orig, &entry()).unwrap();
            let (o, p) = (orig.as_object().unwrap(), out.as_object().unwrap());
            prop_assert_eq!(o.keys().collect::<Vec<_>>(), p.keys().collect::<Vec<_>>());
            for (k, v) in o {
                if k != "plugins" {
                    prop_assert_eq!(Some(v), p.get(k));
                }
            }
            prop_assert_eq!(unpatch(&out, "ambient-cni").unwrap(), Some(without_ours(&orig)));
        }

        #[test]
        fn single_conf_round_trips(mut body in extra_keys(), t in "(ptp|bridge|macvlan)",
                                   version in prop::option::of("[01]\\.[0-9]\\.[0-9]"), name in "[a-z]{1,8}") {
            body.insert("type".into(), json!(t));
            let mut conf = Map::new();
            if let Some(v) = &version { conf.insert("cniVersion".into(), json!(v)); }
            conf.insert("name".into(), json!(name));
            conf.extend(body.clone());
            let out = patch(ConfigKind::Single, &Value::Object(conf), &entry()).unwrap();
            prop_assert_eq!(&out["name"], &json!(name));
            let want_version = version.map(|v| json!(v));
            prop_assert_eq!(out.get("cniVersion"), want_version.as_ref());
            let back = unpatch(&out, "ambient-cni").unwrap().unwrap();
            prop_assert_eq!(&back["plugins"], &json!([Value::Object(body)]));
            prop_assert_eq!(patch(ConfigKind::List, &out, &entry()).unwrap(), out);
        }

        #[test]
        fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(ConfigKind::List, &bytes);
            let _ = parse(ConfigKind::Single, &bytes);
        }

        #[test]
        fn patch_never_panics_on_any_json(v in any_json()) {
            let _ = patch(ConfigKind::List, &v, &entry());
            let _ = patch(ConfigKind::Single, &v, &entry());
            let _ = unpatch(&v, "ambient-cni");
        }
    }
}
