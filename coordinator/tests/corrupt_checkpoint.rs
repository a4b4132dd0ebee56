//! A checkpoint that becomes corrupt while the job runs (a storage fault
//! after its commit) used to break every re-formed world until the
//! coordinator restarted: each world resumed from it and failed restoring
//! it. A world that fails before training past its resume step now has
//! that checkpoint verified, as a job start does; a corrupt one is set
//! aside and the next world resumes from the newest good one (issue 28).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Harness;
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_corrupted_while_the_job_runs_is_set_aside_before_the_next_world() {
    let h = Harness::with_job(8, 1, 1, 2, 20).await;
    let store = h.store();
    let mut first = h.worker("host-a").await;
    first.join().await;
    first.heartbeat(2).await;
    first.checkpoint(&store, 2).await.expect("commit 2");
    first.heartbeat(4).await;
    first.checkpoint(&store, 4).await.expect("commit 4");

    // A byte of step 4's file changes in storage, its size the same.
    let objects = store.object_store().clone();
    let files: Vec<_> = objects
        .list(Some(&"checkpoints/step-00000004".into()))
        .try_collect()
        .await
        .expect("list");
    let file = files
        .iter()
        .find(|m| m.location.as_ref().ends_with("student.safetensors"))
        .expect("step 4's student file");
    objects
        .put(
            &file.location,
            PutPayload::from(Bytes::from("weights at 9")),
        )
        .await
        .expect("corrupt it");

    // The worker dies after training: no reason to doubt step 4 yet.
    first.fail("out of memory").await;
    let mut second = h.worker("host-b").await;
    h.advance(5_000);
    let placed = second.join().await;
    assert_eq!(placed.resume_step, 4);
    // It fails restoring step 4, before training past it.
    second.fail("checkpoint step 4: sha256 mismatch").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while h.server.app.status().committed_step != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "step 4 was never set aside: {:#?}",
            h.server.app.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let set_aside: Vec<_> = objects
        .list(Some(&"corrupt".into()))
        .try_collect()
        .await
        .expect("list");
    assert!(!set_aside.is_empty(), "kept in corrupt/, never deleted");
    let mut third = h.worker("host-c").await;
    h.advance(5_000);
    assert_eq!(third.join().await.resume_step, 2);
    h.shutdown().await;
}
