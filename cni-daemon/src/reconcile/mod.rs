//! The reconciler: `desired` (pure) → `plan` against what was read back (pure) → `apply`.
//!
//! Full reconciles (start-up, ztunnel changes, the periodic resync) read every object of ours back
//! from the kernel and apply only the difference. A pod ADD/DEL applies just that pod's slice
//! ([`plan::pod_ops`]) with idempotent operations, so its cost does not grow with the node's pods;
//! the periodic resync then verifies it like everything else.

pub mod apply;
pub mod desired;
pub mod plan;

pub use apply::{apply, observe, ApplyReport};
pub use desired::{desired, Desired, Ztunnel};
pub use plan::{plan, pod_ops, Observed, Op};
