//! The run directory: everything a training run keeps in storage (local disk,
//! S3, GCS, or memory for tests), reached through `object_store`.
//!
//! Layout under the run directory:
//!
//! ```text
//! config.yaml, run.json, ...                      run files (put_run_file / put_json)
//! checkpoints/LATEST                              pointer to the newest committed step (a hint)
//! checkpoints/step-00001000/manifest.json         written last: commits the checkpoint
//! checkpoints/step-00001000/attempt-<id>/<name>   the checkpoint's files
//! lease/<sequence>.json                           who runs a job here (lease.rs)
//! ```
//!
//! A checkpoint exists only once its manifest exists and validates (every
//! listed file present with the listed size). The manifest is written with
//! `PutMode::Create`, so of two writers racing for one step exactly one wins;
//! each writer puts its files under its own `attempt-<id>` folder so that the
//! loser can never overwrite the winner's files. Resolution reads manifests,
//! never `LATEST`: the pointer is for people and tools and only moves forward.
//!
//! One job at a time writes a run directory: its coordinator holds the
//! run directory's lease (lease.rs) and renews it while the job runs.
//!
//! [`AsyncRunStore`] is the async core (the coordinator); [`RunStore`] wraps it
//! for synchronous callers (the trainer loop, whose uploader moves checkpoint
//! uploads off the training thread: `swiftbrush_worker::trainer::checkpoint`).

mod blocking;
mod commit;
mod error;
mod latest;
mod layout;
mod lease;
mod location;
mod manifest;
mod retention;
mod scan;
mod store;
mod writer;

pub use blocking::{CheckpointWriter, RunStore};
pub use error::{Result, RunStoreError};
pub use latest::LatestPointer;
pub use lease::{DEFAULT_LEASE_TTL, LeaseHolder, LeaseOptions, RunLease};
pub use location::{RunLocation, StoreOptions};
pub use manifest::{CheckpointMeta, FileEntry, MANIFEST_FORMAT_VERSION, Manifest};
pub use retention::RetentionReport;
pub use scan::{CheckpointInfo, CheckpointStatus};
pub use store::{AsyncRunStore, DEFAULT_UPLOAD_PART_SIZE, ResumeFrom, Verify};
pub use writer::{AsyncCheckpointWriter, StagedCheckpoint};
