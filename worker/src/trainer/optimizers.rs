//! The optimizer steps of an iteration: the student's and the fake score's
//! Adam, each behind the step vote (gradients averaged over the ranks,
//! every rank's losses and gradients finite), clipped to their configured
//! norms. With fp16 loss scaling each optimizer has its GradScaler
//! (grad_scaler.rs): its gradients are unscaled before clipping, and it
//! steps or skips on its own gradients (every rank's), not the other's.

use tch::Tensor;

use super::TrainError;
use super::grad_scaler::{GradScaler, LossScalers};
use super::gradient_sync::{GradientSync, StepVote};
use crate::optim::{Adam, defined_grads, grad_norm, scale_to_norm};
use crate::torch::host_read;
use crate::vsd::{DeviceLosses, LossScales, VsdLosses};

/// What the first optimizer step of an iteration decided.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    /// The combined vote of all ranks.
    pub vote: StepVote,
    /// This rank's losses (its share of the batch).
    pub rank_losses: VsdLosses,
    /// The global batch's: the ranks' losses averaged in the vote's round.
    pub losses: VsdLosses,
    /// Whether each optimizer stepped (both iff `vote.finite`, unless fp16
    /// loss scaling skipped one alone).
    pub student_stepped: bool,
    pub fake_score_stepped: bool,
    /// `world.shard_state`: some rank asked for a checkpoint at this
    /// step's boundary (every rank gathers for it after the step). Always
    /// false unsharded.
    pub checkpoint: bool,
}

pub struct Optimizers {
    pub student: Adam,
    pub fake_score: Adam,
    /// Max gradient norms (`method.student.grad_clip`,
    /// `method.fake_score.optimizer.grad_clip`).
    pub(super) student_clip: f64,
    pub(super) fake_score_clip: f64,
    /// fp16 dynamic loss scaling (`precision::loss_scaling`); None: the
    /// losses are not scaled.
    pub(super) scalers: Option<LossScalers>,
    /// `world.shard_state` in a world (sharded_step.rs); None: replicated,
    /// today's step.
    pub(super) shard: Option<crate::shard::ShardedState>,
}

impl Optimizers {
    pub fn new(student: Adam, fake_score: Adam, student_clip: f64, fake_score_clip: f64) -> Self {
        Self {
            student,
            fake_score,
            student_clip,
            fake_score_clip,
            scalers: None,
            shard: None,
        }
    }

    /// With fp16 dynamic loss scaling, both scalers at torch's defaults.
    pub fn with_loss_scaling(mut self) -> Self {
        self.scalers = Some(LossScalers::default());
        self
    }

    /// What the VSD step multiplies each loss by now (None: unscaled).
    pub fn loss_scales(&self) -> Option<LossScales> {
        self.scalers.as_ref().map(LossScalers::scales)
    }

    /// The scalers' state, for the checkpoint (None: no loss scaling).
    pub fn loss_scalers(&self) -> Option<LossScalers> {
        self.scalers
    }

    /// Restores the scalers from a checkpoint's state; one without it (an
    /// older checkpoint, or a run that had no loss scaling) starts them at
    /// torch's defaults. Nothing to do without loss scaling.
    pub fn restore_loss_scalers(&mut self, saved: Option<LossScalers>) {
        if let Some(scalers) = self.scalers.as_mut() {
            *scalers = saved.unwrap_or_default();
        }
    }

    pub fn zero_grad(&mut self) {
        self.student.zero_grad();
        self.fake_score.zero_grad();
    }

