//! Losing workers and worlds: declaring a worker dead, charging its host
//! (quarantine), breaking the world it was in (generation bump, restart
//! count, backoff) and ending the job when restarts run out.

use super::effect::Effect;
use super::state::CoordinatorState;
use super::types::{Departure, Health, JobPhase, Millis, WorkerId};

impl CoordinatorState {
    /// Declares `id` dead. Its rank is released; if it was in the current
    /// world, that world breaks. Idempotent.
    pub(crate) fn declare_dead(&mut self, id: WorkerId, departure: Departure, now: Millis) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.is_dead() {
            return;
        }
        worker.health = Health::Dead;
        worker.departure = Some(departure.clone());
        worker.died_at = Some(now);
        worker.ready_since = None;
        let was_member = worker.rank.take().is_some();
        let host = worker.host.clone();
        let failure = departure.is_failure();
        let reason = format!("worker {id} on {host}: {departure}");
        self.effects.push(Effect::WorkerDied {
            worker: id,
            host: host.clone(),
            departure,
        });
        if failure {
            self.charge_host(&host, now);
        }
        if was_member {
            self.break_world(reason, failure, now);
        }
    }

    /// Ends the job when no worker is alive and at least a world's worth
    /// (`world.min_size`, and never fewer than two: one failure may be a
    /// passing one that a restarted worker gets past) of workers reported
    /// the same failure: every worker that tried failed the same way.
    pub(crate) fn fail_job_if_every_worker_failed(&mut self, reason: &str) {
        let Some(job) = self.job.as_ref() else {
            return;
        };
        if job.phase.is_terminal() || self.workers.values().any(|w| !w.is_dead()) {
            return;
        }
        let same = self
            .workers
            .values()
            .filter(
                |w| matches!(&w.departure, Some(Departure::Failed { reason: r }) if r == reason),
            )
            .count();
        if same >= job.spec.min_size.max(2) as usize {
            let why = format!("every worker failed the same way ({same} workers): {reason}");
            self.end_job(JobPhase::Failed, why);
        }
    }

    /// Records a failure on `host`; enough of them quarantine it.
    fn charge_host(&mut self, host: &str, now: Millis) {
        let window = self.options.quarantine_window_ms;
        let threshold = self.options.quarantine_after;
        let record = self.hosts.entry(host.to_owned()).or_default();
        record.failures.retain(|&t| now.saturating_sub(t) < window);
        record.failures.push(now);
        if threshold > 0 && record.failures.len() >= threshold as usize {
            let until = now.saturating_add(self.options.quarantine_ms);
            record.quarantined_until = Some(until);
            record.failures.clear();
            self.effects.push(Effect::HostQuarantined {
                host: host.to_owned(),
                until,
            });
        }
    }

    /// Ends the current world: every member loses its rank, the generation
    /// moves on (so the old world can neither fetch captions nor commit),
    /// and the job gathers a new world. A failure counts as a restart and
    /// delays the next world by the backoff; past max_restarts the job fails.
    pub(crate) fn break_world(&mut self, reason: String, failure: bool, now: Millis) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        let Some(world) = job.world.take() else {
            return;
        };
        // A world that fails before any member trained past its resume
        // step may have failed restoring it: a checkpoint that became
        // corrupt after it was committed would break every world that
        // resumes from it. It is verified before the next world forms.
        let never_trained = world.members.iter().all(|id| {
            self.workers
                .get(id)
                .is_none_or(|w| w.step <= world.resume_step)
        });
        for id in &world.members {
            if let Some(worker) = self.workers.get_mut(id) {
                worker.rank = None;
            }
        }
        if failure && never_trained && world.resume_step > 0 && job.verifying.is_none() {
            job.verifying = Some(world.resume_step);
            self.effects.push(Effect::VerifyCheckpoint {
                step: world.resume_step,
            });
        }
        let from = job.generation;
        job.generation += 1;
        job.resize_at = None;
        let stopping = job.stop_at.take();
        job.step_rate = Default::default();
        if failure {
            job.restarts += 1;
        }
        self.effects.push(Effect::GenerationBumped {
            from,
            to: job.generation,
            reason: reason.clone(),
            failure,
        });
        if let Some(stop) = stopping {
            let why = format!(
                "{} (the world ended before the final checkpoint at step {}: {reason}; \
                 the newest checkpoint is at step {})",
                stop.reason, stop.step, job.committed_step
            );
            self.end_job(JobPhase::Cancelled, why);
            return;
        }
        if failure && job.restarts > job.spec.max_restarts {
            let why = format!(
                "{} restarts exceed world.max_restarts {}; last: {reason}",
                job.restarts, job.spec.max_restarts
            );
            self.end_job(JobPhase::Failed, why);
            return;
        }
        if failure {
            job.not_before = now.saturating_add(self.options.backoff_ms(job.restarts));
        }
        job.phase = JobPhase::Reforming;
        job.phase_since = now;
        job.reason = reason;
    }

    /// The verification of the committed checkpoint at `step` ended:
    /// `newest_valid` is the newest checkpoint that verifies now (corrupt
    /// newer ones were set aside), None when none does, or Err when the
    /// store could not be read (nothing changes: the next failure checks
    /// again). A corrupt committed checkpoint moves the job back to the
    /// newest good one, so the next world resumes from there.
    pub fn checkpoint_checked(&mut self, step: u64, newest_valid: Result<Option<u64>, String>) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        if job.verifying != Some(step) {
            return;
        }
        job.verifying = None;
        let Ok(newest) = newest_valid else {
            return;
        };
        let newest = newest.unwrap_or(0);
        if newest < job.committed_step && job.world.is_none() {
            job.reason = format!(
                "the checkpoint of step {} is corrupt and was set aside; resuming from step {newest}",
                job.committed_step
            );
            job.committed_step = newest;
        }
    }

    /// Moves the job to a terminal phase and releases every rank.
    pub(crate) fn end_job(&mut self, phase: JobPhase, reason: String) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        if let Some(world) = job.world.take() {
            for id in &world.members {
                if let Some(worker) = self.workers.get_mut(id) {
                    worker.rank = None;
                }
            }
        }
        job.phase = phase;
        job.reason = reason.clone();
        job.resize_at = None;
        job.stop_at = None;
        for worker in self.workers.values_mut() {
            worker.ready_since = None;
        }
        self.effects.push(Effect::JobEnded { phase, reason });
    }
}
