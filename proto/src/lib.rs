//! The gRPC contract between `ambient-cni` (the CNI plugin) and `ambient-cnid` (the node daemon).
//!
//! The `.proto` is compiled at build time by protox, so no system `protoc` is needed.

pub mod h2wire;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ambientcni.v1");
}

/// The contract version a plugin sends and a daemon accepts. Bumped only for incompatible changes
/// in meaning; new fields alone do not bump it.
pub const CONTRACT_VERSION: u32 = 1;

/// The default path of the daemon's socket.
pub const DEFAULT_SOCKET: &str = "/run/ambient-cni/cni.sock";