    /// Averages both networks' gradients over the ranks, reads this rank's
    /// losses and both gradient norms back in one transfer (a non-finite
    /// gradient makes its norm non-finite), then votes (`mine`, `finite`
    /// set from those four numbers); only if every rank's are finite,
    /// clips (to the norms read) and steps both optimizers. Gradients are
    /// zeroed either way. A NaN anywhere skips the step everywhere, so
    /// replicas stay identical.
    pub fn apply(
        &mut self,
        sync: &mut dyn GradientSync,
        losses: &DeviceLosses,
        mut mine: StepVote,
    ) -> Result<Applied, TrainError> {
        if self.shard.is_some() {
            return self.apply_sharded(sync, losses, mine);
        }
        let student_grads = defined_grads(self.student.params());
        let fake_grads = defined_grads(self.fake_score.params());
        sync.all_reduce_mean(&student_grads)?;
        sync.all_reduce_mean(&fake_grads)?;
        let student_norm = grad_norm(&student_grads);
        let fake_norm = grad_norm(&fake_grads);
        let host = host_read::read(&[&losses.vsd, &losses.fake_score, &student_norm, &fake_norm])
            .map_err(crate::vsd::VsdError::from)?;
        let rank_losses = VsdLosses {
            vsd: host[0],
            fake_score: host[1],
        };
        mine.finite = host.iter().all(|v| v.is_finite());
        mine.student_nonfinite = !(host[0].is_finite() && host[2].is_finite());
        mine.fake_score_nonfinite = !(host[1].is_finite() && host[3].is_finite());
        let (vote, global) = sync.vote_with_losses(mine, &host[..2])?;
        let (student_stepped, fake_score_stepped) = match self.scalers.as_mut() {
            None => {
                if vote.finite {
                    scale_to_norm(&student_grads, host[2], self.student_clip);
                    self.student.step();
                    scale_to_norm(&fake_grads, host[3], self.fake_score_clip);
                    self.fake_score.step();
                }
                (vote.finite, vote.finite)
            }
            Some(scalers) => (
                scaled_step(
                    &mut self.student,
                    &mut scalers.student,
                    &student_grads,
                    host[2],
                    self.student_clip,
                    !vote.student_nonfinite,
                ),
                scaled_step(
                    &mut self.fake_score,
                    &mut scalers.fake_score,
                    &fake_grads,
                    host[3],
                    self.fake_score_clip,
                    !vote.fake_score_nonfinite,
                ),
            ),
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
            checkpoint: false,
        })
    }

    /// A further fake-score update whose gradients the backward of `loss`
    /// (on the device) left: averaged over the ranks, read back with their
    /// norm in one transfer, voted finite, clipped and stepped (skipped
    /// everywhere if any rank's is not finite), then zeroed. Returns
    /// whether it was applied.
    pub fn apply_fake_score(
        &mut self,
        sync: &mut dyn GradientSync,
        loss: &Tensor,
    ) -> Result<bool, TrainError> {
        if self.shard.as_ref().is_some_and(|s| s.fake_score.is_some()) {
            return self.apply_fake_score_sharded(sync, loss);
        }
        let grads = defined_grads(self.fake_score.params());
        sync.all_reduce_mean(&grads)?;
        let norm = grad_norm(&grads);
        let host = host_read::read(&[loss, &norm]).map_err(crate::vsd::VsdError::from)?;
        let finite = host.iter().all(|v| v.is_finite());
        let vote = sync.vote(StepVote {
            finite,
            fake_score_nonfinite: !finite,
            ..StepVote::default()
        })?;
        match self.scalers.as_mut() {
            None => {
                if vote.finite {
                    scale_to_norm(&grads, host[1], self.fake_score_clip);
                    self.fake_score.step();
                }
            }
            Some(scalers) => {
                scaled_step(
                    &mut self.fake_score,
                    &mut scalers.fake_score,
                    &grads,
                    host[1],
                    self.fake_score_clip,
                    vote.finite,
                );
            }
        }
        self.fake_score.zero_grad();
        Ok(vote.finite)
    }
}

