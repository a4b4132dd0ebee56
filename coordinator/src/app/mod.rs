//! The shell around the domain core: one `Coordinator` owns the core's state
//! behind a mutex, a clock, the run store and the job's caption corpus. It
//! runs each transition, logs and acts on its effects, wakes long-polling
//! callers, and does the I/O the core must not (loading captions, committing
//! checkpoints, retention). No tonic types: the gRPC layer calls it, and so
//! can tests or another transport.

mod captions;
mod clock;
mod commit;
mod corpus;
mod error;
mod lease;
mod loss_history;
mod submit;
mod waiting;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use swiftbrush_proto::run_store::{AsyncRunStore, LeaseHolder, RunLease};
use tokio::sync::watch;

pub use captions::{MAX_CAPTION_REPLY_BYTES, StepCaptions};
pub use clock::{Clock, ManualClock, TokioClock};
pub use commit::Committed;
pub use corpus::{CaptionCorpus, CaptionFields, CorpusError};
pub use error::AppError;
pub use loss_history::{LossHistory, LossPoint, LossSeries};
pub use submit::{JobInfo, Submitted};
pub use waiting::MAX_WAIT;

use crate::domain::{
    CoordinatorState, CoreOptions, Effect, HeartbeatAck, HeartbeatInput, Millis, RegisterInput,
    Registration, StatusSnapshot, WorkerId,
};

/// The job the coordinator runs, as the shell keeps it beside the core.
#[derive(Debug, Clone)]
struct JobData {
    info: JobInfo,
    corpus: CaptionCorpus,
}

struct Inner {
    state: Mutex<CoordinatorState>,
    /// Bumped after every transition that emitted effects: long-polls wait
    /// on it.
    changed: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
    store: AsyncRunStore,
    job: RwLock<Option<JobData>>,
    /// Set when the server stops: long-polls answer at once.
    shutting_down: AtomicBool,
    /// The run directory's lease (lease.rs); none in tests that build a
    /// bare `Coordinator`.
    lease: tokio::sync::Mutex<Option<RunLease>>,
    /// The holder that took the lease, once it is lost.
    lease_lost: watch::Sender<Option<LeaseHolder>>,
    /// The losses heartbeats reported, for the status page's curves.
    history: Mutex<LossHistory>,
}

