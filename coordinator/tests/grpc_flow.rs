//! Two fake workers drive a whole job through real gRPC: register,
//! rendezvous, the collective bootstrap, captions, heartbeats, checkpoint
//! commits and completion; plus the health service and the HTTP side.

mod common;

use common::Harness;
use swiftbrush_proto::rpc::{self, command, rendezvous_reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_a_job_to_completion() {
    let h = Harness::with_job(10, 2, 2, 4, 4).await;
    let mut a = h.worker("host-a").await;
    let mut b = h.worker("host-b").await;
    assert_ne!(a.id, b.id);

    // a waits in Rendezvous until b arrives; then both have a place.
    let waiting = tokio::spawn(async move {
        let assignment = a.join().await;
        (a, assignment)
    });
    let b_assignment = b.join().await;
    let (a, a_assignment) = waiting.await.expect("a's rendezvous");
    assert_eq!(a_assignment.generation, b_assignment.generation);
    assert_eq!(
        (a_assignment.world_size, a_assignment.per_rank_batch),
        (2, 2)
    );
    assert_eq!(a_assignment.backend, "tcp");
    let job = a_assignment
        .job
        .as_ref()
        .expect("the assignment names the job");
    assert!(
        job.config_yaml.contains("global_batch: 4"),
        "{}",
        job.config_yaml
    );
    assert_eq!(job.run_dir, h.store_url);
    let mut ranks = [a.rank, b.rank];
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1]);
    let (mut rank0, mut rank1) = if a.rank == 0 { (a, b) } else { (b, a) };

    // TCP ring bootstrap: every rank publishes its address, all fetch all.
    for w in [&mut rank0, &mut rank1] {
        w.client
            .publish_bootstrap(rpc::PublishBootstrapRequest {
                worker_id: w.id,
                generation: w.generation,
                rank: w.rank,
                blob: format!("127.0.0.1:{}", 7000 + w.rank).into_bytes(),
            })
            .await
            .expect("publish");
    }
    let fetched = rank1
        .client
        .fetch_bootstrap(rpc::FetchBootstrapRequest {
            worker_id: rank1.id,
            generation: rank1.generation,
            all_ranks: true,
            wait_ms: 1_000,
        })
        .await
        .expect("fetch")
        .into_inner();
    assert!(fetched.complete);
    assert_eq!(fetched.blobs[0].blob, b"127.0.0.1:7000");

    // Captions: each rank gets its half of each global batch.
    let c0 = rank0.captions(0, 4).await.expect("captions");
    let c1 = rank1.captions(0, 4).await.expect("captions");
    assert_eq!(c0.len(), 4);
    for (s0, s1) in c0.iter().zip(&c1) {
        assert_eq!((s0.caption_ids.len(), s1.caption_ids.len()), (2, 2));
        for (id, text) in s0.caption_ids.iter().zip(&s0.captions) {
            assert_eq!(text, &format!("caption {id}"));
        }
    }

    // Train: heartbeats carry progress; at max_steps rank 0 is told to
    // write the final checkpoint.
    for step in 1..=3 {
        assert!(matches!(
            rank0.heartbeat(step).await,
            command::Kind::None(_)
        ));
        assert!(matches!(
            rank1.heartbeat(step).await,
            command::Kind::None(_)
        ));
    }
    let store = h.store();
    let reply = rank0.checkpoint(&store, 2).await.expect("commit step 2");
    assert_eq!(reply.committed_step, 2);
    assert_eq!(
        reply.manifest_path,
        "checkpoints/step-00000002/manifest.json"
    );
    let err = rank1
        .checkpoint(&store, 3)
        .await
        .expect_err("rank 1 may not commit");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    match rank0.heartbeat(4).await {
        command::Kind::Checkpoint(c) => assert_eq!(c.step, 4),
        other => panic!("expected a checkpoint command, got {other:?}"),
    }
    rank0.checkpoint(&store, 4).await.expect("final commit");
    let latest = store
        .resolve(swiftbrush_proto::run_store::ResumeFrom::Latest)
        .await
        .expect("latest");
    assert_eq!((latest.step, latest.meta.generation), (4, rank0.generation));
    assert!(matches!(rank1.heartbeat(4).await, command::Kind::Stop(_)));
    match rank0.rendezvous(0).await {
        rendezvous_reply::Outcome::Finished(f) => {
            assert_eq!(f.phase, rpc::JobPhase::Completed as i32)
        }
        other => panic!("{other:?}"),
    }

    let status = h
        .client()
        .await
        .job_status(rpc::JobStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.phase, rpc::JobPhase::Completed as i32);
    assert_eq!((status.committed_step, status.samples_committed), (4, 16));
    // The fake score's loss under its name and, for one release, its old one.
    let metrics = status.workers[0].metrics.expect("metrics");
    #[allow(deprecated)]
    let old_name = metrics.loss_lora;
    assert_eq!((metrics.loss_fake_score, old_name), (0.25, 0.25));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_and_http_side() {
    let h = Harness::with_job(10, 1, 1, 4, 4).await;
    let mut w = h.worker("host-a").await;
    w.join().await;
    w.heartbeat(1).await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(
        common::channel(h.server.grpc_addr).await,
    );
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "swiftbrush.v1.Coordinator".to_owned(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let http = h.server.http_addr.expect("http side");
    let (code, body) = get(http, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = get(http, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(http, "/status").await;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(json["phase"], "running");
    assert_eq!(json["workers"][0]["step"], 1);
    // The fake score's loss under its name and, for one release, its old one.
    let metrics = &json["workers"][0]["metrics"];
    assert_eq!(metrics["loss_fake_score"], 0.25, "{json}");
    assert_eq!(metrics["loss_lora"], 0.25, "{json}");
    let (code, body) = get(http, "/metrics").await;
    assert_eq!(code, 200);
    for needle in [
        "swiftbrush_job_phase{phase=\"running\"} 1",
        "swiftbrush_world_size 1",
        "swiftbrush_worker_step_time_seconds{",
        "swiftbrush_worker_allreduce_seconds{",
        "swiftbrush_worker_checkpoint_stall_seconds{",
        "swiftbrush_checkpoint_upload_seconds ",
        "swiftbrush_restarts_total 0",
    ] {
        assert!(body.contains(needle), "{needle} missing from\n{body}");
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_a_waiting_rendezvous() {
    let h = Harness::with_job(10, 2, 2, 4, 4).await;
    let mut a = h.worker("host-a").await;
    let id = swiftbrush_coordinator::domain::WorkerId(a.id);
    let waiting = tokio::spawn(async move { a.rendezvous(30_000).await });
    // Once the call has reached the server, stop it.
    while !h
        .server
        .app
        .inspect(|s| s.worker(id).is_some_and(|w| w.ready_since.is_some()))
    {
        tokio::task::yield_now().await;
    }
    let started = std::time::Instant::now();
    h.shutdown().await;
    let outcome = waiting.await.expect("the call returns");
    assert!(matches!(outcome, rendezvous_reply::Outcome::Waiting(_)));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// A bare HTTP/1.1 GET: (status code, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_every_worker_and_a_new_job_may_follow() {
    let h = Harness::with_job(10, 1, 1, 4, 4).await;
    let mut w = h.worker("host-a").await;
    w.join().await;
    let mut operator = h.client().await;
    let reply = operator
        .cancel_job(rpc::CancelJobRequest {
            reason: "operator".to_owned(),
            final_checkpoint: false,
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(reply.phase, rpc::JobPhase::Cancelled as i32);
    match w.heartbeat(1).await {
        command::Kind::Stop(stop) => {
            assert_eq!(
                (stop.phase, stop.reason.as_str()),
                (rpc::JobPhase::Cancelled as i32, "operator")
            );
        }
        other => panic!("expected stop, got {other:?}"),
    }
    let err = operator
        .cancel_job(rpc::CancelJobRequest {
            reason: "again".to_owned(),
            final_checkpoint: false,
        })
        .await
        .expect_err("nothing to cancel");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // A new job over the same run directory numbers its worlds past the old.
    let captions = h.dir.path().join("captions.txt");
    let yaml = common::config_yaml(&captions.display().to_string(), 1, 1, 4, 4);
    let submitted = operator
        .submit_job(rpc::SubmitJobRequest { config_yaml: yaml })
        .await
        .expect("resubmit")
        .into_inner();
    assert_eq!(submitted.num_captions, 10);
    assert!(submitted.generation > w.generation);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_with_a_final_checkpoint_ends_once_rank_zero_commits_it() {
    let h = Harness::with_job(10, 1, 1, 4, 20).await;
    let mut w = h.worker("host-a").await;
    w.join().await;
    w.heartbeat(3).await;
    let mut operator = h.client().await;
    let reply = operator
        .cancel_job(rpc::CancelJobRequest {
            reason: "operator".to_owned(),
            final_checkpoint: true,
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(
        (reply.phase, reply.final_checkpoint_step),
        (rpc::JobPhase::Running as i32, 4)
    );
    let status = operator
        .job_status(rpc::JobStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.stopping_at_step, 4);
    match w.heartbeat(3).await {
        command::Kind::Checkpoint(c) => assert_eq!(c.step, 4),
        other => panic!("expected the final checkpoint, got {other:?}"),
    }
    let store = h.store();
    w.checkpoint(&store, 4).await.expect("commit");
    match w.heartbeat(4).await {
        command::Kind::Stop(stop) => {
            assert_eq!(stop.phase, rpc::JobPhase::Cancelled as i32);
            assert!(
                stop.reason.contains("final checkpoint at step 4"),
                "{}",
                stop.reason
            );
        }
        other => panic!("expected stop, got {other:?}"),
    }
    assert_eq!(
        store.latest_valid().await.expect("read").map(|m| m.step),
        Some(4)
    );
    h.shutdown().await;
}
