//! Between gRPC messages and the core's types: requests are checked and
//! converted with `TryFrom` (a malformed, missing or absurd field is
//! INVALID_ARGUMENT, before the core sees anything); replies convert back
//! with `From`. Generated types stop here.

use std::time::Duration;

use swiftbrush_proto::rpc::{self, MAX_DOCUMENT_BYTES, MAX_NAME_BYTES};
use swiftbrush_proto::run_store::StagedCheckpoint;
use tonic::Status;

use crate::app::{AppError, Committed, JobInfo, StepCaptions, Submitted};
use crate::domain::{
    Assignment, Backend, BootstrapView, Capabilities, CaptionRequest, CheckpointReport, Command,
    Health, HeartbeatAck, HeartbeatInput, JobPhase, RegisterInput, Registration, RendezvousOutcome,
    StatusSnapshot, StepMetrics, WorkerId, WorkerPhase, WorkerSnapshot,
};

fn invalid(field: &'static str, why: impl Into<String>) -> Status {
    AppError::invalid(field, why).into()
}

/// A required, bounded, printable string.
fn name(field: &'static str, value: String, max: usize) -> Result<String, Status> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    optional_text(field, value, max)
}

/// A bounded string without control characters; may be empty.
fn optional_text(field: &'static str, value: String, max: usize) -> Result<String, Status> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!("is {} bytes; at most {max}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(value)
}

fn worker_id(value: u64) -> Result<WorkerId, Status> {
    if value == 0 {
        return Err(invalid("worker_id", "is required (from Register)"));
    }
    Ok(WorkerId(value))
}

/// A duration or rate a worker measured: finite, not negative, not absurd.
fn measure(field: &'static str, value: f64) -> Result<f64, Status> {
    if !value.is_finite() || !(0.0..1e12).contains(&value) {
        return Err(invalid(
            field,
            format!("{value} is not a finite value in [0, 1e12)"),
        ));
    }
    Ok(value)
}

pub fn wait(ms: u64) -> Duration {
    Duration::from_millis(ms.min(rpc::MAX_WAIT_MS))
}

impl TryFrom<rpc::RegisterRequest> for RegisterInput {
    type Error = Status;

