//! Heartbeats: a sign of life, progress and metrics in; the command for the
//! worker out (none, checkpoint at a step, stop, abort and re-form).

use super::error::CoreError;
use super::replies::{Command, HeartbeatAck};
use super::state::CoordinatorState;
use super::types::{Millis, StepMetrics, WorkerId, WorkerPhase};

/// A worker's Heartbeat call, validated by the service.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatInput {
    pub worker: WorkerId,
    /// The worker's generation (0 outside a world).
    pub generation: u64,
    /// Completed steps.
    pub step: u64,
    pub phase: WorkerPhase,
    pub metrics: StepMetrics,
}

impl CoordinatorState {
    pub fn heartbeat(
        &mut self,
        input: HeartbeatInput,
        now: Millis,
    ) -> Result<HeartbeatAck, CoreError> {
        self.live_worker(input.worker)?;
        self.check_not_future(input.generation)?;
        let current = self.generation();
        let in_current_world = input.generation == current
            && self
                .world()
                .is_some_and(|w| w.generation == current && w.rank_of(input.worker).is_some());
        let worker = self.live_worker_mut(input.worker)?;
        worker.touch(now);
        worker.phase = input.phase;
        worker.metrics = input.metrics;
        let mut rank0_step = None;
        if in_current_world && input.step > worker.step {
            worker.step = input.step;
            worker.progress_at = now;
            if worker.rank == Some(0) {
                rank0_step = Some(input.step);
            }
        }
        if let (Some(step), Some(job)) = (rank0_step, self.job.as_mut()) {
            job.step_rate.observe(step, now);
        }
        self.plan_resize(now);
        Ok(HeartbeatAck {
            command: self.command_for(input.worker, input.generation, in_current_world),
            heartbeat_interval_ms: self.heartbeat_interval_ms(),
            generation: current,
        })
    }

    fn command_for(&self, worker: WorkerId, generation: u64, in_current_world: bool) -> Command {
        let Some(job) = self.job.as_ref() else {
            return Command::None;
        };
        if job.phase.is_terminal() {
            return Command::Stop {
                phase: job.phase,
                reason: job.reason.clone(),
            };
        }
        let is_member = job
            .world
            .as_ref()
            .is_some_and(|w| w.rank_of(worker).is_some());
        // A worker that was in an older world and has no place in the
        // current one must drop its communicator. (One that has a place but
        // still reports the old number just has not seen its assignment.)
        if generation != 0 && generation < job.generation && !is_member {
            return Command::AbortAndReform {
                generation: job.generation,
                reason: job.reason.clone(),
            };
        }
        if !in_current_world {
            return Command::None;
        }
        let step = self.workers.get(&worker).map_or(0, |w| w.step);
        if step >= job.spec.max_steps && job.committed_step < job.spec.max_steps {
            return Command::CheckpointAt {
                step: job.spec.max_steps,
                reason: "train.max_steps reached: the final checkpoint".to_owned(),
            };
        }
        if let Some(stop) = &job.stop_at
            && job.committed_step < stop.step
        {
            return Command::CheckpointAt {
                step: stop.step,
                reason: format!(
                    "the job is cancelled ({}): the final checkpoint",
                    stop.reason
                ),
            };
        }
        if let Some(resize_at) = job.resize_at
            && job.committed_step < resize_at
        {
            return Command::CheckpointAt {
                step: resize_at,
                reason: "more workers are ready: the world grows after this checkpoint".to_owned(),
            };
        }
        Command::None
    }
}
