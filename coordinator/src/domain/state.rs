//! The coordinator's whole state: the job, the worker registry and the host
//! records; lookups shared by the transitions, and the status snapshot.
//!
//! Every transition is a method `fn(&mut self, input, now) -> Result<reply,
//! CoreError>` (the `(state, event, now) -> (state, effects)` shape, with
//! effects collected in an outbox that the shell drains with
//! [`CoordinatorState::take_effects`]). A transition that returns `Err`
//! leaves the state unchanged: it validates before it mutates.

use std::collections::BTreeMap;

use serde::Serialize;

use super::effect::Effect;
use super::error::CoreError;
use super::job::Job;
use super::options::CoreOptions;
use super::replies::{StatusSnapshot, WorkerSnapshot};
use super::types::{JobPhase, Millis, WorkerId};
use super::worker::Worker;
use super::world::World;

/// Failures seen on one host, and its quarantine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostRecord {
    /// Times of recent failures (inside the quarantine window).
    pub failures: Vec<Millis>,
    pub quarantined_until: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorState {
    pub(crate) options: CoreOptions,
    pub(crate) job: Option<Job>,
    pub(crate) workers: BTreeMap<WorkerId, Worker>,
    pub(crate) hosts: BTreeMap<String, HostRecord>,
    pub(crate) next_seq: u64,
    pub(crate) effects: Vec<Effect>,
}

impl CoordinatorState {
    pub fn new(options: CoreOptions) -> Self {
        Self {
            options,
            job: None,
            workers: BTreeMap::new(),
            hosts: BTreeMap::new(),
            next_seq: 1,
            effects: Vec::new(),
        }
    }

    pub fn options(&self) -> &CoreOptions {
        &self.options
    }

    pub fn job(&self) -> Option<&Job> {
        self.job.as_ref()
    }

    pub fn workers(&self) -> &BTreeMap<WorkerId, Worker> {
        &self.workers
    }

    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    pub fn hosts(&self) -> &BTreeMap<String, HostRecord> {
        &self.hosts
    }

