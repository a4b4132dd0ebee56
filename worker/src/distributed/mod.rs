//! The distributed worker: one process per device that joins the
//! coordinator's job (`swiftbrush worker`, and every worker of `swiftbrush
//! train`'s local mode). It runs the same trainer loop as a single process
//! with other parts: captions streamed from the coordinator, a collective
//! per world, checkpoints reported to the coordinator for it to commit, and
//! a control fed by heartbeats and signals. gRPC client side only.
//!
//! - `link`: the coordinator connection for synchronous callers, and what
//!   each failed call means;
//! - `status`: progress and standing orders shared by the threads;
//! - `heartbeat`: the heartbeat thread;
//! - `control`: the loop's control in a world;
//! - `captions`: the prefetching caption feed;
//! - `communicator`: forming a world's communicator: the backend seam (tcp
//!   ring; nccl) and its bootstrap (the all-reduce is `crate::collective`);
//! - `report`: the checkpoint sink that reports to the coordinator;
//! - `signals`: preemption on SIGTERM / ctrl-c;
//! - `health`: the worker's `/healthz`;
//! - `rendezvous`: the calls outside a world (register, rendezvous until
//!   placed, wait out a broken world, leave), each retried, and the job
//!   they bring;
//! - `runtime`: the worker's life, world after world.

pub mod captions;
pub mod communicator;
pub mod control;
pub mod health;
pub mod heartbeat;
pub mod link;
mod rendezvous;
pub mod report;
pub mod runtime;
pub mod signals;
pub mod status;

pub use runtime::{WorkerEnd, WorkerError, WorkerOptions, WorkerSummary, run_worker};

/// Several workers in one process (local mode) share the CPU: libtorch's
/// thread pool is the process's, so each gets its part of it.
pub fn share_cpu_threads(num_workers: usize) {
    let threads = tch::get_num_threads().max(1) as usize;
    tch::set_num_threads((threads / num_workers.max(1)).max(1) as i32);
}
