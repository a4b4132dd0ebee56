//! The swiftbrush coordinator. It never links libtorch (it runs on CPU
//! nodes). `domain` is the pure core (job state machine, worker health,
//! world formation, checkpoint bookkeeping) and holds no RPC types; `app`
//! runs it with a clock, storage and the caption corpus; `grpc` and `http`
//! expose it; `serve` wires everything into one server. The caption ledger
//! and caption sources are pure modules the worker uses too; `cli` is the
//! command line both coordinator binaries share.

pub mod app;
pub mod caption_ledger;
pub mod caption_source;
pub mod cli;
pub mod domain;
pub mod grpc;
pub mod http;
mod serve;

pub use caption_ledger::{CaptionPlan, PlanError};
pub use serve::{
    DEFAULT_LISTEN, RunningCoordinator, ServeError, ServeOptions, TlsOptions, serve,
    shutdown_signal, start, start_with_clock,
};
