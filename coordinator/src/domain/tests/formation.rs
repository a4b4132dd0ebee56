//! Forming worlds: sizes, settling, standby and growth.

use super::super::*;
use super::sim::{Sim, spec};

#[test]
fn a_full_world_forms_at_once_with_ranks_0_to_w_minus_1() {
    let mut sim = Sim::with_job(spec(1, 4));
    let ws = sim.world_of(4);
    let mut ranks: Vec<u32> = ws.iter().map(|&w| sim.assigned(w).rank).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, vec![0, 1, 2, 3]);
    let a = sim.assigned(ws[0]);
    assert_eq!(
        (a.generation, a.world_size, a.resume_step, a.per_rank_batch),
        (1, 4, 0, 1)
    );
    assert_eq!(a.backend, Backend::Tcp, "cpu workers get the tcp ring");
    assert_eq!(sim.state.phase(), JobPhase::Running);
}

#[test]
fn below_min_size_workers_wait() {
    let mut sim = Sim::with_job(spec(2, 2));
    let a = sim.register("a");
    let info = sim.waiting(a);
    assert_eq!((info.num_ready, info.min_size), (1, 2));
    sim.pass(&[a], 0, 60_000);
    sim.rendezvous(a);
    assert_eq!(sim.state.phase(), JobPhase::Forming);
    let b = sim.register("b");
    assert_eq!(sim.assigned(b).world_size, 2);
    assert_eq!(sim.assigned(a).world_size, 2);
}

#[test]
fn a_smaller_world_forms_after_settling_with_a_size_that_divides_the_batch() {
    // Batch 4, up to 4 workers, 3 came: a world of 2 (3 does not divide 4)
    // once the settle time has passed; the third waits as standby.
    let mut sim = Sim::with_job(spec(1, 4));
    let ws: Vec<_> = ["a", "b", "c"].iter().map(|h| sim.register(h)).collect();
    for &w in &ws {
        assert!(sim.waiting(w).reason.contains("waiting for more"));
    }
    sim.advance(1_999);
    assert_eq!(sim.state.phase(), JobPhase::Forming);
    for &w in &ws {
        sim.rendezvous(w);
    }
    sim.advance(1);
    assert_eq!(sim.state.world().map(World::size), Some(2));
    assert!(sim.waiting(ws[2]).reason.starts_with("standby"));
    assert_eq!(sim.rank_of(ws[2]), None);
}

#[test]
fn a_worker_that_stops_asking_is_not_placed() {
    let mut sim = Sim::with_job(spec(2, 2));
    let a = sim.register("a");
    sim.rendezvous(a);
    sim.advance(6_000);
    sim.heartbeat(a, 0, 0);
    let b = sim.register("b");
    sim.waiting(b);
    assert_eq!(sim.state.world(), None, "a's readiness lapsed");
    assert_eq!(sim.assigned(a).world_size, 2);
}

#[test]
fn standby_workers_grow_the_world_at_the_next_committed_step() {
    let mut sim = Sim::with_job(spec(1, 2));
    let a = sim.register("a");
    sim.rendezvous(a);
    sim.advance(2_000);
    assert_eq!(sim.assigned(a).world_size, 1);
    sim.heartbeat(a, 1, 5);
    let b = sim.register("b");
    sim.waiting(b);
    let cmd = sim.heartbeat(a, 1, 5);
    assert!(
        matches!(cmd, Command::CheckpointAt { step: 6, .. }),
        "{cmd:?}"
    );
    sim.heartbeat(a, 1, 6);
    sim.commit(a, 6);
    assert_eq!(sim.state.generation(), 2);
    assert_eq!(
        sim.state.job().map(|j| j.restarts),
        Some(0),
        "growing is no failure"
    );
    assert!(matches!(
        sim.heartbeat(a, 1, 7),
        Command::AbortAndReform { generation: 2, .. }
    ));
    sim.waiting(b);
    let wa = sim.assigned(a);
    let wb = sim.assigned(b);
    assert_eq!((wa.world_size, wa.resume_step, wb.generation), (2, 6, 2));
}

#[test]
fn nccl_only_for_all_cuda_worlds() {
    let mut sim = Sim::with_job(spec(2, 2));
    let a = sim.register_on("a", "cuda:0");
    let b = sim.register_on("b", "cuda:0");
    sim.rendezvous(a);
    assert_eq!(sim.assigned(b).backend, Backend::Nccl);
}
