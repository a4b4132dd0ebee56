//! Losing workers: silence, no progress, restarts and backoff, quarantine,
//! replacement, leaving.

use super::super::*;
use super::sim::{Sim, TEACHER, spec};

#[test]
fn silence_makes_a_worker_suspect_then_dead_and_the_world_reforms() {
    // Like SIGSTOP: the process is there but says nothing.
    let mut sim = Sim::with_job(spec(1, 2));
    let ws = sim.world_of(2);
    let (a, b) = (ws[0], ws[1]);
    sim.commit(a, 10);
    for _ in 0..4 {
        sim.beat_all(&[a], 12);
        sim.advance(1_000);
    }
    assert_eq!(sim.health(b), Health::Suspect, "silent for 4 s > 3 beats");
    assert_eq!(sim.state.generation(), 1, "a suspect keeps its rank");
    assert_eq!(sim.rank_of(b), Some(1));
    for _ in 0..7 {
        sim.beat_all(&[a], 12);
        sim.advance(1_000);
    }
    assert_eq!(sim.health(b), Health::Dead);
    assert_eq!(sim.state.generation(), 2);
    assert_eq!(sim.state.phase(), JobPhase::Reforming);
    assert_eq!(sim.state.job().map(|j| j.restarts), Some(1));
    // The survivor is told to abort; the dead one must register again.
    assert!(matches!(
        sim.heartbeat(a, 1, 12),
        Command::AbortAndReform { generation: 2, .. }
    ));
    let err = sim.refused(|s, now| s.rendezvous(b, 1, TEACHER, now));
    assert!(matches!(err, CoreError::WorkerDead { .. }), "{err}");
    // After the backoff the survivor re-forms alone, from the committed step.
    sim.waiting(a);
    sim.advance(1_000);
    sim.advance(2_000);
    let assignment = sim.assigned(a);
    assert_eq!(
        (
            assignment.generation,
            assignment.world_size,
            assignment.resume_step
        ),
        (2, 1, 10)
    );
}

#[test]
fn a_worker_whose_step_does_not_advance_dies() {
    let mut sim = Sim::with_job(spec(1, 2));
    let ws = sim.world_of(2);
    let mut seconds = 0;
    while sim.health(ws[1]) != Health::Dead {
        // a trains, b heartbeats but is stuck at step 3.
        sim.heartbeat(ws[0], 1, 3 + seconds);
        sim.heartbeat(ws[1], 1, 3);
        sim.advance(1_000);
        seconds += 1;
        assert!(seconds < 100);
    }
    assert_eq!(
        seconds, 61,
        "dies once stalled longer than progress_timeout_ms = 60 s"
    );
    assert_eq!(sim.health(ws[0]), Health::Alive);
    assert_eq!(sim.health(ws[1]), Health::Dead);
    let departure = sim.state.worker(ws[1]).and_then(|w| w.departure.clone());
    assert!(
        matches!(departure, Some(Departure::NoProgress { step: 3, .. })),
        "{departure:?}"
    );
    assert_eq!(sim.state.generation(), 2);
}

#[test]
fn restarts_back_off_and_past_max_restarts_the_job_fails() {
    let mut sim = Sim::with_job(spec(1, 1));
    let mut backoffs = Vec::new();
    for restart in 1..=3 {
        let w = sim.register(&format!("h{restart}"));
        sim.rendezvous(w);
        let formed_at = sim.now;
        let a = loop {
            match sim.rendezvous(w) {
                RendezvousOutcome::Assigned(a) => break a,
                _ => sim.advance(500),
            }
        };
        backoffs.push(sim.now - formed_at);
        assert_eq!(a.generation, restart);
        sim.apply(|s, now| s.declare_dead(w, Departure::HeartbeatTimeout { silent_ms: 0 }, now));
    }
    // The first world formed at once; then 1 s, 2 s of backoff.
    assert_eq!(backoffs, vec![0, 1_000, 2_000]);
    assert_eq!(sim.state.job().map(|j| j.restarts), Some(3));
    assert_eq!(sim.state.phase(), JobPhase::Reforming);
    // The fourth failure exceeds max_restarts = 3.
    sim.advance(4_000);
    let w = sim.register("h4");
    sim.assigned(w);
    sim.apply(|s, now| s.declare_dead(w, Departure::HeartbeatTimeout { silent_ms: 0 }, now));
    assert_eq!(sim.state.phase(), JobPhase::Failed);
    assert_eq!(sim.state.world(), None);
    let x = sim.register("h5");
    assert!(matches!(
        sim.heartbeat(x, 0, 0),
        Command::Stop {
            phase: JobPhase::Failed,
            ..
        }
    ));
    assert!(matches!(
        sim.rendezvous(x),
        RendezvousOutcome::Finished { .. }
    ));
}

