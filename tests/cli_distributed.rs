//! Distributed training as an operator runs it: a coordinator (the library,
//! on loopback, with its real gRPC service) and `swiftbrush worker --device
//! cpu` processes on the tiny SD1-style fixture. Two workers end where one
//! process ends; a worker killed (SIGKILL), frozen (SIGSTOP) or stopped
//! (SIGTERM) mid-run costs nothing, and so does the coordinator process
//! killed and started again on the same store: the job resumes from the
//! newest committed checkpoint and the caption audit shows every caption
//! exactly once per epoch over the committed history.

mod cluster;
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use swiftbrush_coordinator::domain::{Health, JobPhase, StatusSnapshot};
use swiftbrush_coordinator::grpc::JobToken;
use swiftbrush_coordinator::{RunningCoordinator, ServeOptions, start};
use swiftbrush_proto::JobConfig;
use swiftbrush_worker::trainer::caption_audit::{committed_history, read_audit_dir};
use tch::Tensor;

const TOKEN: &str = "distributed-test-token-0123456789";
const NUM_CAPTIONS: u64 = 6;
const GLOBAL_BATCH: u64 = 2;
/// Generous: the suite shares two cores with other tests.
const DEADLINE: Duration = Duration::from_secs(180);

fn job_yaml(dir: &Path, min_size: u32, max_steps: u64) -> String {
    format!(
        "name: distributed-test
model:
  teacher: {teacher}
  resolution: 16
method:
  # Moves the student far beyond rounding in a few steps, so the
  # equivalence checks below can fail (the default 1e-6 cannot).
  student:
    lr: 1.0e-3
  lora:
    rank: 4
    alpha: 8
data:
  captions: [{captions}]
train:
  global_batch: {GLOBAL_BATCH}
  max_steps: {max_steps}
  seed: 0
  device: cpu
world:
  min_size: {min_size}
  max_size: 2
  heartbeat_interval_ms: 250
  heartbeat_timeout_ms: 4000
  progress_timeout_ms: 120000
  max_restarts: 5
checkpoint:
  every_steps: 2
  keep_last: 20
precision:
  teacher_dtype: fp32
  autocast: none
logging:
  every_steps: 1
",
        teacher = common::pipeline("sd1").display(),
        captions = dir.join("captions.txt").display(),
    )
}

fn setup(min_size: u32, max_steps: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let captions: String = (0..NUM_CAPTIONS)
        .map(|i| format!("a photo of thing number {i}\n"))
        .collect();
    std::fs::write(dir.path().join("captions.txt"), captions).unwrap();
    std::fs::write(
        dir.path().join("job.yaml"),
        job_yaml(dir.path(), min_size, max_steps),
    )
    .unwrap();
    // The same job for one process alone.
    std::fs::write(
        dir.path().join("alone.yaml"),
        job_yaml(dir.path(), 1, max_steps),
    )
    .unwrap();
    dir
}

/// The coordinator, in this process, serving real gRPC on loopback.
struct Coordinator {
    runtime: tokio::runtime::Runtime,
    server: Option<RunningCoordinator>,
    address: String,
}

impl Coordinator {
    fn start(dir: &Path, run: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let config = JobConfig::from_yaml_file(&dir.join("job.yaml")).unwrap();
        let mut options = ServeOptions::new(
            dir.join(run).display().to_string(),
            JobToken::new(TOKEN).unwrap(),
        );
        options.listen = "127.0.0.1:0".parse().unwrap();
        options.config = Some(config);
        options.core.settle_ms = 500;
        options.tick = Duration::from_millis(50);
        let server = runtime.block_on(start(options)).unwrap();
        let address = format!("http://{}", server.grpc_addr);
        Self {
            runtime,
            server: Some(server),
            address,
        }
    }

    fn status(&self) -> StatusSnapshot {
        self.server.as_ref().unwrap().app.status()
    }

