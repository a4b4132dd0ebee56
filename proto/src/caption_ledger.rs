//! Which captions each step and rank trains on, as a pure function of
//! (seed, number of captions, global batch, step).
//!
//! Captions form one endless stream: epoch e is a permutation of all caption
//! ids seeded by (seed, e), and the epochs follow each other. Global step s
//! takes stream positions [s*G, (s+1)*G); rank r of W takes the r-th of W
//! equal slices. So every epoch uses each caption exactly once, a batch may
//! straddle two epochs instead of dropping or repeating captions, and the
//! captions of a step do not depend on the world size: a run resumed at step
//! s with another W consumes exactly what an uninterrupted run would have.

use crate::mix::SplitMix64;

/// The plan of a caption stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionPlan {
    num_captions: u64,
    global_batch: u64,
    seed: u64,
    shuffle: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no captions: the caption sources hold no non-empty caption")]
    NoCaptions,
    #[error("global batch must be at least 1")]
    ZeroBatch,
    #[error("global batch {global_batch} is not divisible by the world size {world_size}")]
    Indivisible { global_batch: u64, world_size: u64 },
    #[error("rank {rank} is outside a world of size {world_size}")]
    BadRank { rank: u64, world_size: u64 },
}

/// Where a step's first caption falls: the epoch and the index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    pub epoch: u64,
    pub index: u64,
}

impl CaptionPlan {
    pub fn new(
        num_captions: u64,
        global_batch: u64,
        seed: u64,
        shuffle: bool,
    ) -> Result<Self, PlanError> {
        if num_captions == 0 {
            return Err(PlanError::NoCaptions);
        }
        if global_batch == 0 {
            return Err(PlanError::ZeroBatch);
        }
        Ok(Self {
            num_captions,
            global_batch,
            seed,
            shuffle,
        })
    }

    pub fn num_captions(&self) -> u64 {
        self.num_captions
    }

    pub fn global_batch(&self) -> u64 {
        self.global_batch
    }

    /// Epoch and in-epoch index of the first caption of `step`.
    pub fn position(&self, step: u64) -> StreamPosition {
        let pos = step * self.global_batch;
        StreamPosition {
            epoch: pos / self.num_captions,
            index: pos % self.num_captions,
        }
    }

    /// The caption order of one epoch.
    pub fn permutation(&self, epoch: u64) -> Vec<u64> {
        let mut ids: Vec<u64> = (0..self.num_captions).collect();
        if self.shuffle {
            let mut rng = SplitMix64::new(mix(self.seed, epoch));
            // Fisher-Yates, from the top.
            for i in (1..ids.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                ids.swap(i, j);
            }
        }
        ids
    }

    /// The caption ids of global step `step`, all ranks together.
    pub fn global_batch_ids(&self, step: u64) -> Vec<u64> {
        let mut cache = EpochCache::default();
        self.ids_in(&mut cache, step * self.global_batch, self.global_batch)
    }

    /// The slice of `step`'s captions that `rank` of `world_size` trains on.
    pub fn rank_batch_ids(
        &self,
        step: u64,
        rank: u64,
        world_size: u64,
    ) -> Result<Vec<u64>, PlanError> {
        let per_rank = self.per_rank(world_size)?;
        if rank >= world_size {
            return Err(PlanError::BadRank { rank, world_size });
        }
        let mut cache = EpochCache::default();
        let start = step * self.global_batch + rank * per_rank;
        Ok(self.ids_in(&mut cache, start, per_rank))
    }

    /// Captions per rank for a world size, if it divides the global batch.
    pub fn per_rank(&self, world_size: u64) -> Result<u64, PlanError> {
        if world_size == 0 || !self.global_batch.is_multiple_of(world_size) {
            return Err(PlanError::Indivisible {
                global_batch: self.global_batch,
                world_size,
            });
        }
        Ok(self.global_batch / world_size)
    }

    fn ids_in(&self, cache: &mut EpochCache, start: u64, len: u64) -> Vec<u64> {
        (start..start + len)
            .map(|pos| {
                let epoch = pos / self.num_captions;
                let index = (pos % self.num_captions) as usize;
                cache.get(self, epoch)[index]
            })
            .collect()
    }
}

