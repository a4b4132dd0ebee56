//! Long-polls: Rendezvous and FetchBootstrap return as soon as the answer
//! is there, or when their wait runs out. They re-ask the core whenever a
//! transition emitted effects, and at least every second (a waiting worker
//! stays ready only while it keeps asking).

use std::time::Duration;

use tokio::time::Instant;

use super::Coordinator;
use super::error::AppError;
use crate::domain::{BootstrapView, RendezvousOutcome, WorkerId};

/// Longest a long-poll waits, whatever the caller asks.
pub const MAX_WAIT: Duration = Duration::from_millis(swiftbrush_proto::rpc::MAX_WAIT_MS);

/// How often a waiting call re-asks even when nothing changed.
const REFRESH: Duration = Duration::from_secs(1);

impl Coordinator {
    pub async fn rendezvous(
        &self,
        worker: WorkerId,
        known_generation: u64,
        teacher_fingerprint: &str,
        wait: Duration,
    ) -> Result<RendezvousOutcome, AppError> {
        self.wait_for(wait, |c| {
            let out = c.transition(|s, now| {
                s.rendezvous(worker, known_generation, teacher_fingerprint, now)
            })?;
            // A worker asked for its teacher is answered at once.
            let done = !matches!(out, RendezvousOutcome::Waiting(ref w) if !w.needs_teacher);
            Ok((out, done))
        })
        .await
    }

    pub async fn fetch_bootstrap(
        &self,
        worker: WorkerId,
        generation: u64,
        all_ranks: bool,
        wait: Duration,
    ) -> Result<BootstrapView, AppError> {
        self.wait_for(wait, |c| {
            let view =
                c.transition(|s, now| s.fetch_bootstrap(worker, generation, all_ranks, now))?;
            let done = view.complete;
            Ok((view, done))
        })
        .await
    }

    /// Asks `poll` until it says done or `wait` passes; errors end the wait.
    async fn wait_for<T>(
        &self,
        wait: Duration,
        mut poll: impl FnMut(&Self) -> Result<(T, bool), AppError>,
    ) -> Result<T, AppError> {
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        let mut changes = self.inner.changed.subscribe();
        loop {
            // Seen before asking: a change during the ask wakes the wait.
            changes.borrow_and_update();
            let (out, done) = poll(self)?;
            let now = Instant::now();
            if done || now >= deadline || self.is_shutting_down() {
                return Ok(out);
            }
            let nap = deadline.min(now + REFRESH);
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(nap) => {}
            }
        }
    }
}
