//! Installer errors. Every variant names the file or directory it is about.

use std::io;
use std::path::PathBuf;

use crate::conflist::ConfigError;

/// What went wrong while installing, uninstalling or watching.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A system call on `path` failed; `op` says which step ("create temp file in", "rename", …).
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The step that failed, phrased to precede the path.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// No file in the conf dir can serve as the primary network (fresh node, the primary CNI has
    /// not written its config yet, or every candidate is invalid). Retried by [`crate::install_wait`].
    #[error("no primary CNI config in {}: {detail}", dir.display())]
    NoPrimaryConfig {
        /// The conf dir searched.
        dir: PathBuf,
        /// Why: empty, missing, or the skipped files with their reasons.
        detail: String,
    },

    /// The selected (override) config is not something we can patch. The file is left untouched.
    #[error("invalid CNI config {}: {source}", path.display())]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ConfigError,
    },

    /// The primary config is a Multus meta-plugin config. Patching it would put our entry into
    /// Multus's own list instead of the pod network's, so we refuse.
    #[error(
        "{} is a Multus config (type {kind}); chaining ambient-cni behind Multus is not supported yet: \
         set the config override to the cluster-network file Multus delegates to, or run without Multus",
        path.display()
    )]
    Multus {
        /// The Multus config file.
        path: PathBuf,
        /// `multus` or `multus-shim`.
        kind: String,
    },

    /// Converting a `.conf` would overwrite a `.conflist` of the same stem that is not ours.
    #[error(
        "cannot convert {} to {}: that file exists and holds no ambient-cni entry (not written by us)",
        conf.display(),
        conflist.display()
    )]
    ConflistExists {
        /// The single-plugin config to convert.
        conf: PathBuf,
        /// The existing list config in the way.
        conflist: PathBuf,
    },

    /// The primary config is a symlink. Replacing it by rename would cut the link its owner
    /// maintains, so we refuse rather than patch a copy that goes stale.
    #[error("{} is a symlink; patching symlinked CNI configs is not supported", path.display())]
    Symlink {
        /// The symlink.
        path: PathBuf,
    },

    /// The [`crate::InstallConfig`] itself is unusable.
    #[error("invalid install config: {0}")]
    InvalidSettings(String),
}

impl InstallError {
    /// Whether waiting may fix it: the primary CNI may write its config later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, InstallError::NoPrimaryConfig { .. })
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| InstallError::Io { op, path, source }
    }
}
