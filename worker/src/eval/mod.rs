//! Judging a model's pictures as the paper's table does (shared/SPEC.md,
//! "Numbers to compare against"): CLIP score (how well each picture
//! matches its prompt, by a CLIP model the user points at) and FID (how
//! the pictures' Inception features compare with a reference set's), and
//! the networks that judge: transformers' `CLIPModel` (`clip_model`, its
//! text tower the SD text encoder of `models::clip`) and FID's Inception-v3
//! (`inception`).

pub mod clip_image;
pub mod clip_model;
pub mod clip_score;
pub mod fid;
pub mod inception;

use std::path::PathBuf;

use crate::models::ModelError;
use crate::models::tokenizer::TokenizerError;
use crate::sample::SampleError;

pub use clip_image::ClipImageProcessor;
pub use clip_score::{ClipScoreReport, ClipScorer, clip_score};
pub use fid::{FeatureStats, FidNetwork, FidReport, FidRequest, fid, frechet_distance};

/// The causes are part of each message (not a `source` chain, which the
/// command line would print twice).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("CLIP model {dir}: {cause}")]
    Clip { dir: PathBuf, cause: ModelError },
    #[error("CLIP model {dir}: {cause}")]
    Tokenizer { dir: PathBuf, cause: TokenizerError },
    #[error("FID Inception weights {path}: {cause}")]
    Inception { path: PathBuf, cause: ModelError },
    #[error("FID Inception weights {path}: {reason}")]
    InceptionFormat { path: PathBuf, reason: String },
    #[error("FID statistics {path}: {reason}")]
    Stats { path: PathBuf, reason: String },
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}
