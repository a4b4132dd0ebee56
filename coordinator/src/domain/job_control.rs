//! Submitting and cancelling the job.

use super::effect::Effect;
use super::error::CoreError;
use super::job::{Job, JobSpec, StopAt};
use super::state::CoordinatorState;
use super::types::{JobPhase, Millis};

impl CoordinatorState {
    /// Starts `spec` (one job at a time; a new one may follow an ended
    /// one). Returns the generation the first world will have.
    pub fn submit(&mut self, spec: JobSpec, now: Millis) -> Result<u64, CoreError> {
        if let Some(job) = self.job.as_ref()
            && !job.phase.is_terminal()
        {
            return Err(CoreError::JobExists {
                name: job.spec.name.clone(),
                phase: job.phase,
            });
        }
        spec.check()?;
        let plan = spec.plan()?;
        let previous = self.job.as_ref().map_or(0, |j| j.generation);
        let generation = spec.last_generation.max(previous) + 1;
        let (committed_step, max_steps) = (spec.committed_step, spec.max_steps);
        self.effects.push(Effect::JobSubmitted {
            name: spec.name.clone(),
            generation,
            committed_step,
        });
        self.job = Some(Job {
            spec,
            plan,
            phase: JobPhase::Pending,
            reason: "submitted".to_owned(),
            generation,
            world: None,
            restarts: 0,
            committed_step,
            phase_since: now,
            not_before: now,
            commit_in_flight: None,
            resize_at: None,
            stop_at: None,
            verifying: None,
            step_rate: Default::default(),
            captions_served: 0,
            checkpoints_committed: 0,
            last_upload_seconds: 0.0,
            upload_seconds_total: 0.0,
        });
        if committed_step >= max_steps {
            // Nothing left to train: the job is complete as submitted, and
            // a worker that asks learns so at once.
            self.end_job(
                JobPhase::Completed,
                format!(
                    "the run directory already holds the checkpoint of step {committed_step} \
                     (train.max_steps)"
                ),
            );
            return Ok(generation);
        }
        if !self.candidates(now).is_empty()
            && let Some(job) = self.job.as_mut()
        {
            job.phase = JobPhase::Forming;
        }
        self.try_form(now);
        Ok(generation)
    }

    /// Ends the job at once: every heartbeat then answers Stop. Steps
    /// trained since the newest commit are lost.
    pub fn cancel(&mut self, reason: String, _now: Millis) -> Result<JobPhase, CoreError> {
        self.active_job()?;
        self.end_job(JobPhase::Cancelled, reason);
        Ok(JobPhase::Cancelled)
    }

    /// Ends the job as failed at once (the coordinator cannot go on: it lost
    /// its run directory to another job). Every heartbeat then answers Stop.
    pub fn fail(&mut self, reason: String, _now: Millis) -> Result<JobPhase, CoreError> {
        self.active_job()?;
        self.end_job(JobPhase::Failed, reason);
        Ok(JobPhase::Failed)
    }

    /// Ends the job after a final checkpoint: while a world runs, rank 0 is
    /// asked (through the heartbeat's `CheckpointAt`) for a checkpoint one
    /// step past the newest reported (or committed) step, and the job is Cancelled once it
    /// commits, or once the world breaks, whichever comes first. Without a
    /// running world there is nothing to save and it ends at once. Asking
    /// again while it waits changes nothing. Returns the step it waits for
    /// (None: ended at once).
    pub fn cancel_after_checkpoint(
        &mut self,
        reason: String,
        now: Millis,
    ) -> Result<Option<u64>, CoreError> {
        let job = self.active_job()?;
        if let Some(stop) = &job.stop_at {
            return Ok(Some(stop.step));
        }
        let Some(world) = job.world.as_ref() else {
            self.cancel(reason, now)?;
            return Ok(None);
        };
        let newest = world
            .members
            .iter()
            .filter_map(|id| self.workers.get(id))
            .map(|w| w.step)
            .max()
            .unwrap_or(0)
            .max(world.resume_step)
            // A heartbeat may lag behind a checkpoint rank 0 already committed.
            .max(job.committed_step);
        let step = (newest + 1).min(job.spec.max_steps);
        if let Some(job) = self.job.as_mut() {
            job.reason = format!("cancelling after the checkpoint at step {step}: {reason}");
            job.stop_at = Some(StopAt { step, reason });
            // The world will not grow: it is about to end.
            job.resize_at = None;
        }
        Ok(Some(step))
    }
}
