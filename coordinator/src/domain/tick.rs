//! The passage of time: workers turn Suspect and then Dead when silent,
//! members of a running world die when their step stops advancing,
//! quarantines expire, old dead workers are forgotten, and worlds that were
//! waiting for settling or backoff form.

use super::effect::Effect;
use super::state::CoordinatorState;
use super::types::{Departure, Health, JobPhase, Millis, WorkerId};

impl CoordinatorState {
    pub fn tick(&mut self, now: Millis) {
        let timeout = self.heartbeat_timeout_ms();
        let suspect_after = self.suspect_after_ms();
        let progress_timeout = self
            .job
            .as_ref()
            .filter(|j| j.phase == JobPhase::Running)
            .map(|j| j.spec.progress_timeout_ms);
        let mut dead: Vec<(WorkerId, Departure)> = Vec::new();
        let mut suspects: Vec<(WorkerId, u64)> = Vec::new();
        for w in self.workers.values().filter(|w| !w.is_dead()) {
            let silent_ms = now.saturating_sub(w.last_seen);
            let stalled_ms = now.saturating_sub(w.progress_at);
            if silent_ms > timeout {
                dead.push((w.id, Departure::HeartbeatTimeout { silent_ms }));
            } else if let Some(limit) = progress_timeout
                && w.rank.is_some()
                && stalled_ms > limit
            {
                dead.push((
                    w.id,
                    Departure::NoProgress {
                        step: w.step,
                        stalled_ms,
                    },
                ));
            } else if silent_ms > suspect_after && w.health == Health::Alive {
                suspects.push((w.id, silent_ms));
            }
        }
        for (id, silent_ms) in suspects {
            if let Some(w) = self.workers.get_mut(&id) {
                w.health = Health::Suspect;
            }
            self.effects.push(Effect::WorkerSuspect {
                worker: id,
                silent_ms,
            });
        }
        for (id, departure) in dead {
            self.declare_dead(id, departure, now);
        }
        self.release_quarantines(now);
        let retention = self.options.dead_retention_ms;
        self.workers
            .retain(|_, w| w.died_at.is_none_or(|t| now.saturating_sub(t) < retention));
        self.try_form(now);
        self.plan_resize(now);
    }

    fn release_quarantines(&mut self, now: Millis) {
        let window = self.options.quarantine_window_ms;
        for (host, record) in &mut self.hosts {
            record.failures.retain(|&t| now.saturating_sub(t) < window);
            if record.quarantined_until.is_some_and(|until| until <= now) {
                record.quarantined_until = None;
                self.effects
                    .push(Effect::HostReleased { host: host.clone() });
            }
        }
        self.hosts
            .retain(|_, r| r.quarantined_until.is_some() || !r.failures.is_empty());
    }
}
