//! The shapes32 toy world (shared/TOYWORLD.md), in which a CPU shows that
//! distillation works: the procedural data source ([`shapes`]), the
//! evaluator that judges whether an image matches its caption
//! ([`evaluator`]), and the toy teacher: its tokenizer ([`vocab`]), frozen
//! text encoder ([`text_encoder`]), pixel-space UNet and training
//! ([`teacher`]), written as a diffusers folder ([`export`]) and judged by
//! DDIM sampling ([`eval`]).

pub mod compare;
pub mod demo;
pub mod eval;
pub mod evaluator;
pub mod export;
pub mod init;
pub mod progress;
pub mod rng;
pub mod shapes;
pub mod teacher;
pub mod text_encoder;
pub mod vocab;

use std::path::PathBuf;

pub use evaluator::{Judgement, ToyReport, judge};
pub use shapes::{Background, Caption, ShapeBatch, ShapeColor, ShapeKind, ShapeParams};
pub use teacher::{
    DEFAULT_TOP_TIMESTEPS, TeacherSettings, TopTimesteps, TrainOutcome, train_teacher,
};

/// Sets libtorch's intra-op CPU threads. On a shared machine one thread
/// can be several times faster than more (no waiting on descheduled peers).
pub fn set_cpu_threads(n: i32) {
    tch::set_num_threads(n);
}

/// Errors of the toy world's commands, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum ToyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    #[error(transparent)]
    Weights(#[from] crate::models::weights::WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] crate::models::tokenizer::TokenizerError),
    #[error(transparent)]
    Schedule(#[from] crate::diffusion::ScheduleError),
    #[error(transparent)]
    UNet(#[from] crate::pipeline::UNetError),
    #[error(transparent)]
    Folder(#[from] crate::pipeline::FolderError),
    #[error(transparent)]
    Store(#[from] swiftbrush_proto::run_store::RunStoreError),
    #[error("checkpoint: {0}")]
    TensorBytes(#[from] crate::trainer::checkpoint::tensor_bytes::TensorBytesError),
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    #[error(transparent)]
    Ema(#[from] crate::ema::EmaError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// A model that cannot be sampled as a toy model, named.
    #[error("{0}")]
    Sample(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
    /// Settings that cannot train (batch size 0, ...), named.
    #[error("invalid toy teacher settings: {0}")]
    Settings(String),
    /// A resume that would not continue the same run.
    #[error("cannot resume in {dir}: {reason}")]
    Resume { dir: PathBuf, reason: String },
    /// The loss went NaN or infinite: the run stops rather than export garbage.
    #[error("training diverged at step {step}: loss {loss}")]
    Diverged { step: u64, loss: f64 },
}

impl ToyError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}
