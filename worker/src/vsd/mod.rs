//! SwiftBrush's variational score distillation (shared/SPEC.md, "One
//! training iteration"), one rank's view:
//!
//! | file | owns |
//! |---|---|
//! | `step.rs` | [`VsdStep`]: steps 1-6 as a function of the draws, both losses, both backwards |
//! | `scores.rs` | [`Scores`]: the real and the fake score the gradient compares |
//! | `score_networks.rs` | the networks that answer them: [`TeacherUNet`] (teacher + LoRA), [`FullFakeScore`] (DMD2), [`ScorePair`] (either) |
//! | `student.rs` | [`Student`]: a full copy of the teacher, or LoRA adapters on the teacher's base ([`StudentNet`]: its pass) |
//! | `draws.rs` | every random draw of a step, a function of (seed, step, sample index) |
//! | `few_step.rs` | a few-step student's iteration: DMD2's backward simulation before steps 2-6 |
//! | `micro_batch.rs` | gradient accumulation over a rank's batch |
//! | `recompute.rs` | `train.gradient_checkpointing`: the student's and the fake score's activations recomputed a few rows at a time |
//!
//! Precision: the score passes (real and fake) run under the configured
//! autocast (`VsdConfig::teacher_autocast`, see precision.rs) and each of
//! their outputs is cast to float32 before it leaves the autocast region;
//! the student pass runs in float32, or under the same autocast with
//! `precision.student_autocast` (`VsdConfig::student_autocast`, one place:
//! [`VsdStep::student_x0`]), its output cast to float32 before the x0
//! formula. The schedule, guidance, the VSD gradient and both losses are
//! float32. With fp16 loss scaling the trainer gives the step
//! [`LossScales`]: each loss is multiplied by its scale before its
//! backward (trainer/grad_scaler.rs unscales).

mod draws;
mod few_step;
mod micro_batch;
mod recompute;
mod score_networks;
mod scores;
mod step;
mod student;

use tch::{TchError, Tensor};

pub use draws::{ChainDraws, DrawKey, DrawSpec, Draws, FakeScoreDraws, RankSlice, with_generator};
pub use score_networks::{FullFakeScore, ScoreNetworkError, ScorePair, TeacherUNet};
pub use scores::{FakeScore, Scores};
pub use step::{DeviceLosses, DeviceStepOutput, StepOutput, VsdStep};
pub use student::{Student, StudentNet};
pub use swiftbrush_proto::config::VsdWeighting;

use crate::diffusion::{OneStepDraw, PredictionType, ScheduleError, StudentChain};
use crate::torch::precision::AutocastPlan;

/// The method's constants for one step.
#[derive(Debug, Clone)]
pub struct VsdConfig {
    pub student_timestep: i64,
    /// A in x0_hat = (z - sqrt(1 - A) eps) / sqrt(A).
    pub student_alpha_bar: f64,
    pub guidance_scale: f64,
    pub weighting: VsdWeighting,
    /// Autocast for the score passes (None: as stored, inputs cast to the
    /// teacher's dtype). Build it with `precision::teacher_autocast`.
    pub teacher_autocast: Option<AutocastPlan>,
    /// Autocast for the student's forward (and so its backward), None:
    /// float32 (`precision.student_autocast`; the teacher's plan when on).
    pub student_autocast: Option<AutocastPlan>,
    /// Step 3 runs the teacher and the LoRA teacher as one pass of twice
    /// the rows (`Scores::both`) instead of two (`train.score_passes`).
    pub one_score_pass: bool,
    /// `train.gradient_checkpointing`: Some(rows) recomputes the student's
    /// pass with gradients, and runs the fake score's loss, `rows` rows at
    /// a time (recompute.rs); None keeps the student's graph for the whole
    /// micro-batch.
    pub recompute_rows: Option<u32>,
    /// A few-step student (`method.student_timesteps` of K > 1 steps):
    /// its chain, trained by backward simulation (few_step.rs). None: the
    /// one-step student on the plain path.
    pub few_step: Option<StudentChain>,
}

impl VsdConfig {
    /// The student's one-step draw for a UNet whose output means
    /// `prediction`.
    pub fn one_step(&self, prediction: PredictionType) -> OneStepDraw {
        OneStepDraw {
            timestep: self.student_timestep,
            alpha_bar: self.student_alpha_bar,
            prediction,
        }
    }
}

/// What each loss is multiplied by before its backward (fp16 dynamic loss
/// scaling, powers of two, so the scaled gradients are exactly the
/// unscaled ones times the scale unless they overflow).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScales {
    /// The VSD loss (the student's gradients).
    pub student: f64,
    /// The fake score's denoising loss (its gradients).
    pub fake_score: f64,
}

/// Text conditions of one batch, computed once and shared by all passes.
pub struct Conditions {
    /// [B,77,D]
    pub cond: Tensor,
    /// The empty prompt's encoding [1,77,D] (not zeros).
    pub uncond: Tensor,
}

impl Conditions {
    /// Rows `start..start + len` of the captions' encodings (one
    /// micro-batch); the null condition is shared.
    pub fn rows(&self, start: i64, len: i64) -> Conditions {
        Conditions {
            cond: self.cond.narrow(0, start, len),
            uncond: self.uncond.shallow_clone(),
        }
    }
}

/// Both losses of a step, read back to the host (float32 losses, summed
/// over micro-batches in float64).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VsdLosses {
    pub vsd: f64,
    /// The fake score's denoising loss (SPEC step 6).
    pub fake_score: f64,
}

impl VsdLosses {
    pub fn all_finite(&self) -> bool {
        self.vsd.is_finite() && self.fake_score.is_finite()
    }
}

/// A step that could not run: a tensor op failed (a shape or device
/// mismatch, out of memory) or a timestep is outside the schedule.
#[derive(Debug, thiserror::Error)]
pub enum VsdError {
    #[error("the VSD step failed: {0}")]
    Torch(#[from] TchError),
    #[error("the VSD step failed: {0}")]
    Schedule(#[from] ScheduleError),
    #[error("the VSD step was given an empty batch")]
    EmptyBatch,
    #[error("the VSD step cannot run: {0}")]
    Unsupported(String),
}
