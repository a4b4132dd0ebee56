//! The test harness: a state, a fake clock, and helpers that run one
//! transition and then check every invariant.

use super::super::*;

/// The teacher fingerprint every simulated worker reports.
pub const TEACHER: &str = "teacher-fingerprint";

/// A job of `min..=max` workers over 10 captions, global batch 4.
pub fn spec(min: u32, max: u32) -> JobSpec {
    JobSpec {
        name: "test".to_owned(),
        config_fingerprint: "f".repeat(64),
        min_size: min,
        max_size: max,
        backend: BackendPolicy::Auto,
        heartbeat_interval_ms: 1_000,
        heartbeat_timeout_ms: 10_000,
        progress_timeout_ms: 60_000,
        max_restarts: 3,
        global_batch: 4,
        max_steps: 100,
        seed: 7,
        shuffle: true,
        num_captions: 10,
        keep_last: 3,
        committed_step: 0,
        last_generation: 0,
        teacher_fingerprint: None,
    }
}

pub fn options() -> CoreOptions {
    CoreOptions {
        settle_ms: 2_000,
        restart_backoff_ms: 1_000,
        max_backoff_ms: 8_000,
        quarantine_after: 3,
        quarantine_window_ms: 600_000,
        quarantine_ms: 60_000,
        worker_id_base: 0,
        ..CoreOptions::default()
    }
}

pub struct Sim {
    pub state: CoordinatorState,
    pub now: Millis,
    /// Every effect so far, in order.
    pub effects: Vec<Effect>,
    /// Generations that have had a world.
    formed: std::collections::BTreeSet<u64>,
}

impl Sim {
    pub fn new() -> Self {
        Self {
            state: CoordinatorState::new(options()),
            now: 1_000,
            effects: Vec::new(),
            formed: Default::default(),
        }
    }

    pub fn with_job(spec: JobSpec) -> Self {
        let mut sim = Self::new();
        sim.apply(|s, now| s.submit(spec, now)).unwrap();
        sim
    }

    /// Runs one transition and checks the invariants after it, including
    /// one no single state can show: at most one world per generation.
    pub fn apply<T>(&mut self, f: impl FnOnce(&mut CoordinatorState, Millis) -> T) -> T {
        let out = f(&mut self.state, self.now);
        let bad = self.state.invariant_violations();
        assert!(
            bad.is_empty(),
            "invariants broken at {}: {bad:#?}",
            self.now
        );
        for effect in self.state.take_effects() {
            if let Effect::WorldFormed { generation, .. } = effect {
                assert!(
                    self.formed.insert(generation),
                    "a second world of generation {generation}"
                );
            }
            self.effects.push(effect);
        }
        out
    }

    /// Runs a transition that must be refused, and checks that it changed
    /// nothing.
    pub fn refused<T: std::fmt::Debug>(
        &mut self,
        f: impl FnOnce(&mut CoordinatorState, Millis) -> Result<T, CoreError>,
    ) -> CoreError {
        let before = self.state.clone();
        let err = self.apply(f).expect_err("the transition should be refused");
        assert_eq!(self.state, before, "a refused transition changed the state");
        err
    }

    /// Moves the clock and lets timers fire.
    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.apply(|s, now| s.tick(now));
    }

    pub fn register_on(&mut self, host: &str, device: &str) -> WorkerId {
        let input = RegisterInput {
            host: host.to_owned(),
            device: device.to_owned(),
            capabilities: Capabilities::default(),
        };
        self.apply(|s, now| s.register(input, now)).unwrap().worker
    }

    pub fn register(&mut self, host: &str) -> WorkerId {
        self.register_on(host, "cpu")
    }

    pub fn rendezvous(&mut self, w: WorkerId) -> RendezvousOutcome {
        let known = self.state.worker(w).map_or(0, |w| w.generation);
        self.apply(|s, now| s.rendezvous(w, known, TEACHER, now))
            .unwrap()
    }

    pub fn assigned(&mut self, w: WorkerId) -> Assignment {
        match self.rendezvous(w) {
            RendezvousOutcome::Assigned(a) => a,
            other => panic!("{w} not assigned: {other:?}"),
        }
    }

    pub fn waiting(&mut self, w: WorkerId) -> WaitInfo {
        match self.rendezvous(w) {
            RendezvousOutcome::Waiting(info) => info,
            other => panic!("{w} not waiting: {other:?}"),
        }
    }

    pub fn heartbeat(&mut self, w: WorkerId, generation: u64, step: u64) -> Command {
        let input = HeartbeatInput {
            worker: w,
            generation,
            step,
            phase: WorkerPhase::Training,
            metrics: StepMetrics::default(),
        };
        self.apply(|s, now| s.heartbeat(input, now))
            .unwrap()
            .command
    }

    /// Every live worker in `ws` heartbeats at `step` (keeps them alive).
    pub fn beat_all(&mut self, ws: &[WorkerId], step: u64) {
        for &w in ws {
            let generation = self.state.worker(w).map_or(0, |w| w.generation);
            self.heartbeat(w, generation, step);
        }
    }

    /// Lets `ms` pass in 1 s ticks while `ws` keep heartbeating at `step`.
    pub fn pass(&mut self, ws: &[WorkerId], step: u64, ms: u64) {
        for _ in 0..ms / 1_000 {
            self.beat_all(ws, step);
            self.advance(1_000);
        }
    }

    /// Registers `n` workers on hosts h0.. and forms a world of all of them.
    pub fn world_of(&mut self, n: usize) -> Vec<WorkerId> {
        let ws: Vec<WorkerId> = (0..n).map(|i| self.register(&format!("h{i}"))).collect();
        for &w in &ws {
            self.rendezvous(w);
        }
        for &w in &ws {
            self.assigned(w);
        }
        ws
    }

    /// Rank 0 reports and the store commits a checkpoint at `step`.
    pub fn commit(&mut self, rank0: WorkerId, step: u64) {
        let generation = self.state.generation();
        let report = CheckpointReport {
            worker: rank0,
            generation,
            step,
            teacher_fingerprint: "t".to_owned(),
            upload_seconds: 1.5,
        };
        let ticket = self.apply(|s, now| s.begin_commit(report, now)).unwrap();
        self.apply(|s, now| s.finish_commit(&ticket, CommitResult::Committed, now));
    }

    pub fn rank_of(&self, w: WorkerId) -> Option<u32> {
        self.state.worker(w).and_then(|w| w.rank)
    }

    pub fn health(&self, w: WorkerId) -> Health {
        self.state.worker(w).map_or(Health::Dead, |w| w.health)
    }
}
