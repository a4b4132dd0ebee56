//! The small value types the domain core speaks in: ids, clock readings,
//! health and phases, step metrics. No RPC types: the service converts.

use serde::Serialize;
use std::fmt;

/// Milliseconds on the coordinator's monotonic clock. The core never reads
/// a clock: every transition is handed `now`, so tests drive time by hand.
pub type Millis = u64;

/// A registered worker process. Ids are never reused within a coordinator,
/// and their high bits differ between coordinator instances, so a worker
/// left over from a restarted coordinator is told to register again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{:x}", self.0)
    }
}

/// What the coordinator believes about a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Alive,
    /// Silent for a while: kept in its world, but not placed in a new one
    /// until heard from again.
    Suspect,
    /// Final for this id: the process must register again.
    Dead,
}

/// What a worker says it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerPhase {
    #[default]
    Unspecified,
    Loading,
    Training,
    Checkpointing,
    Idle,
}

/// The job's life: Pending -> Forming -> Running(generation) -> Reforming ->
/// Running(generation + 1) -> ... -> Completed | Failed | Cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobPhase {
    /// No job yet, or a job that no worker has come for.
    Pending,
    /// Workers are gathering for the first world.
    Forming,
    Running,
    /// A world broke (a member died or left, or the world grows); the next
    /// one is gathering.
    Reforming,
    Completed,
    Failed,
    Cancelled,
}

impl JobPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Forming => "forming",
            Self::Running => "running",
            Self::Reforming => "reforming",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The collective a world runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nccl,
    Tcp,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Nccl => "nccl",
            Self::Tcp => "tcp",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "nccl" => Some(Self::Nccl),
            "tcp" => Some(Self::Tcp),
            _ => None,
        }
    }
}

/// A worker's measurements of its last logged step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepMetrics {
    pub loss_vsd: f64,
    pub loss_fake_score: f64,
    pub step_time_ms: f64,
    pub allreduce_ms: f64,
    pub samples_per_s: f64,
    /// The training thread's time in its newest checkpoint step.
    pub checkpoint_stall_ms: f64,
}

impl Serialize for StepMetrics {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("StepMetrics", 7)?;
        s.serialize_field("loss_vsd", &self.loss_vsd)?;
        s.serialize_field("loss_fake_score", &self.loss_fake_score)?;
        // The fake score's loss under its old name, for one release: it is
        // not LoRA's for DMD2's full fake score.
        s.serialize_field("loss_lora", &self.loss_fake_score)?;
        s.serialize_field("step_time_ms", &self.step_time_ms)?;
        s.serialize_field("allreduce_ms", &self.allreduce_ms)?;
        s.serialize_field("samples_per_s", &self.samples_per_s)?;
        s.serialize_field("checkpoint_stall_ms", &self.checkpoint_stall_ms)?;
        s.end()
    }
}

/// Why a worker is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Departure {
    /// No RPC from it for longer than world.heartbeat_timeout_ms.
    HeartbeatTimeout { silent_ms: u64 },
    /// In a running world, its step did not advance for longer than
    /// world.progress_timeout_ms.
    NoProgress { step: u64, stalled_ms: u64 },
    /// The same host and device registered again: the old process is gone.
    Replaced { by: WorkerId },
    /// It said goodbye (Leave).
    Left { reason: String },
    /// It is exiting on an error it could report (Leave with `failed`): a
    /// teacher it cannot read, a device that fails, a collective that
    /// cannot start.
    Failed { reason: String },
}

impl Departure {
    /// Failures count against the host (quarantine) and the job's restarts;
    /// a worker that leaves on purpose does neither.
    pub fn is_failure(&self) -> bool {
        !matches!(self, Self::Left { .. })
    }
}

impl fmt::Display for Departure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeartbeatTimeout { silent_ms } => write!(f, "silent for {silent_ms} ms"),
            Self::NoProgress { step, stalled_ms } => {
                write!(f, "no progress past step {step} for {stalled_ms} ms")
            }
            Self::Replaced { by } => write!(f, "replaced by {by} on the same host and device"),
            Self::Left { reason } => write!(f, "left: {reason}"),
            Self::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}
