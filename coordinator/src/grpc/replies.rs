//! Replies out: the coordinator's results as gRPC messages.

use swiftbrush_proto::rpc;

use crate::app::{Committed, JobInfo, StepCaptions, Submitted};
use crate::domain::{
    Assignment, BootstrapView, Command, Health, HeartbeatAck, JobPhase, Registration,
    RendezvousOutcome, StatusSnapshot, StepMetrics, WorkerPhase, WorkerSnapshot,
};

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
            num_captions: info.num_captions,
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
    let needs_teacher = matches!(&outcome, RendezvousOutcome::Waiting(w) if w.needs_teacher);
    let mut reply = rpc::RendezvousReply::from(outcome);
    match reply.outcome.as_mut() {
        Some(rpc::rendezvous_reply::Outcome::Assignment(a)) => a.job = job.map(Into::into),
        // The worker did not know the job: it needs it to load the teacher.
        Some(rpc::rendezvous_reply::Outcome::Waiting(w)) if needs_teacher => {
            w.job = job.map(Into::into)
        }
        _ => {}
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
                job: None,
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
            loss_fake_score: m.loss_fake_score,
            #[allow(deprecated)]
            loss_lora: m.loss_fake_score,
            step_time_ms: m.step_time_ms,
            allreduce_ms: m.allreduce_ms,
            samples_per_s: m.samples_per_s,
            checkpoint_stall_ms: m.checkpoint_stall_ms,
        }
    }
}

impl From<WorkerSnapshot> for rpc::WorkerStatus {
    fn from(w: WorkerSnapshot) -> Self {
        Self {
            worker_id: w.worker.0,
            host: w.host,
            device: w.device,
            health: if w.left {
                rpc::Health::Left as i32
            } else {
                health_i32(w.health)
            },
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
            stopping_at_step: s.stopping_at_step.unwrap_or(0),
        }
    }
}

/// `final_checkpoint_step`: the step a cancel waits for (None: ended).
pub fn cancel_reply(phase: JobPhase, final_checkpoint_step: Option<u64>) -> rpc::CancelJobReply {
    rpc::CancelJobReply {
        phase: phase_i32(phase),
        final_checkpoint_step: final_checkpoint_step.unwrap_or(0),
    }
}