#[test]
fn a_host_that_fails_repeatedly_is_quarantined_then_released() {
    let mut sim = Sim::with_job(spec(1, 1));
    for _ in 0..3 {
        let w = sim.register("flaky");
        sim.apply(|s, now| s.declare_dead(w, Departure::HeartbeatTimeout { silent_ms: 0 }, now));
    }
    let input = RegisterInput {
        host: "flaky".to_owned(),
        device: "cpu".to_owned(),
        capabilities: Capabilities::default(),
    };
    let err = sim.refused(|s, now| s.register(input.clone(), now));
    assert!(
        matches!(
            err,
            CoreError::HostQuarantined {
                remaining_ms: 60_000,
                ..
            }
        ),
        "{err}"
    );
    // Other hosts are unaffected.
    let good = sim.register("good");
    assert_eq!(sim.assigned(good).world_size, 1);
    sim.pass(&[good], 1, 30_000);
    sim.refused(|s, now| s.register(input.clone(), now));
    sim.pass(&[good], 1, 31_000);
    sim.apply(|s, now| s.register(input, now)).unwrap();
}

#[test]
fn leaving_reforms_without_a_restart_or_a_charge() {
    let mut sim = Sim::with_job(spec(1, 2));
    let ws = sim.world_of(2);
    sim.apply(|s, now| s.leave(ws[1], "preempted".to_owned(), now))
        .unwrap();
    let job = sim.state.job().unwrap();
    assert_eq!(
        (job.generation, job.restarts, job.not_before <= sim.now),
        (2, 0, true)
    );
    assert!(sim.state.hosts().is_empty());
    sim.waiting(ws[0]);
    sim.advance(2_000);
    assert_eq!(sim.assigned(ws[0]).world_size, 1);
}

#[test]
fn registering_again_from_the_same_device_replaces_the_old_process() {
    let mut sim = Sim::with_job(spec(2, 2));
    let a = sim.register_on("h0", "cuda:0");
    let b = sim.register_on("h1", "cuda:0");
    sim.rendezvous(a);
    sim.assigned(b);
    let ws = [a, b];
    // Another CPU process on the same host is no replacement.
    let cpu = sim.register_on("h1", "cpu");
    assert_eq!(sim.health(cpu), Health::Alive);
    let again = sim.register_on("h1", "cuda:0");
    assert_eq!(sim.health(ws[1]), Health::Dead);
    assert!(matches!(
        sim.state.worker(ws[1]).and_then(|w| w.departure.clone()),
        Some(Departure::Replaced { by }) if by == again
    ));
    assert_eq!(sim.state.generation(), 2);
    sim.advance(1_000);
    sim.rendezvous(ws[0]);
    assert_eq!(sim.assigned(again).world_size, 2);
}

#[test]
fn workers_that_fail_the_same_way_fail_the_job_with_their_reason() {
    // Issue 29: a teacher both workers cannot read. Each reports the error
    // as it exits; the job fails with it instead of re-forming forever.
    let mut sim = Sim::with_job(spec(2, 2));
    let ws = sim.world_of(2);
    let reason = "cannot read the teacher /no/such: no such directory";
    sim.apply(|s, now| s.fail_worker(ws[0], reason.to_owned(), now))
        .unwrap();
    assert_eq!(sim.health(ws[0]), Health::Dead);
    let departure = sim.state.worker(ws[0]).and_then(|w| w.departure.clone());
    assert_eq!(
        departure.map(|d| d.to_string()),
        Some(format!("failed: {reason}"))
    );
    assert_eq!(
        sim.state.phase(),
        JobPhase::Reforming,
        "one worker is still alive"
    );
    assert_eq!(
        sim.state.job().map(|j| j.restarts),
        Some(1),
        "a failure, not a leave"
    );
    sim.apply(|s, now| s.fail_worker(ws[1], reason.to_owned(), now))
        .unwrap();
    assert_eq!(sim.state.phase(), JobPhase::Failed);
    let why = sim
        .state
        .job()
        .map(|j| j.reason.clone())
        .unwrap_or_default();
    assert!(
        why.contains("every worker failed the same way (2 workers)"),
        "{why}"
    );
    assert!(why.contains(reason), "{why}");
}

#[test]
fn one_failure_of_a_one_worker_job_waits_for_a_second() {
    // It may be a passing failure: a restarted worker may get past it.
    let mut sim = Sim::with_job(spec(1, 1));
    let a = sim.world_of(1)[0];
    sim.apply(|s, now| s.fail_worker(a, "out of memory".to_owned(), now))
        .unwrap();
    assert_eq!(sim.state.phase(), JobPhase::Reforming);
    let b = sim.register("host-b");
    sim.rendezvous(b);
    sim.advance(3_000);
    sim.assigned(b);
    sim.apply(|s, now| s.fail_worker(b, "out of memory".to_owned(), now))
        .unwrap();
    assert_eq!(sim.state.phase(), JobPhase::Failed, "twice the same way");
}

#[test]
fn workers_that_fail_differently_leave_the_job_waiting() {
    let mut sim = Sim::with_job(spec(2, 2));
    let ws = sim.world_of(2);
    sim.apply(|s, now| s.fail_worker(ws[0], "out of memory".to_owned(), now))
        .unwrap();
    sim.apply(|s, now| s.fail_worker(ws[1], "NCCL init failed".to_owned(), now))
        .unwrap();
    // Each host may be at fault: new workers may yet succeed.
    assert_eq!(sim.state.phase(), JobPhase::Reforming);
}

