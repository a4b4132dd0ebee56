//! The optimizer steps of an iteration: the student's and the fake score's
//! Adam, each behind the step vote (gradients averaged over the ranks,
//! every rank's losses and gradients finite), clipped to their configured
//! norms.

use super::TrainError;
use super::gradient_sync::{GradientSync, StepVote, all_finite, gradients};
use crate::optim::{Adam, clip_grad_norm};
use crate::vsd::VsdLosses;

pub struct Optimizers {
    pub student: Adam,
    pub fake_score: Adam,
    /// Max gradient norms (`method.student.grad_clip`,
    /// `method.fake_score.optimizer.grad_clip`).
    student_clip: f64,
    fake_score_clip: f64,
}

impl Optimizers {
    pub fn new(student: Adam, fake_score: Adam, student_clip: f64, fake_score_clip: f64) -> Self {
        Self {
            student,
            fake_score,
            student_clip,
            fake_score_clip,
        }
    }

    pub fn zero_grad(&mut self) {
        self.student.zero_grad();
        self.fake_score.zero_grad();
    }

    /// Averages both networks' gradients over the ranks, then votes (`mine`,
    /// with `finite` set from this rank's losses and averaged gradients);
    /// only if every rank's are finite, clips and steps both optimizers.
    /// Gradients are zeroed either way. Returns the combined vote (a NaN
    /// anywhere skips the step everywhere, so replicas stay identical) and
    /// the global batch's losses: this rank's `losses` averaged over the
    /// ranks in the vote's round.
    pub fn apply(
        &mut self,
        sync: &mut dyn GradientSync,
        losses: &VsdLosses,
        mut mine: StepVote,
    ) -> Result<(StepVote, VsdLosses), TrainError> {
        let student_grads = gradients(self.student.params());
        let fake_grads = gradients(self.fake_score.params());
        sync.all_reduce_mean(&student_grads)?;
        sync.all_reduce_mean(&fake_grads)?;
        mine.finite = losses.all_finite() && all_finite(&student_grads) && all_finite(&fake_grads);
        let (vote, global) = sync.vote_with_losses(mine, &[losses.vsd, losses.fake_score])?;
        let global = VsdLosses {
            vsd: global[0],
            fake_score: global[1],
        };
        if vote.finite {
            clip_grad_norm(self.student.params(), self.student_clip);
            self.student.step();
            clip_grad_norm(self.fake_score.params(), self.fake_score_clip);
            self.fake_score.step();
        }
        self.zero_grad();
        Ok((vote, global))
    }

    /// A further fake-score update whose gradients the backward of `loss`
    /// left: averaged over the ranks, voted finite, clipped and stepped
    /// (skipped everywhere if any rank's is not finite), then zeroed.
    /// Returns whether it was applied.
    pub fn apply_fake_score(
        &mut self,
        sync: &mut dyn GradientSync,
        loss: f64,
    ) -> Result<bool, TrainError> {
        let grads = gradients(self.fake_score.params());
        sync.all_reduce_mean(&grads)?;
        let vote = sync.vote(StepVote {
            finite: loss.is_finite() && all_finite(&grads),
            preempt: false,
            num_truncated: 0,
        })?;
        if vote.finite {
            clip_grad_norm(self.fake_score.params(), self.fake_score_clip);
            self.fake_score.step();
        }
        self.fake_score.zero_grad();
        Ok(vote.finite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamConfig;
    use crate::trainer::gradient_sync::SingleProcess;
    use swiftbrush_proto::config::OptimizerConfig;
    use tch::{Kind, Tensor};

    fn adam(p: &Tensor) -> Adam {
        let cfg = AdamConfig::from(&OptimizerConfig::with_lr(0.1));
        Adam::new([("w".to_owned(), p.shallow_clone())], cfg)
    }

    #[test]
    fn non_finite_losses_or_gradients_skip_both_updates() {
        let s = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let l = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let mut opt = Optimizers::new(adam(&s), adam(&l), 1.0, 1.0);
        let losses = |vsd: f64| VsdLosses {
            vsd,
            fake_score: 0.5,
        };
        let vote = StepVote {
            finite: true,
            preempt: false,
            num_truncated: 2,
        };

        // A NaN loss: nothing moves, gradients are cleared.
        (&s * 2.0).sum(Kind::Float).backward();
        (&l * 2.0).sum(Kind::Float).backward();
        let (applied, _) = opt
            .apply(&mut SingleProcess, &losses(f64::NAN), vote)
            .unwrap();
        assert!(!applied.finite);
        assert_eq!(applied.num_truncated, 2, "the counts travel with the vote");
        assert_eq!(Vec::<f32>::try_from(s.detach()).unwrap(), vec![1.0, 2.0]);
        assert_eq!(opt.student.num_steps(), 0);
        assert_eq!(s.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);

        // A finite loss but an infinite gradient: skipped too.
        (&s * f64::INFINITY).sum(Kind::Float).backward();
        let (applied, _) = opt.apply(&mut SingleProcess, &losses(0.1), vote).unwrap();
        assert!(!applied.finite);
        assert_eq!(Vec::<f32>::try_from(l.detach()).unwrap(), vec![3.0]);

        // All finite: both networks step.
        (&s * 2.0).sum(Kind::Float).backward();
        (&l * 2.0).sum(Kind::Float).backward();
        let (applied, global) = opt.apply(&mut SingleProcess, &losses(0.1), vote).unwrap();
        assert!(applied.finite);
        assert_eq!(global, losses(0.1), "one rank: its own losses, untouched");
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
        assert!(!opt.apply_fake_score(&mut SingleProcess, f64::NAN).unwrap());
        assert_eq!(opt.fake_score.num_steps(), 0);
        assert_eq!(l.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        (&l * 2.0).sum(Kind::Float).backward();
        assert!(opt.apply_fake_score(&mut SingleProcess, 0.5).unwrap());
        assert_eq!(opt.fake_score.num_steps(), 1);
        assert!(Vec::<f32>::try_from(l.detach()).unwrap()[0] < 3.0);
        assert_eq!(opt.student.num_steps(), 0, "the student does not move");
    }
}
