//! What the core's transitions hand back to the caller: plain data that the
//! service converts to gRPC replies.

use serde::Serialize;
use swiftbrush_proto::run_store::CheckpointMeta;

use super::types::{Backend, JobPhase, Millis, WorkerId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub worker: WorkerId,
    pub heartbeat_interval_ms: u64,
    /// Whether a job is there to run (the service attaches its config).
    pub has_job: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub rank: u32,
    pub worker: WorkerId,
    pub host: String,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    pub resume_step: u64,
    pub per_rank_batch: u64,
    pub backend: Backend,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaitInfo {
    pub reason: String,
    pub num_ready: u32,
    pub min_size: u32,
    /// A hint; the service long-polls anyway.
    pub retry_after_ms: u64,
    /// The worker must load the job's teacher and report its fingerprint
    /// before it can be placed (the reply carries the job).
    pub needs_teacher: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RendezvousOutcome {
    Waiting(WaitInfo),
    Assigned(Assignment),
    Finished { phase: JobPhase, reason: String },
}

/// The command in a heartbeat reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    None,
    /// Rank 0 checkpoints at the first step >= `step` and reports it.
    CheckpointAt {
        step: u64,
        reason: String,
    },
    Stop {
        phase: JobPhase,
        reason: String,
    },
    /// The worker's world is gone: abort the communicator, rendezvous again.
    AbortAndReform {
        generation: u64,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatAck {
    pub command: Command,
    pub heartbeat_interval_ms: u64,
    pub generation: u64,
}

/// One step's captions for one rank, as caption ids (the service looks up
/// the strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSlice {
    pub step: u64,
    pub epoch: u64,
    pub caption_ids: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapView {
    pub complete: bool,
    pub blobs: Vec<(u32, Vec<u8>)>,
}

/// Permission to commit one checkpoint: what to write into its manifest.
/// Hand it back to `finish_commit` however the write ends.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitTicket {
    pub step: u64,
    pub generation: u64,
    pub meta: CheckpointMeta,
    pub upload_seconds: f64,
}

/// How the storage side of a commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitResult {
    Committed,
    /// The manifest already existed, or storage failed: nothing changes.
    NotCommitted,
}

/// A point-in-time view for /status, JobStatus and /metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusSnapshot {
    pub now_ms: Millis,
    pub phase: JobPhase,
    pub name: String,
    pub reason: String,
    pub generation: u64,
    pub world_size: u32,
    pub committed_step: u64,
    pub max_steps: u64,
    pub samples_committed: u64,
    pub restarts: u32,
    pub max_restarts: u32,
    pub step_rate: f64,
    /// A cancel waits for the checkpoint at this step.
    pub stopping_at_step: Option<u64>,
    pub captions_served: u64,
    pub checkpoints_committed: u64,
    pub last_upload_seconds: f64,
    pub upload_seconds_total: f64,
    pub workers: Vec<WorkerSnapshot>,
    pub quarantined_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerSnapshot {
    pub worker: WorkerId,
    pub host: String,
    pub device: String,
    pub health: super::types::Health,
    pub rank: Option<u32>,
    pub generation: u64,
    pub step: u64,
    pub heartbeat_age_ms: u64,
    pub phase: super::types::WorkerPhase,
    pub metrics: super::types::StepMetrics,
    pub death_reason: Option<String>,
    /// Dead because it left on purpose, not by a failure.
    pub left: bool,
}
