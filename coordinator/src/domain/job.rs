//! A submitted job as the core sees it: the parts of the config that drive
//! world formation, health and checkpoints (`JobSpec`), and the job's
//! mutable record (`Job`): phase, generation, world, restarts, commits.

use serde::Serialize;
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::CollectiveBackend;

use super::error::CoreError;
use super::types::{JobPhase, Millis};
use super::world::World;
use swiftbrush_proto::caption_ledger::CaptionPlan;

/// What the core needs of a job, taken from a validated config plus what
/// the shell found in storage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSpec {
    pub name: String,
    pub config_fingerprint: String,
    pub min_size: u32,
    pub max_size: u32,
    pub backend: BackendPolicy,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub progress_timeout_ms: u64,
    pub max_restarts: u32,
    pub global_batch: u64,
    pub max_steps: u64,
    pub seed: u64,
    pub shuffle: bool,
    pub num_captions: u64,
    pub keep_last: u32,
    /// The newest committed checkpoint's step when the job was submitted
    /// (0: none): a resubmitted job resumes there.
    pub committed_step: u64,
    /// The generation recorded with that checkpoint: new worlds number past
    /// it, or the run store would refuse their commits as stale.
    pub last_generation: u64,
    /// The teacher that checkpoint was trained from (its fingerprint);
    /// none for a job from scratch, whose first worker to report one sets
    /// it. A worker with another teacher is refused.
    pub teacher_fingerprint: Option<String>,
}

/// Which collective the config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendPolicy {
    /// NCCL when every member is on CUDA and can run it, else TCP.
    Auto,
    Nccl,
    Tcp,
}

impl JobSpec {
    /// From a parsed config (the caller validates it first), the number of
    /// captions found, and the newest committed checkpoint.
    pub fn from_config(
        config: &JobConfig,
        num_captions: u64,
        committed_step: u64,
        last_generation: u64,
    ) -> Result<Self, CoreError> {
        let world = &config.world;
        let spec = Self {
            name: config.name.clone(),
            config_fingerprint: config.fingerprint(),
            min_size: world.min_size,
            max_size: world.max_size,
            backend: match world.backend {
                CollectiveBackend::Auto => BackendPolicy::Auto,
                CollectiveBackend::Nccl => BackendPolicy::Nccl,
                CollectiveBackend::Tcp => BackendPolicy::Tcp,
            },
            heartbeat_interval_ms: world.heartbeat_interval_ms,
            heartbeat_timeout_ms: world.heartbeat_timeout_ms,
            progress_timeout_ms: world.progress_timeout_ms,
            max_restarts: world.max_restarts,
            global_batch: u64::from(config.train.global_batch),
            max_steps: config.train.max_steps,
            seed: config.train.seed,
            shuffle: config.data.shuffle,
            num_captions,
            keep_last: config.checkpoint.keep_last,
            committed_step,
            last_generation,
            teacher_fingerprint: None,
        };
        spec.check()?;
        Ok(spec)
    }

    /// The checks the core relies on (config validation covers more).
    pub fn check(&self) -> Result<(), CoreError> {
        let bad = |why: String| Err(CoreError::InvalidJob(why));
        if self.min_size == 0 || self.min_size > self.max_size {
            return bad(format!(
                "world size range {}..={} is empty",
                self.min_size, self.max_size
            ));
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_timeout_ms <= self.heartbeat_interval_ms
        {
            return bad("heartbeat_timeout_ms must exceed heartbeat_interval_ms > 0".to_owned());
        }
        if super::world::best_world_size(self.max_size as usize, self).is_none() {
            return bad(format!(
                "no world size in {}..={} divides the global batch {}",
                self.min_size, self.max_size, self.global_batch
            ));
        }
        if self.committed_step > self.max_steps {
            return bad(format!(
                "the run directory holds a checkpoint at step {}, past train.max_steps {}",
                self.committed_step, self.max_steps
            ));
        }
        CaptionPlan::new(
            self.num_captions,
            self.global_batch,
            self.seed,
            self.shuffle,
        )
        .map_err(|e| CoreError::InvalidJob(e.to_string()))?;
        Ok(())
    }

    pub fn plan(&self) -> Result<CaptionPlan, CoreError> {
        CaptionPlan::new(
            self.num_captions,
            self.global_batch,
            self.seed,
            self.shuffle,
        )
        .map_err(|e| CoreError::InvalidJob(e.to_string()))
    }

    /// A worker silent this long is Suspect: three missed beats, and never
    /// later than half the timeout.
    pub fn suspect_after_ms(&self) -> u64 {
        (self.heartbeat_interval_ms.saturating_mul(3)).min(self.heartbeat_timeout_ms / 2)
    }
}

/// A commit the coordinator is writing: world formation waits for it, so
/// that a new world's resume step is never older than a checkpoint that is
/// about to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PendingCommit {
    pub step: u64,
    pub generation: u64,
}

/// A cancel that waits for a final checkpoint: the job ends Cancelled once
/// a checkpoint at or after `step` commits, or at once if the world breaks
/// first (nothing re-forms for a cancelled job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StopAt {
    pub step: u64,
    pub reason: String,
}

/// A running estimate of steps per second from rank 0's heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct StepRate {
    pub last: Option<(u64, Millis)>,
    pub steps_per_s: f64,
}

impl StepRate {
    pub fn observe(&mut self, step: u64, now: Millis) {
        if let Some((last_step, last_at)) = self.last {
            if step <= last_step || now <= last_at {
                return;
            }
            let rate = (step - last_step) as f64 * 1000.0 / (now - last_at) as f64;
            // Smoothed: one slow step should not swing the dashboard.
            self.steps_per_s = if self.steps_per_s == 0.0 {
                rate
            } else {
                0.7 * self.steps_per_s + 0.3 * rate
            };
        }
        self.last = Some((step, now));
    }
}

/// The job's mutable record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub spec: JobSpec,
    #[serde(skip)]
    pub plan: CaptionPlan,
    pub phase: JobPhase,
    /// Why the job is in its phase (the last break, the end).
    pub reason: String,
    /// The current generation: the running world's number, or the number
    /// the next world will have.
    pub generation: u64,
    pub world: Option<World>,
    /// Failures that broke a world.
    pub restarts: u32,
    /// The newest committed checkpoint's step (0: none).
    pub committed_step: u64,
    /// When the current phase began (settling counts from here).
    pub phase_since: Millis,
    /// No world forms before this (restart backoff).
    pub not_before: Millis,
    pub commit_in_flight: Option<PendingCommit>,
    /// The world grows once a checkpoint at or after this step commits.
    pub resize_at: Option<u64>,
    /// A cancel waiting for its final checkpoint (only while a world runs).
    pub stop_at: Option<StopAt>,
    /// The committed step being verified before a world resumes from it
    /// again (a world broke before training past it): no world forms
    /// meanwhile.
    pub verifying: Option<u64>,
    pub step_rate: StepRate,
    pub captions_served: u64,
    pub checkpoints_committed: u64,
    pub last_upload_seconds: f64,
    pub upload_seconds_total: f64,
}

impl Job {
    pub fn samples_committed(&self) -> u64 {
        self.committed_step.saturating_mul(self.spec.global_batch)
    }
}
