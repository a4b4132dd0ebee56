//! Requests the core refuses, each leaving the state untouched.

use super::super::*;
use super::sim::{Sim, TEACHER, spec};

#[test]
fn stale_and_future_generations_are_refused_everywhere() {
    let mut sim = Sim::with_job(spec(1, 2));
    let ws = sim.world_of(2);
    sim.apply(|s, now| s.leave(ws[1], "bye".to_owned(), now))
        .unwrap();
    sim.advance(3_000);
    sim.assigned(ws[0]);
    assert_eq!(sim.state.generation(), 2);
    let w = ws[0];
    let caption = |generation| CaptionRequest {
        worker: w,
        generation,
        rank: 0,
        first_step: 0,
        num_steps: 1,
    };
    let stale = sim.refused(|s, now| s.captions(caption(1), now));
    assert_eq!(
        stale,
        CoreError::StaleGeneration {
            given: 1,
            current: 2
        }
    );
    let future = sim.refused(|s, now| s.captions(caption(3), now));
    assert_eq!(
        future,
        CoreError::FutureGeneration {
            given: 3,
            current: 2
        }
    );
    let commit = CheckpointReport {
        worker: w,
        generation: 1,
        step: 5,
        teacher_fingerprint: String::new(),
        upload_seconds: 0.0,
    };
    assert!(matches!(
        sim.refused(|s, now| s.begin_commit(commit, now)),
        CoreError::StaleGeneration { .. }
    ));
    assert!(matches!(
        sim.refused(|s, now| s.publish_bootstrap(w, 1, 0, vec![1], now)),
        CoreError::StaleGeneration { .. }
    ));
    assert!(matches!(
        sim.refused(|s, now| s.rendezvous(w, 9, TEACHER, now)),
        CoreError::FutureGeneration { .. }
    ));
    sim.apply(|s, now| s.captions(caption(2), now)).unwrap();
}

#[test]
fn captions_only_for_your_own_rank_and_within_the_run() {
    let mut sim = Sim::with_job(spec(2, 2));
    let ws = sim.world_of(2);
    let w = ws[0];
    let rank = sim.rank_of(w).unwrap();
    let req = |rank, first_step, num_steps| CaptionRequest {
        worker: w,
        generation: 1,
        rank,
        first_step,
        num_steps,
    };
    assert!(matches!(
        sim.refused(|s, now| s.captions(req(1 - rank, 0, 1), now)),
        CoreError::WrongRank { .. }
    ));
    assert!(matches!(
        sim.refused(|s, now| s.captions(req(rank, 0, 0), now)),
        CoreError::InvalidField { .. }
    ));
    assert!(matches!(
        sim.refused(|s, now| s.captions(req(rank, 0, 65), now)),
        CoreError::InvalidField { .. }
    ));
    assert!(matches!(
        sim.refused(|s, now| s.captions(req(rank, 100, 1), now)),
        CoreError::StepOutOfRange { .. }
    ));
    // The last steps are cut at max_steps.
    let slices = sim
        .apply(|s, now| s.captions(req(rank, 98, 10), now))
        .unwrap();
    assert_eq!(
        slices.iter().map(|s| s.step).collect::<Vec<_>>(),
        vec![98, 99]
    );
    assert!(slices.iter().all(|s| s.caption_ids.len() == 2));
}

#[test]
fn unknown_workers_and_bootstrap_conflicts() {
    let mut sim = Sim::with_job(spec(1, 1));
    let w = sim.world_of(1)[0];
    let ghost = WorkerId(999);
    assert_eq!(
        sim.refused(|s, now| s.rendezvous(ghost, 0, TEACHER, now)),
        CoreError::UnknownWorker(ghost)
    );
    sim.apply(|s, now| s.publish_bootstrap(w, 1, 0, b"id".to_vec(), now))
        .unwrap();
    sim.apply(|s, now| s.publish_bootstrap(w, 1, 0, b"id".to_vec(), now))
        .unwrap();
    assert_eq!(
        sim.refused(|s, now| s.publish_bootstrap(w, 1, 0, b"other".to_vec(), now)),
        CoreError::BootstrapConflict { rank: 0 }
    );
    let big = vec![0u8; MAX_BOOTSTRAP_BYTES + 1];
    assert!(matches!(
        sim.refused(|s, now| s.publish_bootstrap(w, 1, 0, big, now)),
        CoreError::InvalidField { .. }
    ));
    let view = sim
        .apply(|s, now| s.fetch_bootstrap(w, 1, true, now))
        .unwrap();
    assert!(view.complete);
    assert_eq!(view.blobs, vec![(0, b"id".to_vec())]);
}

#[test]
fn one_job_at_a_time_and_cancel_stops_it() {
    let mut sim = Sim::with_job(spec(1, 1));
    assert!(matches!(
        sim.refused(|s, now| s.submit(spec(1, 1), now)),
        CoreError::JobExists { .. }
    ));
    let w = sim.world_of(1)[0];
    sim.apply(|s, now| s.cancel("operator".to_owned(), now))
        .unwrap();
    assert!(matches!(
        sim.heartbeat(w, 1, 3),
        Command::Stop {
            phase: JobPhase::Cancelled,
            ..
        }
    ));
    assert_eq!(
        sim.refused(|s, now| s.cancel("again".to_owned(), now)),
        CoreError::JobEnded {
            phase: JobPhase::Cancelled
        }
    );
    // A new job may follow, numbering its worlds past the old ones.
    assert_eq!(sim.apply(|s, now| s.submit(spec(1, 1), now)), Ok(2));
}

#[test]
fn a_job_whose_world_sizes_cannot_divide_the_batch_is_refused() {
    let mut sim = Sim::new();
    let mut s = spec(3, 3);
    s.global_batch = 4;
    assert!(matches!(
        sim.refused(|st, now| st.submit(s, now)),
        CoreError::InvalidJob(_)
    ));
}

#[test]
fn registrations_past_the_cap_are_refused_until_a_job_needs_more() {
    let mut sim = Sim::new();
    sim.state.options.max_workers = 3;
    for i in 0..3 {
        sim.register(&format!("h{i}"));
    }
    let input = RegisterInput {
        host: "h3".to_owned(),
        device: "cpu".to_owned(),
        capabilities: Capabilities::default(),
    };
    let err = sim.refused(|s, now| s.register(input.clone(), now));
    assert_eq!(err, CoreError::TooManyWorkers { max: 3 });
    assert!(err.to_string().contains("--max-workers"), "{err}");
    // A job of up to 4 workers raises the cap to 8 (its world and spares).
    sim.apply(|s, now| s.submit(spec(1, 4), now)).unwrap();
    assert_eq!(sim.state.worker_cap(), 8);
    for i in 3..8 {
        sim.register(&format!("h{i}"));
    }
    let err = sim.refused(|s, now| s.register(input.clone(), now));
    assert_eq!(err, CoreError::TooManyWorkers { max: 8 });
}
