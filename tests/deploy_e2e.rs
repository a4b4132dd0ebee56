//! Multi-process jobs as a cluster runs them, on this machine: the sbatch
//! script under stand-ins for srun and scontrol (tests/fake_slurm: two
//! "nodes" as local processes on loopback) starts a coordinator and two CPU
//! workers that train the tiny fixture teacher to the end; a time-limit
//! signal makes them checkpoint, the script requeues, and the rerun resumes.
//! And the operator's way: `swiftbrush launch` against a running
//! coordinator, two `swiftbrush worker` processes completing it, `swiftbrush
//! cancel` ending another after a final checkpoint.

mod cluster;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cluster::{
    BIN, CoordinatorProcess, JobDir, fails, free_port, ok, poll, status_json, swiftbrush,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A job for two CPU workers on the tiny SD1-style fixture.
fn tiny_job(job: &JobDir, name: &str, max_steps: u64) -> PathBuf {
    let teacher = common::pipeline("sd1");
    let yaml = format!(
        "name: {name}
model: {{teacher: {teacher}, resolution: 16}}
method:
  lora: {{rank: 4, alpha: 8}}
data: {{captions: [{captions}]}}
train: {{global_batch: 2, max_steps: {max_steps}, seed: 0, device: cpu}}
world:
  min_size: 2
  max_size: 2
  backend: tcp
  heartbeat_interval_ms: 500
  heartbeat_timeout_ms: 30000
  progress_timeout_ms: 300000
checkpoint: {{every_steps: 2, keep_last: 20}}
precision: {{teacher_dtype: fp32, autocast: none}}
logging: {{every_steps: 1}}
",
        teacher = teacher.display(),
        captions = job.path().join("captions.txt").display(),
    );
    let path = job.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).expect("config");
    path
}

/// The newest committed step in a local run directory (manifests only).
fn committed_steps(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().join("manifest.json").exists())
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("step-")
                        .and_then(|s| s.parse().ok())
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

