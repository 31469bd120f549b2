//! CNI errors: the spec's codes, ours above 100, and the JSON document a runtime reads on failure.

use serde_json::{json, Value};

/// Spec: the config's `cniVersion` is not one we speak (or missing), or the verb does not exist
/// in that version (CHECK before 0.4.0, GC/STATUS before 1.1.0).
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// Spec: a field we know carries a value we do not support (message names key and value).
pub const UNSUPPORTED_FIELD: u32 = 2;
/// Spec: a CNI_* environment variable is missing or invalid (message names it).
pub const INVALID_ENV: u32 = 4;
/// Spec: stdin could not be decoded (not JSON, not an object, too large).
pub const DECODE: u32 = 6;
/// Spec: the config decodes but is invalid (wrong types for our keys, missing prevResult on ADD).
pub const INVALID_CONFIG: u32 = 7;
/// Spec: try again later. Ours: the daemon is unreachable or missed the deadline.
pub const TRY_AGAIN: u32 = 11;
/// Spec (STATUS): the plugin cannot serve ADDs right now.
pub const NOT_AVAILABLE: u32 = 50;
/// Ours: the daemon answered and refused the request (policy, bad request, missing state).
pub const DAEMON_REFUSED: u32 = 100;
/// Ours: the daemon accepted the request but could not program the kernel.
pub const DAEMON_INTERNAL: u32 = 101;
/// Ours: a bug in the plugin itself (a caught panic). Never retried into success.
pub const PLUGIN_BUG: u32 = 102;

/// The `cniVersion` of an error when the config gave none we could read.
pub const FALLBACK_VERSION: &str = "1.0.0";

/// One CNI error: printed on stdout as JSON, exit status 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}: {details}")]
pub struct CniError {
    /// The CNI error code (spec 1–99, ours 100+).
    pub code: u32,
    /// A short, one-line message.
    pub msg: String,
    /// The cause, in more words.
    pub details: String,
}

impl CniError {
    /// An error with a code, message and details.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error document the spec defines, stamped with `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_shape_in_order() {
        let e = CniError::new(TRY_AGAIN, "daemon unreachable", "connect: No such file");
        let s = serde_json::to_string(&e.to_json("0.4.0")).unwrap_or_default();
        assert_eq!(
            s,
            r#"{"cniVersion":"0.4.0","code":11,"msg":"daemon unreachable","details":"connect: No such file"}"#
        );
    }

    #[test]
    fn display_carries_code_and_details() {
        let e = CniError::new(DECODE, "bad", "why");
        assert_eq!(e.to_string(), "CNI error 6: bad: why");
    }
}