    /// The effects of the transitions since the last call.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    pub fn phase(&self) -> JobPhase {
        self.job.as_ref().map_or(JobPhase::Pending, |j| j.phase)
    }

    pub fn generation(&self) -> u64 {
        self.job.as_ref().map_or(0, |j| j.generation)
    }

    pub fn world(&self) -> Option<&World> {
        self.job.as_ref().and_then(|j| j.world.as_ref())
    }

    pub fn heartbeat_interval_ms(&self) -> u64 {
        self.job
            .as_ref()
            .map_or(self.options.default_heartbeat_interval_ms, |j| {
                j.spec.heartbeat_interval_ms
            })
    }

    pub(crate) fn heartbeat_timeout_ms(&self) -> u64 {
        self.job
            .as_ref()
            .map_or(self.options.default_heartbeat_timeout_ms, |j| {
                j.spec.heartbeat_timeout_ms
            })
    }

    pub(crate) fn suspect_after_ms(&self) -> u64 {
        self.job.as_ref().map_or(
            (self.options.default_heartbeat_interval_ms * 3)
                .min(self.options.default_heartbeat_timeout_ms / 2),
            |j| j.spec.suspect_after_ms(),
        )
    }

    /// How much longer `host` is quarantined, if it is.
    pub fn quarantine_remaining(&self, host: &str, now: Millis) -> Option<Millis> {
        let until = self.hosts.get(host)?.quarantined_until?;
        (until > now).then(|| until - now)
    }

    /// A registered worker that is not dead.
    pub(crate) fn live_worker(&self, id: WorkerId) -> Result<&Worker, CoreError> {
        let worker = self.workers.get(&id).ok_or(CoreError::UnknownWorker(id))?;
        if worker.is_dead() {
            return Err(CoreError::WorkerDead {
                id,
                reason: worker
                    .departure
                    .as_ref()
                    .map_or_else(|| "unknown".to_owned(), ToString::to_string),
            });
        }
        Ok(worker)
    }

    pub(crate) fn live_worker_mut(&mut self, id: WorkerId) -> Result<&mut Worker, CoreError> {
        self.live_worker(id)?;
        self.workers
            .get_mut(&id)
            .ok_or(CoreError::UnknownWorker(id))
    }

    /// The job, if it exists and has not ended.
    pub(crate) fn active_job(&self) -> Result<&Job, CoreError> {
        let job = self.job.as_ref().ok_or(CoreError::NoJob)?;
        if job.phase.is_terminal() {
            return Err(CoreError::JobEnded { phase: job.phase });
        }
        Ok(job)
    }

    /// A generation a worker may claim without being refused: not beyond
    /// the current one.
    pub(crate) fn check_not_future(&self, given: u64) -> Result<(), CoreError> {
        let current = self.generation();
        if given > current {
            return Err(CoreError::FutureGeneration { given, current });
        }
        Ok(())
    }

    /// Checks that `worker` is a live member of the current world and that
    /// `generation` is that world's; returns its rank. Used by every call
    /// that acts inside a world (captions, bootstrap, commits).
    pub(crate) fn member_rank(&self, worker: WorkerId, generation: u64) -> Result<u32, CoreError> {
        self.live_worker(worker)?;
        let job = self.active_job()?;
        if generation < job.generation {
            return Err(CoreError::StaleGeneration {
                given: generation,
                current: job.generation,
            });
        }
        if generation > job.generation {
            return Err(CoreError::FutureGeneration {
                given: generation,
                current: job.generation,
            });
        }
        job.world
            .as_ref()
            .filter(|w| w.generation == generation)
            .and_then(|w| w.rank_of(worker))
            .ok_or(CoreError::NotInWorld { worker, generation })
    }

    /// Everything the status page, JobStatus and /metrics show.
    pub fn snapshot(&self, now: Millis) -> StatusSnapshot {
        let job = self.job.as_ref();
        let workers = self
            .workers
            .values()
            .map(|w| WorkerSnapshot {
                worker: w.id,
                host: w.host.clone(),
                device: w.device.clone(),
                health: w.health,
                rank: w.rank,
                generation: w.generation,
                step: w.step,
                heartbeat_age_ms: now.saturating_sub(w.last_seen),
                phase: w.phase,
                metrics: w.metrics,
                death_reason: w.departure.as_ref().map(ToString::to_string),
                left: matches!(w.departure, Some(super::types::Departure::Left { .. })),
            })
            .collect();
        let quarantined_hosts = self
            .hosts
            .iter()
            .filter(|(_, h)| h.quarantined_until.is_some_and(|u| u > now))
            .map(|(name, _)| name.clone())
            .collect();
        StatusSnapshot {
            now_ms: now,
            phase: self.phase(),
            name: job.map(|j| j.spec.name.clone()).unwrap_or_default(),
            reason: job.map(|j| j.reason.clone()).unwrap_or_default(),
            generation: self.generation(),
            world_size: self.world().map_or(0, World::size),
            committed_step: job.map_or(0, |j| j.committed_step),
            max_steps: job.map_or(0, |j| j.spec.max_steps),
            samples_committed: job.map_or(0, Job::samples_committed),
            restarts: job.map_or(0, |j| j.restarts),
            max_restarts: job.map_or(0, |j| j.spec.max_restarts),
            step_rate: job.map_or(0.0, |j| j.step_rate.steps_per_s),
            stopping_at_step: job.and_then(|j| j.stop_at.as_ref()).map(|s| s.step),
            captions_served: job.map_or(0, |j| j.captions_served),
            checkpoints_committed: job.map_or(0, |j| j.checkpoints_committed),
            last_upload_seconds: job.map_or(0.0, |j| j.last_upload_seconds),
            upload_seconds_total: job.map_or(0.0, |j| j.upload_seconds_total),
            workers,
            quarantined_hosts,
        }
    }
}
