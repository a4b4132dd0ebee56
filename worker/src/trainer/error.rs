//! What can end a training run, and which of those only end its world.

use super::caption_audit::AuditError;
use super::caption_feed::FeedError;
use super::checkpoint::CheckpointError;
use super::gradient_sync::SyncError;
use super::text::TextError;
use crate::diffusion::ScheduleError;
use crate::ema::EmaError;
use crate::optim::OptimError;
use crate::pipeline::UNetError;
use crate::vsd::ScoreNetworkError;
use swiftbrush_proto::run_store::RunStoreError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("teacher {teacher}: {source}")]
    Teacher {
        teacher: String,
        #[source]
        source: ScoreNetworkError,
    },
    /// Restoring the fake score (a checkpoint's adapters or UNet copy).
    #[error(transparent)]
    ScoreNetwork(#[from] ScoreNetworkError),
    /// Restoring the student's weights.
    #[error(transparent)]
    UNet(#[from] UNetError),
    #[error(transparent)]
    Folder(#[from] crate::pipeline::FolderError),
    #[error(transparent)]
    Fingerprint(#[from] crate::pipeline::FingerprintError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Store(#[from] RunStoreError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Ema(#[from] EmaError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A world asked for the initial state (resume step 0) after this
    /// trainer trained: the caller builds a fresh trainer.
    #[error("the initial state is gone (this trainer has trained); build a fresh one")]
    InitialStateGone,
    #[error(
        "checkpoint step {step} in {run_dir} was distilled from another teacher \
         (fingerprint {found}, this teacher is {expected}); use a new run directory \
         or the teacher it was trained from"
    )]
    TeacherMismatch {
        step: u64,
        run_dir: String,
        found: String,
        expected: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Step(#[from] crate::vsd::VsdError),
}

impl TrainError {
    /// Whether the error means the world is gone rather than the run
    /// failed: a collective or the coordinator's caption stream broke.
    pub fn breaks_world(&self) -> bool {
        matches!(
            self,
            Self::Sync(_) | Self::Feed(FeedError::WorldGone { .. })
        )
    }
}
