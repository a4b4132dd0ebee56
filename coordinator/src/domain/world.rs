//! A world: the ranked members of one generation, the checkpoint they start
//! from, and their collective bootstrap blobs; plus the pure rules for its
//! size and backend.

use std::collections::BTreeMap;

use serde::Serialize;

use super::job::{BackendPolicy, JobSpec};
use super::types::{Backend, Millis, WorkerId};
use super::worker::Worker;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct World {
    pub generation: u64,
    /// Index = rank.
    pub members: Vec<WorkerId>,
    pub resume_step: u64,
    pub formed_at: Millis,
    pub backend: Backend,
    /// Published bootstrap blobs by rank (opaque to the coordinator).
    #[serde(skip)]
    pub bootstrap: BTreeMap<u32, Vec<u8>>,
}

impl World {
    pub fn size(&self) -> u32 {
        // Bounded by world.max_size, a u32.
        self.members.len() as u32
    }

    pub fn rank_of(&self, worker: WorkerId) -> Option<u32> {
        self.members
            .iter()
            .position(|&m| m == worker)
            .map(|r| r as u32)
    }

    pub fn per_rank_batch(&self, global_batch: u64) -> u64 {
        global_batch / u64::from(self.size().max(1))
    }
}

/// The largest world size that `available` workers can fill: within the
/// config's range and dividing the global batch (so every rank takes an
/// equal slice and a step's captions do not depend on the size).
pub fn best_world_size(available: usize, spec: &JobSpec) -> Option<u32> {
    let cap = u32::try_from(available)
        .unwrap_or(u32::MAX)
        .min(spec.max_size);
    (spec.min_size..=cap)
        .rev()
        .find(|&w| w > 0 && spec.global_batch.is_multiple_of(u64::from(w)))
}

/// Whether a worker can take part in a world under this policy.
pub fn can_run(worker: &Worker, policy: BackendPolicy) -> bool {
    match policy {
        BackendPolicy::Auto | BackendPolicy::Tcp => true,
        BackendPolicy::Nccl => worker.supports(Backend::Nccl),
    }
}

/// The backend of a world of these members.
pub fn choose_backend<'a>(
    policy: BackendPolicy,
    mut members: impl Iterator<Item = &'a Worker>,
) -> Backend {
    match policy {
        BackendPolicy::Nccl => Backend::Nccl,
        BackendPolicy::Tcp => Backend::Tcp,
        BackendPolicy::Auto => {
            if members.all(|w| w.device.starts_with("cuda") && w.supports(Backend::Nccl)) {
                Backend::Nccl
            } else {
                Backend::Tcp
            }
        }
    }
}