    fn try_from(req: rpc::RegisterRequest) -> Result<Self, Status> {
        let caps = req.capabilities.unwrap_or_default();
        if caps.backends.len() > 8 {
            return Err(invalid("capabilities.backends", "at most 8 entries"));
        }
        let backends = caps
            .backends
            .iter()
            .map(|b| {
                Backend::parse(b).ok_or_else(|| {
                    invalid(
                        "capabilities.backends",
                        format!("unknown backend {b:?}; expected nccl or tcp"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            host: name("host", req.host, MAX_NAME_BYTES)?,
            device: name("device", req.device, 64)?,
            capabilities: Capabilities {
                backends,
                device_memory_bytes: caps.device_memory_bytes,
                version: optional_text("capabilities.version", caps.version, MAX_NAME_BYTES)?,
            },
        })
    }
}

impl TryFrom<rpc::Phase> for WorkerPhase {
    type Error = Status;

    fn try_from(phase: rpc::Phase) -> Result<Self, Status> {
        Ok(match phase {
            rpc::Phase::Unspecified => WorkerPhase::Unspecified,
            rpc::Phase::Loading => WorkerPhase::Loading,
            rpc::Phase::Training => WorkerPhase::Training,
            rpc::Phase::Checkpointing => WorkerPhase::Checkpointing,
            rpc::Phase::Idle => WorkerPhase::Idle,
        })
    }
}

impl TryFrom<rpc::StepMetrics> for StepMetrics {
    type Error = Status;

    fn try_from(m: rpc::StepMetrics) -> Result<Self, Status> {
        Ok(Self {
            // Losses are reported as seen, NaN included: that is news.
            loss_vsd: m.loss_vsd,
            loss_lora: m.loss_lora,
            step_time_ms: measure("metrics.step_time_ms", m.step_time_ms)?,
            allreduce_ms: measure("metrics.allreduce_ms", m.allreduce_ms)?,
            samples_per_s: measure("metrics.samples_per_s", m.samples_per_s)?,
        })
    }
}

impl TryFrom<rpc::HeartbeatRequest> for HeartbeatInput {
    type Error = Status;

    fn try_from(req: rpc::HeartbeatRequest) -> Result<Self, Status> {
        let phase = rpc::Phase::try_from(req.phase)
            .map_err(|_| invalid("phase", format!("unknown phase {}", req.phase)))?;
        Ok(Self {
            worker: worker_id(req.worker_id)?,
            generation: req.generation,
            step: req.step,
            phase: phase.try_into()?,
            metrics: req.metrics.unwrap_or_default().try_into()?,
        })
    }
}

impl TryFrom<rpc::GetCaptionsRequest> for CaptionRequest {
    type Error = Status;

    fn try_from(req: rpc::GetCaptionsRequest) -> Result<Self, Status> {
        if req.num_steps == 0 || req.num_steps > rpc::MAX_CAPTION_STEPS {
            return Err(invalid(
                "num_steps",
                format!(
                    "must be 1..={}, got {}",
                    rpc::MAX_CAPTION_STEPS,
                    req.num_steps
                ),
            ));
        }
        Ok(Self {
            worker: worker_id(req.worker_id)?,
            generation: req.generation,
            rank: req.rank,
            first_step: req.first_step,
            num_steps: req.num_steps,
        })
    }
}

/// A checked ReportCheckpoint: the core's part and the staged files.
pub struct CheckpointCall {
    pub report: CheckpointReport,
    pub staged: StagedCheckpoint,
}

impl TryFrom<rpc::ReportCheckpointRequest> for CheckpointCall {
    type Error = Status;

    fn try_from(req: rpc::ReportCheckpointRequest) -> Result<Self, Status> {
        if req.staged_json.is_empty() {
            return Err(invalid("staged_json", "is required"));
        }
        if req.staged_json.len() > MAX_DOCUMENT_BYTES {
            return Err(invalid(
                "staged_json",
                format!("at most {MAX_DOCUMENT_BYTES} bytes"),
            ));
        }
        let staged: StagedCheckpoint = serde_json::from_str(&req.staged_json)
            .map_err(|e| invalid("staged_json", format!("not a staged checkpoint: {e}")))?;
        if staged.files.is_empty() || staged.files.len() > 10_000 {
            return Err(invalid("staged_json", "must list 1..=10000 files"));
        }
        Ok(Self {
            report: CheckpointReport {
                worker: worker_id(req.worker_id)?,
                generation: req.generation,
                step: req.step,
                teacher_fingerprint: optional_text(
                    "teacher_fingerprint",
                    req.teacher_fingerprint,
                    MAX_NAME_BYTES,
                )?,
                upload_seconds: measure("upload_seconds", req.upload_seconds)?,
            },
            staged,
        })
    }
}

/// A checked PublishBootstrap.
pub struct PublishCall {
    pub worker: WorkerId,
    pub generation: u64,
    pub rank: u32,
    pub blob: Vec<u8>,
}

impl TryFrom<rpc::PublishBootstrapRequest> for PublishCall {
    type Error = Status;

    fn try_from(req: rpc::PublishBootstrapRequest) -> Result<Self, Status> {
        if req.blob.is_empty() || req.blob.len() > rpc::MAX_BOOTSTRAP_BYTES {
            return Err(invalid(
                "blob",
                format!(
                    "must be 1..={} bytes, got {}",
                    rpc::MAX_BOOTSTRAP_BYTES,
                    req.blob.len()
                ),
            ));
        }
        Ok(Self {
            worker: worker_id(req.worker_id)?,
            generation: req.generation,
            rank: req.rank,
            blob: req.blob,
        })
    }
}

pub fn checked_worker(id: u64) -> Result<WorkerId, Status> {
    worker_id(id)
}

pub fn reason(value: String) -> Result<String, Status> {
    optional_text("reason", value, MAX_NAME_BYTES)
}

pub fn config_yaml(value: String) -> Result<String, Status> {
    if value.trim().is_empty() {
        return Err(invalid("config_yaml", "is required"));
    }
    if value.len() > MAX_DOCUMENT_BYTES {
        return Err(invalid(
            "config_yaml",
            format!("at most {MAX_DOCUMENT_BYTES} bytes"),
        ));
    }
    Ok(value)
}

// ---- replies ----

impl From<JobPhase> for rpc::JobPhase {
    fn from(phase: JobPhase) -> Self {
        match phase {
            JobPhase::Pending => Self::Pending,
            JobPhase::Forming => Self::Forming,
            JobPhase::Running => Self::Running,
            JobPhase::Reforming => Self::Reforming,
            JobPhase::Completed => Self::Completed,
            JobPhase::Failed => Self::Failed,
            JobPhase::Cancelled => Self::Cancelled,
        }
    }
}

fn phase_i32(phase: JobPhase) -> i32 {
    rpc::JobPhase::from(phase) as i32
}

impl From<JobInfo> for rpc::JobInfo {
    fn from(info: JobInfo) -> Self {
        Self {
            name: info.name,
            config_yaml: info.config_yaml,
            config_fingerprint: info.config_fingerprint,
            run_dir: info.run_dir,
        }
    }
}

pub fn register_reply(registration: Registration, job: Option<JobInfo>) -> rpc::RegisterReply {
    rpc::RegisterReply {
        worker_id: registration.worker.0,
        heartbeat_interval_ms: registration.heartbeat_interval_ms,
        job: job.map(Into::into),
    }
}

impl From<Assignment> for rpc::Assignment {
    fn from(a: Assignment) -> Self {
        Self {
            job: None,
            generation: a.generation,
            rank: a.rank,
            world_size: a.world_size,
            resume_step: a.resume_step,
            per_rank_batch: u32::try_from(a.per_rank_batch).unwrap_or(u32::MAX),
            backend: a.backend.name().to_owned(),
            members: a
                .members
                .into_iter()
                .map(|m| rpc::Member {
                    rank: m.rank,
                    worker_id: m.worker.0,
                    host: m.host,
                    device: m.device,
                })
                .collect(),
        }
    }
}

/// The assignment carries the job, so a worker that registered before the
/// job existed never needs to register again.
pub fn rendezvous_reply(outcome: RendezvousOutcome, job: Option<JobInfo>) -> rpc::RendezvousReply {
    let mut reply = rpc::RendezvousReply::from(outcome);
    if let Some(rpc::rendezvous_reply::Outcome::Assignment(a)) = reply.outcome.as_mut() {
        a.job = job.map(Into::into);
    }
    reply
}

impl From<RendezvousOutcome> for rpc::RendezvousReply {
    fn from(outcome: RendezvousOutcome) -> Self {
        use rpc::rendezvous_reply::Outcome;
        let outcome = match outcome {
            RendezvousOutcome::Waiting(w) => Outcome::Waiting(rpc::Waiting {
                reason: w.reason,
                num_ready: w.num_ready,
                min_size: w.min_size,
                retry_after_ms: w.retry_after_ms,
            }),
            RendezvousOutcome::Assigned(a) => Outcome::Assignment(a.into()),
            RendezvousOutcome::Finished { phase, reason } => Outcome::Finished(rpc::Finished {
                phase: phase_i32(phase),
                reason,
            }),
        };
        Self {
            outcome: Some(outcome),
        }
    }
}

impl From<BootstrapView> for rpc::FetchBootstrapReply {
    fn from(view: BootstrapView) -> Self {
        Self {
            complete: view.complete,
            blobs: view
                .blobs
                .into_iter()
                .map(|(rank, blob)| rpc::RankBlob { rank, blob })
                .collect(),
        }
    }
}

pub fn captions_reply(steps: Vec<StepCaptions>) -> rpc::GetCaptionsReply {
    rpc::GetCaptionsReply {
        steps: steps
            .into_iter()
            .map(|s| rpc::StepCaptions {
                step: s.step,
                epoch: s.epoch,
                caption_ids: s.caption_ids,
                captions: s.captions,
            })
            .collect(),
    }
}

impl From<Command> for rpc::Command {
    fn from(command: Command) -> Self {
        use rpc::command::Kind;
        let kind = match command {
            Command::None => Kind::None(rpc::NoCommand {}),
            Command::CheckpointAt { step, reason } => {
                Kind::Checkpoint(rpc::CheckpointAt { step, reason })
            }
            Command::Stop { phase, reason } => Kind::Stop(rpc::Stop {
                phase: phase_i32(phase),
                reason,
            }),
            Command::AbortAndReform { generation, reason } => {
                Kind::AbortAndReform(rpc::AbortAndReform { generation, reason })
            }
        };
        Self { kind: Some(kind) }
    }
}

impl From<HeartbeatAck> for rpc::HeartbeatReply {
    fn from(ack: HeartbeatAck) -> Self {
        Self {
            command: Some(ack.command.into()),
            heartbeat_interval_ms: ack.heartbeat_interval_ms,
            generation: ack.generation,
        }
    }
}

impl From<Committed> for rpc::ReportCheckpointReply {
    fn from(c: Committed) -> Self {
        Self {
            committed_step: c.step,
            manifest_path: c.manifest_path,
        }
    }
}

impl From<Submitted> for rpc::SubmitJobReply {
    fn from(s: Submitted) -> Self {
        Self {
            name: s.name,
            config_fingerprint: s.config_fingerprint,
            num_captions: s.num_captions,
            resume_step: s.resume_step,
            generation: s.generation,
        }
    }
}

fn health_i32(health: Health) -> i32 {
    (match health {
        Health::Alive => rpc::Health::Alive,
        Health::Suspect => rpc::Health::Suspect,
        Health::Dead => rpc::Health::Dead,
    }) as i32
}

fn worker_phase_i32(phase: WorkerPhase) -> i32 {
    (match phase {
        WorkerPhase::Unspecified => rpc::Phase::Unspecified,
        WorkerPhase::Loading => rpc::Phase::Loading,
        WorkerPhase::Training => rpc::Phase::Training,
        WorkerPhase::Checkpointing => rpc::Phase::Checkpointing,
        WorkerPhase::Idle => rpc::Phase::Idle,
    }) as i32
}

impl From<StepMetrics> for rpc::StepMetrics {
    fn from(m: StepMetrics) -> Self {
        Self {
            loss_vsd: m.loss_vsd,
            loss_lora: m.loss_lora,
            step_time_ms: m.step_time_ms,
            allreduce_ms: m.allreduce_ms,
            samples_per_s: m.samples_per_s,
        }
    }
}

impl From<WorkerSnapshot> for rpc::WorkerStatus {
    fn from(w: WorkerSnapshot) -> Self {
        Self {
            worker_id: w.worker.0,
            host: w.host,
            device: w.device,
            health: health_i32(w.health),
            rank: w.rank.map_or(-1, |r| i32::try_from(r).unwrap_or(i32::MAX)),
            generation: w.generation,
            step: w.step,
            heartbeat_age_ms: w.heartbeat_age_ms,
            phase: worker_phase_i32(w.phase),
            metrics: Some(w.metrics.into()),
            death_reason: w.death_reason.unwrap_or_default(),
        }
    }
}

impl From<StatusSnapshot> for rpc::JobStatusReply {
    fn from(s: StatusSnapshot) -> Self {
        Self {
            phase: phase_i32(s.phase),
            name: s.name,
            reason: s.reason,
            generation: s.generation,
            world_size: s.world_size,
            committed_step: s.committed_step,
            max_steps: s.max_steps,
            samples_committed: s.samples_committed,
            restarts: s.restarts,
            max_restarts: s.max_restarts,
            workers: s.workers.into_iter().map(Into::into).collect(),
            quarantined_hosts: s.quarantined_hosts,
            step_rate: s.step_rate,
        }
    }
}

pub fn cancel_reply(phase: JobPhase) -> rpc::CancelJobReply {
    rpc::CancelJobReply {
        phase: phase_i32(phase),
    }
}
