//! Requests in: each gRPC request is checked and converted with `TryFrom`
//! (a malformed, missing or absurd field is INVALID_ARGUMENT) before the
//! coordinator sees anything. Generated types stop here.

use std::time::Duration;

use swiftbrush_proto::rpc::{self, MAX_DOCUMENT_BYTES, MAX_NAME_BYTES, MAX_REASON_BYTES};
use swiftbrush_proto::run_store::StagedCheckpoint;
use tonic::Status;

use crate::app::AppError;
use crate::domain::{
    Backend, Capabilities, CaptionRequest, CheckpointReport, HeartbeatInput, RegisterInput,
    StepMetrics, WorkerId, WorkerPhase,
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
            // A worker of the release before names it loss_lora only.
            #[allow(deprecated)]
            loss_fake_score: if m.loss_fake_score == 0.0 {
                m.loss_lora
            } else {
                m.loss_fake_score
            },
            step_time_ms: measure("metrics.step_time_ms", m.step_time_ms)?,
            allreduce_ms: measure("metrics.allreduce_ms", m.allreduce_ms)?,
            samples_per_s: measure("metrics.samples_per_s", m.samples_per_s)?,
            checkpoint_stall_ms: measure("metrics.checkpoint_stall_ms", m.checkpoint_stall_ms)?,
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

/// A teacher's fingerprint (a sha256 in hex; empty: not loaded yet).
pub fn fingerprint(value: String) -> Result<String, Status> {
    optional_text("teacher_fingerprint", value, MAX_NAME_BYTES)
}

/// A worker's error as it exits: an error chain with paths, longer than a
/// name.
pub fn failure_reason(value: String) -> Result<String, Status> {
    optional_text("reason", value, MAX_REASON_BYTES)
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
