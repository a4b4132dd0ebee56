//! Cancelling after a final checkpoint: rank 0 is asked for it, the job
//! ends once it commits, and a world that breaks first ends the job too
//! (a cancelled job never re-forms).

use super::super::*;
use super::random_walk::Rng;
use super::sim::{Sim, TEACHER, spec};

fn rank0_of(sim: &Sim, ws: &[WorkerId]) -> WorkerId {
    *ws.iter()
        .find(|&&w| sim.rank_of(w) == Some(0))
        .expect("a rank 0")
}

fn cancel(sim: &mut Sim) -> Option<u64> {
    sim.apply(|s, now| s.cancel_after_checkpoint("operator".to_owned(), now))
        .expect("cancel")
}

#[test]
fn the_job_ends_once_the_final_checkpoint_commits() {
    let mut sim = Sim::with_job(spec(2, 2));
    let ws = sim.world_of(2);
    let rank0 = rank0_of(&sim, &ws);
    sim.beat_all(&ws, 7);
    sim.commit(rank0, 5);
    assert_eq!(
        cancel(&mut sim),
        Some(8),
        "one step past the newest reported"
    );
    assert_eq!(sim.state.phase(), JobPhase::Running);
    assert_eq!(sim.state.snapshot(sim.now).stopping_at_step, Some(8));
    // Asking again changes nothing.
    assert_eq!(cancel(&mut sim), Some(8));
    for &w in &ws {
        assert!(matches!(
            sim.heartbeat(w, 1, 7),
            Command::CheckpointAt { step: 8, .. }
        ));
    }
    // An earlier checkpoint (periodic) is not the final one.
    sim.commit(rank0, 7);
    assert_eq!(sim.state.phase(), JobPhase::Running);
    sim.commit(rank0, 8);
    assert_eq!(sim.state.phase(), JobPhase::Cancelled);
    let job = sim.state.job().expect("job");
    assert!(
        job.reason.contains("after the final checkpoint at step 8"),
        "{}",
        job.reason
    );
    assert!(matches!(
        sim.heartbeat(ws[0], 1, 8),
        Command::Stop {
            phase: JobPhase::Cancelled,
            ..
        }
    ));
}

#[test]
fn the_final_checkpoint_is_past_a_commit_the_heartbeats_have_not_caught_up_with() {
    let mut sim = Sim::with_job(spec(1, 1));
    let ws = sim.world_of(1);
    sim.beat_all(&ws, 3);
    sim.commit(ws[0], 6);
    assert_eq!(cancel(&mut sim), Some(7));
}

#[test]
fn without_a_running_world_it_ends_at_once() {
    let mut sim = Sim::with_job(spec(2, 2));
    let w = sim.register("h0");
    sim.rendezvous(w);
    assert_eq!(cancel(&mut sim), None);
    assert_eq!(sim.state.phase(), JobPhase::Cancelled);
    assert_eq!(
        sim.refused(|s, now| s.cancel_after_checkpoint("again".to_owned(), now)),
        CoreError::JobEnded {
            phase: JobPhase::Cancelled
        }
    );
}

#[test]
fn a_world_that_breaks_before_the_final_checkpoint_ends_the_job() {
    let mut sim = Sim::with_job(spec(1, 2));
    let ws = sim.world_of(2);
    let rank0 = rank0_of(&sim, &ws);
    sim.beat_all(&ws, 4);
    sim.commit(rank0, 2);
    assert_eq!(cancel(&mut sim), Some(5));
    sim.apply(|s, now| s.leave(rank0, "preempted".to_owned(), now))
        .expect("leave");
    assert_eq!(sim.state.phase(), JobPhase::Cancelled);
    let job = sim.state.job().expect("job");
    assert!(
        job.reason.contains("newest checkpoint is at step 2"),
        "{}",
        job.reason
    );
    // The survivor is told to stop, not to re-form.
    let other = if ws[0] == rank0 { ws[1] } else { ws[0] };
    assert!(matches!(sim.heartbeat(other, 1, 4), Command::Stop { .. }));
}

#[test]
fn a_stopping_world_does_not_grow_and_the_final_step_stays_within_max_steps() {
    let mut s = spec(1, 2);
    s.max_steps = 6;
    let mut sim = Sim::with_job(s);
    let w = sim.register("h0");
    sim.rendezvous(w);
    sim.advance(2_000);
    sim.assigned(w);
    let ws = [w];
    sim.beat_all(&ws, 6);
    assert_eq!(cancel(&mut sim), Some(6), "clamped to train.max_steps");
    let late = sim.register("late");
    sim.rendezvous(late);
    sim.beat_all(&ws, 6);
    assert!(sim.state.job().is_some_and(|j| j.resize_at.is_none()));
    // The final checkpoint at max_steps completes the job: it is done.
    sim.commit(ws[0], 6);
    assert_eq!(sim.state.phase(), JobPhase::Completed);
}

#[test]
fn invariants_hold_when_cancelling_at_random_moments() {
    let mut ends = std::collections::BTreeMap::<&str, usize>::new();
    for seed in 0..200 {
        let mut rng = Rng(seed);
        let mut sim = Sim::with_job(spec(1, 3));
        let ws: Vec<WorkerId> = (0..3).map(|i| sim.register(&format!("h{i}"))).collect();
        let mut step = 0;
        let mut asked = false;
        for _ in 0..60 {
            let w = ws[rng.below(3) as usize];
            match rng.below(8) {
                0 | 1 => {
                    let _ = sim.apply(|s, now| {
                        let known = s.worker(w).map_or(0, |x| x.generation);
                        s.rendezvous(w, known, TEACHER, now)
                    });
                }
                2 | 3 => {
                    step += rng.below(2);
                    for &w in &ws {
                        let input = HeartbeatInput {
                            worker: w,
                            generation: sim.state.worker(w).map_or(0, |x| x.generation),
                            step,
                            phase: WorkerPhase::Training,
                            metrics: StepMetrics::default(),
                        };
                        // The dead are refused; that is part of the walk.
                        let _ = sim.apply(|s, now| s.heartbeat(input, now));
                    }
                }
                4 if sim.rank_of(w) == Some(0) => {
                    let generation = sim.state.generation();
                    let report = CheckpointReport {
                        worker: w,
                        generation,
                        step: sim.state.worker(w).map_or(0, |x| x.step),
                        teacher_fingerprint: String::new(),
                        upload_seconds: 0.0,
                    };
                    if let Ok(ticket) = sim.apply(|s, now| s.begin_commit(report, now)) {
                        sim.apply(|s, now| s.finish_commit(&ticket, CommitResult::Committed, now));
                    }
                }
                5 if !asked => {
                    asked = true;
                    let _ = sim.apply(|s, now| s.cancel_after_checkpoint("walk".to_owned(), now));
                }
                6 if rng.below(4) == 0 => {
                    let _ = sim.apply(|s, now| s.leave(w, "walk".to_owned(), now));
                }
                _ => sim.advance(1_000),
            }
            if sim.state.phase().is_terminal() {
                break;
            }
        }
        if let Some(job) = sim.state.job().filter(|j| j.phase == JobPhase::Cancelled) {
            let how = if job.reason.contains("after the final checkpoint") {
                "after the checkpoint"
            } else if job.reason.contains("before the final checkpoint") {
                "world broke first"
            } else {
                "at once"
            };
            *ends.entry(how).or_default() += 1;
        }
    }
    // The walks reach every way a cancel ends.
    for how in ["after the checkpoint", "world broke first", "at once"] {
        assert!(ends.get(how).copied().unwrap_or(0) >= 5, "{ends:?}");
    }
}
