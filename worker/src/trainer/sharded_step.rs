//! The optimizer steps with `world.shard_state` (crate::shard): the same
//! vote, clip and loss-scaling rules as optimizers.rs, on each rank's slice
//! of the reduced gradients. The clip's global norm is the slices' squared
//! norms summed over the ranks, read with the losses in the step's one
//! device read and summed in the vote's round (no further host syncs).
//! The LoRA adapters stay replicated: their all-reduce and norm as today.

use swiftbrush_proto::config::ShardState;
use tch::Tensor;

use super::TrainError;
use super::gradient_sync::{GradientSync, StepVote};
use super::optimizers::{Applied, Optimizers, scaled_step_by};
use crate::optim::{defined_grads, grad_norm, scale_to_norm};
use crate::shard::{ShardedNet, ShardedState};
use crate::torch::host_read;
use crate::vsd::{DeviceLosses, VsdLosses};

/// The fake score's reduced gradients: a slice (DMD2's full copy,
/// sharded) or every gradient (the LoRA adapters, replicated).
enum FakeGrads {
    Slice(Tensor),
    All(Vec<Tensor>),
}

impl Optimizers {
    /// Whether a world's sharding is in place.
    pub fn is_sharded(&self) -> bool {
        self.shard.is_some()
    }

    /// Shards the state for this rank of `sync`'s world: the student's
    /// Adam and EMA (`ema`, taken), and DMD2's fake score's Adam when
    /// `fake_params` is given.
    pub fn enter_sharding(
        &mut self,
        stage: ShardState,
        sync: &dyn GradientSync,
        student_params: Vec<(String, Tensor)>,
        ema: Option<(crate::ema::Ema, f64)>,
        fake_params: Option<Vec<(String, Tensor)>>,
    ) -> Result<(), TrainError> {
        let fake = fake_params.map(|p| (&mut self.fake_score, p));
        let state =
            ShardedState::enter(stage, sync, (&mut self.student, student_params), ema, fake)
                .map_err(TrainError::Invalid)?;
        self.shard = Some(state);
        Ok(())
    }

    /// Back to the unsharded shapes (zero moments); returns whether the
    /// student had an EMA (None: it was not sharded).
    pub fn leave_sharding(&mut self) -> Option<bool> {
        self.shard
            .take()
            .map(|s| s.leave(&mut self.student, &mut self.fake_score))
    }

    pub fn shard(&self) -> Option<&ShardedState> {
        self.shard.as_ref()
    }

    pub fn shard_mut(&mut self) -> Option<&mut ShardedState> {
        self.shard.as_mut()
    }

    /// ZeRO-2: the freed gradients back in shape before the step's
    /// backward (a no-op otherwise).
    pub fn ready_grads(&mut self) {
        if let Some(s) = self.shard.as_mut() {
            s.restore_grads();
        }
    }

    /// ZeRO-2: the fake score's alone, before a further fake-score update's
    /// backward (the student's stay freed until the next step).
    pub fn ready_fake_score_grads(&mut self) {
        if let Some(f) = self.shard.as_mut().and_then(|s| s.fake_score.as_mut()) {
            f.restore_grads();
        }
    }

    /// Bytes of optimizer state, EMA and gradients this rank keeps beside
    /// the weights (the resident-state test's count; `ema`: the trainer's
    /// unsharded EMA): the full Adams' moments (empty while sharded), the
    /// gradients the parameters hold, and the slices' moments and EMA.
    pub fn resident_state_bytes(&self, ema: Option<&crate::ema::Ema>) -> usize {
        crate::shard::replicated_bytes(&self.student, ema)
            + crate::shard::replicated_bytes(&self.fake_score, None)
            + self.shard.as_ref().map_or(0, ShardedState::slice_bytes)
    }

