//! A few-step student's iteration (shared/SPEC.md "Few-step students"):
//! DMD2's backward simulation, then SPEC steps 2-6 as the one-step
//! student runs them. Each sample has drawn a step index k; the student's
//! own chain runs without gradients from its pure noise z through its
//! first k steps (predict x0, re-noise to the next timestep with the
//! sample's chain noise), and the student's x0 at (x_k, t_k), with
//! gradients, is the x0_hat that steps 2-6 score. Samples with k = 0 are
//! the one-step student's draw (the run's A at t_0).
//!
//! With `train.gradient_checkpointing` the student's x0 at (x_k, t_k) is
//! drawn without gradients and re-run with them a chunk of rows at a time
//! (recompute.rs), on the same x_k, k and caption per row.
//!
//! Every formula is `diffusion::few_step`'s or step.rs's; this file only
//! orders the passes. The one-step student never comes here.

use tch::{Kind, Tensor};

use super::draws::{ChainDraws, Draws};
use super::micro_batch::MicroBatch;
use super::scores::Scores;
use super::{Conditions, VsdError, VsdStep};
use crate::diffusion::{Denoiser, StudentChain};

impl<S: Denoiser, F: Scores> VsdStep<'_, S, F> {
    /// Steps 1-6 on one micro-batch of a few-step student: the chain's
    /// input at each sample's step, without gradients, then the plain
    /// iteration on the student's x0 there.
    pub(super) fn iteration_few_step(
        &self,
        chain: &StudentChain,
        text: &Conditions,
        draws: &Draws,
        part: MicroBatch,
    ) -> Result<((Tensor, Tensor), Tensor), VsdError> {
        let sim = draws.chain.as_ref().ok_or_else(|| {
            VsdError::Unsupported(format!(
                "a {}-step student's step was given no backward-simulation draws \
                 (DrawSpec::student_steps must be the student's steps)",
                chain.len()
            ))
        })?;
        // 1. The student's own chain up to each sample's step, then its
        // x0 there with gradients.
        let x_k = tch::no_grad(|| self.chain_input(chain, &draws.z, &text.cond, sim))?;
        // The student's x0 at (x_k, t_k) of the micro-batch (None) or of
        // rows (start, len) of it: each row with its own chain input, step
        // index and caption.
        let at_k = |range: Option<(i64, i64)>| match range {
            None => self.student_x0_at(chain, &x_k, &sim.k, &text.cond),
            Some((start, len)) => self.student_x0_at(
                chain,
                &x_k.narrow(0, start, len),
                &sim.k.narrow(0, start, len),
                &text.cond.narrow(0, start, len),
            ),
        };
        // train.gradient_checkpointing: that pass drawn without gradients
        // and re-run with them a chunk at a time (recompute.rs); x_k stays
        // alive for the step, the chain is not run again.
        if let Some(rows) = self.config.recompute_rows {
            return self.recomputed_iteration(text, draws, part, rows, at_k);
        }
        let x0_hat = at_k(None)?;

        // 2-5, and 6 on the detached draw: the plain iteration's.
        let loss_vsd = self.vsd_loss(&x0_hat, text, draws)?;
        part.backward_scaled(&loss_vsd, self.loss_scales.map(|s| s.student))?;
        let x0 = x0_hat.f_detach()?;
        let fake_score = self.fake_score_loss(text, &x0, &draws.fake, part)?;
        Ok(((loss_vsd.f_detach()?, fake_score), x0))
    }

    /// Backward simulation: x at t_k for every sample, from z through the
    /// student's first k steps. Step j runs only on the samples that go
    /// past it (k > j), so a sample costs k passes here.
    fn chain_input(
        &self,
        chain: &StudentChain,
        z: &Tensor,
        cond: &Tensor,
        sim: &ChainDraws,
    ) -> Result<Tensor, VsdError> {
        let mut x = z.shallow_clone();
        let k = sim.k.f_to_device(z.device())?;
        for j in 0..chain.len() - 1 {
            let rows = k.f_gt(j as i64)?.f_nonzero()?.f_flatten(0, -1)?;
            let n = rows.size()[0];
            if n == 0 {
                break;
            }
            let at = Tensor::f_full([n], j as i64, (Kind::Int64, z.device()))?;
            let x0 = self.student_x0_at(
                chain,
                &x.f_index_select(0, &rows)?,
                &at,
                &cond.f_index_select(0, &rows)?,
            )?;
            let next = chain.renoise(
                &x0,
                &sim.eps[j].f_index_select(0, &rows.f_to_device(sim.eps[j].device())?)?,
                j + 1,
                self.schedule,
            )?;
            x = x.f_index_copy(0, &rows, &next)?;
        }
        Ok(x)
    }

    /// The student's x0 on `x` at per-sample step indices `steps`, float32,
    /// with gradients when called with them; under
    /// `precision.student_autocast` as [`VsdStep::student_x0`] runs it.
    pub fn student_x0_at(
        &self,
        chain: &StudentChain,
        x: &Tensor,
        steps: &Tensor,
        cond: &Tensor,
    ) -> Result<Tensor, VsdError> {
        let Some(plan) = self.config.student_autocast.as_ref() else {
            return Ok(chain.x0(&self.student, x, steps, cond)?);
        };
        let out = {
            let _autocast = plan.enter();
            chain.output(&self.student, x, steps, cond)?
        };
        Ok(chain.x0_of_output(&out, x, steps)?)
    }
}
