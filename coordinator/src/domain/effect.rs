//! What a transition asks the world outside the core to do or know: log
//! lines and metrics, and storage work (retention after a commit). The shell
//! drains them after every transition.

use serde::Serialize;

use super::types::{Backend, Departure, JobPhase, Millis, WorkerId};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    WorkerRegistered {
        worker: WorkerId,
        host: String,
        device: String,
    },
    WorkerSuspect {
        worker: WorkerId,
        silent_ms: u64,
    },
    WorkerDied {
        worker: WorkerId,
        host: String,
        departure: Departure,
    },
    HostQuarantined {
        host: String,
        until: Millis,
    },
    HostReleased {
        host: String,
    },
    WorldFormed {
        generation: u64,
        world_size: u32,
        resume_step: u64,
        backend: Backend,
    },
    /// The world of `from` is gone; the next one will be `to`.
    GenerationBumped {
        from: u64,
        to: u64,
        reason: String,
        failure: bool,
    },
    BootstrapPublished {
        generation: u64,
        rank: u32,
    },
    JobSubmitted {
        name: String,
        generation: u64,
        committed_step: u64,
    },
    /// The world will grow once a checkpoint at `step` commits.
    ResizePlanned {
        step: u64,
        from_size: u32,
        to_size: u32,
    },
    CheckpointCommitted {
        step: u64,
        generation: u64,
    },
    /// Keep the newest `keep_last` checkpoints (after a commit).
    ApplyRetention {
        keep_last: u32,
    },
    /// Verify the committed checkpoint at `step` (every file's sha256)
    /// and set it aside if it is corrupt; report with `checkpoint_checked`.
    VerifyCheckpoint {
        step: u64,
    },
    JobEnded {
        phase: JobPhase,
        reason: String,
    },
}
