//! What must hold after every transition. Tests call this after each step;
//! the service checks it in debug builds.

use std::collections::BTreeSet;

use super::state::CoordinatorState;
use super::types::JobPhase;
use super::world::best_world_size;

impl CoordinatorState {
    /// Every broken rule, as one message each (empty: all hold).
    pub fn invariant_violations(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                bad.push(what);
            }
        };
        let world = self.world();
        // Ranks: exactly the members of the current world hold one, and it
        // is their index.
        for w in self.workers.values() {
            match (w.rank, world.and_then(|wd| wd.rank_of(w.id))) {
                (Some(r), Some(idx)) => {
                    check(r == idx, format!("{} holds rank {r} at index {idx}", w.id))
                }
                (Some(r), None) => {
                    check(false, format!("{} holds rank {r} outside the world", w.id))
                }
                (None, Some(idx)) => {
                    check(false, format!("{} is member {idx} without a rank", w.id))
                }
                (None, None) => {}
            }
            if w.is_dead() {
                check(w.rank.is_none(), format!("dead {} holds a rank", w.id));
                check(w.ready_since.is_none(), format!("dead {} is ready", w.id));
            }
            if w.rank.is_some() {
                check(
                    w.ready_since.is_none(),
                    format!("member {} is also ready", w.id),
                );
            }
        }
        if let Some(job) = self.job.as_ref() {
            check(
                job.generation >= 1,
                "a job's generation starts at 1".to_owned(),
            );
            check(
                job.generation > job.spec.last_generation,
                format!(
                    "generation {} is not past the stored one {}",
                    job.generation, job.spec.last_generation
                ),
            );
            check(
                job.committed_step <= job.spec.max_steps,
                format!("committed step {} past max_steps", job.committed_step),
            );
            check(
                (job.phase == JobPhase::Running) == job.world.is_some(),
                format!(
                    "phase {} with world {:?}",
                    job.phase.name(),
                    job.world.is_some()
                ),
            );
            check(
                job.phase == JobPhase::Failed || job.restarts <= job.spec.max_restarts,
                format!("{} restarts and not failed", job.restarts),
            );
            if let Some(stop) = &job.stop_at {
                check(
                    job.phase == JobPhase::Running,
                    format!("waiting to stop in phase {}", job.phase.name()),
                );
                check(
                    stop.step > job.committed_step && stop.step <= job.spec.max_steps,
                    format!(
                        "final checkpoint at {} with {} committed",
                        stop.step, job.committed_step
                    ),
                );
                check(job.resize_at.is_none(), "growing while stopping".to_owned());
            }
            if let Some(c) = job.commit_in_flight {
                check(
                    c.generation <= job.generation,
                    "commit from a future generation".to_owned(),
                );
            }
            if let Some(world) = job.world.as_ref() {
                // At most one world per generation: the world carries the
                // current number, and every bump retires it.
                check(
                    world.generation == job.generation,
                    format!(
                        "world generation {} vs job {}",
                        world.generation, job.generation
                    ),
                );
                let unique: BTreeSet<_> = world.members.iter().collect();
                check(
                    unique.len() == world.members.len(),
                    "a worker holds two ranks".to_owned(),
                );
                let size = world.size();
                check(
                    (job.spec.min_size..=job.spec.max_size).contains(&size)
                        && job.spec.global_batch.is_multiple_of(u64::from(size))
                        && best_world_size(size as usize, &job.spec) == Some(size),
                    format!("world size {size} is not allowed"),
                );
                check(
                    world.resume_step <= job.committed_step,
                    "world resumes past the committed step".to_owned(),
                );
                for id in &world.members {
                    let w = self.workers.get(id);
                    check(
                        w.is_some_and(|w| !w.is_dead()),
                        format!("member {id} is dead or gone"),
                    );
                    check(
                        w.is_some_and(|w| w.generation == world.generation),
                        format!("member {id} has another generation"),
                    );
                }
                check(
                    world.bootstrap.keys().all(|&r| r < size),
                    "bootstrap blob of a rank outside the world".to_owned(),
                );
            }
        } else {
            check(
                self.workers.values().all(|w| w.rank.is_none()),
                "a rank without a job".to_owned(),
            );
        }
        bad
    }
}
