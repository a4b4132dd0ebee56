//! The coordinator's domain core: the job state machine, the worker
//! registry and its health, world formation, checkpoint-commit bookkeeping
//! and the caption ledger's serving rule. Pure and synchronous: no clock
//! (every transition takes `now`), no I/O, no RPC types. The shell
//! (`crate::app`) feeds it requests and time and carries out its effects.

mod bootstrap;
mod captions;
mod checkpoint;
mod effect;
mod error;
mod failure;
mod formation;
mod heartbeat;
mod invariants;
mod job;
mod job_control;
mod membership;
mod options;
mod replies;
mod state;
mod tick;
mod types;
mod worker;
mod world;

#[cfg(test)]
mod tests;

pub use bootstrap::MAX_BOOTSTRAP_BYTES;
pub use captions::{CaptionRequest, MAX_CAPTION_STEPS};
pub use checkpoint::CheckpointReport;
pub use effect::Effect;
pub use error::CoreError;
pub use heartbeat::HeartbeatInput;
pub use job::{BackendPolicy, Job, JobSpec, PendingCommit, StopAt};
pub use membership::RegisterInput;
pub use options::CoreOptions;
pub use replies::{
    Assignment, BootstrapView, Command, CommitResult, CommitTicket, HeartbeatAck, Member,
    Registration, RendezvousOutcome, StatusSnapshot, StepSlice, WaitInfo, WorkerSnapshot,
};
pub use state::{CoordinatorState, HostRecord};
pub use types::{Backend, Departure, Health, JobPhase, Millis, StepMetrics, WorkerId, WorkerPhase};
pub use worker::{Capabilities, Worker};
pub use world::{World, best_world_size};
