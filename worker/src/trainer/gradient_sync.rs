//! How ranks agree: gradient averaging and the step vote (every rank's
//! losses finite, anyone leaving, captions truncated). The trainer only sees
//! this trait; the single-process implementation is here, the collective
//! ones (TCP ring, NCCL) live in `collective/`.

use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("collective failed: {0}")]
    Collective(String),
}

pub trait GradientSync {
    fn rank(&self) -> u64;
    fn world_size(&self) -> u64;
    /// Replaces each gradient by its mean over all ranks, in place.
    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<(), SyncError>;
    /// Sums a few host values over all ranks, in place: the small flags and
    /// counters of the step vote (exact for integers below 2^24).
    fn all_sum(&mut self, values: &mut [f32]) -> Result<(), SyncError>;

    /// The part of a flat buffer of `numel` elements that `rank` receives
    /// from [`Self::reduce_scatter_mean`] and contributes to
    /// [`Self::all_gather`]: the ranks' parts are contiguous, disjoint and
    /// cover `0..numel`. Each backend lays them out as its primitives do
    /// (the TCP ring: the chunk its reduce-scatter phase leaves on the
    /// rank; NCCL: equal chunks in rank order); the sharded optimizer
    /// (crate::shard) takes whatever it is given.
    fn shard_range(&self, numel: usize, rank: u64) -> std::ops::Range<usize> {
        even_range(numel, rank, self.world_size())
    }

    /// Reduce-scatter: `flat` (1-D, the same length and dtype on every
    /// rank) averaged over the ranks; returns this rank's part of the mean
    /// (`shard_range(numel, rank())`). `flat`'s contents are undefined
    /// afterwards. This default all-reduces the whole buffer (right, not
    /// lean: the backends override it).
    fn reduce_scatter_mean(&mut self, flat: &Tensor) -> Result<Tensor, SyncError> {
        self.all_reduce_mean(std::slice::from_ref(flat))?;
        let range = self.shard_range(flat.numel(), self.rank());
        Ok(flat.narrow(0, range.start as i64, range.len() as i64))
    }

    /// All-gather, in place: every rank's own part of `flat` (its
    /// `shard_range`) copied to every rank, so all ranks end with the
    /// same `flat`. A world of one has nothing to gather; a backend
    /// without the primitive refuses a larger world.
    fn all_gather(&mut self, flat: &Tensor) -> Result<(), SyncError> {
        let _ = flat;
        if self.world_size() <= 1 {
            return Ok(());
        }
        Err(SyncError::Collective(
            "this collective has no all-gather (world.shard_state needs the TCP ring or NCCL)"
                .to_owned(),
        ))
    }

    /// True when every rank passes `ok` (one NaN anywhere skips the step
    /// everywhere, so replicas never diverge).
    fn all_ok(&mut self, ok: bool) -> Result<bool, SyncError> {
        let mut flag = [if ok { 0.0 } else { 1.0 }];
        self.all_sum(&mut flag)?;
        Ok(flag[0] == 0.0)
    }

    /// Combines every rank's vote in one round.
    fn vote(&mut self, mine: StepVote) -> Result<StepVote, SyncError> {
        Ok(self.vote_with_losses(mine, &[])?.0)
    }

    /// Combines every rank's vote and averages `losses` over the ranks, in
    /// the same round: each rank's loss is the mean over its equal share of
    /// the global batch, so their mean is the global batch's loss (what a
    /// job reports). In float32 (the vote's), so to about 7 digits; a world
    /// of one returns its losses untouched.
    fn vote_with_losses(
        &mut self,
        mine: StepVote,
        losses: &[f64],
    ) -> Result<(StepVote, Vec<f64>), SyncError> {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let mut values = vec![
            flag(!mine.finite),
            flag(mine.preempt),
            mine.num_truncated as f32,
            flag(mine.student_nonfinite),
            flag(mine.fake_score_nonfinite),
        ];
        let first_loss = values.len();
        values.extend(losses.iter().map(|&l| l as f32));
        self.all_sum(&mut values)?;
        let n = self.world_size();
        let means = if n <= 1 {
            losses.to_vec()
        } else {
            values[first_loss..]
                .iter()
                .map(|&v| f64::from(v) / n as f64)
                .collect()
        };
        let vote = StepVote {
            finite: values[0] == 0.0,
            preempt: values[1] > 0.0,
            num_truncated: values[2].round().max(0.0) as u64,
            student_nonfinite: values[3] > 0.0,
            fake_score_nonfinite: values[4] > 0.0,
        };
        Ok((vote, means))
    }
}

/// Rank `rank`'s part of `numel` elements split as evenly as integers
/// allow over `world_size` ranks, in rank order.
pub fn even_range(numel: usize, rank: u64, world_size: u64) -> std::ops::Range<usize> {
    let (r, w) = (rank as usize, world_size.max(1) as usize);
    numel * r / w..numel * (r + 1) / w
}

/// What each rank says after its backward pass. Combined over ranks:
/// `finite` only if every rank's is, `preempt` if any rank's is, the
/// counts summed. Every rank acts on the combined vote, so they all take
/// the same decision at the same step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepVote {
    /// Losses and gradients are finite.
    pub finite: bool,
    /// This rank must stop (SIGTERM): checkpoint at this step boundary.
    pub preempt: bool,
    /// Captions cut at 77 tokens in this step's batch.
    pub num_truncated: u64,
    /// The student's loss or gradient is not finite (with fp16 loss
    /// scaling each optimizer's step and scaler follow their own flag;
    /// without, `finite` decides both). Combined: if any rank's is.
    pub student_nonfinite: bool,
    /// The fake score's loss or gradient is not finite.
    pub fake_score_nonfinite: bool,
}

/// One process: nothing to average, nobody to ask.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl GradientSync for SingleProcess {
    fn rank(&self) -> u64 {
        0
    }
    fn world_size(&self) -> u64 {
        1
    }
    fn all_reduce_mean(&mut self, _grads: &[Tensor]) -> Result<(), SyncError> {
        Ok(())
    }
    fn all_sum(&mut self, _values: &mut [f32]) -> Result<(), SyncError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_is_ok_when_it_is() {
        let mut s = SingleProcess;
        assert!(!s.all_ok(false).unwrap());
        assert!(s.all_ok(true).unwrap());
    }

    #[test]
    fn a_single_process_vote_is_its_own() {
        let mine = StepVote {
            finite: false,
            preempt: true,
            num_truncated: 3,
            student_nonfinite: true,
            fake_score_nonfinite: false,
        };
        assert_eq!(SingleProcess.vote(mine).unwrap(), mine);
        assert_eq!(
            SingleProcess.vote(StepVote::default()).unwrap(),
            StepVote::default()
        );
    }
}
