//! Submitting and cancelling the job.

use super::effect::Effect;
use super::error::CoreError;
use super::job::{Job, JobSpec};
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

    pub fn cancel(&mut self, reason: String, _now: Millis) -> Result<JobPhase, CoreError> {
        self.active_job()?;
        self.end_job(JobPhase::Cancelled, reason);
        Ok(JobPhase::Cancelled)
    }
}