/// The permutation of the last epoch used: consecutive positions mostly
/// fall in one epoch, so each is computed once per call.
#[derive(Default)]
struct EpochCache {
    epoch: Option<u64>,
    perm: Vec<u64>,
}

impl EpochCache {
    fn get(&mut self, plan: &CaptionPlan, epoch: u64) -> &[u64] {
        if self.epoch != Some(epoch) {
            self.perm = plan.permutation(epoch);
            self.epoch = Some(epoch);
        }
        &self.perm
    }
}

/// Combines seed and epoch into one well-mixed 64-bit state (kept as it
/// was before crate::mix::derive existed: it is the caption order of every
/// run so far; the seed is mixed before the epoch meets it, so seeds do not
/// alias epochs).
fn mix(seed: u64, epoch: u64) -> u64 {
    let mut r = SplitMix64::new(seed ^ 0x5157_4946_5442_5253);
    r.next_u64() ^ epoch.wrapping_mul(crate::mix::GOLDEN_GAMMA)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
    }

    #[test]
    fn every_epoch_uses_each_caption_exactly_once() {
        // 10 captions, batch 4: steps straddle epoch boundaries.
        let plan = CaptionPlan::new(10, 4, 7, true).unwrap();
        let stream: Vec<u64> = (0..10).flat_map(|s| plan.global_batch_ids(s)).collect();
        for epoch in stream.chunks(10) {
            assert_eq!(sorted(epoch.to_vec()), (0..10).collect::<Vec<_>>());
        }
        // Epochs are shuffled differently.
        assert_ne!(plan.permutation(0), plan.permutation(1));
    }

    #[test]
    fn rank_slices_tile_the_global_batch_for_any_world_size() {
        let plan = CaptionPlan::new(37, 12, 3, true).unwrap();
        for step in [0, 1, 5, 100] {
            let global = plan.global_batch_ids(step);
            for w in [1, 2, 3, 4, 6, 12] {
                let joined: Vec<u64> = (0..w)
                    .flat_map(|r| plan.rank_batch_ids(step, r, w).unwrap())
                    .collect();
                assert_eq!(joined, global, "step {step} world {w}");
            }
        }
    }

    #[test]
    fn same_inputs_same_stream_other_seed_other_stream() {
        let a = CaptionPlan::new(1000, 16, 1, true).unwrap();
        let b = CaptionPlan::new(1000, 16, 1, true).unwrap();
        let c = CaptionPlan::new(1000, 16, 2, true).unwrap();
        assert_eq!(a.global_batch_ids(42), b.global_batch_ids(42));
        assert_ne!(a.global_batch_ids(42), c.global_batch_ids(42));
    }

    #[test]
    fn unshuffled_is_file_order() {
        let plan = CaptionPlan::new(5, 2, 9, false).unwrap();
        assert_eq!(plan.global_batch_ids(2), vec![4, 0]);
        assert_eq!(plan.position(2), StreamPosition { epoch: 0, index: 4 });
        assert_eq!(plan.position(3), StreamPosition { epoch: 1, index: 1 });
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert_eq!(CaptionPlan::new(0, 4, 0, true), Err(PlanError::NoCaptions));
        assert_eq!(CaptionPlan::new(4, 0, 0, true), Err(PlanError::ZeroBatch));
        let plan = CaptionPlan::new(10, 6, 0, true).unwrap();
        assert_eq!(
            plan.rank_batch_ids(0, 0, 4),
            Err(PlanError::Indivisible {
                global_batch: 6,
                world_size: 4
            })
        );
        assert_eq!(
            plan.rank_batch_ids(0, 3, 3),
            Err(PlanError::BadRank {
                rank: 3,
                world_size: 3
            })
        );
    }

    #[test]
    fn permutation_is_roughly_uniform() {
        // Where caption 0 lands over many epochs: no position is starved.
        let plan = CaptionPlan::new(8, 1, 11, true).unwrap();
        let mut counts = [0u32; 8];
        for e in 0..8000 {
            let p = plan.permutation(e);
            counts[p.iter().position(|&x| x == 0).unwrap()] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }
}
