//! Checkpoints, one folder. Files (safetensors unless noted): one per
//! [`TensorGroup`] and `state.json`. Tensors are copied to host bytes on
//! the training thread (that copy is the snapshot); the upload runs on a
//! background thread, one checkpoint in flight, and the manifest is written
//! last, so a checkpoint killed mid-write never exists for a resume. Who
//! writes the manifest is the job's [`CheckpointSink`]: the process itself,
//! or the coordinator. Which of the trainer's tensors go in, restore and
//! the loop's checkpoint step are the trainer's (`trainer/save_restore.rs`).
//!
//! | file | owns |
//! |---|---|
//! | `checkpointer.rs` | the trainer's component: [`Resume`], cadence, the uploader, the steps written and committed, the stall time |
//! | `format.rs` | the files: [`TensorGroup`], [`TrainState`], [`Snapshot`], reading a committed checkpoint back |
//! | `upload.rs` | the upload thread ([`Uploader`]), the sinks ([`CheckpointSink`], [`CommitToStore`]) and the writer they finish |
//! | `tensor_bytes.rs` | named tensors to and from safetensors bytes in memory |

mod checkpointer;
mod format;
pub mod tensor_bytes;
mod upload;

use swiftbrush_proto::run_store::RunStoreError;

pub use checkpointer::{Checkpointer, Resume, every_and_last};
pub use format::{CONFIG, Restored, STATE, Snapshot, TensorGroup, TrainState, read_checkpoint};
use tensor_bytes::TensorBytesError;
pub use upload::{CheckpointSink, CheckpointWriter, CommitToStore, Landing, Uploader};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] RunStoreError),
    #[error(transparent)]
    Tensors(#[from] TensorBytesError),
    #[error("checkpoint step {step}: {file} is not valid: {reason}")]
    BadFile {
        step: u64,
        file: String,
        reason: String,
    },
    #[error("the checkpoint uploader stopped: {0}")]
    UploaderGone(String),
    #[error("reporting checkpoint step {step} to the coordinator: {reason}")]
    Report { step: u64, reason: String },
}
