//! Local mode: the coordinator in this process on 127.0.0.1:0 with a random
//! job token, and N worker threads that register, rendezvous, stream
//! captions and heartbeat through it like any worker. A worker that fails
//! cancels the job, so the others stop too, and its error is the run's.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use swiftbrush_coordinator::domain::JobPhase;
use swiftbrush_coordinator::grpc::JobToken;
use swiftbrush_coordinator::{ServeOptions, start};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::run_store::LeaseOptions;
use swiftbrush_worker::distributed::{self, WorkerEnd, WorkerOptions, WorkerSummary, run_worker};
use swiftbrush_worker::vsd::VsdLosses;

/// After ctrl-c or SIGTERM, exit anyway if the checkpoint has not landed.
const GRACE: Duration = Duration::from_secs(25);

pub struct LocalOptions {
    pub num_workers: u32,
    pub caption_audit: Option<PathBuf>,
    /// The run directory's lease (`--take-over`, `--lease-ttl`).
    pub lease: LeaseOptions,
}

/// What the run did, for the summary lines.
pub struct Outcome {
    pub start_step: u64,
    pub end_step: u64,
    pub seconds: f64,
    pub last_checkpoint: Option<u64>,
    pub last_losses: Option<VsdLosses>,
    pub num_nonfinite_steps: u64,
    pub num_truncated_captions: u64,
}

pub fn train(config: JobConfig, options: LocalOptions) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("coordinator")
        .enable_all()
        .build()
        .context("cannot start the coordinator's runtime")?;
    distributed::signals::install(runtime.handle(), GRACE);
    let token = random_token()?;
    let device = config.train.device.clone();
    let mut serve = ServeOptions::new(
        config.checkpoint.run_dir.clone(),
        JobToken::new(&token).context("the local job token")?,
    );
    serve.listen = ([127, 0, 0, 1], 0).into();
    serve.config = Some(config);
    serve.lease = options.lease.clone();
    // All workers start together; the settle time only matters if one fails.
    serve.core.settle_ms = 500;
    serve.tick = Duration::from_millis(50);
    let coordinator = runtime.block_on(start(serve))?;
    let app = coordinator.app.clone();
    let start_step = app.status().committed_step;

    if options.num_workers > 1 {
        distributed::share_cpu_threads(options.num_workers as usize);
    }
    let address = format!("http://{}", coordinator.grpc_addr);
    let (done_tx, done_rx) = mpsc::channel();
    let mut threads = Vec::new();
    for i in 0..options.num_workers {
        let worker = WorkerOptions {
            coordinator: address.clone(),
            token: token.clone(),
            tls: None,
            device: device.clone(),
            host: "localhost".to_owned(),
            ring_listen: Some(([127, 0, 0, 1], 0).into()),
            health_listen: None,
            caption_audit: options.caption_audit.clone(),
            // The job config carries `--micro-batch`.
            micro_batch: None,
            connect_timeout: Duration::from_secs(10),
            // One process: its threads are shared once (share_cpu_threads).
            world_threads: None,
        };
        let done = done_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || {
                // A panic (a bug, an allocation failure in libtorch) is this
                // worker's failure like any error: the job is cancelled and
                // the command says which worker and why.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_worker(worker).map_err(anyhow::Error::from)
                }))
                .unwrap_or_else(|payload| {
                    Err(anyhow::anyhow!("panicked: {}", panic_message(&*payload)))
                });
                let _ = done.send((i, result));
            })
            .context("cannot start a worker thread")?;
        threads.push(thread);
    }
    drop(done_tx);

    let mut summaries: Vec<WorkerSummary> = Vec::new();
    let mut first_error: Option<(u32, anyhow::Error)> = None;
    for (worker, result) in done_rx.iter() {
        match result {
            Ok(summary) => summaries.push(summary),
            Err(e) => {
                if first_error.is_none() {
                    // The others stop at their next heartbeat.
                    let _guard = runtime.enter();
                    let _ = app.cancel(format!("local worker {worker} failed: {e}"));
                    first_error = Some((worker, e));
                }
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    let status = app.status();
    runtime
        .block_on(coordinator.shutdown())
        .context("stopping the coordinator")?;
    // Another job took the run directory: that is why the job failed,
    // whatever the workers saw as it ended.
    if let Some(lost) = app.lease_lost() {
        anyhow::bail!("{lost}");
    }
    if let Some((worker, e)) = first_error {
        return Err(e.context(format!(
            "local worker {worker} of {} failed; the job is cancelled",
            options.num_workers
        )));
    }
    if let Some(step) = summaries.iter().find_map(|s| match s.end {
        WorkerEnd::Preempted { step, .. } => Some(step),
        _ => None,
    }) {
        anyhow::bail!(
            "stopped by a signal{}; the newest checkpoint is {}; run the same command again to resume",
            step.map_or(String::new(), |s| format!(" at step {s}")),
            match status.committed_step {
                0 => "none".to_owned(),
                s => format!("step {s}"),
            }
        );
    }
    if status.phase != JobPhase::Completed {
        anyhow::bail!("the job ended {:?}: {}", status.phase, status.reason);
    }
    let trained = summaries.iter().filter_map(|s| s.train.as_ref());
    let last = trained.clone().max_by_key(|t| t.end_step);
    Ok(Outcome {
        start_step,
        end_step: status.committed_step,
        seconds: started.elapsed().as_secs_f64(),
        last_checkpoint: (status.committed_step > 0).then_some(status.committed_step),
        last_losses: last.and_then(|t| t.last_losses),
        num_nonfinite_steps: last.map_or(0, |t| t.num_nonfinite_steps),
        num_truncated_captions: last.map_or(0, |t| t.num_truncated_captions),
    })
}

/// The text a panic was raised with (`panic!` gives a &str or a String).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// 32 random bytes as hex: the token only this process knows.
fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness for the job token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
