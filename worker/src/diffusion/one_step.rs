//! The student's one-step draw (shared/SPEC.md step 1 and "Inference"):
//! one pass at the student timestep on pure noise z, the output as epsilon,
//! x0_hat = (z - sqrt(1 - A) eps) / sqrt(A) with the run's constant A.
//! Training, its sample step and `sample --student` all draw through it.

use tch::{Kind, TchError, Tensor};

use super::schedule::{PredictionType, to_epsilon, to_x0};

/// A noise-prediction network (a UNet in any role).
pub trait Denoiser {
    /// The raw model output (float32) for latents `x` [B,C,h,w], one
    /// timestep per sample `t` [B], text condition `cond` [B,77,D].
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Result<Tensor, TchError>;
}

/// A borrowed denoiser is one (the step holds its student by value: a
/// UNet by reference, or a LoRA student's view of the shared base).
impl<D: Denoiser + ?Sized> Denoiser for &D {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Result<Tensor, TchError> {
        (**self).predict(x, t, cond)
    }
}

/// What the student's one-step draw needs: its timestep, the constant A,
/// and what the UNet's output means.
#[derive(Debug, Clone, Copy)]
pub struct OneStepDraw {
    pub timestep: i64,
    pub alpha_bar: f64,
    pub prediction: PredictionType,
}

/// x0_hat of the noise `z` [B,C,h,w] under `cond` [B,77,D], in float32;
/// with gradients when called with them.
pub fn one_step_x0(
    student: &impl Denoiser,
    z: &Tensor,
    cond: &Tensor,
    draw: &OneStepDraw,
) -> Result<Tensor, TchError> {
    let out = one_step_output(student, z, cond, draw)?;
    x0_of_output(&out, z, draw)
}

/// The student's raw output at the draw's timestep, float32 (the pass
/// alone: a caller may run it under autocast, the formula outside).
pub fn one_step_output(
    student: &impl Denoiser,
    z: &Tensor,
    cond: &Tensor,
    draw: &OneStepDraw,
) -> Result<Tensor, TchError> {
    let (b, device) = (z.size()[0], z.device());
    let t = Tensor::f_full([b], draw.timestep, (Kind::Int64, device))?;
    student.predict(z, &t, cond)?.f_to_kind(Kind::Float)
}

/// x0_hat = (z - sqrt(1 - A) eps) / sqrt(A) from the student's float32
/// output `out` on the noise `z`.
pub fn x0_of_output(out: &Tensor, z: &Tensor, draw: &OneStepDraw) -> Result<Tensor, TchError> {
    let a = Tensor::f_full([1, 1, 1, 1], draw.alpha_bar, (Kind::Float, z.device()))?;
    // The constant A stands in for abar_t: the output is read as if the
    // student were at a timestep whose abar is A.
    let eps = to_epsilon(draw.prediction, out, z, &a)?;
    to_x0(PredictionType::Epsilon, &eps, z, &a)
}
