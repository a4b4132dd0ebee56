//! Contracts between swiftbrush processes. Today: the job-config schema that
//! the CLI, the coordinator and every worker parse alike.

pub mod config;
mod config_error;
mod config_validate;

pub use config::JobConfig;
pub use config_error::{ConfigError, Problem};
