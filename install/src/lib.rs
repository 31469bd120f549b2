//! Installer: copies the plugin onto the node and patches the CNI config (issue 7).
