//! In-memory dataplane (filled in by the reconciler work).
