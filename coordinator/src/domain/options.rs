//! The coordinator's own policy knobs: the timings the job config does not
//! hold (how long to wait for more workers, restart backoff, quarantine).

/// Policy that is the coordinator's, not the job's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreOptions {
    /// Once a world of at least min_size could form, wait this long for more
    /// workers before forming a smaller one than max_size allows.
    pub settle_ms: u64,
    /// After a failure, the next world forms no sooner than
    /// `restart_backoff_ms * 2^(restarts - 1)`, capped at `max_backoff_ms`.
    pub restart_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// This many failures of workers on one host within
    /// `quarantine_window_ms` quarantine the host for `quarantine_ms`.
    pub quarantine_after: u32,
    pub quarantine_window_ms: u64,
    pub quarantine_ms: u64,
    /// A worker counts as ready for this long after its last Rendezvous
    /// call (the service re-asks every second while a call waits).
    pub ready_ttl_ms: u64,
    /// Dead workers stay on the status page this long.
    pub dead_retention_ms: u64,
    /// Most live workers at once (`--max-workers`); more registrations are
    /// refused. A job raises it to twice its world.max_size
    /// (`CoordinatorState::worker_cap`).
    pub max_workers: usize,
    /// High bits of every worker id (random per coordinator instance).
    pub worker_id_base: u64,
    /// Heartbeat timing before any job (a job's config overrides both).
    pub default_heartbeat_interval_ms: u64,
    pub default_heartbeat_timeout_ms: u64,
}

impl Default for CoreOptions {
    fn default() -> Self {
        Self {
            settle_ms: 3_000,
            restart_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            quarantine_after: 3,
            quarantine_window_ms: 600_000,
            quarantine_ms: 1_800_000,
            ready_ttl_ms: 5_000,
            dead_retention_ms: 3_600_000,
            max_workers: 4_096,
            worker_id_base: 0,
            default_heartbeat_interval_ms: 1_000,
            default_heartbeat_timeout_ms: 10_000,
        }
    }
}

impl CoreOptions {
    /// The delay before the next world after the `restarts`-th failure.
    pub fn backoff_ms(&self, restarts: u32) -> u64 {
        let doublings = restarts.saturating_sub(1).min(32);
        self.restart_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms)
    }
}
