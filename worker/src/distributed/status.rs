//! What the training thread, the heartbeat thread and `/healthz` share: the
//! worker's progress (written by the loop, sent with every heartbeat) and
//! the coordinator's orders (written by the heartbeat thread, read by the
//! loop at step boundaries). Orders are a mailbox of the latest state, not
//! a queue: a repeated command is one order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use swiftbrush_proto::rpc;

use crate::trainer::{Phase, StepReport};

/// The job ended (heartbeat `stop`, or Rendezvous `finished`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOrder {
    pub phase: rpc::JobPhase,
    pub reason: String,
}

/// The coordinator's standing orders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Orders {
    /// (the world it was asked of, the step): rank 0 checkpoints at the
    /// first boundary at or after the step.
    pub checkpoint_at: Option<(u64, u64)>,
    pub stop: Option<StopOrder>,
    /// The newest generation the coordinator told this worker to re-form
    /// into (0: none).
    pub reform_to: u64,
    pub reform_reason: String,
    /// The coordinator does not know this worker any more.
    pub unknown: bool,
}

#[derive(Debug, Default)]
pub struct WorkerStatus {
    worker_id: AtomicU64,
    /// The world this worker trains in (0: none).
    generation: AtomicU64,
    step: AtomicU64,
    phase: Mutex<Option<Phase>>,
    metrics: Mutex<rpc::StepMetrics>,
    /// The coordinator's current generation, from the last heartbeat reply.
    coordinator_generation: AtomicU64,
    /// Wall-clock ms of the last heartbeat the coordinator answered.
    last_ack_unix_ms: AtomicU64,
    heartbeat_interval_ms: AtomicU64,
    orders: Mutex<Orders>,
    orders_changed: Condvar,
    /// Set to ask the heartbeat thread for a beat now.
    poke: Mutex<bool>,
    poked: Condvar,
    shutdown: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl WorkerStatus {
    pub fn new(heartbeat_interval_ms: u64) -> Self {
        let s = Self::default();
        s.heartbeat_interval_ms
            .store(heartbeat_interval_ms, Ordering::Relaxed);
        *lock(&s.phase) = Some(Phase::Idle);
        s
    }

    pub fn worker_id(&self) -> u64 {
        self.worker_id.load(Ordering::SeqCst)
    }

    /// A new registration: the old id's orders are void (the coordinator
    /// may even be a restarted one, numbering its generations anew).
    pub fn set_worker_id(&self, id: u64) {
        // Under the orders lock, so that `forget` sees either the old id
        // with the old orders or the new id with fresh ones.
        let mut orders = lock(&self.orders);
        self.worker_id.store(id, Ordering::SeqCst);
        *orders = Orders::default();
        self.coordinator_generation.store(0, Ordering::SeqCst);
        drop(orders);
        self.orders_changed.notify_all();
    }

    /// The coordinator said it does not know worker `id`: orders the loop
    /// to register again, unless it already has (a heartbeat sent under
    /// the old id can be answered after the new registration; it must not
    /// void the new one). True if the order was given.
    pub fn forget(&self, id: u64) -> bool {
        let mut orders = lock(&self.orders);
        if self.worker_id.load(Ordering::SeqCst) != id {
            return false;
        }
        orders.unknown = true;
        drop(orders);
        self.orders_changed.notify_all();
        true
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Enters (or, with 0, leaves) a world at `step`.
    pub fn set_world(&self, generation: u64, step: u64) {
        self.generation.store(generation, Ordering::SeqCst);
        self.step.store(step, Ordering::SeqCst);
    }

    pub fn step(&self) -> u64 {
        self.step.load(Ordering::SeqCst)
    }

    pub fn phase(&self) -> Phase {
        lock(&self.phase).unwrap_or(Phase::Idle)
    }

    pub fn set_phase(&self, phase: Phase) {
        *lock(&self.phase) = Some(phase);
    }

    pub fn step_done(&self, report: &StepReport) {
        self.step.store(report.step, Ordering::SeqCst);
        // The coordinator refuses times that are not finite and >= 0; a
        // NaN loss is reported as it is.
        let time = |x: f64| {
            if x.is_finite() {
                x.clamp(0.0, 1e11)
            } else {
                0.0
            }
        };
        *lock(&self.metrics) = rpc::StepMetrics {
            loss_vsd: report.losses.vsd,
            loss_fake_score: report.losses.fake_score,
            #[allow(deprecated)]
            loss_lora: report.losses.fake_score,
            step_time_ms: time(report.step_ms),
            allreduce_ms: time(report.allreduce_ms),
            samples_per_s: time(report.samples_per_s),
            checkpoint_stall_ms: time(report.checkpoint_stall_ms),
        };
    }

    pub fn metrics(&self) -> rpc::StepMetrics {
        *lock(&self.metrics)
    }

    pub fn coordinator_generation(&self) -> u64 {
        self.coordinator_generation.load(Ordering::SeqCst)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.load(Ordering::Relaxed).max(10))
    }

    /// Milliseconds since the coordinator last answered a heartbeat.
    pub fn last_ack_age_ms(&self) -> Option<u64> {
        match self.last_ack_unix_ms.load(Ordering::SeqCst) {
            0 => None,
            t => Some(unix_ms().saturating_sub(t)),
        }
    }

    pub fn set_interval_ms(&self, interval_ms: u64) {
        if interval_ms > 0 {
            self.heartbeat_interval_ms
                .store(interval_ms, Ordering::Relaxed);
        }
    }

    /// A heartbeat reply arrived.
    pub fn acked(&self, coordinator_generation: u64, interval_ms: u64) {
        self.last_ack_unix_ms.store(unix_ms(), Ordering::SeqCst);
        self.coordinator_generation
            .store(coordinator_generation, Ordering::SeqCst);
        self.set_interval_ms(interval_ms);
        self.orders_changed.notify_all();
    }

    pub fn orders(&self) -> Orders {
        lock(&self.orders).clone()
    }

    /// Changes the orders and wakes whoever waits for them.
    pub fn order(&self, f: impl FnOnce(&mut Orders)) {
        f(&mut lock(&self.orders));
        self.orders_changed.notify_all();
    }

    /// Waits up to `timeout` for the orders to change (or a reply to come).
    pub fn wait_orders(&self, timeout: Duration) {
        let guard = lock(&self.orders);
        let _ = self.orders_changed.wait_timeout(guard, timeout);
    }

    /// Asks the heartbeat thread for a beat now.
    pub fn poke(&self) {
        *lock(&self.poke) = true;
        self.poked.notify_all();
    }

    /// The heartbeat thread's sleep: until `timeout`, a poke or shutdown.
    pub fn sleep_until_poked(&self, timeout: Duration) {
        let mut poked = lock(&self.poke);
        if !*poked && !self.is_shut_down() {
            poked = self
                .poked
                .wait_timeout(poked, timeout)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
        *poked = false;
    }

    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.poke();
    }

    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsd::VsdLosses;

    #[test]
    fn metrics_sent_are_always_acceptable_times() {
        let s = WorkerStatus::new(1000);
        s.step_done(&StepReport {
            step: 3,
            losses: VsdLosses {
                vsd: f64::NAN,
                fake_score: 0.5,
            },
            step_ms: f64::INFINITY,
            allreduce_ms: -1.0,
            samples_per_s: 8.0,
            checkpoint_stall_ms: f64::NAN,
        });
        let m = s.metrics();
        assert_eq!(s.step(), 3);
        assert_eq!(
            (
                m.step_time_ms,
                m.allreduce_ms,
                m.samples_per_s,
                m.checkpoint_stall_ms
            ),
            (0.0, 0.0, 8.0, 0.0)
        );
        assert!(m.loss_vsd.is_nan());
    }

    #[test]
    fn a_new_registration_clears_the_old_ids_orders() {
        let s = WorkerStatus::new(1000);
        s.order(|o| {
            o.unknown = true;
            o.checkpoint_at = Some((3, 7));
            o.reform_to = 4;
        });
        s.acked(4, 0);
        s.set_worker_id(9);
        assert_eq!(s.orders(), Orders::default());
        assert_eq!(s.coordinator_generation(), 0);
        assert_eq!(s.worker_id(), 9);
    }

    #[test]
    fn a_late_not_found_for_the_old_id_spares_the_new_registration() {
        let s = WorkerStatus::new(1000);
        s.set_worker_id(7);
        s.set_worker_id(9);
        assert!(!s.forget(7), "a reply to a heartbeat sent as worker 7");
        assert!(!s.orders().unknown);
        assert!(s.forget(9));
        assert!(s.orders().unknown);
    }
}