/// The coordinator: cheap to clone, every clone is the same coordinator.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("store", &self.inner.store.name())
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    pub fn new(options: CoreOptions, store: AsyncRunStore, clock: Arc<dyn Clock>) -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(CoordinatorState::new(options)),
                changed,
                clock,
                store,
                job: RwLock::new(None),
                shutting_down: AtomicBool::new(false),
                lease: tokio::sync::Mutex::new(None),
                lease_lost: watch::channel(None).0,
                history: Mutex::new(LossHistory::default()),
            }),
        }
    }

    pub fn store(&self) -> &AsyncRunStore {
        &self.inner.store
    }

    pub fn now(&self) -> Millis {
        self.inner.clock.now_ms()
    }

    fn lock(&self) -> MutexGuard<'_, CoordinatorState> {
        // A panic inside a transition is a bug; the state it left is still
        // the best there is, and refusing every later call would be worse.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs one transition of the core at the current time, then carries out
    /// its effects.
    fn transition<T>(&self, f: impl FnOnce(&mut CoordinatorState, Millis) -> T) -> T {
        let (out, effects) = {
            let mut state = self.lock();
            let now = self.now();
            let out = f(&mut state, now);
            debug_assert!(
                state.invariant_violations().is_empty(),
                "{:?}",
                state.invariant_violations()
            );
            (out, state.take_effects())
        };
        if !effects.is_empty() {
            for effect in &effects {
                self.carry_out(effect);
            }
            self.inner.changed.send_modify(|v| *v += 1);
        }
        out
    }

    fn carry_out(&self, effect: &Effect) {
        match effect {
            Effect::ApplyRetention { keep_last } => {
                let store = self.inner.store.clone();
                let keep_last = (*keep_last).max(1) as usize;
                tokio::spawn(async move {
                    if let Err(e) = store.apply_retention(keep_last).await {
                        tracing::warn!(error = %e, "checkpoint retention failed");
                    }
                });
            }
            Effect::VerifyCheckpoint { step } => {
                tracing::warn!(
                    step,
                    "a world failed before training past its checkpoint: verifying it"
                );
                let this = self.clone();
                let step = *step;
                tokio::spawn(async move {
                    let newest = this
                        .store()
                        .latest_verified()
                        .await
                        .map(|m| m.map(|m| m.step))
                        .map_err(|e| e.to_string());
                    if let Err(e) = &newest {
                        tracing::warn!(step, error = %e, "could not verify the checkpoint");
                    }
                    this.transition(|s, _| s.checkpoint_checked(step, newest));
                });
            }
            // Leaving on purpose and completing are how things should go.
            Effect::WorkerDied { departure, .. } if !departure.is_failure() => {
                tracing::info!(effect = %json(effect), "coordinator");
            }
            Effect::JobEnded {
                phase: crate::domain::JobPhase::Completed,
                ..
            } => tracing::info!(effect = %json(effect), "coordinator"),
            Effect::WorkerDied { .. }
            | Effect::GenerationBumped { .. }
            | Effect::HostQuarantined { .. }
            | Effect::JobEnded { .. } => {
                tracing::warn!(effect = %json(effect), "coordinator");
            }
            _ => tracing::info!(effect = %json(effect), "coordinator"),
        }
    }

    /// Makes waiting calls return now (the server is stopping).
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.changed.send_modify(|v| *v += 1);
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Lets time pass in the core (timeouts, settling, backoff).
    pub fn tick(&self) {
        self.transition(|s, now| s.tick(now));
    }

    /// Ticks every `period` until `shutdown` resolves.
    pub async fn run_ticker(
        self,
        period: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = interval.tick() => self.tick(),
            }
        }
    }

    pub fn register(
        &self,
        input: RegisterInput,
    ) -> Result<(Registration, Option<JobInfo>), AppError> {
        let registration = self.transition(|s, now| s.register(input, now))?;
        Ok((registration, self.job_info()))
    }

    pub fn heartbeat(&self, input: HeartbeatInput) -> Result<HeartbeatAck, AppError> {
        let (worker, step, metrics) = (input.worker, input.step, input.metrics);
        let ack = self.transition(|s, now| s.heartbeat(input, now))?;
        self.inner
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(worker, step, &metrics);
        Ok(ack)
    }

    /// Each worker's reported losses since this coordinator started.
    pub fn loss_history(&self) -> Vec<LossSeries> {
        self.inner
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .series()
    }

    pub fn leave(&self, worker: WorkerId, reason: String) -> Result<(), AppError> {
        Ok(self.transition(|s, now| s.leave(worker, reason, now))?)
    }

    /// A worker exiting on an error it reports (`CoordinatorState::fail`).
    pub fn worker_failed(&self, worker: WorkerId, reason: String) -> Result<(), AppError> {
        tracing::warn!(%worker, %reason, "a worker failed");
        Ok(self.transition(|s, now| s.fail_worker(worker, reason, now))?)
    }

    pub fn publish_bootstrap(
        &self,
        worker: WorkerId,
        generation: u64,
        rank: u32,
        blob: Vec<u8>,
    ) -> Result<(), AppError> {
        Ok(self.transition(|s, now| s.publish_bootstrap(worker, generation, rank, blob, now))?)
    }

    pub fn cancel(&self, reason: String) -> Result<crate::domain::JobPhase, AppError> {
        Ok(self.transition(|s, now| s.cancel(reason, now))?)
    }

    /// Cancels after a final checkpoint; the step it waits for (None: ended).
    pub fn cancel_after_checkpoint(&self, reason: String) -> Result<Option<u64>, AppError> {
        Ok(self.transition(|s, now| s.cancel_after_checkpoint(reason, now))?)
    }

    pub fn status(&self) -> StatusSnapshot {
        let state = self.lock();
        state.snapshot(self.now())
    }

    /// The job's config and name, once one is submitted.
    pub fn job_info(&self) -> Option<JobInfo> {
        self.read_job().map(|j| j.info)
    }

    fn read_job(&self) -> Option<JobData> {
        self.inner
            .job
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs a read-only look at the core state (tests, the HTTP side).
    pub fn inspect<T>(&self, f: impl FnOnce(&CoordinatorState) -> T) -> T {
        f(&self.lock())
    }
}

fn json(effect: &Effect) -> String {
    serde_json::to_string(effect).unwrap_or_else(|_| format!("{effect:?}"))
}
