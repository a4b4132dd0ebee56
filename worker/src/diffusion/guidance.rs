//! Classifier-free guidance as diffusers' pipelines apply it.

use tch::{TchError, Tensor};

/// uncond + scale * (cond - uncond).
pub fn classifier_free_guidance(
    uncond: &Tensor,
    cond: &Tensor,
    scale: f64,
) -> Result<Tensor, TchError> {
    uncond.f_add(&cond.f_sub(uncond)?.f_mul_scalar(scale)?)
}

/// Guidance on the output of one batched pass over `cat([uncond, cond])`
/// (diffusers' order: the null condition first), returning [B, ...] from
/// [2B, ...].
pub fn guide_batched(output: &Tensor, scale: f64) -> Result<Tensor, TchError> {
    let rows = output.size().first().copied().unwrap_or(0);
    if rows % 2 != 0 {
        return Err(TchError::Shape(format!(
            "guided output must stack [uncond; cond] along dim 0, got {} rows",
            rows
        )));
    }
    let halves = output.f_chunk(2, 0)?;
    classifier_free_guidance(&halves[0], &halves[1], scale)
}
