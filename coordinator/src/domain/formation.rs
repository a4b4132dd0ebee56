//! Forming worlds: which ready workers are candidates, when a world forms
//! (between min_size and max_size, any size dividing the global batch,
//! after settling and backoff, never while a commit is in flight), and
//! planning a resize when standby workers could make the world larger.

use super::effect::Effect;
use super::replies::WaitInfo;
use super::state::CoordinatorState;
use super::types::{Health, JobPhase, Millis, WorkerId};
use super::world::{World, best_world_size, can_run, choose_backend};

/// Whether a world forms now, and from whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Formation {
    Form(Vec<WorkerId>),
    Wait(WaitInfo),
}

impl CoordinatorState {
    /// The workers waiting in Rendezvous that a new world could take now.
    pub fn ready_workers(&self, now: Millis) -> Vec<WorkerId> {
        self.candidates(now)
    }

    /// Ready, alive, unranked workers on hosts not quarantined that can run
    /// the job's backend, first come first placed.
    pub(crate) fn candidates(&self, now: Millis) -> Vec<WorkerId> {
        let Some(job) = self.job.as_ref() else {
            return Vec::new();
        };
        let mut ready: Vec<(Millis, WorkerId)> = self
            .workers
            .values()
            .filter(|w| w.health == Health::Alive && w.rank.is_none())
            .filter(|w| self.quarantine_remaining(&w.host, now).is_none())
            .filter(|w| can_run(w, job.spec.backend))
            .filter(|w| now.saturating_sub(w.ready_seen) <= self.options.ready_ttl_ms)
            .filter_map(|w| w.ready_since.map(|t| (t, w.id)))
            .collect();
        ready.sort_unstable();
        ready.into_iter().map(|(_, id)| id).collect()
    }

    pub(crate) fn formation(&self, now: Millis) -> Formation {
        let wait = |reason: String, num_ready: usize, min_size: u32, retry_after_ms: u64| {
            Formation::Wait(WaitInfo {
                reason,
                num_ready: u32::try_from(num_ready).unwrap_or(u32::MAX),
                min_size,
                retry_after_ms,
                needs_teacher: false,
            })
        };
        let Some(job) = self.job.as_ref() else {
            return wait("no job has been submitted".to_owned(), 0, 0, 1_000);
        };
        let min = job.spec.min_size;
        let candidates = self.candidates(now);
        let n = candidates.len();
        match job.phase {
            JobPhase::Running => {
                let size = job.world.as_ref().map_or(0, World::size);
                return wait(
                    format!(
                        "standby: the world of generation {} is running with {size} workers",
                        job.generation
                    ),
                    n,
                    min,
                    1_000,
                );
            }
            phase if phase.is_terminal() => {
                return wait(format!("the job has ended ({})", phase.name()), n, min, 0);
            }
            _ => {}
        }
        if let Some(commit) = job.commit_in_flight {
            return wait(
                format!("waiting for the commit of step {}", commit.step),
                n,
                min,
                500,
            );
        }
        if let Some(step) = job.verifying {
            return wait(
                format!("verifying the checkpoint of step {step} before resuming from it"),
                n,
                min,
                500,
            );
        }
        if now < job.not_before {
            return wait(
                format!("backing off after restart {}", job.restarts),
                n,
                min,
                job.not_before - now,
            );
        }
        let Some(size) = best_world_size(n, &job.spec) else {
            return wait(
                format!(
                    "{n} workers ready; a world needs {min}..={} workers, a number dividing the global batch {}",
                    job.spec.max_size, job.spec.global_batch
                ),
                n,
                min,
                1_000,
            );
        };
        // Checked at submission: some size in range divides the batch.
        let largest = best_world_size(job.spec.max_size as usize, &job.spec).unwrap_or(size);
        let settle_end = job.phase_since.saturating_add(self.options.settle_ms);
        if size < largest && now < settle_end {
            return wait(
                format!("{n} workers ready; waiting for more before forming a world of {size}"),
                n,
                min,
                settle_end - now,
            );
        }
        Formation::Form(candidates.into_iter().take(size as usize).collect())
    }

    /// Forms a world if one can form now.
    pub(crate) fn try_form(&mut self, now: Millis) {
        let Formation::Form(members) = self.formation(now) else {
            return;
        };
        let Some(job) = self.job.as_ref() else {
            return;
        };
        let backend = choose_backend(
            job.spec.backend,
            members.iter().filter_map(|id| self.workers.get(id)),
        );
        let resume_step = job.committed_step;
        let generation = job.generation;
        for (rank, id) in members.iter().enumerate() {
            if let Some(worker) = self.workers.get_mut(id) {
                worker.rank = Some(rank as u32);
                worker.generation = generation;
                worker.ready_since = None;
                worker.step = resume_step;
                worker.progress_at = now;
            }
        }
        let world = World {
            generation,
            members,
            resume_step,
            formed_at: now,
            backend,
            bootstrap: Default::default(),
        };
        let world_size = world.size();
        let Some(job) = self.job.as_mut() else {
            return;
        };
        job.world = Some(world);
        job.phase = JobPhase::Running;
        job.phase_since = now;
        job.reason = format!("world of {world_size} formed at generation {generation}");
        self.effects.push(Effect::WorldFormed {
            generation,
            world_size,
            resume_step,
            backend,
        });
    }

    /// When standby workers could make a larger world, asks for a
    /// checkpoint one step ahead; the world re-forms larger once it commits
    /// (so growing never loses a step of training).
    pub(crate) fn plan_resize(&mut self, now: Millis) {
        let Some(job) = self.job.as_ref() else {
            return;
        };
        if job.phase != JobPhase::Running || job.resize_at.is_some() || job.stop_at.is_some() {
            return;
        }
        let Some(world) = job.world.as_ref() else {
            return;
        };
        let standby = self.candidates(now).len();
        if standby == 0 {
            return;
        }
        let size = world.size();
        let Some(best) = best_world_size(world.members.len() + standby, &job.spec) else {
            return;
        };
        if best <= size {
            return;
        }
        let newest = world
            .members
            .iter()
            .filter_map(|id| self.workers.get(id))
            .map(|w| w.step)
            .max()
            .unwrap_or(world.resume_step)
            .max(world.resume_step);
        let step = (newest + 1).min(job.spec.max_steps);
        if step <= job.committed_step {
            return;
        }
        if let Some(job) = self.job.as_mut() {
            job.resize_at = Some(step);
        }
        self.effects.push(Effect::ResizePlanned {
            step,
            from_size: size,
            to_size: best,
        });
    }
}
