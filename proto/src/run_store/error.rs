//! The run store's error type: every variant names the run directory (or the
//! URL or path the user gave) so a message alone says where things went wrong.

use std::path::PathBuf;

pub type Result<T, E = RunStoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RunStoreError {
    #[error("run directory {url:?} is not a valid URL: {reason}")]
    InvalidUrl { url: String, reason: String },

    #[error(
        "run directory {url:?}: unsupported scheme {scheme:?}; expected a local path, \
         file://, s3://, gs:// or memory://"
    )]
    UnsupportedScheme { url: String, scheme: String },

    #[error("run directory {}: cannot create or write it: {source}", path.display())]
    LocalDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("run directory {url}: cannot set up the object store: {source}")]
    Configure {
        url: String,
        #[source]
        source: Box<object_store::Error>,
    },

    /// A storage operation failed (network, permissions, ...).
    #[error("run directory {run}: {op} {location} failed: {source}")]
    Store {
        run: String,
        op: &'static str,
        location: String,
        // Boxed: object_store's error is large and every Result carries its size.
        #[source]
        source: Box<object_store::Error>,
    },

    /// Another writer committed this step first: the conditional create of
    /// the manifest lost the race. The caller's files are orphans that
    /// retention removes.
    #[error(
        "run directory {run}: checkpoint step {step} is already committed (lost the race to another writer)"
    )]
    AlreadyCommitted { run: String, step: u64 },

    /// A writer from an older generation tried to commit after a newer
    /// generation had committed; stale generations cannot commit anything.
    #[error(
        "run directory {run}: checkpoint step {step} from generation {generation} is stale: \
         generation {newer_generation} already committed step {newer_step}"
    )]
    StaleGeneration {
        run: String,
        step: u64,
        generation: u64,
        newer_generation: u64,
        newer_step: u64,
    },

    /// Another job holds the run directory's lease: two jobs must never
    /// write one run directory.
    #[error(
        "run directory {run} is in use by another job: {holder}. Two jobs must not write one \
         run directory: wait for that job to end, use another run directory, or, if that job is \
         gone (it crashed and its lease has not expired yet), start this one with --take-over"
    )]
    LeaseHeld {
        run: String,
        holder: Box<super::lease::LeaseHolder>,
    },

    /// Another job took this job's lease (`--take-over`, or after this one
    /// failed to renew it in time): this job must stop writing.
    #[error(
        "run directory {run}: this job's lease on it was taken over by {holder}; this job stops \
         so that two jobs never write one run directory"
    )]
    LeaseLost {
        run: String,
        holder: Box<super::lease::LeaseHolder>,
    },

    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },

    #[error("checkpoint step {step}: {problem}")]
    InvalidWrite { step: u64, problem: String },

    #[error("run directory {run}: no valid checkpoint at step {step}; valid steps: {}", steps(.valid))]
    NoSuchCheckpoint {
        run: String,
        step: u64,
        valid: Vec<u64>,
    },

    #[error("run directory {run}: no valid checkpoint to resume from")]
    NoCheckpoint { run: String },

    #[error("run directory {run}: checkpoint step {step} has no file {name:?}; it holds {}", .available.join(", "))]
    NoSuchFile {
        run: String,
        step: u64,
        name: String,
        available: Vec<String>,
    },

    /// The checkpoint's manifest exists but the data does not match it.
    #[error("run directory {run}: checkpoint step {step} is invalid: {problem}")]
    InvalidCheckpoint {
        run: String,
        step: u64,
        problem: String,
    },

    #[error("run directory {run}: {location} is not valid JSON for this type: {source}")]
    Json {
        run: String,
        location: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("retention must keep at least one checkpoint (keep_last = 0)")]
    InvalidRetention,

    #[error(
        "the blocking RunStore API was called on an async runtime thread; use AsyncRunStore there"
    )]
    BlockingInAsync,

    #[error("cannot start the run store's I/O runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl RunStoreError {
    /// True when a conditional write lost to a concurrent writer: the caller
    /// should not retry the same commit.
    pub fn is_lost_race(&self) -> bool {
        matches!(self, Self::AlreadyCommitted { .. })
    }

    /// True when this job no longer holds the run directory's lease.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::LeaseLost { .. })
    }
}

fn steps(valid: &[u64]) -> String {
    if valid.is_empty() {
        "none".to_owned()
    } else {
        valid
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}
