//! Checkpoint commits and completion.

use super::super::*;
use super::sim::{Sim, spec};

fn report(worker: WorkerId, generation: u64, step: u64) -> CheckpointReport {
    CheckpointReport {
        worker,
        generation,
        step,
        teacher_fingerprint: "t".to_owned(),
        upload_seconds: 2.0,
    }
}

#[test]
fn rank_zero_commits_and_the_manifest_meta_names_the_generation() {
    let mut sim = Sim::with_job(spec(2, 2));
    let ws = sim.world_of(2);
    let rank0 = if sim.rank_of(ws[0]) == Some(0) {
        ws[0]
    } else {
        ws[1]
    };
    let other = if rank0 == ws[0] { ws[1] } else { ws[0] };
    let err = sim.refused(|s, now| s.begin_commit(report(other, 1, 5), now));
    assert!(matches!(err, CoreError::NotRankZero { rank: 1, .. }));
    let ticket = sim
        .apply(|s, now| s.begin_commit(report(rank0, 1, 5), now))
        .unwrap();
    assert_eq!(
        (ticket.meta.generation, ticket.meta.epoch),
        (1, 2),
        "step 5 x 4 = 20 = epoch 2"
    );
    assert_eq!(ticket.meta.config_fingerprint, "f".repeat(64));
    let err = sim.refused(|s, now| s.begin_commit(report(rank0, 1, 6), now));
    assert!(matches!(err, CoreError::CommitInFlight { step: 5 }));
    sim.apply(|s, now| s.finish_commit(&ticket, CommitResult::Committed, now));
    assert_eq!(sim.state.job().map(|j| j.committed_step), Some(5));
    assert!(
        sim.effects
            .contains(&Effect::ApplyRetention { keep_last: 3 })
    );
    let err = sim.refused(|s, now| s.begin_commit(report(rank0, 1, 5), now));
    assert!(matches!(
        err,
        CoreError::AlreadyCommitted {
            step: 5,
            committed: 5
        }
    ));
}

#[test]
fn a_commit_in_flight_holds_back_the_next_world_and_then_sets_its_resume_step() {
    let mut sim = Sim::with_job(spec(1, 2));
    let ws = sim.world_of(2);
    let rank0 = if sim.rank_of(ws[0]) == Some(0) {
        ws[0]
    } else {
        ws[1]
    };
    let other = if rank0 == ws[0] { ws[1] } else { ws[0] };
    let ticket = sim
        .apply(|s, now| s.begin_commit(report(rank0, 1, 8), now))
        .unwrap();
    // The other rank leaves while the upload runs.
    sim.apply(|s, now| s.leave(other, "preempted".to_owned(), now))
        .unwrap();
    assert_eq!(sim.state.generation(), 2);
    assert!(sim.waiting(rank0).reason.contains("commit of step 8"));
    sim.advance(5_000);
    assert_eq!(
        sim.state.world(),
        None,
        "no world while the commit is in flight"
    );
    // The commit lands although its world is gone: the checkpoint exists.
    sim.apply(|s, now| s.finish_commit(&ticket, CommitResult::Committed, now));
    assert_eq!(sim.assigned(rank0).resume_step, 8);
}

#[test]
fn a_failed_commit_changes_nothing_but_frees_the_slot() {
    let mut sim = Sim::with_job(spec(1, 1));
    let w = sim.world_of(1)[0];
    let ticket = sim
        .apply(|s, now| s.begin_commit(report(w, 1, 8), now))
        .unwrap();
    sim.apply(|s, now| s.finish_commit(&ticket, CommitResult::NotCommitted, now));
    assert_eq!(
        sim.state
            .job()
            .map(|j| (j.committed_step, j.commit_in_flight)),
        Some((0, None))
    );
    sim.commit(w, 9);
}

#[test]
fn the_final_checkpoint_completes_the_job_and_stops_everyone() {
    let mut sim = Sim::with_job(spec(1, 1));
    let w = sim.world_of(1)[0];
    assert!(matches!(sim.heartbeat(w, 1, 99), Command::None));
    assert!(matches!(
        sim.heartbeat(w, 1, 100),
        Command::CheckpointAt { step: 100, .. }
    ));
    let err = sim.refused(|s, now| s.begin_commit(report(w, 1, 101), now));
    assert!(matches!(err, CoreError::StepOutOfRange { step: 101, .. }));
    sim.commit(w, 100);
    assert_eq!(sim.state.phase(), JobPhase::Completed);
    assert!(matches!(
        sim.heartbeat(w, 1, 100),
        Command::Stop {
            phase: JobPhase::Completed,
            ..
        }
    ));
}

#[test]
fn a_resubmitted_job_resumes_at_the_stored_step_with_a_newer_generation() {
    let mut s = spec(1, 1);
    s.committed_step = 40;
    s.last_generation = 6;
    let mut sim = Sim::with_job(s);
    let w = sim.world_of(1)[0];
    let a = sim.assigned(w);
    assert_eq!((a.generation, a.resume_step), (7, 40));
}

#[test]
fn a_job_whose_final_checkpoint_exists_is_complete_when_submitted() {
    let mut s = spec(1, 2);
    s.committed_step = s.max_steps;
    let mut sim = Sim::with_job(s);
    assert_eq!(sim.state.job().map(|j| j.phase), Some(JobPhase::Completed));
    let w = sim.register("host-a");
    assert!(matches!(
        sim.rendezvous(w),
        RendezvousOutcome::Finished {
            phase: JobPhase::Completed,
            ..
        }
    ));
}
