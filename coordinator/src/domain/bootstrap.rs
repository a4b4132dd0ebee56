//! The collective bootstrap: members of a world publish opaque blobs (rank
//! 0's NCCL unique id, or every rank's TCP listen address) and fetch the
//! others'. Blobs live with the world and vanish with it.

use super::effect::Effect;
use super::error::CoreError;
use super::replies::BootstrapView;
use super::state::CoordinatorState;
use super::types::{Millis, WorkerId};

/// Largest blob a rank may publish.
pub const MAX_BOOTSTRAP_BYTES: usize = 64 * 1024;

impl CoordinatorState {
    pub fn publish_bootstrap(
        &mut self,
        worker: WorkerId,
        generation: u64,
        rank: u32,
        blob: Vec<u8>,
        now: Millis,
    ) -> Result<(), CoreError> {
        let actual = self.member_rank(worker, generation)?;
        if actual != rank {
            return Err(CoreError::WrongRank {
                worker,
                claimed: rank,
                actual,
            });
        }
        if blob.is_empty() || blob.len() > MAX_BOOTSTRAP_BYTES {
            return Err(CoreError::InvalidField {
                field: "blob",
                why: format!(
                    "must be 1..={MAX_BOOTSTRAP_BYTES} bytes, got {}",
                    blob.len()
                ),
            });
        }
        let existing = self
            .world()
            .and_then(|w| w.bootstrap.get(&rank))
            .map(|b| b == &blob);
        match existing {
            // A retry of the same publish.
            Some(true) => {}
            Some(false) => return Err(CoreError::BootstrapConflict { rank }),
            None => {
                if let Some(world) = self.job.as_mut().and_then(|j| j.world.as_mut()) {
                    world.bootstrap.insert(rank, blob);
                }
                self.effects
                    .push(Effect::BootstrapPublished { generation, rank });
            }
        }
        self.live_worker_mut(worker)?.touch(now);
        Ok(())
    }

    pub fn fetch_bootstrap(
        &mut self,
        worker: WorkerId,
        generation: u64,
        all_ranks: bool,
        now: Millis,
    ) -> Result<BootstrapView, CoreError> {
        self.member_rank(worker, generation)?;
        let world = self
            .world()
            .ok_or(CoreError::NotInWorld { worker, generation })?;
        let complete = if all_ranks {
            world.bootstrap.len() == world.members.len()
        } else {
            world.bootstrap.contains_key(&0)
        };
        let blobs = world
            .bootstrap
            .iter()
            .map(|(r, b)| (*r, b.clone()))
            .collect();
        self.live_worker_mut(worker)?.touch(now);
        Ok(BootstrapView { complete, blobs })
    }
}
