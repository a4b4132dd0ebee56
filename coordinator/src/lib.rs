//! The swiftbrush coordinator's domain core. It never links libtorch (it runs
//! on CPU nodes) and holds no RPC types: the caption ledger now; the job
//! state machine, worker registry and checkpoint commits join it with the
//! distributed runtime.

pub mod caption_ledger;
pub mod caption_source;

pub use caption_ledger::{CaptionPlan, PlanError};