    /// Polls the job status until `ok`; panics with the status and the
    /// workers' logs after the deadline.
    fn wait_for(
        &self,
        what: &str,
        workers: &[&Worker],
        ok: impl Fn(&StatusSnapshot) -> bool,
    ) -> StatusSnapshot {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let status = self.status();
            if ok(&status) {
                return status;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = workers.iter().map(|w| w.log()).collect();
                panic!("never {what}: {status:#?}\n{}", logs.join("\n----------\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.runtime.block_on(server.shutdown());
        }
    }
}

/// A `swiftbrush worker` process; killed when dropped.
struct Worker {
    child: Child,
    host: String,
    log_path: PathBuf,
    out_path: PathBuf,
}

impl Worker {
    fn spawn(dir: &Path, coordinator: &str, host: &str, extra: &[&str]) -> Self {
        let log_path = dir.join(format!("{host}.log"));
        let out_path = dir.join(format!("{host}.out"));
        let child = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
            .env_clear()
            .env("SWIFTBRUSH_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            // One libtorch thread: several processes share the machine.
            .env("OMP_NUM_THREADS", "1")
            .current_dir(dir)
            .args(["worker", "--coordinator", coordinator])
            .args(["--device", "cpu", "--host", host])
            .args(["--caption-audit", "audit"])
            .args(extra)
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("spawn swiftbrush worker");
        Self {
            child,
            host: host.to_owned(),
            log_path,
            out_path,
        }
    }

    fn log(&self) -> String {
        format!(
            "== {} ==\n{}{}",
            self.host,
            std::fs::read_to_string(&self.out_path).unwrap_or_default(),
            std::fs::read_to_string(&self.log_path).unwrap_or_default()
        )
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; its status and stdout.
    fn wait(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let out = std::fs::read_to_string(&self.out_path).unwrap_or_default();
                return (status, out);
            }
            assert!(
                Instant::now() < deadline,
                "worker never exited\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The worker's id and rank in the coordinator's current world.
    fn rank(&self, status: &StatusSnapshot) -> Option<u32> {
        status
            .workers
            .iter()
            .find(|w| w.host == self.host && w.health != Health::Dead)
            .and_then(|w| w.rank)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A stopped process cannot die until it runs again.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `swiftbrush train` (local mode, one worker) with the same job: the
/// uninterrupted reference.
fn train_alone(dir: &Path, run: &str) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir)
        .args(["train", "--config", "alone.yaml", "--run-dir", run])
        .args(["--caption-audit", &format!("{run}-audit")])
        .output()
        .expect("spawn swiftbrush train");
    assert!(
        out.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn student(run: &Path, step: u64) -> Vec<(String, Tensor)> {
    let dir = run.join("checkpoints").join(format!("step-{step:08}"));
    let attempt = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("attempt-"))
        .unwrap_or_else(|| panic!("no attempt in {}", dir.display()));
    let mut t = Tensor::read_safetensors(attempt.path().join("student.safetensors")).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// The committed history of an audit folder: each step's global batch of
/// caption ids. Asserts that it covers steps 0..max_steps, that replicas
/// agreed after every step, and that every epoch used each caption once.
fn exactly_once(audit: &Path, max_steps: u64) -> BTreeMap<u64, Vec<u64>> {
    let entries = read_audit_dir(audit).unwrap();
    let history = committed_history(&entries).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        history.keys().copied().collect::<Vec<_>>(),
        (0..max_steps).collect::<Vec<_>>(),
        "the committed history covers every step once"
    );
    let stream: Vec<u64> = history.values().flatten().copied().collect();
    assert_eq!(stream.len() as u64, max_steps * GLOBAL_BATCH);
    for (epoch, ids) in stream.chunks(NUM_CAPTIONS as usize).enumerate() {
        if ids.len() == NUM_CAPTIONS as usize {
            let mut sorted = ids.to_vec();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..NUM_CAPTIONS).collect::<Vec<_>>(),
                "epoch {epoch} used each caption exactly once"
            );
        }
    }
    history
}

/// Ends equal to the uninterrupted reference: the same captions at every
/// step, and the same student to float rounding (the world size changed).
/// Returns the one-worker reference run's stdout.
fn assert_matches_reference(dir: &Path, run: &str, max_steps: u64) -> String {
    let alone = train_alone(dir, "reference");
    let reference = exactly_once(&dir.join("reference-audit"), max_steps);
    let history = exactly_once(&dir.join("audit"), max_steps);
    assert_eq!(history, reference, "the same captions in the same steps");
    let ours = student(&dir.join(run), max_steps);
    let theirs = student(&dir.join("reference"), max_steps);
    // Apart by at most 2e-2 of how far the reference moved after step 2
    // (measured: 2e-3 to 5e-3, the rounding of near-zero gradients that
    // Adam turns into lr-sized moves; a wrong average or a lost rank's
    // share moves it elsewhere by O(1)).
    let start = student(&dir.join("reference"), 2);
    let r = common::tensors::relative_to_move(&ours, &theirs, &start);
    assert!(
        r <= 2e-2,
        "the student differs from the reference by {r:e} of its move"
    );
    String::from_utf8_lossy(&alone.stdout).into_owned()
}

/// The losses `train` prints last: (vsd, fake score).
fn last_losses(stdout: &str) -> (f64, f64) {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("last losses: "))
        .unwrap_or_else(|| panic!("no last losses in {stdout}"));
    let value = |name: &str| -> f64 {
        line.split(", ")
            .find_map(|p| p.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (value("vsd"), value("fake score"))
}

#[test]
fn two_worker_processes_end_where_one_process_ends() {
    let max_steps = 6;
    let dir = setup(2, max_steps);
    let d = dir.path();
    let coordinator = Coordinator::start(d, "run");
    let mut a = Worker::spawn(d, &coordinator.address, "host-a", &[]);
    let mut b = Worker::spawn(d, &coordinator.address, "host-b", &[]);
    let status = coordinator.wait_for("completed", &[&a, &b], |s| s.phase == JobPhase::Completed);
    assert_eq!((status.committed_step, status.restarts), (max_steps, 0));
    for w in [&mut a, &mut b] {
        let (exit, out) = w.wait();
        assert!(exit.success(), "{}", w.log());
        assert!(
            out.contains("the job completed; trained steps 0..6"),
            "{out}"
        );
    }
    // Every step's audit lines say the two ranks ended it with the same
    // student and adapters, bit for bit (`exactly_once` checks the digests).
    let entries = read_audit_dir(&d.join("audit")).unwrap();
    assert_eq!(
        entries.len() as u64,
        2 * max_steps,
        "two ranks, every step once"
    );
    assert!(entries.iter().all(|e| e.world_size == 2));
    assert_matches_reference(d, "run", max_steps);
}

/// `world.shard_state: state` in `dir`'s job.yaml (the one-process
/// reference, alone.yaml, stays unsharded).
fn shard_job(dir: &Path, state: &str) {
    let path = dir.join("job.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    assert!(yaml.contains("world:\n"), "{yaml}");
    let yaml = yaml.replace("world:\n", &format!("world:\n  shard_state: {state}\n"));
    std::fs::write(path, yaml).unwrap();
}

/// Kills (or freezes) one member once a checkpoint is committed; the other
/// goes on alone from the newest committed checkpoint.
fn survives(fault: &str) {
    survives_with(fault, None)
}

/// [`survives`], with `world.shard_state` set in the job (the re-formed
/// world reshards the newest committed checkpoint for its own size).
fn survives_with(fault: &str, shard_state: Option<&str>) {
    let max_steps = 12;
    let dir = setup(1, max_steps);
    let d = dir.path();
    if let Some(state) = shard_state {
        shard_job(d, state);
    }
    let coordinator = Coordinator::start(d, "run");
    let a = Worker::spawn(d, &coordinator.address, "host-a", &[]);
    let b = Worker::spawn(d, &coordinator.address, "host-b", &[]);
    // Rank 0 reports what its checkpoints cost the training thread.
    let rank0_stall = |s: &StatusSnapshot| {
        s.workers
            .iter()
            .find(|w| w.rank == Some(0) && w.health != Health::Dead)
            .map_or(0.0, |w| w.metrics.checkpoint_stall_ms)
    };
    let running = coordinator.wait_for("a world of 2 with a commit", &[&a, &b], |s| {
        s.world_size == 2
            && s.committed_step >= 2
            && s.phase == JobPhase::Running
            && rank0_stall(s) > 0.0
    });
    assert!(
        running.committed_step < max_steps,
        "the job finished too soon to test"
    );
    // The harder case: the rank that writes the checkpoints goes.
    let (victim, mut survivor) = if a.rank(&running) == Some(0) {
        (a, b)
    } else {
        (b, a)
    };
    victim.signal(fault);
    let broken = coordinator.wait_for("the victim declared dead", &[&victim, &survivor], |s| {
        s.generation > running.generation
            && s.workers
                .iter()
                .any(|w| w.host == victim.host && w.health == Health::Dead)
    });
    let death = broken
        .workers
        .iter()
        .find(|w| w.host == victim.host)
        .and_then(|w| w.death_reason.clone())
        .unwrap_or_default();
    assert!(
        death.contains("silent for"),
        "detected by the heartbeat timeout: {death}"
    );
    assert_eq!(broken.restarts, 1);
    let done = coordinator.wait_for("completed", &[&victim, &survivor], |s| {
        s.phase == JobPhase::Completed
    });
    assert_eq!(done.committed_step, max_steps);
    assert_eq!(done.world_size, 0, "the world ended with the job");
    let (exit, out) = survivor.wait();
    assert!(exit.success(), "{}", survivor.log());
    assert!(out.contains("in 2 worlds"), "{out}\n{}", survivor.log());
    drop(victim);
    assert_matches_reference(d, "run", max_steps);
}

#[test]
fn a_killed_worker_costs_nothing() {
    survives("KILL");
}

#[test]
fn a_frozen_worker_is_declared_dead_and_its_peer_goes_on() {
    survives("STOP");
}

/// Elastic re-formation with ZeRO-2: the rank that gathers and writes the
/// checkpoints is killed; the survivor re-forms alone from the newest
/// committed checkpoint (the full state) and ends where one unsharded
/// process ends.
#[test]
fn a_killed_worker_costs_nothing_sharded() {
    survives_with("KILL", Some("optimizer_and_gradients"));
}

#[test]
fn sigterm_checkpoints_leaves_and_the_job_resumes_when_a_worker_joins() {
    sigterm_checkpoints_with(None);
}

/// The preemption checkpoint sharded (ZeRO-1): every rank gathers at the
/// boundary the vote agreed on, rank 0 writes; the job resumes in a new
/// world from it.
#[test]
fn sigterm_checkpoints_sharded() {
    sigterm_checkpoints_with(Some("optimizer"));
}

fn sigterm_checkpoints_with(shard_state: Option<&str>) {
    // Room for the signal to take effect before the job's end: the
    // checkpoint comes at the step boundary both ranks agree on, which a
    // loaded machine may reach seconds later (with 8 steps, once, the job
    // finished with b's checkpoint of the last step).
    let max_steps = 24;
    let dir = setup(2, max_steps);
    let d = dir.path();
    if let Some(state) = shard_state {
        shard_job(d, state);
    }
    let coordinator = Coordinator::start(d, "run");
    let a = Worker::spawn(d, &coordinator.address, "host-a", &[]);
    let mut b = Worker::spawn(d, &coordinator.address, "host-b", &[]);
    let running = coordinator.wait_for("training", &[&a, &b], |s| {
        s.world_size == 2 && s.workers.iter().any(|w| w.step >= 1)
    });
    b.signal("TERM");
    let (exit, out) = b.wait();
    assert!(exit.success(), "{}", b.log());
    // It checkpointed at a step boundary (all ranks agreed where), and the
    // checkpoint was committed before it left.
    let step: u64 = out
        .split("checkpoint at step ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no checkpoint step in: {out}"));
    assert!(out.contains("committed"), "{out}");
    assert!(step < max_steps, "stopped before the end: {out}");
    let waiting = coordinator.wait_for("waiting for a second worker", &[&a, &b], |s| {
        s.generation > running.generation && s.committed_step == step
    });
    assert_eq!(waiting.restarts, 0, "leaving is not a failure");
    assert_ne!(
        waiting.phase,
        JobPhase::Running,
        "min_size 2: no world of one"
    );

    let c = Worker::spawn(d, &coordinator.address, "host-c", &[]);
    coordinator.wait_for("completed", &[&a, &c], |s| s.phase == JobPhase::Completed);
    drop((a, b, c));
    assert_matches_reference(d, "run", max_steps);
}

/// Issue 29: a teacher path the workers cannot read. Each worker exits 1
/// with the reason, and used to leave `status` at "reforming (worker ...
/// silent for 10168 ms)" with a restart spent, again and again. Now each
/// reports its error as it exits: `status` shows it per worker, and since
/// every worker failed the same way, the job fails with that reason.
#[test]
fn workers_that_cannot_read_the_teacher_fail_the_job_with_their_reason() {
    let dir = setup(2, 4);
    let d = dir.path();
    let teacher = common::pipeline("sd1").display().to_string();
    let yaml = std::fs::read_to_string(d.join("job.yaml")).unwrap();
    std::fs::write(
        d.join("job.yaml"),
        yaml.replace(&teacher, "/no/such/teacher"),
    )
    .unwrap();
    let coordinator = Coordinator::start(d, "run");
    let mut a = Worker::spawn(d, &coordinator.address, "host-a", &[]);
    let mut b = Worker::spawn(d, &coordinator.address, "host-b", &[]);
    for worker in [&mut a, &mut b] {
        let (exit, _) = worker.wait();
        assert!(!exit.success(), "{}", worker.log());
    }
    let status = coordinator.wait_for("the job to fail", &[&a, &b], |s| {
        s.phase == JobPhase::Failed
    });
    assert!(
        status
            .reason
            .contains("every worker failed the same way (2 workers)")
            && status.reason.contains("/no/such/teacher"),
        "{}",
        status.reason
    );
    for worker in &status.workers {
        let why = worker.death_reason.clone().unwrap_or_default();
        assert!(
            why.starts_with("failed: ") && why.contains("/no/such/teacher"),
            "{}: {why}",
            worker.host
        );
    }
}

/// Issue 28: two hosts whose copies of the teacher at the same path differ
/// (here: the same relative path, resolved in each worker's own folder, is
/// the sd1 fixture for one and the sd2 fixture for the other). The second
/// used to train beside the first, averaging gradients of another model;
/// now it is refused when it asks to join, naming its host and both
/// fingerprints, and the job completes without it.
#[test]
fn a_worker_with_another_teacher_is_refused_and_the_job_goes_on() {
    let dir = setup(1, 4);
    let d = dir.path();
    let teacher = common::pipeline("sd1").display().to_string();
    let yaml = std::fs::read_to_string(d.join("job.yaml")).unwrap();
    std::fs::write(d.join("job.yaml"), yaml.replace(&teacher, "teacher")).unwrap();
    let (here, there) = (d.join("host-a"), d.join("host-b"));
    for (folder, kind) in [(&here, "sd1"), (&there, "sd2")] {
        std::fs::create_dir(folder).unwrap();
        std::os::unix::fs::symlink(common::pipeline(kind), folder.join("teacher")).unwrap();
    }
    let coordinator = Coordinator::start(d, "run");
    let a = Worker::spawn(&here, &coordinator.address, "host-a", &[]);
    coordinator.wait_for("host-a to train", &[&a], |s| a.rank(s).is_some());
    let mut b = Worker::spawn(&there, &coordinator.address, "host-b", &[]);
    let (exit, _) = b.wait();
    assert!(!exit.success(), "{}", b.log());
    assert!(
        b.log().contains("has another teacher than the job"),
        "{}",
        b.log()
    );
    let status = coordinator.wait_for("the job to complete", &[&a, &b], |s| {
        s.phase == JobPhase::Completed
    });
    let refused = status.workers.iter().find(|w| w.host == "host-b").unwrap();
    let why = refused.death_reason.clone().unwrap_or_default();
    assert!(
        why.starts_with("failed: ") && why.contains("on host-b has another teacher"),
        "{why}"
    );
}

#[test]
fn a_graceful_cancel_gets_its_final_checkpoint_from_the_workers() {
    graceful_cancel_with(None);
}

/// The coordinator's checkpoint order, sharded (ZeRO-2): rank 0 puts it
/// into the next step's vote, every rank gathers after that step, rank 0
/// writes and the job ends the same way.
#[test]
fn a_graceful_cancel_gets_its_final_checkpoint_sharded() {
    graceful_cancel_with(Some("optimizer_and_gradients"));
}

fn graceful_cancel_with(shard_state: Option<&str>) {
    let max_steps = 40;
    let dir = setup(2, max_steps);
    let d = dir.path();
    if let Some(state) = shard_state {
        shard_job(d, state);
        // Only the order writes a checkpoint (none on the cadence), so
        // the order's path through the vote is what ends the job.
        let path = d.join("job.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        assert!(yaml.contains("checkpoint:\n  every_steps: 2\n"), "{yaml}");
        let yaml = yaml.replace(
            "checkpoint:\n  every_steps: 2\n",
            "checkpoint:\n  every_steps: 1000\n",
        );
        std::fs::write(path, yaml).unwrap();
    }
    let coordinator = Coordinator::start(d, "run");
    let mut a = Worker::spawn(d, &coordinator.address, "host-a", &[]);
    let mut b = Worker::spawn(d, &coordinator.address, "host-b", &[]);
    coordinator.wait_for("training", &[&a, &b], |s| {
        s.world_size == 2 && s.workers.iter().any(|w| w.step >= 1)
    });
    let app = coordinator.server.as_ref().unwrap().app.clone();
    let step = {
        let _guard = coordinator.runtime.enter();
        app.cancel_after_checkpoint("test: graceful cancel".to_owned())
            .unwrap()
            .expect("a world runs: a final checkpoint is awaited")
    };
    // Rank 0 writes it when the heartbeat asks (CheckpointAt), the
    // coordinator commits it, then every worker is told to stop.
    // The step asked for is one past the newest step the heartbeats had
    // reported; workers already past it checkpoint at their next boundary
    // instead, which ends the job the same way.
    let done = coordinator.wait_for("cancelled", &[&a, &b], |s| s.phase == JobPhase::Cancelled);
    assert!(
        done.committed_step >= step,
        "the final checkpoint committed: {} < {step}",
        done.committed_step
    );
    let step = done.committed_step;
    assert!(step < max_steps);
    for w in [&mut a, &mut b] {
        let (exit, out) = w.wait();
        assert!(exit.success(), "{}", w.log());
        assert!(out.contains("the job was cancelled"), "{out}");
        assert!(
            out.contains(&format!("after the final checkpoint at step {step}")),
            "{out}"
        );
        // Issue 29: the steps it trained agree with the final checkpoint:
        // those past it are said not to be kept.
        let trained = out.split("trained steps ").nth(1).expect(&out);
        let (_, end) = trained.split_once("..").expect(&out);
        let end: u64 = end
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .expect(&out);
        assert!(end >= step, "{out}");
        if end > step {
            assert!(
                out.contains(&format!(
                    "the run keeps the final checkpoint at step {step}: steps {step}..{end} \
                     were trained before the stop arrived and are not kept"
                )),
                "{out}"
            );
        }
    }
    assert!(!student(&d.join("run"), step).is_empty());
}

#[test]
fn the_worker_serves_healthz_and_refuses_what_it_cannot_run() {
    // min_size 2 and one worker: it waits for a world, heartbeating.
    let dir = setup(2, 2);
    let d = dir.path();
    let coordinator = Coordinator::start(d, "run");
    let health = format!("127.0.0.1:{}", cluster::free_port());
    let w = Worker::spawn(
        d,
        &coordinator.address,
        "host-a",
        &["--health-listen", &health],
    );
    let deadline = Instant::now() + DEADLINE;
    let body = loop {
        if let Ok(body) = http_get(&health, "/healthz")
            && body.contains("\"alive\":true")
            && !body.contains("\"last_heartbeat_ack_ms\":null")
        {
            break body;
        }
        assert!(Instant::now() < deadline, "no /healthz\n{}", w.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let id = coordinator
        .status()
        .workers
        .iter()
        .find(|s| s.host == "host-a")
        .map(|s| s.worker.0)
        .unwrap();
    assert!(body.contains(&format!("\"worker_id\":{id},")), "{body}");
    assert!(body.contains("\"phase\":\"PHASE_IDLE\""), "{body}");
    assert!(body.contains("\"step\":0"), "{body}");
    drop(w);

    // No token: a clear error, before anything else.
    let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .args(["worker", "--coordinator", &coordinator.address])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("SWIFTBRUSH_TOKEN"), "{err}");

    // A job that needs NCCL, which this build lacks: said, not waited for.
    let yaml = job_yaml(d, 1, 2).replace("max_size: 2", "max_size: 2\n  backend: nccl");
    std::fs::write(d.join("job.yaml"), yaml).unwrap();
    let nccl = Coordinator::start(d, "run-nccl");
    let mut w = Worker::spawn(d, &nccl.address, "host-n", &[]);
    let (exit, _) = w.wait();
    assert!(!exit.success());
    assert!(
        w.log()
            .contains("world.backend is nccl, but this worker cannot run it"),
        "{}",
        w.log()
    );
}

/// A bare HTTP/1.1 GET; the body.
fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// `train --workers 2` on job.yaml in `dir`, with `extra` arguments and
/// `env` set.
fn train_two_local_workers(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_swiftbrush"));
    cmd.env_clear()
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir)
        .args([
            "train",
            "--config",
            "job.yaml",
            "--run-dir",
            "run",
            "--workers",
            "2",
        ])
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn swiftbrush train")
}

#[test]
fn local_mode_with_two_workers_ends_where_one_worker_ends() {
    let max_steps = 4;
    let dir = setup(1, max_steps);
    let d = dir.path();
    let out = train_two_local_workers(d, &["--caption-audit", "audit"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("trained steps 0..4"), "{stdout}");
    let entries = read_audit_dir(&d.join("audit")).unwrap();
    assert!(entries.iter().all(|e| e.world_size == 2), "a world of two");
    let alone = assert_matches_reference(d, "run", max_steps);
    // The job's losses are the global batch's, not rank 0's share (each
    // rank's differed from the mean by ~20 % here before they were
    // averaged); float32 averaging keeps about 7 digits.
    let ((vsd2, lora2), (vsd1, lora1)) = (last_losses(&stdout), last_losses(&alone));
    for (name, two, one) in [("vsd", vsd2, vsd1), ("lora", lora2, lora1)] {
        assert!(
            (two - one).abs() <= 1e-5 * one.abs(),
            "{name}: 2 workers printed {two}, 1 worker {one}"
        );
    }
}

/// A four-step student (`method.student_timesteps`, issue 26) trained by two
/// local workers ends with the student one worker ends with: each rank
/// keeps its own rows of the global batch's chain draws (the step index k
/// and the re-noising noise), as it does of the one-step draws.
/// Measured 2.4e-3 of the move; seen failing at 0.99 with every rank
/// taking rank 0's rows of k.
#[test]
fn local_mode_four_step_students_end_where_one_worker_ends() {
    let max_steps = 4;
    let dir = setup(1, max_steps);
    let d = dir.path();
    for file in ["job.yaml", "alone.yaml"] {
        let path = d.join(file);
        let yaml = std::fs::read_to_string(&path).unwrap().replacen(
            "method:\n",
            "method:\n  student_timesteps: [999, 749, 499, 249]\n",
            1,
        );
        std::fs::write(path, yaml).unwrap();
    }
    let out = train_two_local_workers(d, &["--caption-audit", "audit"], &[]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_matches_reference(d, "run", max_steps);
}

/// `train --workers 2` with ZeRO-1 and `--workers 3` with ZeRO-2 (global
/// batch 6, which both divide) end with the student one unsharded process
/// ends with, by the data-parallel measure. The ZeRO-2 run also draws the
/// sample step's pictures, whose EMA weights exist only as the ranks'
/// slices: its step-4 picture is the one `sample --student` draws from the
/// step-4 checkpoint's EMA, not the raw student's.
#[test]
fn local_mode_sharded_workers_end_where_one_worker_ends() {
    let max_steps = 4;
    for (workers, state) in [("2", "optimizer"), ("3", "optimizer_and_gradients")] {
        let dir = setup(1, max_steps);
        let d = dir.path();
        for file in ["job.yaml", "alone.yaml"] {
            let path = d.join(file);
            let yaml = std::fs::read_to_string(&path)
                .unwrap()
                .replace("global_batch: 2\n", "global_batch: 6\n")
                .replace("max_size: 2\n", "max_size: 3\n");
            std::fs::write(path, yaml).unwrap();
        }
        shard_job(d, state);
        let samples = workers == "3";
        if samples {
            let path = d.join("job.yaml");
            let yaml = std::fs::read_to_string(&path).unwrap().replacen(
                "train:\n",
                "train:\n  sample_every_steps: 4\n  sample_prompts: [a red circle, a dog]\n",
                1,
            );
            std::fs::write(path, yaml).unwrap();
        }
        let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
            .env_clear()
            .env("RUST_LOG", "warn")
            .env("OMP_NUM_THREADS", "1")
            .current_dir(d)
            .args(["train", "--config", "job.yaml", "--run-dir", "run"])
            .args(["--workers", workers])
            .output()
            .expect("spawn swiftbrush train");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{workers} workers, {state}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("trained steps 0..4"), "{stdout}");
        train_alone(d, "reference");
        let ours = student(&d.join("run"), max_steps);
        let theirs = student(&d.join("reference"), max_steps);
        let start = student(&d.join("reference"), 2);
        let r = common::tensors::relative_to_move(&ours, &theirs, &start);
        eprintln!("{workers} workers, {state}: {r:e} of the move");
        assert!(
            r <= 2e-2,
            "{workers} workers, {state}: the student differs from one process's by {r:e} of \
             its move"
        );
        if samples {
            assert_sample_is_the_checkpoints_ema(d, "run", max_steps);
        }
    }
}

/// RUN/samples/step-N.png equals `sample --student` of RUN's step-N
/// checkpoint (its EMA weights), with the run's seed (0).
fn assert_sample_is_the_checkpoints_ema(d: &Path, run: &str, step: u64) {
    std::fs::write(d.join("prompts.txt"), "a red circle\na dog\n").unwrap();
    let sampled = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("OMP_NUM_THREADS", "1")
        .current_dir(d)
        .arg("sample")
        .args(["--student", &format!("{run}/checkpoints/step-{step:08}")])
        .args(["--prompts", "prompts.txt", "--seed", "0"])
        .args(["--batch-size", "8", "--height", "16", "--width", "16"])
        .args(["--out", "sampled.png"])
        .output()
        .expect("spawn swiftbrush sample");
    assert!(
        sampled.status.success(),
        "{}",
        String::from_utf8_lossy(&sampled.stderr)
    );
    let picture = d.join(format!("{run}/samples/step-{step:08}.png"));
    let picture = std::fs::read(&picture).unwrap_or_else(|e| panic!("{}: {e}", picture.display()));
    assert!(
        std::fs::read(d.join("sampled.png")).unwrap() == picture,
        "{run}/samples/step-{step:08}.png is not `sample --student`'s picture of that \
         checkpoint's EMA"
    );
}

/// A local worker that panics (a bug, an allocation failure inside
/// libtorch) is the run's error: the command names the worker and the
/// panic, exits non-zero, and the other worker stops with it.
#[test]
fn a_panicking_local_worker_fails_the_run_naming_it() {
    let dir = setup(1, 4);
    let d = dir.path();
    let started = Instant::now();
    let out = train_two_local_workers(d, &[], &[("SWIFTBRUSH_FAULT_PANIC", "1:1")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("local worker") && stderr.contains("of 2 failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("panicked: SWIFTBRUSH_FAULT_PANIC: rank 1 panics at step 1"),
        "{stderr}"
    );
    assert!(!stderr.contains("the job ended Running"), "{stderr}");
    assert!(
        started.elapsed() < DEADLINE,
        "the other worker did not stop"
    );
}

/// Polls the coordinator process's /status until `ok`; panics with it, the
/// coordinator's log and the workers' logs after the deadline.
fn wait_for_process(
    coordinator: &cluster::CoordinatorProcess,
    what: &str,
    workers: &[&Worker],
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = cluster::status_json(&coordinator.http);
        if ok(&status) {
            return status;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = workers.iter().map(|w| w.log()).collect();
            panic!(
                "never {what}: {status:#}\n== coordinator ==\n{}\n{}",
                coordinator.log(),
                logs.join("\n----------\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn field(status: &serde_json::Value, name: &str) -> u64 {
    status[name]
        .as_u64()
        .unwrap_or_else(|| panic!("/status has no {name}: {status}"))
}

#[test]
fn a_killed_and_restarted_coordinator_costs_nothing() {
    let max_steps = 12;
    let dir = setup(2, max_steps);
    let d = dir.path();
    let grpc = format!("127.0.0.1:{}", cluster::free_port());
    let http = format!("127.0.0.1:{}", cluster::free_port());
    let address = format!("http://{grpc}");
    std::fs::write(d.join("token"), TOKEN).unwrap();
    let path = |name: &str| d.join(name).display().to_string();
    let (store, config, token) = (path("run"), path("job.yaml"), path("token"));
    // `swiftbrush coordinator` as an operator runs it, on fixed ports so
    // that the restarted one is found where the workers look.
    let args = [
        "--store",
        &store,
        "--config",
        &config,
        "--token-file",
        &token,
        "--settle-ms",
        "500",
    ];
    let first = cluster::CoordinatorProcess::start_at(&grpc, &http, &args);
    let mut a = Worker::spawn(d, &address, "host-a", &[]);
    let mut b = Worker::spawn(d, &address, "host-b", &[]);
    let running = wait_for_process(&first, "a world of 2 with a commit", &[&a, &b], |s| {
        s["phase"] == "running" && field(s, "world_size") == 2 && field(s, "committed_step") >= 2
    });
    let committed = field(&running, "committed_step");
    assert!(committed < max_steps, "the job finished too soon to test");
    first.kill();
    // Down for longer than a heartbeat timeout (4 s), as a rescheduled pod
    // is: the workers' calls fail meanwhile and they keep trying.
    std::thread::sleep(Duration::from_secs(5));

    // The same command again, on the same store: it finds the job's
    // checkpoints there, and the workers find it.
    let second = cluster::CoordinatorProcess::start_at(&grpc, &http, &args);
    let resumed = cluster::status_json(&second.http);
    assert!(
        field(&resumed, "committed_step") >= committed,
        "no committed step is lost: {resumed}"
    );
    let done = wait_for_process(&second, "completed", &[&a, &b], |s| {
        s["phase"] == "completed"
    });
    assert_eq!(field(&done, "committed_step"), max_steps);
    assert!(
        field(&done, "generation") > field(&running, "generation"),
        "the new coordinator's worlds number past the stored ones: {done}"
    );
    for w in [&mut a, &mut b] {
        let (exit, out) = w.wait();
        assert!(exit.success(), "{}", w.log());
        // One world before the kill, one after: a restart costs the
        // workers nothing more (no world broken by a late answer).
        assert!(out.contains("in 2 worlds"), "{out}\n{}", w.log());
    }
    drop(second);
    assert_matches_reference(d, "run", max_steps);
}
