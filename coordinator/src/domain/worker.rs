//! A worker's record: who it is, what it can do, what it last reported,
//! and where it stands (health, readiness, rank).

use serde::Serialize;

use super::types::{Backend, Departure, Health, Millis, StepMetrics, WorkerId, WorkerPhase};

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Capabilities {
    /// Empty: unknown (assumed able to run any backend).
    pub backends: Vec<Backend>,
    pub device_memory_bytes: u64,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Worker {
    pub id: WorkerId,
    pub host: String,
    pub device: String,
    pub capabilities: Capabilities,
    pub health: Health,
    pub registered_at: Millis,
    /// Any RPC from the worker counts as a sign of life.
    pub last_seen: Millis,
    /// Completed steps, as last reported within its current world.
    pub step: u64,
    /// When `step` last advanced (or the world formed).
    pub progress_at: Millis,
    pub phase: WorkerPhase,
    pub metrics: StepMetrics,
    /// Set while the worker waits in Rendezvous for a world.
    pub ready_since: Option<Millis>,
    /// The last Rendezvous call: readiness lapses when the worker stops
    /// asking (it may have moved on without saying so).
    pub ready_seen: Millis,
    /// The last generation the worker was placed in (0: none).
    pub generation: u64,
    /// Its rank in the current world, if it is a member.
    pub rank: Option<u32>,
    pub departure: Option<Departure>,
    /// When it was declared dead (for pruning the status page).
    pub died_at: Option<Millis>,
}

impl Worker {
    pub fn new(
        id: WorkerId,
        host: String,
        device: String,
        capabilities: Capabilities,
        now: Millis,
    ) -> Self {
        Self {
            id,
            host,
            device,
            capabilities,
            health: Health::Alive,
            registered_at: now,
            last_seen: now,
            step: 0,
            progress_at: now,
            phase: WorkerPhase::Unspecified,
            metrics: StepMetrics::default(),
            ready_since: None,
            ready_seen: now,
            generation: 0,
            rank: None,
            departure: None,
            died_at: None,
        }
    }

    pub fn is_dead(&self) -> bool {
        self.health == Health::Dead
    }

    pub fn supports(&self, backend: Backend) -> bool {
        self.capabilities.backends.is_empty() || self.capabilities.backends.contains(&backend)
    }

    /// A sign of life: a Suspect worker is Alive again.
    pub fn touch(&mut self, now: Millis) {
        self.last_seen = self.last_seen.max(now);
        if self.health == Health::Suspect {
            self.health = Health::Alive;
        }
    }
}
