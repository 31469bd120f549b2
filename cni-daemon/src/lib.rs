//! ambient-cnid: the node daemon of ambient-cni.
//!
//! Pods arrive from the CNI plugin over gRPC; the daemon keeps a registry of them, computes the
//! kernel state the node needs (a pure function of pods, ztunnel and config), reads back what the
//! kernel has, and applies the difference through the [`dataplane::Dataplane`] seam.
#![deny(clippy::unwrap_used)]

pub mod admin;
pub mod cleanup;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod dataplane;
pub mod events;
pub mod explain;
#[cfg(any(test, feature = "fake-api"))]
#[cfg(feature = "kube")]
pub mod fake_api;
pub mod install_cmd;
#[cfg(feature = "kube")]
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod registry;
pub mod server;
pub mod store;
