//! The heartbeat thread: every `heartbeat_interval_ms` (or at once when
//! poked) it tells the coordinator the worker's step, phase and metrics,
//! and turns the reply's command into standing orders for the loop. When
//! the coordinator says the world is gone it also aborts the communicator,
//! so a rank blocked in a collective with a dead peer returns at once. It
//! never blocks the training thread, and runs from registration to exit
//! (also while the worker waits in Rendezvous or loads the teacher).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use swiftbrush_proto::rpc::{self, command};

use super::communicator::AbortSlot;
use super::link::{CoordinatorLink, Reaction};
use super::status::{StopOrder, WorkerStatus};
use crate::trainer::Phase;

/// A heartbeat that takes longer than this counts as missed.
const BEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// The running heartbeat thread; dropping it stops the thread.
pub struct Heartbeat {
    status: Arc<WorkerStatus>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(
        link: CoordinatorLink,
        status: Arc<WorkerStatus>,
        abort: AbortSlot,
    ) -> std::io::Result<Self> {
        let s = status.clone();
        let thread = std::thread::Builder::new()
            .name("heartbeat".to_owned())
            .spawn(move || {
                while !s.is_shut_down() {
                    beat(&link, &s, &abort);
                    s.sleep_until_poked(s.heartbeat_interval());
                }
            })?;
        Ok(Self {
            status,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.status.shut_down();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn proto_phase(phase: Phase) -> rpc::Phase {
    match phase {
        Phase::Loading => rpc::Phase::Loading,
        Phase::Training => rpc::Phase::Training,
        Phase::Checkpointing => rpc::Phase::Checkpointing,
        Phase::Idle => rpc::Phase::Idle,
    }
}

fn beat(link: &CoordinatorLink, status: &WorkerStatus, abort: &AbortSlot) {
    let worker_id = status.worker_id();
    if worker_id == 0 {
        return;
    }
    let generation = status.generation();
    let request = rpc::HeartbeatRequest {
        worker_id,
        generation,
        step: status.step(),
        phase: proto_phase(status.phase()) as i32,
        metrics: Some(status.metrics()),
    };
    match link.call("Heartbeat", BEAT_TIMEOUT, |mut c| async move {
        c.heartbeat(request).await
    }) {
        Ok(reply) => {
            status.acked(reply.generation, reply.heartbeat_interval_ms);
            if let Some(kind) = reply.command.and_then(|c| c.kind) {
                obey(kind, generation, status, abort);
            }
        }
        Err(e) => match e.reaction() {
            Reaction::Reregister => {
                // Our id is dead to the coordinator (we were silent too
                // long, or it restarted): the loop registers again. Not if
                // it already has: this beat went out under the old id.
                if status.forget(worker_id) {
                    tracing::warn!(worker_id, error = %e, "the coordinator does not know this worker");
                    abort.abort_below(u64::MAX);
                }
            }
            Reaction::Fatal => tracing::error!(error = %e, "heartbeat refused"),
            _ => tracing::debug!(error = %e, "heartbeat missed"),
        },
    }
}

/// `sent_generation`: the generation the heartbeat carried (a checkpoint
/// request belongs to that world).
fn obey(kind: command::Kind, sent_generation: u64, status: &WorkerStatus, abort: &AbortSlot) {
    match kind {
        command::Kind::None(_) => {}
        command::Kind::Checkpoint(c) => {
            status.order(|o| o.checkpoint_at = Some((sent_generation, c.step)));
        }
        command::Kind::Stop(s) => {
            let phase = s.phase();
            status.order(|o| {
                o.stop = Some(StopOrder {
                    phase,
                    reason: s.reason,
                });
            });
        }
        command::Kind::AbortAndReform(a) => {
            // A worker that already holds a place in that generation has
            // nothing to abort.
            if a.generation <= status.generation() {
                return;
            }
            tracing::warn!(generation = a.generation, reason = %a.reason, "the world is gone: aborting the communicator");
            status.order(|o| {
                if a.generation > o.reform_to {
                    o.reform_to = a.generation;
                    o.reform_reason = a.reason;
                }
            });
            abort.abort_below(a.generation);
        }
    }
}
