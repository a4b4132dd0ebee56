//! Why the core refused a request. Each variant says what the caller can
//! do about it; the service maps them to gRPC codes in one match
//! (grpc/status.rs).

use super::types::{JobPhase, Millis, WorkerId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("no job has been submitted")]
    NoJob,
    #[error("job {name:?} is already {}; cancel it first", phase.name())]
    JobExists { name: String, phase: JobPhase },
    #[error("the job has ended ({})", phase.name())]
    JobEnded { phase: JobPhase },
    #[error("invalid job: {0}")]
    InvalidJob(String),
    #[error("unknown worker {0}; register again")]
    UnknownWorker(WorkerId),
    #[error("worker {id} was declared dead ({reason}); register again")]
    WorkerDead { id: WorkerId, reason: String },
    #[error("host {host:?} is quarantined after repeated failures for another {remaining_ms} ms")]
    HostQuarantined { host: String, remaining_ms: Millis },
    #[error(
        "too many workers: at most {max} may be registered (the coordinator's --max-workers, \
         or twice the job's world.max_size if that is more)"
    )]
    TooManyWorkers { max: usize },
    #[error("generation {given} is stale: the current generation is {current}")]
    StaleGeneration { given: u64, current: u64 },
    #[error("generation {given} does not exist yet: the current generation is {current}")]
    FutureGeneration { given: u64, current: u64 },
    #[error("worker {worker} is not in the world of generation {generation}")]
    NotInWorld { worker: WorkerId, generation: u64 },
    #[error("worker {worker} holds rank {actual}, not rank {claimed}")]
    WrongRank {
        worker: WorkerId,
        claimed: u32,
        actual: u32,
    },
    #[error("only rank 0 reports checkpoints; worker {worker} holds rank {rank}")]
    NotRankZero { worker: WorkerId, rank: u32 },
    #[error("step {step} is outside {first}..{end}: {why}")]
    StepOutOfRange {
        step: u64,
        first: u64,
        end: u64,
        why: &'static str,
    },
    #[error("checkpoint step {step} is not newer than the committed step {committed}")]
    AlreadyCommitted { step: u64, committed: u64 },
    #[error("the checkpoint of step {step} is being committed; try again")]
    CommitInFlight { step: u64 },
    #[error("rank {rank} already published a different bootstrap blob for this generation")]
    BootstrapConflict { rank: u32 },
    #[error("{field}: {why}")]
    InvalidField { field: &'static str, why: String },
    #[error(
        "worker {worker} on {host} has another teacher than the job: its teacher's fingerprint \
         is {worker_fingerprint}, the job's is {job_fingerprint} (a stale or different copy of \
         the teacher folder on that host?); it is not placed in a world"
    )]
    TeacherMismatch {
        worker: WorkerId,
        host: String,
        worker_fingerprint: String,
        job_fingerprint: String,
    },
}
