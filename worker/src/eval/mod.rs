//! Judging a model's pictures: CLIP score (how well each picture matches its
//! prompt, by a CLIP model the user points at), as the paper's table
//! reports it (shared/SPEC.md, "Numbers to compare against").

pub mod clip_image;
pub mod clip_score;

pub use clip_image::ClipImageProcessor;
pub use clip_score::{ClipScoreReport, ClipScorer, EvalError, clip_score};
