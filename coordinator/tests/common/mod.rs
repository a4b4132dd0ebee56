//! Shared by the service tests: an in-process coordinator on 127.0.0.1:0
//! with a hand-moved clock and an in-memory run store, and a fake worker
//! that drives it through real gRPC (test code, not a mock of the server).

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use swiftbrush_coordinator::app::ManualClock;
use swiftbrush_coordinator::grpc::JobToken;
use swiftbrush_coordinator::{RunningCoordinator, ServeOptions, start_with_clock};
use swiftbrush_proto::rpc::{self, command, rendezvous_reply};
use swiftbrush_proto::run_store::AsyncRunStore;
use tonic::Status;
use tonic::transport::Channel;

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// The teacher every simulated worker reports.
pub const TEACHER_FINGERPRINT: &str = "teacher-fingerprint";

pub type Client = rpc::CoordinatorConnection;

pub struct Harness {
    pub server: RunningCoordinator,
    pub clock: ManualClock,
    pub store_url: String,
    pub dir: tempfile::TempDir,
}

/// A unique in-memory run store per test (named memory stores are shared
/// within the process, so fake workers see what the coordinator sees).
pub fn memory_url() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "memory://coord-test-{}-{}/run",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// A job config over `num_captions` captions "caption 0", "caption 1", ...
pub fn config_yaml(
    captions_file: &str,
    min: u32,
    max: u32,
    global_batch: u32,
    max_steps: u64,
) -> String {
    format!(
        "name: svc-test
model:
  teacher: /models/unused-by-the-coordinator
  resolution: 16
data:
  captions: [{captions_file}]
train:
  global_batch: {global_batch}
  max_steps: {max_steps}
  seed: 3
world:
  min_size: {min}
  max_size: {max}
  heartbeat_interval_ms: 1000
  heartbeat_timeout_ms: 10000
  progress_timeout_ms: 120000
  max_restarts: 5
checkpoint:
  keep_last: 10
"
    )
}

impl Harness {
    /// A coordinator with a job of `num_captions` captions already submitted.
    pub async fn with_job(
        num_captions: usize,
        min: u32,
        max: u32,
        global_batch: u32,
        max_steps: u64,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let captions = dir.path().join("captions.txt");
        let text: String = (0..num_captions)
            .map(|i| format!("caption {i}\n"))
            .collect();
        std::fs::write(&captions, text).expect("write captions");
        let yaml = config_yaml(
            &captions.display().to_string(),
            min,
            max,
            global_batch,
            max_steps,
        );
        let config = swiftbrush_proto::JobConfig::from_yaml_str(&yaml, "test").expect("config");
        Self::start(Some(config), dir).await
    }

    pub async fn start(
        config: Option<swiftbrush_proto::JobConfig>,
        dir: tempfile::TempDir,
    ) -> Self {
        Self::start_with(config, dir, |_| {}).await
    }

    /// [`Harness::start`], with a last say on the server's options.
    pub async fn start_with(
        config: Option<swiftbrush_proto::JobConfig>,
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut ServeOptions),
    ) -> Self {
        let store_url = memory_url();
        let mut options =
            ServeOptions::new(store_url.clone(), JobToken::new(TOKEN).expect("token"));
        options.listen = "127.0.0.1:0".parse().expect("addr");
        options.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
        options.config = config;
        options.core.settle_ms = 500;
        options.core.restart_backoff_ms = 1_000;
        options.tick = Duration::from_millis(20);
        tweak(&mut options);
        let clock = ManualClock::new(1_000);
        let server = start_with_clock(options, Arc::new(clock.clone()))
            .await
            .expect("coordinator starts");
        Self {
            server,
            clock,
            store_url,
            dir,
        }
    }

    /// Moves the coordinator's clock and lets timers fire.
    pub fn advance(&self, ms: u64) {
        self.clock.advance(ms);
        self.server.app.tick();
    }

    pub async fn client(&self) -> Client {
        client_with_token(self.server.grpc_addr, TOKEN).await
    }

    pub async fn worker(&self, host: &str) -> FakeWorker {
        FakeWorker::register(self.client().await, host, "cpu").await
    }

    pub fn store(&self) -> AsyncRunStore {
        AsyncRunStore::open(&self.store_url).expect("store")
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await.expect("clean shutdown");
    }
}

pub async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// A client that sends `token` with every call, as a worker connects.
pub async fn client_with_token(addr: std::net::SocketAddr, token: &str) -> Client {
    rpc::connect(&format!("http://{addr}"), token, None)
        .await
        .expect("connect")
}

