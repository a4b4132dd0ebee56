//! The caption ledger's promise through the service: the captions a job
//! trains on, step by step as its committed history records them, cover
//! every caption exactly once per epoch, also when the world shrinks from
//! 2 to 1 after a failure and grows back to 2 at a committed step, and
//! steps trained after the last commit are served again, identically, to
//! the next world.

mod common;

use std::collections::BTreeMap;

use common::{FakeWorker, Harness};
use swiftbrush_coordinator::app::Clock;
use swiftbrush_proto::rpc::command;

const NUM_CAPTIONS: usize = 10;
const GLOBAL_BATCH: u32 = 4;
const MAX_STEPS: u64 = 10;

/// What each world fetched: (generation, step) -> caption ids of all ranks.
#[derive(Default)]
struct Served(BTreeMap<(u64, u64), Vec<u64>>);

impl Served {
    /// Fetches steps `from..to` for every worker of one world.
    async fn fetch(&mut self, world: &mut [&mut FakeWorker], from: u64, to: u64) {
        for w in world.iter_mut() {
            let steps = w
                .captions(from, (to - from) as u32)
                .await
                .expect("captions");
            assert_eq!(steps.len() as u64, to - from);
            for s in steps {
                assert_eq!(s.caption_ids.len() as u32, GLOBAL_BATCH / w.world_size);
                for (id, text) in s.caption_ids.iter().zip(&s.captions) {
                    assert_eq!(text, &format!("caption {id}"));
                }
                self.0
                    .entry((w.generation, s.step))
                    .or_default()
                    .extend(s.caption_ids);
            }
        }
    }
}

