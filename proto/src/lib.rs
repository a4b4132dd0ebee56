//! Contracts between swiftbrush processes: the job-config schema that the
//! CLI, the coordinator and every worker parse alike, the run-directory store
//! (checkpoints and run files) that they read and write alike, the
//! coordinator's gRPC API (`rpc`), and which captions each step and rank
//! trains on (`caption_ledger`, over the files `caption_source` reads), so
//! that a worker and the coordinator agree without sharing more code.

pub mod caption_ledger;
pub mod caption_source;
pub mod config;
mod config_changes;
mod config_error;
mod config_moved;
mod config_validate;
mod error_line;
pub mod mix;
pub mod rpc;
pub mod run_store;

pub use config::JobConfig;
pub use config_changes::ConfigChange;
pub use config_error::{ConfigError, Problem};
pub use error_line::error_line;