#[test]
fn a_worker_with_another_teacher_is_refused_and_the_world_forms_without_it() {
    // Issue 28: a node whose copy of the teacher is stale used to average
    // gradients of another model silently.
    let mut sim = Sim::with_job(spec(1, 2));
    let a = sim.register("host-a");
    let b = sim.register("host-b");
    // The first fingerprint reported becomes the job's.
    sim.rendezvous(a);
    // Refused, and unlike other refusals it changes the state: the worker
    // is declared dead with the reason, for the status page.
    let err = sim
        .apply(|s, now| s.rendezvous(b, 0, "stale-copy", now))
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CoreError::TeacherMismatch { .. }), "{text}");
    assert!(
        text.contains("on host-b") && text.contains("stale-copy") && text.contains(TEACHER),
        "{text}"
    );
    assert_eq!(sim.health(b), Health::Dead);
    let why = sim.state.worker(b).and_then(|w| w.departure.clone());
    assert!(matches!(why, Some(Departure::Failed { .. })), "{why:?}");
    sim.advance(2_000);
    let assignment = sim.assigned(a);
    assert_eq!(assignment.world_size, 1, "the world forms without it");
}

#[test]
fn a_worker_that_has_not_loaded_the_teacher_waits_and_is_sent_the_job() {
    let mut sim = Sim::with_job(spec(1, 1));
    let a = sim.register("host-a");
    let waiting = match sim.apply(|s, now| s.rendezvous(a, 0, "", now)).unwrap() {
        RendezvousOutcome::Waiting(w) => w,
        other => panic!("{other:?}"),
    };
    assert!(waiting.needs_teacher, "{waiting:?}");
    sim.advance(2_000);
    assert_eq!(sim.state.generation(), 1, "no world formed with it");
    // A resumed job knows its teacher from the checkpoint: others are refused.
    let mut resumed = spec(1, 1);
    resumed.teacher_fingerprint = Some("the-checkpoints".to_owned());
    let mut sim = Sim::with_job(resumed);
    let a = sim.register("host-a");
    let err = sim
        .apply(|s, now| s.rendezvous(a, 0, TEACHER, now))
        .unwrap_err();
    assert!(err.to_string().contains("the-checkpoints"), "{err}");
}

#[test]
fn a_world_that_fails_before_training_has_its_checkpoint_verified_first() {
    // Issue 28: a checkpoint that became corrupt while the job ran broke
    // every re-formed world until the coordinator restarted.
    let mut sim = Sim::with_job(spec(1, 2));
    let ws = sim.world_of(2);
    let (a, b) = (ws[0], ws[1]);
    sim.beat_all(&ws, 10);
    sim.commit(a, 10);
    // A failure after training (steps past the resume step 0): no check.
    sim.apply(|s, now| s.declare_dead(b, Departure::HeartbeatTimeout { silent_ms: 0 }, now));
    assert_eq!(sim.state.job().and_then(|j| j.verifying), None);
    // The next world resumes at 10 and fails before training past it (a
    // member cannot restore the checkpoint): verify before another world.
    sim.waiting(a);
    sim.advance(3_000);
    assert_eq!(sim.assigned(a).resume_step, 10);
    let c = sim.register("host-c");
    sim.apply(|s, now| s.fail_worker(a, "checkpoint step 10: sha256 mismatch".to_owned(), now))
        .unwrap();
    assert_eq!(sim.state.job().and_then(|j| j.verifying), Some(10));
    assert!(
        sim.effects
            .iter()
            .any(|e| matches!(e, Effect::VerifyCheckpoint { step: 10 }))
    );
    sim.rendezvous(c);
    sim.advance(10_000);
    let wait = sim.waiting(c);
    assert!(
        wait.reason.contains("verifying the checkpoint of step 10"),
        "{wait:?}"
    );
    // Step 10 was corrupt and set aside; the newest good one is step 6.
    sim.apply(|s, _| s.checkpoint_checked(10, Ok(Some(6))));
    assert_eq!(sim.state.job().map(|j| j.committed_step), Some(6));
    sim.advance(1_000);
    assert_eq!(sim.assigned(c).resume_step, 6);
}

#[test]
fn a_checkpoint_that_verifies_or_cannot_be_read_changes_nothing() {
    let mut sim = Sim::with_job(spec(1, 1));
    let a = sim.world_of(1)[0];
    sim.beat_all(&[a], 4);
    sim.commit(a, 4);
    sim.apply(|s, now| s.declare_dead(a, Departure::HeartbeatTimeout { silent_ms: 0 }, now));
    let b = sim.register("host-b");
    sim.rendezvous(b);
    sim.advance(3_000);
    sim.assigned(b);
    sim.apply(|s, now| s.fail_worker(b, "lost".to_owned(), now))
        .unwrap();
    assert_eq!(sim.state.job().and_then(|j| j.verifying), Some(4));
    sim.apply(|s, _| s.checkpoint_checked(4, Err("store unreachable".to_owned())));
    assert_eq!(
        sim.state.job().map(|j| (j.committed_step, j.verifying)),
        Some((4, None))
    );
}