/// Heartbeats `step` from every worker of the world; returns rank 0's command.
async fn beat(world: &mut [&mut FakeWorker], step: u64) -> command::Kind {
    let mut rank0 = None;
    for w in world.iter_mut() {
        let cmd = w.heartbeat(step).await;
        if w.rank == 0 {
            rank0 = Some(cmd);
        }
    }
    rank0.expect("a rank 0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caption_once_per_epoch_across_world_changes() {
    let h = Harness::with_job(NUM_CAPTIONS, 1, 2, GLOBAL_BATCH, MAX_STEPS).await;
    let store = h.store();
    let mut served = Served::default();
    // The committed history: which generation trained each step.
    let mut trained_by: BTreeMap<u64, u64> = BTreeMap::new();

    // World 1: two workers train steps 0..4, commit step 3, then b dies
    // (falls silent) after training step 3, which is never committed.
    let mut a = h.worker("host-a").await;
    let mut b = h.worker("host-b").await;
    let pending = tokio::spawn(async move {
        a.join().await;
        a
    });
    b.join().await;
    let mut a = pending.await.expect("a joins");
    let g1 = a.generation;
    assert_eq!((a.world_size, b.world_size), (2, 2));
    served.fetch(&mut [&mut a, &mut b], 0, 4).await;
    for step in 1..=3 {
        beat(&mut [&mut a, &mut b], step).await;
    }
    let (rank0, _) = if a.rank == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    rank0.checkpoint(&store, 3).await.expect("commit 3");
    beat(&mut [&mut a, &mut b], 4).await;
    for step in 0..3 {
        trained_by.insert(step, g1);
    }
    // b is silent: after the heartbeat timeout it is dead and the world breaks.
    for _ in 0..11 {
        a.heartbeat(4).await;
        h.advance(1_000);
    }
    match a.heartbeat(4).await {
        command::Kind::AbortAndReform(r) => assert_eq!(r.generation, g1 + 1),
        other => panic!("expected abort-and-reform, got {other:?}"),
    }

    // World 2: a alone resumes at the committed step 3 (step 3 is replayed).
    let rejoin = {
        let mut a = a;
        tokio::spawn(async move {
            let assignment = a.join().await;
            (a, assignment)
        })
    };
    // Backoff (1 s) and settling (0.5 s) pass on the coordinator's clock.
    while !h
        .server
        .app
        .inspect(|s| !s.ready_workers(h.clock.now_ms()).is_empty())
    {
        tokio::task::yield_now().await;
    }
    h.advance(1_000);
    h.advance(1_000);
    let (mut a, assignment) = rejoin.await.expect("a re-forms");
    let g2 = assignment.generation;
    assert_eq!(
        (assignment.world_size, assignment.resume_step, g2),
        (1, 3, g1 + 1)
    );
    served.fetch(&mut [&mut a], 3, 7).await;
    for step in 4..=6 {
        beat(&mut [&mut a], step).await;
    }
    a.checkpoint(&store, 6).await.expect("commit 6");

    // A new worker appears: the coordinator asks for a checkpoint one step
    // ahead, and the world grows to 2 once it commits.
    let mut c = h.worker("host-c").await;
    let standby = tokio::spawn(async move {
        let assignment = c.join().await;
        (c, assignment)
    });
    while !h
        .server
        .app
        .inspect(|s| !s.ready_workers(h.clock.now_ms()).is_empty())
    {
        tokio::task::yield_now().await;
    }
    let resize_at = match beat(&mut [&mut a], 6).await {
        command::Kind::Checkpoint(cp) => cp.step,
        other => panic!("expected a checkpoint command, got {other:?}"),
    };
    assert_eq!(resize_at, 7);
    served.fetch(&mut [&mut a], 7, 8).await;
    beat(&mut [&mut a], 7).await;
    a.checkpoint(&store, 7).await.expect("commit 7");
    for step in 3..7 {
        trained_by.insert(step, g2);
    }
    match a.heartbeat(7).await {
        command::Kind::AbortAndReform(r) => assert_eq!(r.generation, g2 + 1),
        other => panic!("expected abort-and-reform, got {other:?}"),
    }
    a.join().await;
    let (mut c, assignment) = standby.await.expect("c joins");
    let g3 = assignment.generation;
    assert_eq!((assignment.world_size, assignment.resume_step), (2, 7));

    // World 3 trains to the end.
    served.fetch(&mut [&mut a, &mut c], 7, 10).await;
    for step in 8..=10 {
        beat(&mut [&mut a, &mut c], step).await;
    }
    let rank0 = if a.rank == 0 { &mut a } else { &mut c };
    rank0.checkpoint(&store, 10).await.expect("final commit");
    for step in 7..10 {
        trained_by.insert(step, g3);
    }

    // The replayed step 3 got the same captions from both worlds.
    let mut step3_g1 = served.0[&(g1, 3)].clone();
    let mut step3_g2 = served.0[&(g2, 3)].clone();
    step3_g1.sort_unstable();
    step3_g2.sort_unstable();
    assert_eq!(step3_g1, step3_g2);
    // The committed history: 10 steps x 4 captions = 4 epochs of 10, each
    // caption exactly once per epoch, in order.
    let stream: Vec<u64> = (0..MAX_STEPS)
        .flat_map(|step| served.0[&(trained_by[&step], step)].clone())
        .collect();
    assert_eq!(stream.len(), 40);
    for epoch in stream.chunks(NUM_CAPTIONS) {
        let mut ids = epoch.to_vec();
        ids.sort_unstable();
        assert_eq!(ids, (0..NUM_CAPTIONS as u64).collect::<Vec<_>>());
    }
    let plan = swiftbrush_proto::caption_ledger::CaptionPlan::new(
        NUM_CAPTIONS as u64,
        u64::from(GLOBAL_BATCH),
        3,
        true,
    )
    .expect("plan");
    let expected: Vec<u64> = (0..MAX_STEPS)
        .flat_map(|s| plan.global_batch_ids(s))
        .collect();
    let mut sorted_stream = stream.clone();
    let mut sorted_expected = expected.clone();
    sorted_stream.sort_unstable();
    sorted_expected.sort_unstable();
    assert_eq!(sorted_stream, sorted_expected);
    let status = h.server.app.status();
    assert_eq!(
        (
            status.committed_step,
            status.samples_committed,
            status.restarts
        ),
        (10, 40, 1)
    );
    h.shutdown().await;
}
