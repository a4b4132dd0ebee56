//! `train.gradient_checkpointing`: one iteration whose activation memory
//! is set by a chunk of `rows` rows instead of the (micro-)batch. libtorch's
//! C++ API has no torch.utils.checkpoint; the step's own structure does
//! the same job with no autograd machinery of ours:
//!
//! - The student's draw x0_hat feeds the VSD loss only through the
//!   surrogate, whose gradient wrt x0_hat is known once the scores have
//!   run (g / numel, times the micro-batch's share). So the student draws
//!   the whole micro-batch without gradients (no activation outlives its
//!   layer), the scores run on it as in the plain step, the surrogate's
//!   backward stops at a leaf standing in for x0_hat, and then the
//!   student's pass runs again with gradients `rows` rows at a time, each
//!   chunk taking its rows of that gradient back into the student's
//!   `.grad`: one more student forward per step.
//! - The fake score's denoising loss (step 6) runs and backpropagates
//!   `rows` rows at a time, each chunk's loss scaled by its share
//!   (accumulation, as `train.micro_batch` does for the whole iteration).
//!
//! A few-step student (few_step.rs) is recomputed the same way: its
//! backward simulation already runs without gradients, so the chain's
//! input x_{t_k} of every row is computed once and kept for the step, and
//! the student's pass drawn and re-run here is its x0 at (x_{t_k}, t_k)
//! of the same rows: the one-step draw's z becomes that row's chain
//! input, its t_0 and A that row's t_k and the abar step k reads with.
//!
//! Every formula is step.rs's: this file only orders the passes. With one
//! chunk covering the micro-batch the arithmetic is the plain step's, so
//! the gradients and losses are the same bit for bit wherever libtorch
//! computes a forward pass the same with and without gradients
//! (`worker/tests/gradient_checkpointing.rs`, one and four student
//! steps); with several, to float rounding.

use tch::{Kind, Tensor};

use super::draws::{Draws, FakeScoreDraws};
use super::micro_batch::{MicroBatch, each_micro_batch, micro_batches};
use super::scores::Scores;
use super::step::accumulate;
use super::{Conditions, VsdError, VsdStep};
use crate::diffusion::Denoiser;

impl<S: Denoiser, F: Scores> VsdStep<'_, S, F> {
    /// Steps 1-6 on one micro-batch with the student's and the fake score's
    /// activations alive for `rows` rows at a time; the same backwards and
    /// losses as the plain iteration (step.rs).
    pub(super) fn iteration_recomputed(
        &self,
        text: &Conditions,
        draws: &Draws,
        part: MicroBatch,
        rows: u32,
    ) -> Result<((Tensor, Tensor), Tensor), VsdError> {
        self.recomputed_iteration(text, draws, part, rows, |range| match range {
            None => self.student_x0(&draws.z, &text.cond),
            Some((start, len)) => self.student_x0(
                &draws.z.narrow(0, start, len),
                &text.cond.narrow(0, start, len),
            ),
        })
    }

    /// [`Self::iteration_recomputed`] for any student pass: `student(None)`
    /// is its x0_hat of the whole micro-batch, `student(Some((start,
    /// len)))` that of rows `start..start + len`, with gradients when
    /// called with them. It is the one way this file calls the student,
    /// and must be the plain step's own pass (`VsdStep::student_x0`, or a
    /// few-step student's `VsdStep::student_x0_at` on its chain's input),
    /// `precision.student_autocast` included: the recomputed rows must
    /// compute what the draw computed for them.
    pub(super) fn recomputed_iteration(
        &self,
        text: &Conditions,
        draws: &Draws,
        part: MicroBatch,
        rows: u32,
        student: impl Fn(Option<(i64, i64)>) -> Result<Tensor, VsdError>,
    ) -> Result<((Tensor, Tensor), Tensor), VsdError> {
        // 1. The draw without gradients.
        let x0_hat = tch::no_grad(|| student(None))?;

        // 2-5 on a leaf in the student's place: the backward of the
        // micro-batch's share of the surrogate stops there, and its .grad
        // is exactly what the plain step sends into the student's graph.
        // The loss is the plain step's number (the same x0_hat).
        let leaf = x0_hat.f_detach()?.f_set_requires_grad(true)?;
        let loss_vsd = self.vsd_loss(&leaf, text, draws)?;
        part.backward_scaled(&loss_vsd, self.loss_scales.map(|s| s.student))?;
        let upstream = leaf.f_grad()?.f_detach()?;
        drop(leaf);

        // The student's pass again, with gradients, a chunk at a time.
        let b = draws.z.size()[0];
        for (start, len) in micro_batches(b, Some(rows)) {
            let x0_rows = student(Some((start, len)))?;
            backward_from(&x0_rows, &upstream.narrow(0, start, len))?;
        }

        // 6. The fake score on the detached draw, a chunk at a time.
        let fake_score = self.fake_score_loss_in_chunks(text, &x0_hat, &draws.fake, part, rows)?;
        Ok(((loss_vsd.f_detach()?, fake_score), x0_hat))
    }

    /// SPEC step 6 on one micro-batch `part`, `rows` rows at a time: each
    /// chunk's backward runs on its share of the micro-batch's share of
    /// the loss; returns the micro-batch's loss (the chunk's own when one
    /// chunk covers it, then exactly the plain step's; else their sum by
    /// shares in float64, as `train.micro_batch` sums).
    pub(super) fn fake_score_loss_in_chunks(
        &self,
        text: &Conditions,
        x0: &Tensor,
        draws: &FakeScoreDraws,
        part: MicroBatch,
        rows: u32,
    ) -> Result<Tensor, VsdError> {
        let mut chunks = each_micro_batch(x0.size()[0], Some(rows), |c| {
            if c.share == 1.0 {
                return self.fake_score_loss(text, x0, draws, part);
            }
            let within = MicroBatch {
                start: part.start + c.start,
                len: c.len,
                share: part.share * c.share,
            };
            self.fake_score_loss(
                &text.rows(c.start, c.len),
                &x0.narrow(0, c.start, c.len),
                &draws.rows(c.start, c.len),
                within,
            )
        })?;
        if chunks.len() == 1 {
            return chunks
                .pop()
                .map(|(_, loss)| loss)
                .ok_or(VsdError::EmptyBatch);
        }
        let mut total: Option<Tensor> = None;
        for (share, loss) in chunks {
            total = Some(accumulate(total, &loss, share)?);
        }
        total.ok_or(VsdError::EmptyBatch)
    }
}

/// The backward of `output` with `gradient` as its incoming gradient
/// (tch has no backward with a gradient argument): sum(output * gradient)
/// sends exactly `gradient` (1 * gradient) into `output`'s graph.
fn backward_from(output: &Tensor, gradient: &Tensor) -> Result<(), VsdError> {
    Ok(output.f_mul(gradient)?.f_sum(Kind::Float)?.f_backward()?)
}
