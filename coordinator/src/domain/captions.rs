//! Which captions a rank trains on: the caption ledger's slice of each
//! step, served only to the member that holds the rank in the current
//! world. Nothing is marked consumed here: a step's captions count as
//! consumed once a checkpoint past the step commits, so steps after the
//! newest commit are simply served again to the next world (see
//! docs/PROTOCOL.md, "exactly once").

use super::error::CoreError;
use super::replies::StepSlice;
use super::state::CoordinatorState;
use super::types::{Millis, WorkerId};

/// Most steps one request may ask for.
pub const MAX_CAPTION_STEPS: u32 = 64;

/// A worker's GetCaptions call, validated by the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptionRequest {
    pub worker: WorkerId,
    pub generation: u64,
    pub rank: u32,
    pub first_step: u64,
    pub num_steps: u32,
}

impl CoordinatorState {
    pub fn captions(
        &mut self,
        req: CaptionRequest,
        now: Millis,
    ) -> Result<Vec<StepSlice>, CoreError> {
        let rank = self.member_rank(req.worker, req.generation)?;
        if rank != req.rank {
            return Err(CoreError::WrongRank {
                worker: req.worker,
                claimed: req.rank,
                actual: rank,
            });
        }
        if req.num_steps == 0 || req.num_steps > MAX_CAPTION_STEPS {
            return Err(CoreError::InvalidField {
                field: "num_steps",
                why: format!("must be 1..={MAX_CAPTION_STEPS}, got {}", req.num_steps),
            });
        }
        let job = self.active_job()?;
        let world = job.world.as_ref().ok_or(CoreError::NotInWorld {
            worker: req.worker,
            generation: req.generation,
        })?;
        let (first, end) = (world.resume_step, job.spec.max_steps);
        if req.first_step < first || req.first_step >= end {
            return Err(CoreError::StepOutOfRange {
                step: req.first_step,
                first,
                end,
                why: "captions exist from the world's resume step to train.max_steps",
            });
        }
        let last = req
            .first_step
            .saturating_add(u64::from(req.num_steps))
            .min(end);
        let size = u64::from(world.size());
        let mut slices = Vec::with_capacity((last - req.first_step) as usize);
        for step in req.first_step..last {
            let caption_ids = job
                .plan
                .rank_batch_ids(step, u64::from(rank), size)
                .map_err(|e| CoreError::InvalidJob(e.to_string()))?;
            slices.push(StepSlice {
                step,
                epoch: job.plan.position(step).epoch,
                caption_ids,
            });
        }
        let served: u64 = slices.iter().map(|s| s.caption_ids.len() as u64).sum();
        if let Some(job) = self.job.as_mut() {
            job.captions_served += served;
        }
        self.live_worker_mut(req.worker)?.touch(now);
        Ok(slices)
    }
}
