//! One job per run directory: a second coordinator on a run directory a
//! live one holds is refused, naming the holder; `--take-over` lets it in
//! and the first one's job fails at its next renewal; and a checkpoint
//! commit lost to another writer ends the job instead of retraining the
//! same steps forever.

mod common;

use std::sync::Arc;

use common::{Harness, TOKEN};
use swiftbrush_coordinator::app::ManualClock;
use swiftbrush_coordinator::domain::JobPhase;
use swiftbrush_coordinator::grpc::JobToken;
use swiftbrush_coordinator::{ServeOptions, start_with_clock};
use swiftbrush_proto::rpc::{self, command};
use swiftbrush_proto::run_store::CheckpointMeta;

async fn second(
    h: &Harness,
    take_over: bool,
) -> Result<swiftbrush_coordinator::RunningCoordinator, String> {
    let mut options = ServeOptions::new(h.store_url.clone(), JobToken::new(TOKEN).unwrap());
    options.listen = "127.0.0.1:0".parse().unwrap();
    options.lease.take_over = take_over;
    options.lease.command = "second coordinator".to_owned();
    start_with_clock(options, Arc::new(ManualClock::new(1_000)))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_is_refused_and_take_over_stops_the_first() {
    let h = Harness::with_job(8, 1, 1, 2, 8).await;
    let mut w = h.worker("host-a").await;
    w.join().await;

    let refused = second(&h, false)
        .await
        .expect_err("the run directory is in use");
    for part in [
        "is in use by another job",
        "swiftbrush coordinator on host",
        &format!("pid {}", std::process::id()),
        "since",
        "lease expires at",
        "--take-over",
    ] {
        assert!(refused.contains(part), "{refused:?} lacks {part:?}");
    }
    assert_eq!(
        h.server.app.status().phase,
        JobPhase::Running,
        "the first job goes on"
    );

    let taker = second(&h, true).await.expect("--take-over gets in");
    // The first coordinator's next renewal finds the lease gone.
    let lost = h.server.app.renew_lease().await.expect_err("lost");
    assert!(
        lost.to_string()
            .contains("taken over by second coordinator"),
        "{lost}"
    );
    let status = h.server.app.status();
    assert_eq!(status.phase, JobPhase::Failed);
    assert!(
        status.reason.contains("lease on it was taken over"),
        "{}",
        status.reason
    );
    assert!(h.server.app.lease_lost().is_some());
    match w.heartbeat(1).await {
        command::Kind::Stop(stop) => assert_eq!(stop.phase, rpc::JobPhase::Failed as i32),
        other => panic!("expected stop, got {other:?}"),
    }
    // The first coordinator commits nothing more, nor starts a new job.
    let store = h.store();
    assert!(w.checkpoint(&store, 2).await.is_err());
    assert!(store.valid_steps().await.unwrap().is_empty());
    h.server.shutdown().await.expect("shutdown");
    // The taker still holds the run directory.
    let holder = store.lease_holder().await.unwrap().expect("a holder");
    assert_eq!(holder.command, "second coordinator");
    assert!(!holder.released);
    taker.shutdown().await.expect("shutdown");
    assert!(store.lease_holder().await.unwrap().unwrap().released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_lost_to_another_writer_ends_the_job() {
    let h = Harness::with_job(8, 1, 1, 2, 8).await;
    let mut w = h.worker("host-a").await;
    w.join().await;
    let store = h.store();
    w.checkpoint(&store, 2).await.expect("commit step 2");
    // Another writer (a job that ignores the lease) commits step 4 first.
    let mut other = store.begin_checkpoint(4);
    other
        .put_file("student.safetensors", bytes::Bytes::from_static(b"theirs"))
        .await
        .unwrap();
    other
        .commit(CheckpointMeta {
            epoch: 1,
            generation: 1,
            config_fingerprint: "other".to_owned(),
            teacher_fingerprint: "other".to_owned(),
            extra: serde_json::json!({}),
        })
        .await
        .unwrap();
    let lost = w.checkpoint(&store, 4).await.expect_err("lost the race");
    assert!(
        lost.message().contains("lost the race to another writer"),
        "{lost}"
    );
    // Not a loop of retraining the same steps: the job has failed, with
    // that error, and the worker is told to stop.
    let status = h.server.app.status();
    assert_eq!(status.phase, JobPhase::Failed, "{}", status.reason);
    assert!(
        status.reason.contains("lost the race to another writer")
            && status
                .reason
                .contains("another job is writing this run directory"),
        "{}",
        status.reason
    );
    match w.heartbeat(4).await {
        command::Kind::Stop(stop) => assert_eq!(stop.phase, rpc::JobPhase::Failed as i32),
        other => panic!("expected stop, got {other:?}"),
    }
    h.shutdown().await;
}
