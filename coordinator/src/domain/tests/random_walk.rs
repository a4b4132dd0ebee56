//! Random sequences of everything workers, storage and time can do, with
//! the invariants checked after every transition: whatever the order, ranks
//! stay 0..W-1 and unique, dead workers hold none, every world has a
//! generation of its own, and the committed step only moves forward.

use super::super::*;
use super::sim::{Sim, TEACHER, spec};

/// A small fixed generator, so a failing seed replays.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn walk(seed: u64) -> Vec<Effect> {
    let mut rng = Rng(seed);
    let mut s = spec(1, 4);
    s.max_restarts = 1_000;
    let mut sim = Sim::with_job(s);
    let mut workers: Vec<WorkerId> = Vec::new();
    let mut committed = 0;
    let mut pending: Option<CommitTicket> = None;
    for _ in 0..400 {
        let pick = |rng: &mut Rng, ws: &[WorkerId]| ws[rng.below(ws.len() as u64) as usize];
        match rng.below(10) {
            0 if workers.len() < 8 => {
                let host = format!("h{}", rng.below(5));
                let device = if rng.below(2) == 0 {
                    "cpu".to_owned()
                } else {
                    format!("cuda:{}", rng.below(2))
                };
                let input = RegisterInput {
                    host,
                    device,
                    capabilities: Capabilities::default(),
                };
                if let Ok(r) = sim.apply(|st, now| st.register(input, now)) {
                    workers.push(r.worker);
                }
            }
            1 | 2 if !workers.is_empty() => {
                let w = pick(&mut rng, &workers);
                let known = sim.state.worker(w).map_or(0, |x| x.generation);
                let _ = sim.apply(|st, now| st.rendezvous(w, known, TEACHER, now));
            }
            3 | 4 if !workers.is_empty() => {
                let w = pick(&mut rng, &workers);
                let generation = sim.state.worker(w).map_or(0, |x| x.generation);
                let step = sim.state.worker(w).map_or(0, |x| x.step) + rng.below(3);
                let input = HeartbeatInput {
                    worker: w,
                    generation,
                    step,
                    phase: WorkerPhase::Training,
                    metrics: StepMetrics::default(),
                };
                let _ = sim.apply(|st, now| st.heartbeat(input, now));
            }
            5 if !workers.is_empty() && pending.is_none() => {
                let w = pick(&mut rng, &workers);
                let generation = sim.state.generation();
                let step = sim.state.worker(w).map_or(0, |x| x.step);
                let report = CheckpointReport {
                    worker: w,
                    generation,
                    step,
                    teacher_fingerprint: String::new(),
                    upload_seconds: 0.0,
                };
                pending = sim.apply(|st, now| st.begin_commit(report, now)).ok();
            }
            6 => {
                if let Some(ticket) = pending.take() {
                    let result = if rng.below(4) == 0 {
                        CommitResult::NotCommitted
                    } else {
                        CommitResult::Committed
                    };
                    sim.apply(|st, now| st.finish_commit(&ticket, result, now));
                }
            }
            7 if !workers.is_empty() => {
                let w = pick(&mut rng, &workers);
                let _ = sim.apply(|st, now| st.leave(w, "random".to_owned(), now));
            }
            8 if !workers.is_empty() => {
                let w = pick(&mut rng, &workers);
                let generation = sim.state.generation();
                let rank = sim.state.worker(w).and_then(|x| x.rank).unwrap_or(0);
                let req = CaptionRequest {
                    worker: w,
                    generation,
                    rank,
                    first_step: sim.state.world().map_or(0, |x| x.resume_step),
                    num_steps: 2,
                };
                if let Ok(slices) = sim.apply(|st, now| st.captions(req, now)) {
                    let size = sim.state.world().map_or(1, World::size) as usize;
                    assert!(slices.iter().all(|s| s.caption_ids.len() * size == 4));
                }
            }
            _ => {
                let ms = [100, 1_000, 5_000][rng.below(3) as usize];
                sim.advance(ms);
            }
        }
        let now_committed = sim.state.job().map_or(0, |j| j.committed_step);
        assert!(now_committed >= committed, "committed step went back");
        committed = now_committed;
        if sim.state.phase().is_terminal() {
            break;
        }
    }
    sim.effects
}

#[test]
fn invariants_hold_along_random_walks() {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for seed in 0..300 {
        for effect in walk(seed) {
            let kind = match effect {
                Effect::WorldFormed { .. } => "formed",
                Effect::GenerationBumped { failure: true, .. } => "broken",
                Effect::GenerationBumped { failure: false, .. } => "left or grown",
                Effect::CheckpointCommitted { .. } => "committed",
                Effect::WorkerDied { .. } => "died",
                Effect::HostQuarantined { .. } => "quarantined",
                Effect::ResizePlanned { .. } => "resize",
                _ => continue,
            };
            *counts.entry(kind).or_default() += 1;
        }
    }
    // The walks must reach the interesting places, not just wander.
    for kind in [
        "formed",
        "broken",
        "left or grown",
        "committed",
        "died",
        "quarantined",
        "resize",
    ] {
        assert!(counts.get(kind).copied().unwrap_or(0) >= 10, "{counts:?}");
    }
}
