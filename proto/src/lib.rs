//! Contracts between swiftbrush processes: the job-config schema that the
//! CLI, the coordinator and every worker parse alike, the run-directory store
//! (checkpoints and run files) that they read and write alike, and the
//! coordinator's gRPC API (`rpc`).

pub mod config;
mod config_error;
mod config_validate;
pub mod rpc;
pub mod run_store;

pub use config::JobConfig;
pub use config_error::{ConfigError, Problem};