    /// [`Optimizers::apply`] sharded.
    pub(super) fn apply_sharded(
        &mut self,
        sync: &mut dyn GradientSync,
        losses: &DeviceLosses,
        mut mine: StepVote,
    ) -> Result<Applied, TrainError> {
        let Some(shard) = self.shard.as_mut() else {
            unreachable!("apply_sharded without sharding");
        };
        let student_grad = shard.student.reduce_scatter(sync)?;
        let (fake_grads, fake_norm) = match shard.fake_score.as_mut() {
            Some(net) => {
                let g = net.reduce_scatter(sync)?;
                let sq = ShardedNet::squared_norm(&g);
                (FakeGrads::Slice(g), sq)
            }
            None => {
                let grads = defined_grads(self.fake_score.params());
                sync.all_reduce_mean(&grads)?;
                let norm = grad_norm(&grads);
                (FakeGrads::All(grads), norm)
            }
        };
        let student_sq = ShardedNet::squared_norm(&student_grad);
        let host = host_read::read(&[&losses.vsd, &losses.fake_score, &student_sq, &fake_norm])
            .map_err(crate::vsd::VsdError::from)?;
        let rank_losses = VsdLosses {
            vsd: host[0],
            fake_score: host[1],
        };
        mine.finite = host.iter().all(|v| v.is_finite());
        mine.student_nonfinite = !(host[0].is_finite() && host[2].is_finite());
        mine.fake_score_nonfinite = !(host[1].is_finite() && host[3].is_finite());
        let asked = if shard.take_checkpoint_request() {
            1.0
        } else {
            0.0
        };
        let fake_sliced = matches!(fake_grads, FakeGrads::Slice(_));
        // The vote averages: the squared norms' sums are W times the means.
        let fake_sq = if fake_sliced { host[3] } else { 0.0 };
        let (vote, global) =
            sync.vote_with_losses(mine, &[host[0], host[1], host[2], fake_sq, asked])?;
        let w = sync.world_size().max(1) as f64;
        let student_norm = (global[2] * w).sqrt();
        let fake_norm = if fake_sliced {
            (global[3] * w).sqrt()
        } else {
            host[3]
        };
        let checkpoint = global[4] * w > 0.5;
        let (student_clip, fake_clip) = (self.student_clip, self.fake_score_clip);
        let fake_score = &mut self.fake_score;
        let mut fake_step =
            |sync: &mut dyn GradientSync, shard: &mut ShardedState| -> Result<(), TrainError> {
                match (&fake_grads, shard.fake_score.as_mut()) {
                    (FakeGrads::Slice(g), Some(net)) => net.step(sync, g)?,
                    _ => fake_score.step(),
                }
                Ok(())
            };
        let fake_list: Vec<Tensor> = match &fake_grads {
            FakeGrads::Slice(g) => vec![g.shallow_clone()],
            FakeGrads::All(gs) => gs.iter().map(Tensor::shallow_clone).collect(),
        };
        let student_list = [student_grad.shallow_clone()];
        let (student_stepped, fake_score_stepped) = match self.scalers.as_mut() {
            None => {
                if vote.finite {
                    scale_to_norm(&student_list, student_norm, student_clip);
                    shard.student.step(sync, &student_grad)?;
                    scale_to_norm(&fake_list, fake_norm, fake_clip);
                    fake_step(sync, shard)?;
                }
                (vote.finite, vote.finite)
            }
            Some(scalers) => {
                let s = scaled_step_by(
                    &mut scalers.student,
                    &student_list,
                    student_norm,
                    student_clip,
                    !vote.student_nonfinite,
                    || shard.student.step(sync, &student_grad),
                )?;
                let f = scaled_step_by(
                    &mut scalers.fake_score,
                    &fake_list,
                    fake_norm,
                    fake_clip,
                    !vote.fake_score_nonfinite,
                    || fake_step(sync, shard),
                )?;
                (s, f)
            }
        };
        self.zero_grad();
        Ok(Applied {
            vote,
            rank_losses,
            losses: VsdLosses {
                vsd: global[0],
                fake_score: global[1],
            },
            student_stepped,
            fake_score_stepped,
            checkpoint,
        })
    }

    /// [`Optimizers::apply_fake_score`] for DMD2's sharded fake score.
    pub(super) fn apply_fake_score_sharded(
        &mut self,
        sync: &mut dyn GradientSync,
        loss: &Tensor,
    ) -> Result<bool, TrainError> {
        let Some(net) = self.shard.as_mut().and_then(|s| s.fake_score.as_mut()) else {
            unreachable!("apply_fake_score_sharded without a sharded fake score");
        };
        let grad = net.reduce_scatter(sync)?;
        let sq = ShardedNet::squared_norm(&grad);
        let host = host_read::read(&[loss, &sq]).map_err(crate::vsd::VsdError::from)?;
        let finite = host.iter().all(|v| v.is_finite());
        let (vote, global) = sync.vote_with_losses(
            StepVote {
                finite,
                fake_score_nonfinite: !finite,
                ..StepVote::default()
            },
            &[host[1]],
        )?;
        let norm = (global[0] * sync.world_size().max(1) as f64).sqrt();
        let list = [grad.shallow_clone()];
        let clip = self.fake_score_clip;
        match self.scalers.as_mut() {
            None => {
                if vote.finite {
                    scale_to_norm(&list, norm, clip);
                    net.step(sync, &grad)?;
                }
            }
            Some(scalers) => {
                scaled_step_by(
                    &mut scalers.fake_score,
                    &list,
                    norm,
                    clip,
                    vote.finite,
                    || net.step(sync, &grad),
                )?;
            }
        }
        self.fake_score.zero_grad();
        Ok(vote.finite)
    }
}
