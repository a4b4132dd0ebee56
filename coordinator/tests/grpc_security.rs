//! Hostile or broken callers: no token, a wrong token, stale generations,
//! malformed and absurd messages. Each gets its status code, and the job is
//! exactly as it was (the coordinator's clock is frozen, so its status
//! snapshot must not change at all).

mod common;

use common::{Harness, TOKEN, client_with_token};
use swiftbrush_proto::rpc;
use swiftbrush_proto::rpc::coordinator_client::CoordinatorClient;
use tonic::Code;

fn intruder() -> rpc::RegisterRequest {
    rpc::RegisterRequest {
        host: "intruder".to_owned(),
        device: "cpu".to_owned(),
        capabilities: None,
    }
}

fn snapshot(h: &Harness) -> String {
    serde_json::to_string(&h.server.app.status()).expect("status JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_tokens_are_unauthenticated() {
    let h = Harness::with_job(10, 1, 1, 4, 4).await;
    let before = snapshot(&h);
    // No token at all: a bare client.
    let mut bare = CoordinatorClient::new(common::channel(h.server.grpc_addr).await);
    let err = bare.register(intruder()).await.expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "missing job token");
    let err = bare
        .job_status(rpc::JobStatusRequest {})
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    let longer = format!("{TOKEN}x");
    for token in ["wrong-token-0123456789abcdef", "", &longer, &TOKEN[1..]] {
        let mut client = client_with_token(h.server.grpc_addr, token).await;
        let err = client.register(intruder()).await.expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "token {token:?}");
        assert_eq!(err.message(), "wrong job token");
        let err = client
            .cancel_job(rpc::CancelJobRequest {
                reason: "x".to_owned(),
                final_checkpoint: false,
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated);
        let err = client
            .job_status(rpc::JobStatusRequest {})
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    assert_eq!(snapshot(&h), before);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_generations_cannot_fetch_captions_or_commit() {
    let h = Harness::with_job(10, 1, 2, 4, 20).await;
    let mut a = h.worker("host-a").await;
    let mut b = h.worker("host-b").await;
    let pending = tokio::spawn(async move {
        a.join().await;
        a
    });
    b.join().await;
    let a = pending.await.expect("a joins");
    let (mut rank0, mut rank1) = if a.rank == 0 { (a, b) } else { (b, a) };
    let old = rank0.generation;
    // rank 1 leaves: the world re-forms without it, one generation on.
    rank1
        .client
        .leave(rpc::LeaveRequest {
            worker_id: rank1.id,
            reason: "preempted".to_owned(),
            failed: false,
        })
        .await
        .expect("leave");
    assert!(
        matches!(rank0.heartbeat(1).await, rpc::command::Kind::AbortAndReform(r) if r.generation == old + 1)
    );
    let store = h.store();
    let before = snapshot(&h);
    let err = rank0.captions(0, 1).await.expect_err("stale");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = rank0.checkpoint(&store, 1).await.expect_err("stale");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The one that left is gone for good: it must register again.
    let err = rank1
        .client
        .heartbeat(rpc::HeartbeatRequest {
            worker_id: rank1.id,
            generation: old,
            step: 1,
            ..Default::default()
        })
        .await
        .expect_err("left");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(snapshot(&h), before);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_absurd_messages_are_invalid_arguments() {
    let h = Harness::with_job(10, 1, 1, 4, 4).await;
    let mut w = h.worker("host-a").await;
    w.join().await;
    let before = snapshot(&h);
    let mut c = h.client().await;
    let mut unlimited = CoordinatorClient::with_interceptor(
        common::channel(h.server.grpc_addr).await,
        rpc::TokenInterceptor::new(TOKEN).expect("token"),
    );
    let id = w.id;
    let generation = w.generation;

    let checks: Vec<(&str, Code, Result<(), tonic::Status>)> = vec![
        ("register without host", Code::InvalidArgument, c.register(rpc::RegisterRequest { host: String::new(), device: "cpu".into(), capabilities: None }).await.map(drop)),
        ("register with a huge host", Code::InvalidArgument, c.register(rpc::RegisterRequest { host: "h".repeat(300), device: "cpu".into(), capabilities: None }).await.map(drop)),
        ("register with control characters", Code::InvalidArgument, c.register(rpc::RegisterRequest { host: "a\nb".into(), device: "cpu".into(), capabilities: None }).await.map(drop)),
        ("register with an unknown backend", Code::InvalidArgument, c.register(rpc::RegisterRequest { host: "x".into(), device: "cpu".into(), capabilities: Some(rpc::Capabilities { backends: vec!["mpi".into()], ..Default::default() }) }).await.map(drop)),
        ("heartbeat without worker id", Code::InvalidArgument, c.heartbeat(rpc::HeartbeatRequest { worker_id: 0, ..Default::default() }).await.map(drop)),
        ("heartbeat with an unknown phase", Code::InvalidArgument, c.heartbeat(rpc::HeartbeatRequest { worker_id: id, generation, phase: 99, ..Default::default() }).await.map(drop)),
        ("heartbeat with NaN step time", Code::InvalidArgument, c.heartbeat(rpc::HeartbeatRequest { worker_id: id, generation, metrics: Some(rpc::StepMetrics { step_time_ms: f64::NAN, ..Default::default() }), ..Default::default() }).await.map(drop)),
        ("heartbeat with negative all-reduce time", Code::InvalidArgument, c.heartbeat(rpc::HeartbeatRequest { worker_id: id, generation, metrics: Some(rpc::StepMetrics { allreduce_ms: -1.0, ..Default::default() }), ..Default::default() }).await.map(drop)),
        ("heartbeat from a future generation", Code::FailedPrecondition, c.heartbeat(rpc::HeartbeatRequest { worker_id: id, generation: generation + 5, ..Default::default() }).await.map(drop)),
        ("heartbeat from an unknown worker", Code::NotFound, c.heartbeat(rpc::HeartbeatRequest { worker_id: 12345, ..Default::default() }).await.map(drop)),
        ("zero caption steps", Code::InvalidArgument, c.get_captions(rpc::GetCaptionsRequest { worker_id: id, generation, rank: 0, first_step: 0, num_steps: 0 }).await.map(drop)),
        ("a million caption steps", Code::InvalidArgument, c.get_captions(rpc::GetCaptionsRequest { worker_id: id, generation, rank: 0, first_step: 0, num_steps: 1_000_000 }).await.map(drop)),
        ("captions past max_steps", Code::OutOfRange, c.get_captions(rpc::GetCaptionsRequest { worker_id: id, generation, rank: 0, first_step: u64::MAX - 1, num_steps: 8 }).await.map(drop)),
        ("captions of another rank", Code::PermissionDenied, c.get_captions(rpc::GetCaptionsRequest { worker_id: id, generation, rank: 7, first_step: 0, num_steps: 1 }).await.map(drop)),
        ("staged checkpoint that is not JSON", Code::InvalidArgument, c.report_checkpoint(rpc::ReportCheckpointRequest { worker_id: id, generation, step: 1, staged_json: "{not json".into(), ..Default::default() }).await.map(drop)),
        ("staged checkpoint of another step", Code::InvalidArgument, c.report_checkpoint(rpc::ReportCheckpointRequest { worker_id: id, generation, step: 1, staged_json: r#"{"step":2,"attempt":"attempt-0123456789abcdef","files":[{"name":"a","size":1,"sha256":"00"}]}"#.into(), ..Default::default() }).await.map(drop)),
        ("staged checkpoint without files", Code::InvalidArgument, c.report_checkpoint(rpc::ReportCheckpointRequest { worker_id: id, generation, step: 1, staged_json: r#"{"step":1,"attempt":"attempt-0123456789abcdef","files":[]}"#.into(), ..Default::default() }).await.map(drop)),
        ("bootstrap blob over 64 KiB", Code::InvalidArgument, c.publish_bootstrap(rpc::PublishBootstrapRequest { worker_id: id, generation, rank: 0, blob: vec![7; 65 * 1024] }).await.map(drop)),
        ("empty bootstrap blob", Code::InvalidArgument, c.publish_bootstrap(rpc::PublishBootstrapRequest { worker_id: id, generation, rank: 0, blob: vec![] }).await.map(drop)),
        ("a second job while one runs", Code::AlreadyExists, c.submit_job(rpc::SubmitJobRequest { config_yaml: "name: x\nmodel: {teacher: t}\n".into() }).await.map(drop)),
        ("an empty config", Code::InvalidArgument, c.submit_job(rpc::SubmitJobRequest { config_yaml: String::new() }).await.map(drop)),
        // A client without the usual limit, so that the server's is tested.
        ("a request over the 1 MiB limit", Code::OutOfRange, unlimited.submit_job(rpc::SubmitJobRequest { config_yaml: "#".repeat(2 * 1024 * 1024) }).await.map(drop)),
    ];
    for (what, code, result) in checks {
        let err = result.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
    }
    assert_eq!(snapshot(&h), before, "refused calls changed the job");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_its_key() {
    let dir = tempfile::tempdir().expect("dir");
    let h = Harness::start(None, dir).await;
    let mut c = h.client().await;
    let err = c
        .submit_job(rpc::SubmitJobRequest {
            config_yaml: "name: x\nmodel: {teacher: t}\ntrain: {global_batchh: 4}\n".into(),
        })
        .await
        .expect_err("typo");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("global_batch"), "{}", err.message());
    let err = c
        .submit_job(rpc::SubmitJobRequest {
            config_yaml: "name: x\nmodel: {teacher: t}\n".into(),
        })
        .await
        .expect_err("no captions");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("data.captions"), "{}", err.message());
    h.shutdown().await;
}
