//! Joining and leaving: Register (with replacement of a restarted process
//! and the quarantine check), Rendezvous (becoming ready and being placed in
//! a world) and Leave.

use super::effect::Effect;
use super::error::CoreError;
use super::formation::Formation;
use super::replies::{Assignment, Member, Registration, RendezvousOutcome, WaitInfo};
use super::state::CoordinatorState;
use super::types::{Departure, JobPhase, Millis, WorkerId};
use super::worker::{Capabilities, Worker};

/// A worker's Register call, validated by the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterInput {
    pub host: String,
    pub device: String,
    pub capabilities: Capabilities,
}

impl CoordinatorState {
    /// Most live workers registered at once: `--max-workers`, raised to
    /// twice the job's largest world (its workers and as many spares), so
    /// that no job is refused its own workers whatever its size.
    pub fn worker_cap(&self) -> usize {
        let from_job = self
            .job
            .as_ref()
            .map_or(0, |j| 2 * j.spec.max_size as usize);
        self.options.max_workers.max(from_job)
    }

    pub fn register(
        &mut self,
        input: RegisterInput,
        now: Millis,
    ) -> Result<Registration, CoreError> {
        if let Some(remaining_ms) = self.quarantine_remaining(&input.host, now) {
            return Err(CoreError::HostQuarantined {
                host: input.host,
                remaining_ms,
            });
        }
        // A process on the same host and accelerator that registers again
        // means the old one is gone (crashed and restarted): no need to wait
        // for its heartbeat to time out. Several CPU workers may share a host.
        let replaced: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| !w.is_dead() && w.host == input.host && w.device == input.device)
            .filter(|w| w.device != "cpu")
            .map(|w| w.id)
            .collect();
        let live = self.workers.values().filter(|w| !w.is_dead()).count();
        let max = self.worker_cap();
        if live - replaced.len() >= max {
            return Err(CoreError::TooManyWorkers { max });
        }
        let id = WorkerId(self.options.worker_id_base | self.next_seq);
        self.next_seq += 1;
        for old in replaced {
            self.declare_dead(old, Departure::Replaced { by: id }, now);
        }
        self.effects.push(Effect::WorkerRegistered {
            worker: id,
            host: input.host.clone(),
            device: input.device.clone(),
        });
        self.workers.insert(
            id,
            Worker::new(id, input.host, input.device, input.capabilities, now),
        );
        Ok(Registration {
            worker: id,
            heartbeat_interval_ms: self.heartbeat_interval_ms(),
            has_job: self.job.is_some(),
        })
    }

    /// Marks the worker ready for a world and forms one if it can. Called
    /// again and again by a waiting worker (long-poll); idempotent for a
    /// worker already placed.
    pub fn rendezvous(
        &mut self,
        worker: WorkerId,
        known_generation: u64,
        teacher_fingerprint: &str,
        now: Millis,
    ) -> Result<RendezvousOutcome, CoreError> {
        self.live_worker(worker)?;
        self.check_not_future(known_generation)?;
        if let Some(job) = self.job.as_ref()
            && job.phase.is_terminal()
        {
            let (phase, reason) = (job.phase, job.reason.clone());
            self.live_worker_mut(worker)?.touch(now);
            return Ok(RendezvousOutcome::Finished { phase, reason });
        }
        if let Some(waiting) = self.check_teacher(worker, teacher_fingerprint, now)? {
            return Ok(RendezvousOutcome::Waiting(waiting));
        }
        let w = self.live_worker_mut(worker)?;
        w.touch(now);
        if w.rank.is_none() {
            w.ready_since.get_or_insert(now);
            w.ready_seen = now;
        }
        if let Some(job) = self.job.as_mut()
            && job.phase == JobPhase::Pending
        {
            job.phase = JobPhase::Forming;
            job.phase_since = now;
        }
        self.try_form(now);
        if let Some(assignment) = self.assignment(worker) {
            return Ok(RendezvousOutcome::Assigned(assignment));
        }
        match self.formation(now) {
            Formation::Wait(info) => Ok(RendezvousOutcome::Waiting(info)),
            // try_form just ran, so a world that could form has formed and
            // this worker is not in it.
            Formation::Form(_) => Ok(RendezvousOutcome::Waiting(WaitInfo {
                reason: "standby".to_owned(),
                num_ready: 0,
                min_size: self.job.as_ref().map_or(0, |j| j.spec.min_size),
                retry_after_ms: 1_000,
                needs_teacher: false,
            })),
        }
    }

    /// The worker's place in the current world, if it has one.
    pub fn assignment(&self, worker: WorkerId) -> Option<Assignment> {
        let job = self.job.as_ref()?;
        let world = job.world.as_ref()?;
        let rank = world.rank_of(worker)?;
        let members = world
            .members
            .iter()
            .enumerate()
            .filter_map(|(r, id)| {
                let w = self.workers.get(id)?;
                Some(Member {
                    rank: r as u32,
                    worker: *id,
                    host: w.host.clone(),
                    device: w.device.clone(),
                })
            })
            .collect();
        Some(Assignment {
            generation: world.generation,
            rank,
            world_size: world.size(),
            resume_step: world.resume_step,
            per_rank_batch: world.per_rank_batch(job.spec.global_batch),
            backend: world.backend,
            members,
        })
    }

    /// The worker leaves on purpose: its world re-forms at once, and the
    /// departure counts neither against its host nor as a restart.
    pub fn leave(
        &mut self,
        worker: WorkerId,
        reason: String,
        now: Millis,
    ) -> Result<(), CoreError> {
        self.live_worker(worker)?;
        self.declare_dead(worker, Departure::Left { reason }, now);
        self.try_form(now);
        Ok(())
    }

    /// Only a worker with the job's teacher joins its worlds: a node whose
    /// copy of the teacher folder is stale or different would average
    /// gradients of another model silently. A worker that has not reported
    /// a fingerprint yet (it did not know the job) waits and is sent the
    /// job; the first fingerprint reported to a job from scratch becomes
    /// the job's; one that differs is refused, and the worker is declared
    /// dead with the reason (the world forms without it).
    fn check_teacher(
        &mut self,
        worker: WorkerId,
        fingerprint: &str,
        now: Millis,
    ) -> Result<Option<WaitInfo>, CoreError> {
        let Some(job) = self.job.as_ref() else {
            return Ok(None);
        };
        if fingerprint.is_empty() {
            let min_size = job.spec.min_size;
            self.live_worker_mut(worker)?.touch(now);
            return Ok(Some(WaitInfo {
                reason: "load the job's teacher and report its fingerprint".to_owned(),
                num_ready: 0,
                min_size,
                retry_after_ms: 0,
                needs_teacher: true,
            }));
        }
        match &job.spec.teacher_fingerprint {
            None => {
                if let Some(job) = self.job.as_mut() {
                    job.spec.teacher_fingerprint = Some(fingerprint.to_owned());
                }
                Ok(None)
            }
            Some(expected) if expected == fingerprint => Ok(None),
            Some(expected) => {
                let host = self.live_worker(worker)?.host.clone();
                let error = CoreError::TeacherMismatch {
                    worker,
                    host,
                    worker_fingerprint: fingerprint.to_owned(),
                    job_fingerprint: expected.clone(),
                };
                // A failure with its reason, as a worker reports its own.
                self.fail_worker(worker, error.to_string(), now)?;
                Err(error)
            }
        }
    }

    /// A worker exiting on an error (Leave with `failed`): a failure like a
    /// death, charged to its host, with the worker's own reason for the
    /// status page. When no worker is left and enough of them failed the
    /// same way, nothing a restart can change: the job fails with that
    /// reason instead of waiting for workers that will fail again.
    pub fn fail_worker(
        &mut self,
        worker: WorkerId,
        reason: String,
        now: Millis,
    ) -> Result<(), CoreError> {
        self.live_worker(worker)?;
        self.declare_dead(
            worker,
            Departure::Failed {
                reason: reason.clone(),
            },
            now,
        );
        self.fail_job_if_every_worker_failed(&reason);
        self.try_form(now);
        Ok(())
    }
}