/// Waits for `child` with a deadline; kills it (and says so) past it.
fn finish(mut child: Child, what: &str, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{what} still ran after {timeout:?}:\nstdout: {}\nstderr: {}",
                cluster::stdout(&out),
                cluster::stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

/// The sbatch script with the fake Slurm on PATH: nodes 127.0.0.1 and
/// 127.0.0.2, one CPU worker each.
struct SlurmJob {
    job: JobDir,
    config: PathBuf,
    port: u16,
    http_port: u16,
}

impl SlurmJob {
    fn new(max_steps: u64) -> Self {
        let job = JobDir::new();
        let config = tiny_job(&job, "slurm", max_steps);
        std::fs::create_dir_all(job.path().join("slurm")).expect("slurm dir");
        Self {
            job,
            config,
            port: free_port(),
            http_port: free_port(),
        }
    }

    fn slurm_log(&self) -> String {
        std::fs::read_to_string(self.job.path().join("slurm/log")).unwrap_or_default()
    }

    fn start(&self, restart_count: u32) -> Child {
        let bin_dir = Path::new(BIN).parent().expect("bin dir");
        let path = format!(
            "{}/tests/fake_slurm:{}:/usr/local/bin:/usr/bin:/bin",
            ROOT,
            bin_dir.display()
        );
        Command::new("bash")
            .arg(Path::new(ROOT).join("deploy/slurm/swiftbrush.sbatch"))
            .current_dir(self.job.path())
            .env_clear()
            .env("PATH", path)
            .env("HOME", self.job.path())
            .env("RUST_LOG", "info")
            .env("OMP_NUM_THREADS", "1")
            .env("SLURM_JOB_ID", "42")
            .env("SLURM_JOB_NODELIST", "127.0.0.1,127.0.0.2")
            .env("SLURM_RESTART_COUNT", restart_count.to_string())
            .env("FAKE_SLURM_LOG", self.job.path().join("slurm/log"))
            .env("FAKE_SLURM_DIR", self.job.path().join("slurm"))
            .env("SWIFTBRUSH_CONFIG", &self.config)
            .env("SWIFTBRUSH_STORE", self.job.run_dir())
            .env("SWIFTBRUSH_TOKEN_FILE", self.job.token_file())
            .env("SWIFTBRUSH_DEVICE", "cpu")
            .env("SWIFTBRUSH_WORKERS_PER_NODE", "1")
            .env("SWIFTBRUSH_PORT", self.port.to_string())
            .env("SWIFTBRUSH_HTTP_PORT", self.http_port.to_string())
            .env("SWIFTBRUSH_LOG_DIR", self.job.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the sbatch script")
    }

    fn http(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }
}

#[test]
fn the_sbatch_script_runs_a_coordinator_and_two_workers_to_the_end() {
    let slurm = SlurmJob::new(4);
    let out = finish(
        slurm.start(0),
        "the sbatch script",
        Duration::from_secs(480),
    );
    let said = cluster::stderr(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("the job is completed"), "{said}");
    assert!(said.contains("coordinator on 127.0.0.1:"), "{said}");
    let log = slurm.slurm_log();
    assert!(log.contains("srun 2 x 1"), "{log}");
    assert!(
        !log.contains("requeue"),
        "a completed job is not requeued: {log}"
    );
    assert_eq!(committed_steps(&slurm.job.run_dir()).last(), Some(&4));
    // Both workers said how they ended.
    let workers = cluster::stdout(&out);
    assert_eq!(
        workers
            .matches(": the job completed; trained steps 0..4")
            .count(),
        2,
        "{workers}"
    );
    // The script printed the final status table.
    assert!(workers.contains("phase        completed"), "{workers}");
}

#[test]
fn a_time_limit_signal_checkpoints_the_script_requeues_and_the_rerun_resumes() {
    let slurm = SlurmJob::new(12);
    let first = slurm.start(0);
    // Training runs and has committed a checkpoint ...
    poll("a first checkpoint", Duration::from_secs(300), || {
        std::net::TcpStream::connect(slurm.http()).ok()?;
        let status = status_json(&slurm.http());
        (status["committed_step"].as_u64() >= Some(2)).then_some(())
    });
    // ... when Slurm's --signal reaches the job step (srun and its tasks).
    let srun_pid = std::fs::read_to_string(slurm.job.path().join("slurm/srun.pid"))
        .expect("the fake srun's pid");
    let sent = Command::new("kill")
        .args(["-TERM", srun_pid.trim()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let out = finish(first, "the signalled run", Duration::from_secs(300));
    let said = cluster::stderr(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("requeueing job 42"), "{said}");
    assert!(
        slurm.slurm_log().contains("requeue 42"),
        "{}",
        slurm.slurm_log()
    );
    let stopped_at = *committed_steps(&slurm.job.run_dir())
        .last()
        .expect("a checkpoint");
    assert!((2..12).contains(&stopped_at), "{stopped_at}");
    let workers = cluster::stdout(&out);
    assert!(
        workers.contains(&format!("checkpoint at step {stopped_at} committed")),
        "the signal's checkpoint is the newest: {workers}"
    );

    // The requeued run resumes there and completes.
    let rerun = finish(slurm.start(1), "the requeued run", Duration::from_secs(480));
    let said = cluster::stderr(&rerun);
    assert!(rerun.status.success(), "{said}");
    assert!(said.contains("the job is completed"), "{said}");
    assert_eq!(slurm.slurm_log().matches("requeue").count(), 1);
    assert_eq!(committed_steps(&slurm.job.run_dir()).last(), Some(&12));
    let coordinator_log =
        std::fs::read_to_string(slurm.job.path().join("swiftbrush-coordinator-42.log"))
            .expect("log");
    assert!(
        coordinator_log.contains(&format!("\"committed_step\":{stopped_at}")),
        "the second coordinator resumed from step {stopped_at}"
    );
}

fn start_worker(job: &JobDir, url: &str) -> Child {
    Command::new(BIN)
        .env_clear()
        .env("RUST_LOG", "info")
        .env("OMP_NUM_THREADS", "1")
        .args(["worker", "--coordinator", url, "--device", "cpu"])
        .arg("--token-file")
        .arg(job.token_file())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a worker")
}

#[test]
fn launch_starts_a_job_that_two_workers_complete() {
    let job = JobDir::new();
    let coordinator = CoordinatorProcess::start(&job, &[]);
    let url = coordinator.grpc.clone();
    let workers = [start_worker(&job, &url), start_worker(&job, &url)];
    let config = tiny_job(&job, "launched", 4).display().to_string();
    let env = [("SWIFTBRUSH_TOKEN", cluster::TOKEN)];
    let launched = ok(&swiftbrush(
        &[
            "launch",
            "--coordinator",
            &url,
            "--config",
            &config,
            "--wait",
            "--poll-ms",
            "200",
        ],
        &env,
    ));
    assert!(launched.contains("job launched completed"), "{launched}");
    for worker in workers {
        let out = finish(worker, "a worker", Duration::from_secs(120));
        assert!(out.status.success(), "{}", cluster::stderr(&out));
        assert!(cluster::stdout(&out).contains("the job completed"));
    }
    assert_eq!(committed_steps(&job.run_dir()).last(), Some(&4));
    let status = ok(&swiftbrush(&["status", "--coordinator", &url], &env));
    assert!(status.contains("phase        completed"), "{status}");
    assert!(coordinator.terminate().success());
}

#[test]
fn cancel_stops_a_running_job_after_a_final_checkpoint() {
    let job = JobDir::new();
    let coordinator = CoordinatorProcess::start(&job, &[]);
    let url = coordinator.grpc.clone();
    let config = tiny_job(&job, "cancelled", 1_000).display().to_string();
    let env = [("SWIFTBRUSH_TOKEN", cluster::TOKEN)];
    ok(&swiftbrush(
        &["launch", "--coordinator", &url, "--config", &config],
        &env,
    ));
    let workers = [start_worker(&job, &url), start_worker(&job, &url)];
    poll(
        "training to commit a checkpoint",
        Duration::from_secs(300),
        || (status_json(&coordinator.http)["committed_step"].as_u64() >= Some(2)).then_some(()),
    );
    let cancelled = ok(&swiftbrush(
        &[
            "cancel",
            "--coordinator",
            &url,
            "--wait",
            "--poll-ms",
            "200",
        ],
        &env,
    ));
    let number_after = |marker: &str| -> u64 {
        cancelled
            .split(marker)
            .nth(1)
            .map(|s| {
                s.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no step after {marker:?} in: {cancelled}"))
    };
    // The coordinator asks for the step after the newest it has heard of;
    // workers whose heartbeat lagged checkpoint at their next boundary.
    let asked = number_after("a final checkpoint at its first step boundary from step ");
    let step = number_after("newest checkpoint at step ");
    assert!(step >= asked, "{cancelled}");
    assert!(
        cancelled.contains(&format!("after the final checkpoint at step {step}")),
        "{cancelled}"
    );
    for worker in workers {
        let out = finish(worker, "a worker", Duration::from_secs(120));
        assert!(out.status.success(), "{}", cluster::stderr(&out));
        assert!(cluster::stdout(&out).contains("the job was cancelled"));
    }
    assert_eq!(committed_steps(&job.run_dir()).last(), Some(&step));
    assert_eq!(status_json(&coordinator.http)["phase"], "cancelled");
    let again = fails(&swiftbrush(&["cancel", "--coordinator", &url], &env));
    assert!(again.contains("nothing to cancel"), "{again}");
    assert!(coordinator.terminate().success());
}