/// A worker process as the coordinator sees it: register, rendezvous,
/// captions, heartbeats, checkpoints.
pub struct FakeWorker {
    pub client: Client,
    pub id: u64,
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    pub resume_step: u64,
}

impl FakeWorker {
    /// Exits on an error it reports (Leave with `failed`).
    pub async fn fail(&mut self, reason: &str) {
        self.client
            .leave(rpc::LeaveRequest {
                worker_id: self.id,
                reason: reason.to_owned(),
                failed: true,
            })
            .await
            .expect("leave");
    }

    pub async fn register(mut client: Client, host: &str, device: &str) -> Self {
        let reply = client
            .register(rpc::RegisterRequest {
                host: host.to_owned(),
                device: device.to_owned(),
                capabilities: Some(rpc::Capabilities {
                    backends: vec!["tcp".to_owned()],
                    device_memory_bytes: 0,
                    version: "test".to_owned(),
                }),
            })
            .await
            .expect("register")
            .into_inner();
        Self {
            client,
            id: reply.worker_id,
            generation: 0,
            rank: 0,
            world_size: 0,
            resume_step: 0,
        }
    }

    pub async fn rendezvous(&mut self, wait_ms: u64) -> rendezvous_reply::Outcome {
        let reply = self
            .client
            .rendezvous(rpc::RendezvousRequest {
                worker_id: self.id,
                known_generation: self.generation,
                wait_ms,
                teacher_fingerprint: TEACHER_FINGERPRINT.to_owned(),
            })
            .await
            .expect("rendezvous")
            .into_inner();
        let outcome = reply.outcome.expect("an outcome");
        if let rendezvous_reply::Outcome::Assignment(a) = &outcome {
            self.generation = a.generation;
            self.rank = a.rank;
            self.world_size = a.world_size;
            self.resume_step = a.resume_step;
        }
        outcome
    }

    /// Rendezvous until assigned (the world must be able to form).
    pub async fn join(&mut self) -> rpc::Assignment {
        for _ in 0..20 {
            if let rendezvous_reply::Outcome::Assignment(a) = self.rendezvous(5_000).await {
                return a;
            }
        }
        panic!("worker {} was never placed", self.id);
    }

    pub async fn heartbeat(&mut self, step: u64) -> command::Kind {
        self.client
            .heartbeat(rpc::HeartbeatRequest {
                worker_id: self.id,
                generation: self.generation,
                step,
                phase: rpc::Phase::Training as i32,
                metrics: Some(rpc::StepMetrics {
                    loss_vsd: 0.5,
                    loss_fake_score: 0.25,
                    step_time_ms: 120.0,
                    allreduce_ms: 15.0,
                    samples_per_s: 8.0,
                    checkpoint_stall_ms: 40.0,
                    ..Default::default()
                }),
            })
            .await
            .expect("heartbeat")
            .into_inner()
            .command
            .and_then(|c| c.kind)
            .expect("a command")
    }

    pub async fn captions(
        &mut self,
        first_step: u64,
        num_steps: u32,
    ) -> Result<Vec<rpc::StepCaptions>, Status> {
        Ok(self
            .client
            .get_captions(rpc::GetCaptionsRequest {
                worker_id: self.id,
                generation: self.generation,
                rank: self.rank,
                first_step,
                num_steps,
            })
            .await?
            .into_inner()
            .steps)
    }

    /// Writes checkpoint files the way rank 0 does and reports them.
    pub async fn checkpoint(
        &mut self,
        store: &AsyncRunStore,
        step: u64,
    ) -> Result<rpc::ReportCheckpointReply, Status> {
        let mut writer = store.begin_checkpoint(step);
        writer
            .put_file(
                "student.safetensors",
                Bytes::from(format!("weights at {step}")),
            )
            .await
            .expect("stage a file");
        let staged = serde_json::to_string(&writer.into_staged()).expect("json");
        self.report(step, staged).await
    }

    pub async fn report(
        &mut self,
        step: u64,
        staged_json: String,
    ) -> Result<rpc::ReportCheckpointReply, Status> {
        Ok(self
            .client
            .report_checkpoint(rpc::ReportCheckpointRequest {
                worker_id: self.id,
                generation: self.generation,
                step,
                staged_json,
                teacher_fingerprint: "teacher".to_owned(),
                upload_seconds: 0.5,
            })
            .await?
            .into_inner())
    }
}
