//! The operator commands as a user runs them against a real `swiftbrush
//! coordinator` process: launch submits, status shows it, cancel ends it
//! (after a final checkpoint that rank 0 writes), and bad addresses, tokens
//! and configs fail with a sentence that says what is wrong.

mod cluster;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster::{BIN, CoordinatorProcess, JobDir, TOKEN, fails, ok, poll, status_json, swiftbrush};
use swiftbrush_proto::rpc::{self, command, rendezvous_reply};
use swiftbrush_proto::run_store::AsyncRunStore;

fn with_token() -> [(&'static str, &'static str); 1] {
    [("SWIFTBRUSH_TOKEN", TOKEN)]
}

#[test]
fn launch_status_and_cancel_drive_a_job_through_the_coordinator() {
    let job = JobDir::new();
    let coordinator = CoordinatorProcess::start(&job, &[]);
    let url = coordinator.grpc.clone();
    let env = with_token();

    let before = ok(&swiftbrush(&["status", "--coordinator", &url], &env));
    assert!(before.contains("job          (none submitted)"), "{before}");

    let config = job.config("ops", "/models/teacher", 1, 2, 6);
    let config = config.display().to_string();
    let launched = ok(&swiftbrush(
        &["launch", "--coordinator", &url, "--config", &config],
        &env,
    ));
    assert!(
        launched.contains(&format!(
            "submitted job ops to {url}: 8 captions, starts from scratch"
        )),
        "{launched}"
    );
    assert!(
        launched.contains("swiftbrush worker --coordinator"),
        "{launched}"
    );
    let (code, ready) = cluster::http_get(&coordinator.http, "/readyz");
    assert_eq!((code, ready.as_str()), (200, "ready: pending\n"));

    let table = ok(&swiftbrush(&["status", "--coordinator", &url], &env));
    assert!(table.contains("job          ops"), "{table}");
    assert!(
        table.contains("phase        pending (submitted)"),
        "{table}"
    );
    assert!(table.contains("step 0/6 (0.0%)"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&ok(&swiftbrush(
        &["status", "--coordinator", &url, "--json"],
        &env,
    )))
    .expect("status --json is JSON");
    assert_eq!(
        (&json["name"], &json["phase"], &json["max_steps"]),
        (&"ops".into(), &"pending".into(), &6.into())
    );

    let phase = ok(&swiftbrush(
        &["status", "--coordinator", &url, "--phase"],
        &env,
    ));
    assert_eq!(phase, "pending\n");

    // One job at a time.
    let again = fails(&swiftbrush(
        &["launch", "--coordinator", &url, "--config", &config],
        &env,
    ));
    assert!(again.contains("already runs a job"), "{again}");

    // No world is running: nothing to save, so it ends at once.
    let cancelled = ok(&swiftbrush(&["cancel", "--coordinator", &url], &env));
    assert!(
        cancelled.contains("cancelled job ops at once"),
        "{cancelled}"
    );
    assert_eq!(status_json(&coordinator.http)["phase"], "cancelled");
    let nothing = fails(&swiftbrush(&["cancel", "--coordinator", &url], &env));
    assert!(nothing.contains("nothing to cancel"), "{nothing}");

    // A new job may follow; the address may come from the environment.
    let env_url = [
        ("SWIFTBRUSH_TOKEN", TOKEN),
        ("SWIFTBRUSH_COORDINATOR", url.as_str()),
    ];
    ok(&swiftbrush(&["launch", "--config", &config], &env_url));
    assert_eq!(status_json(&coordinator.http)["phase"], "pending");

    let exit = coordinator.terminate();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn bad_addresses_tokens_and_configs_are_named() {
    let job = JobDir::new();
    let coordinator = CoordinatorProcess::start(&job, &[]);
    let url = coordinator.grpc.clone();
    let config = job.config("errs", "/models/teacher", 1, 1, 4);
    let config = config.display().to_string();

    let wrong = fails(&swiftbrush(
        &["status", "--coordinator", &url],
        &[("SWIFTBRUSH_TOKEN", "not-the-token-0123456789")],
    ));
    assert!(
        wrong.contains("refused the job token (wrong job token)"),
        "{wrong}"
    );
    let none = fails(&swiftbrush(
        &["launch", "--coordinator", &url, "--config", &config],
        &[],
    ));
    assert!(
        none.contains("no job token") && none.contains("SWIFTBRUSH_TOKEN"),
        "{none}"
    );
    let missing_file = job.path().join("no-such-token").display().to_string();
    let unreadable = fails(&swiftbrush(
        &[
            "status",
            "--coordinator",
            &url,
            "--token-file",
            &missing_file,
        ],
        &[],
    ));
    assert!(
        unreadable.contains("cannot read the token file") && unreadable.contains("no-such-token")
    );

    // Nothing listens there (a port the coordinator held and released).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let started = Instant::now();
    let down = fails(&swiftbrush(
        &[
            "status",
            "--coordinator",
            &closed_url,
            "--connect-timeout-ms",
            "300",
        ],
        &with_token(),
    ));
    assert!(
        down.contains(&format!(
            "cannot connect to the coordinator at {closed_url}"
        )) && down.contains("tried for 300 ms"),
        "{down}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");
    let tls = fails(&swiftbrush(
        &["status", "--coordinator", "https://127.0.0.1:1"],
        &with_token(),
    ));
    assert!(tls.contains("needs --tls-ca"), "{tls}");

    // A typo is named with its file, before the coordinator is asked.
    let typo = job.path().join("typo.yaml");
    std::fs::write(
        &typo,
        std::fs::read_to_string(&config)
            .expect("read")
            .replace("max_steps", "max_stpes"),
    )
    .expect("write");
    let typo = typo.display().to_string();
    let named = fails(&swiftbrush(
        &["launch", "--coordinator", &url, "--config", &typo],
        &with_token(),
    ));
    assert!(
        named.contains("typo.yaml") && named.contains("max_stpes"),
        "{named}"
    );
    assert!(named.contains("did you mean `max_steps`"), "{named}");
    // Captions the coordinator cannot read: its refusal, with advice.
    let lost = job.path().join("lost.yaml");
    std::fs::write(
        &lost,
        std::fs::read_to_string(&config)
            .expect("read")
            .replace("captions.txt", "gone.txt"),
    )
    .expect("write");
    let lost = lost.display().to_string();
    let refused = fails(&swiftbrush(
        &["launch", "--coordinator", &url, "--config", &lost],
        &with_token(),
    ));
    assert!(
        refused.contains("gone.txt") && refused.contains("coordinator's machine"),
        "{refused}"
    );
    assert_eq!(status_json(&coordinator.http)["name"], "");
}

/// A worker's side of the protocol, enough to hold rank 0 of a world of one
/// and write the checkpoints it is asked for (the real worker lives in
/// tests/deploy_e2e.rs; here the operator commands are under test).
struct RankZero {
    client: rpc::CoordinatorConnection,
    id: u64,
    generation: u64,
}

impl RankZero {
    async fn join(url: &str) -> Self {
        let mut client = rpc::connect(url, TOKEN, None).await.expect("connect");
        let id = client
            .register(rpc::RegisterRequest {
                host: "test-host".into(),
                device: "cpu".into(),
                capabilities: Some(rpc::Capabilities {
                    backends: vec!["tcp".into()],
                    ..Default::default()
                }),
            })
            .await
            .expect("register")
            .into_inner()
            .worker_id;
        loop {
            let reply = client
                .rendezvous(rpc::RendezvousRequest {
                    worker_id: id,
                    known_generation: 0,
                    wait_ms: 2_000,
                    teacher_fingerprint: "t".into(),
                })
                .await
                .expect("rendezvous")
                .into_inner();
            if let Some(rendezvous_reply::Outcome::Assignment(a)) = reply.outcome {
                assert_eq!(a.rank, 0);
                return Self {
                    client,
                    id,
                    generation: a.generation,
                };
            }
        }
    }

    async fn heartbeat(&mut self, step: u64) -> command::Kind {
        self.client
            .heartbeat(rpc::HeartbeatRequest {
                worker_id: self.id,
                generation: self.generation,
                step,
                phase: rpc::Phase::Training as i32,
                metrics: Some(rpc::StepMetrics::default()),
            })
            .await
            .expect("heartbeat")
            .into_inner()
            .command
            .and_then(|c| c.kind)
            .expect("a command")
    }

    async fn leave(&mut self, reason: &str) {
        self.client
            .leave(rpc::LeaveRequest {
                worker_id: self.id,
                reason: reason.to_owned(),
                failed: false,
            })
            .await
            .expect("leave");
    }

    async fn checkpoint(&mut self, store: &AsyncRunStore, step: u64) {
        let mut writer = store.begin_checkpoint(step);
        writer
            .put_file("student.safetensors", Bytes::from(format!("at {step}")))
            .await
            .expect("stage");
        let staged_json = serde_json::to_string(&writer.into_staged()).expect("json");
        self.client
            .report_checkpoint(rpc::ReportCheckpointRequest {
                worker_id: self.id,
                generation: self.generation,
                step,
                staged_json,
                teacher_fingerprint: "t".into(),
                upload_seconds: 0.1,
            })
            .await
            .expect("commit");
    }
}

#[test]
fn cancel_waits_for_the_final_checkpoint_and_launch_wait_reports_the_end() {
    let job = JobDir::new();
    let coordinator = CoordinatorProcess::start(&job, &[]);
    let url = coordinator.grpc.clone();
    let config = job.config("final", "/models/teacher", 1, 1, 50);
    let config = config.display().to_string();
    let launch = Command::new(BIN)
        .env_clear()
        .env("SWIFTBRUSH_TOKEN", TOKEN)
        .args(["launch", "--coordinator", &url, "--config", &config])
        .args(["--wait", "--poll-ms", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch --wait");
    poll("the job to be submitted", Duration::from_secs(30), || {
        (status_json(&coordinator.http)["name"] == "final").then_some(())
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rank0 = runtime.block_on(RankZero::join(&url));
    runtime.block_on(rank0.heartbeat(3));

    let mut cancel = Command::new(BIN)
        .env_clear()
        .env("SWIFTBRUSH_TOKEN", TOKEN)
        .args(["cancel", "--coordinator", &url, "--reason", "enough"])
        .args(["--wait", "--poll-ms", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cancel --wait");
    let step = poll(
        "the final checkpoint request",
        Duration::from_secs(30),
        || match runtime.block_on(rank0.heartbeat(3)) {
            command::Kind::Checkpoint(c) => Some(c.step),
            _ => None,
        },
    );
    assert_eq!(step, 4, "one step past the newest reported");
    let table = ok(&swiftbrush(
        &["status", "--coordinator", &url],
        &with_token(),
    ));
    assert!(
        table.contains("stopping     after the final checkpoint at step 4"),
        "{table}"
    );
    // The operator is still waiting: the job has not ended.
    assert!(cancel.try_wait().expect("poll cancel").is_none());

    // Rank 0 was already past step 4 when the order reached it (the
    // heartbeats lag the training): it writes the checkpoint at step 6.
    let store = AsyncRunStore::open(&job.run_dir().display().to_string()).expect("store");
    runtime.block_on(rank0.checkpoint(&store, 6));
    assert!(matches!(
        runtime.block_on(rank0.heartbeat(6)),
        command::Kind::Stop(_)
    ));

    // Issue 29: cancel names the step the final checkpoint was written at,
    // not the one it asked for.
    let cancel = cancel.wait_with_output().expect("cancel ends");
    let said = ok(&cancel);
    assert!(
        said.contains(
            "cancelling job final: rank 0 writes a final checkpoint at its first step \
             boundary from step 4 on"
        ),
        "{said}"
    );
    assert!(!said.contains("checkpoint at step 4"), "{said}");
    assert!(
        said.contains("job final cancelled: enough (after the final checkpoint at step 6)"),
        "{said}"
    );
    assert!(said.contains("newest checkpoint at step 6"), "{said}");
    let launch = launch.wait_with_output().expect("launch ends");
    let why = fails(&launch);
    assert!(why.contains("job final cancelled"), "{why}");
    assert!(cluster::stdout(&launch).contains("committed step 6/50"));
    let latest = runtime.block_on(store.latest_valid()).expect("read store");
    assert_eq!(latest.map(|m| m.step), Some(6));

    // Issue 29: a worker that left after the job ended is "left" with its
    // last phase, not "dead ... training", under the name the reasons use.
    runtime.block_on(rank0.leave("the job ended"));
    let table = ok(&swiftbrush(
        &["status", "--coordinator", &url],
        &with_token(),
    ));
    let row = table
        .lines()
        .find(|l| l.contains(&format!("w{:x}", rank0.id)))
        .unwrap_or_else(|| panic!("no row for w{:x} in\n{table}", rank0.id));
    assert!(row.contains("left"), "{row}");
    assert!(row.contains("training (last)"), "{row}");
    assert!(!row.contains("dead"), "{row}");
    assert!(row.contains("left: the job ended"), "{row}");
}

/// Issue 29: README's "Locally" block starts the coordinator with `&` and
/// runs `launch` at once. `launch` waits for the coordinator to answer (as
/// `worker` does) instead of failing with "Connection refused".
#[test]
fn launch_waits_for_a_coordinator_that_is_still_starting() {
    let job = JobDir::new();
    let config = job.config("early", "/models/teacher", 1, 1, 4);
    let config = config.display().to_string();
    let grpc = format!("127.0.0.1:{}", cluster::free_port());
    let url = format!("http://{grpc}");
    let launch = Command::new(BIN)
        .env_clear()
        .env("SWIFTBRUSH_TOKEN", TOKEN)
        .args(["launch", "--coordinator", &url, "--config", &config])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch");
    // Launch is already knocking when the coordinator starts.
    std::thread::sleep(Duration::from_millis(500));
    let store = job.run_dir().display().to_string();
    let token = job.token_file().display().to_string();
    let _coordinator = CoordinatorProcess::start_at(
        &grpc,
        "127.0.0.1:0",
        &["--store", &store, "--token-file", &token],
    );
    let launched = ok(&launch.wait_with_output().expect("launch ends"));
    assert!(launched.contains("submitted job early"), "{launched}");
}

/// Issue 29: launch's hint for starting workers carries the token file it
/// was given, and a run directory whose job already reached max_steps is
/// said to be complete, not to "resume from step N".
#[test]
fn launch_hints_with_the_token_file_and_names_a_complete_run() {
    let job = JobDir::new();
    let coordinator = CoordinatorProcess::start(&job, &[]);
    let url = coordinator.grpc.clone();
    let token = job.token_file().display().to_string();
    let config = job.config("done", "/models/teacher", 1, 1, 4);
    let config = config.display().to_string();
    // The run directory already holds the final checkpoint (step 4 of 4).
    let store = AsyncRunStore::open(&job.run_dir().display().to_string()).expect("store");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut writer = store.begin_checkpoint(4);
        writer
            .put_file("student.safetensors", Bytes::from_static(b"at 4"))
            .await
            .expect("stage");
        store
            .commit_staged(writer.into_staged(), Default::default())
            .await
            .expect("commit");
    });
    let launched = ok(&swiftbrush(
        &[
            "launch",
            "--coordinator",
            &url,
            "--token-file",
            &token,
            "--config",
            &config,
        ],
        &[],
    ));
    assert!(
        launched.contains("already complete: its run directory holds the checkpoint at step 4"),
        "{launched}"
    );
    assert!(!launched.contains("resumes from"), "{launched}");
    assert!(
        launched.contains(&format!(
            "swiftbrush worker --coordinator {url} --token-file {token}"
        )),
        "{launched}"
    );
}
