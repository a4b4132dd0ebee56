//! Why the coordinator refused or failed a call: the core's refusals plus
//! what the shell adds (bad input, the job config, captions, storage). The
//! gRPC layer maps every variant to a status code in one match.

use swiftbrush_proto::ConfigError;
use swiftbrush_proto::run_store::RunStoreError;

use super::corpus::CorpusError;
use crate::domain::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A request field is missing, malformed or absurd.
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Captions(#[from] CorpusError),
    #[error(transparent)]
    Store(#[from] RunStoreError),
    /// A task the coordinator started did not finish (shutdown, a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn invalid(field: &'static str, why: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            why: why.into(),
        }
    }
}
