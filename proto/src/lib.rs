//! Contracts between swiftbrush processes. Today: the job-config schema that
//! the CLI, the coordinator and every worker parse alike, and the run-directory
//! store (checkpoints and run files) that they read and write alike.

pub mod config;
mod config_error;
mod config_validate;
pub mod run_store;

pub use config::JobConfig;
pub use config_error::{ConfigError, Problem};