/// One optimizer's step under loss scaling (torch's `scaler.unscale_`,
/// clip, `scaler.step`, `scaler.update`): with every rank's gradients
/// finite (`finite`, from the vote), unscales them, clips the unscaled
/// gradients to `max_norm` (their norm is `scaled_norm` times the inverse
/// scale, exactly: the scale is a power of two) and steps; otherwise skips.
/// Then the scaler counts the step or backs off. Returns whether it
/// stepped.
fn scaled_step(
    optimizer: &mut Adam,
    scaler: &mut GradScaler,
    grads: &[Tensor],
    scaled_norm: f64,
    max_norm: f64,
    finite: bool,
) -> bool {
    let stepped = scaled_step_by(scaler, grads, scaled_norm, max_norm, finite, || {
        optimizer.step();
        Ok::<(), std::convert::Infallible>(())
    });
    match stepped {
        Ok(stepped) => stepped,
        Err(never) => match never {},
    }
}

/// [`scaled_step`] with the step itself given (the sharded step's
/// collectives can fail).
pub(super) fn scaled_step_by<E>(
    scaler: &mut GradScaler,
    grads: &[Tensor],
    scaled_norm: f64,
    max_norm: f64,
    finite: bool,
    step: impl FnOnce() -> Result<(), E>,
) -> Result<bool, E> {
    if finite {
        let inv = scaler.inv_scale();
        tch::no_grad(|| {
            crate::torch::foreach::mul_scalar_(grads, inv)
                .unwrap_or_else(|e| panic!("gradient unscale: {e}"));
        });
        scale_to_norm(grads, scaled_norm * inv, max_norm);
        step()?;
    }
    scaler.update(!finite);
    Ok(finite)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamConfig;
    use crate::trainer::gradient_sync::SingleProcess;
    use swiftbrush_proto::config::OptimizerConfig;
    use tch::Kind;

    fn adam(p: &Tensor) -> Adam {
        let cfg = AdamConfig::from(&OptimizerConfig::with_lr(0.1));
        Adam::new([("w".to_owned(), p.shallow_clone())], cfg)
    }

    #[test]
    fn non_finite_losses_or_gradients_skip_both_updates() {
        let s = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let l = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let mut opt = Optimizers::new(adam(&s), adam(&l), 1.0, 1.0);
        let losses = |vsd: f64| DeviceLosses {
            vsd: Tensor::from(vsd),
            fake_score: Tensor::from(0.5f64),
        };
        let vote = StepVote {
            finite: true,
            num_truncated: 2,
            ..StepVote::default()
        };

        // A NaN loss: nothing moves, gradients are cleared.
        (&s * 2.0).sum(Kind::Float).backward();
        (&l * 2.0).sum(Kind::Float).backward();
        let applied = opt
            .apply(&mut SingleProcess, &losses(f64::NAN), vote)
            .unwrap()
            .vote;
        assert!(!applied.finite);
        assert_eq!(applied.num_truncated, 2, "the counts travel with the vote");
        assert_eq!(Vec::<f32>::try_from(s.detach()).unwrap(), vec![1.0, 2.0]);
        assert_eq!(opt.student.num_steps(), 0);
        assert_eq!(s.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);

        // A finite loss but an infinite gradient: skipped too.
        (&s * f64::INFINITY).sum(Kind::Float).backward();
        let applied = opt
            .apply(&mut SingleProcess, &losses(0.1), vote)
            .unwrap()
            .vote;
        assert!(!applied.finite);
        assert_eq!(Vec::<f32>::try_from(l.detach()).unwrap(), vec![3.0]);

        // All finite: both networks step.
        (&s * 2.0).sum(Kind::Float).backward();
        (&l * 2.0).sum(Kind::Float).backward();
        let reads = host_read::count();
        let done = opt.apply(&mut SingleProcess, &losses(0.1), vote).unwrap();
        assert_eq!(
            host_read::count() - reads,
            1,
            "one read for losses and norms"
        );
        let applied = done.vote;
        assert!(applied.finite);
        let want = VsdLosses {
            vsd: 0.1,
            fake_score: 0.5,
        };
        assert_eq!(done.losses, want, "one rank: its own losses, untouched");
        assert_eq!(done.rank_losses, want);
        assert_eq!(opt.student.num_steps(), 1);
        assert_eq!(opt.fake_score.num_steps(), 1);
        assert!(Vec::<f32>::try_from(l.detach()).unwrap()[0] < 3.0);
    }

    #[test]
    fn a_non_finite_fake_score_update_is_skipped_and_cleared() {
        let s = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let l = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let mut opt = Optimizers::new(adam(&s), adam(&l), 1.0, 1.0);
        (&l * 2.0).sum(Kind::Float).backward();
        assert!(
            !opt.apply_fake_score(&mut SingleProcess, &Tensor::from(f64::NAN))
                .unwrap()
        );
        assert_eq!(opt.fake_score.num_steps(), 0);
        assert_eq!(l.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        (&l * 2.0).sum(Kind::Float).backward();
        assert!(
            opt.apply_fake_score(&mut SingleProcess, &Tensor::from(0.5f64))
                .unwrap()
        );
        assert_eq!(opt.fake_score.num_steps(), 1);
        assert!(Vec::<f32>::try_from(l.detach()).unwrap()[0] < 3.0);
        assert_eq!(opt.student.num_steps(), 0, "the student does not move");
    }

    #[test]
    fn loss_scalers_restore_or_start_afresh() {
        let s = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let l = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let mut plain = Optimizers::new(adam(&s), adam(&l), 1.0, 1.0);
        plain.restore_loss_scalers(Some(LossScalers::default()));
        assert_eq!(plain.loss_scalers(), None, "no loss scaling: nothing kept");
        assert_eq!(plain.loss_scales(), None);

        let mut scaled = Optimizers::new(adam(&s), adam(&l), 1.0, 1.0).with_loss_scaling();
        let saved = LossScalers {
            student: GradScaler {
                scale: 1024.0,
                growth_tracker: 5,
            },
            fake_score: GradScaler::default(),
        };
        scaled.restore_loss_scalers(Some(saved));
        assert_eq!(scaled.loss_scalers(), Some(saved));
        assert_eq!(scaled.loss_scales().unwrap().student, 1024.0);
        // A checkpoint without them (older, or written without scaling).
        scaled.restore_loss_scalers(None);
        assert_eq!(scaled.loss_scalers(), Some(LossScalers::default()));
    }

    #[test]
    fn a_scaled_step_unscales_before_clipping() {
        // Gradients scaled by 2^10: the step must see them unscaled and
        // clipped by their unscaled norm, as torch's unscale_ then clip.
        let s = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let l = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let mut opt = Optimizers::new(adam(&s), adam(&l), 1.0, 1.0).with_loss_scaling();
        opt.restore_loss_scalers(Some(LossScalers {
            student: GradScaler {
                scale: 1024.0,
                growth_tracker: 0,
            },
            fake_score: GradScaler::default(),
        }));
        (&s * Tensor::from_slice(&[3.0f32 * 1024.0, 4.0 * 1024.0]))
            .sum(Kind::Float)
            .backward();
        let g = s.grad();
        let norm = grad_norm(std::slice::from_ref(&g)).double_value(&[]);
        assert_eq!(norm, 5.0 * 1024.0);
        let mut scaler = opt.loss_scalers().unwrap().student;
        assert!(scaled_step(
            &mut opt.student,
            &mut scaler,
            std::slice::from_ref(&g),
            norm,
            1.0,
            true
        ));
        // Unscaled (3, 4), clipped to norm 1: (0.6, 0.8) up to the 1e-6.
        let got = Vec::<f32>::try_from(&g).unwrap();
        let coef = 1.0 / (5.0 + 1e-6);
        assert_eq!(got, vec![(3.0 * coef) as f32, (4.0 * coef) as f32]);
        assert_eq!(scaler.growth_tracker, 1);
        // Skipped: no step, the scale backs off.
        assert!(!scaled_step(
            &mut opt.student,
            &mut scaler,
            std::slice::from_ref(&g),
            f64::INFINITY,
            1.0,
            false
        ));
        assert_eq!((scaler.scale, scaler.growth_tracker), (512.0, 0));
        assert_eq!(opt.student.num_steps(), 1);
    }
}
