//! `swiftbrush train`: distill on this machine. Local mode: a coordinator
//! runs in this process on loopback and `--workers N` workers (threads)
//! join it, through exactly the path a cluster uses (gRPC, caption stream,
//! heartbeats, checkpoints committed by the coordinator). One worker is the
//! single-GPU or single-CPU run.

mod local;

use std::path::PathBuf;

use anyhow::Context;
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::CollectiveBackend;
use swiftbrush_proto::run_store::{DEFAULT_LEASE_TTL, LeaseOptions, ResumeFrom, RunStore};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The YAML job config (configs/sd21-base.yaml, ...).
    #[arg(long)]
    config: PathBuf,
    /// The teacher's diffusers folder (overrides model.teacher).
    #[arg(long)]
    teacher: Option<String>,
    /// Caption files (.txt, .jsonl, .parquet or WebDataset .tar shards),
    /// paths or object-store URLs; repeat
    /// for several (overrides data.captions).
    #[arg(long = "captions")]
    captions: Vec<String>,
    /// Run directory: a path or an s3:// / gs:// URL (overrides
    /// checkpoint.run_dir).
    #[arg(long)]
    run_dir: Option<String>,
    /// Overrides train.max_steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Overrides checkpoint.every_steps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Overrides train.seed.
    #[arg(long)]
    seed: Option<u64>,
    /// `latest` (the default: the newest checkpoint whose files verify, if
    /// any; a corrupt newer one is moved aside to RUN/corrupt/ with a
    /// warning) or a step number, which must be that checkpoint.
    #[arg(long)]
    resume: Option<String>,
    /// auto, cpu or cuda:N (overrides train.device).
    #[arg(long)]
    device: Option<String>,
    /// At most N samples through the networks at once per worker: gradient
    /// accumulation over the worker's share of the global batch (overrides
    /// train.micro_batch; the result does not change, the memory does).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    micro_batch: Option<u32>,
    /// Data-parallel workers in this process (threads on the same device;
    /// world.max_size is capped to it). The result equals one worker's.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Append one JSON line per trained step and worker (generation, rank,
    /// step, caption ids) under DIR: proof of exactly-once.
    #[arg(long)]
    caption_audit: Option<PathBuf>,
    /// Take the run directory from the job that holds it (after a crash on
    /// another machine whose lease has not expired yet). If that job is
    /// still running, it stops at its next lease renewal with an error.
    #[arg(long)]
    take_over: bool,
    /// Seconds the run directory's lease lasts unless renewed (renewed
    /// every third of that): how long a job that crashed on another
    /// machine keeps others out.
    #[arg(long, default_value_t = DEFAULT_LEASE_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease_ttl: u64,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut config = JobConfig::from_yaml_file(&args.config)?;
    if let Some(t) = args.teacher {
        config.model.teacher = Some(t);
    }
    if !args.captions.is_empty() {
        config.data.captions = args.captions;
    }
    if let Some(d) = args.run_dir {
        config.checkpoint.run_dir = d;
    }
    if let Some(n) = args.max_steps {
        config.train.max_steps = n;
    }
    if let Some(n) = args.checkpoint_every {
        config.checkpoint.every_steps = n;
    }
    if let Some(n) = args.seed {
        config.train.seed = n;
    }
    if let Some(d) = args.device {
        config.train.device = d;
    }
    if let Some(n) = args.micro_batch {
        config.train.micro_batch = Some(n);
    }
    fit_world(&mut config, args.workers)?;
    config
        .validate()
        .with_context(|| format!("{} is not a valid job config", args.config.display()))?;
    anyhow::ensure!(
        !config.data.captions.is_empty(),
        "no caption sources: set data.captions in the config or pass --captions FILE"
    );
    // The teacher is local here: a wrong path is named before anything starts.
    if let Some(teacher) = &config.model.teacher {
        swiftbrush_worker::pipeline::DiffusersFolder::open(std::path::Path::new(teacher))?;
    }
    if let Some(resume) = args.resume.as_deref() {
        check_resume(&config.checkpoint.run_dir, resume)?;
    }
    let run_dir = config.checkpoint.run_dir.clone();
    let outcome = local::train(
        config,
        local::LocalOptions {
            num_workers: args.workers,
            caption_audit: args.caption_audit,
            lease: LeaseOptions {
                ttl: std::time::Duration::from_secs(args.lease_ttl),
                take_over: args.take_over,
                command: "swiftbrush train".to_owned(),
            },
        },
    )?;
    println!(
        "trained steps {}..{} in {:.1}s; last checkpoint: {}; run directory: {run_dir}",
        outcome.start_step,
        outcome.end_step,
        outcome.seconds,
        outcome
            .last_checkpoint
            .map_or("none".to_owned(), |s| format!("step {s}")),
    );
    if let Some(l) = outcome.last_losses {
        println!(
            "last losses: vsd {:.6e}, fake score {:.6}",
            l.vsd, l.fake_score
        );
    }
    if outcome.num_nonfinite_steps > 0 || outcome.num_truncated_captions > 0 {
        println!(
            "skipped non-finite steps: {}; captions truncated to 77 tokens: {}",
            outcome.num_nonfinite_steps, outcome.num_truncated_captions
        );
    }
    Ok(())
}

/// The local world is at most `--workers` ranks: without this, one worker
/// under a config allowing two would wait for a second that never comes.
/// Local workers share one device, which NCCL cannot split between ranks:
/// several of them use the TCP ring.
fn fit_world(config: &mut JobConfig, workers: u32) -> anyhow::Result<()> {
    let world = &mut config.world;
    anyhow::ensure!(
        world.min_size <= workers,
        "--workers {workers} is fewer than world.min_size = {} of the config",
        world.min_size
    );
    world.max_size = world.max_size.min(workers).max(world.min_size);
    if world.max_size > 1 {
        anyhow::ensure!(
            world.backend != CollectiveBackend::Nccl,
            "--workers {workers} share one device, and NCCL needs a device per rank: \
             use world.backend tcp (or auto) here, or one `swiftbrush worker` per GPU"
        );
        world.backend = CollectiveBackend::Tcp;
    }
    Ok(())
}

/// A run continues from its newest committed checkpoint (the coordinator
/// commits only steps past it), so `--resume STEP` must name that one.
fn check_resume(run_dir: &str, resume: &str) -> anyhow::Result<()> {
    if resume == "latest" {
        return Ok(());
    }
    let step: u64 = resume
        .parse()
        .with_context(|| format!("--resume {resume:?}: expected `latest` or a step number"))?;
    let store = RunStore::open(run_dir)?;
    store
        .resolve(ResumeFrom::Step(step))
        .with_context(|| format!("--resume {step}"))?;
    // Verified, so a corrupt newer checkpoint is set aside here rather than
    // standing in the way of an older good one.
    if let Some(newest) = store.latest_verified()?
        && newest.step > step
    {
        anyhow::bail!(
            "--resume {step}: {run_dir} has a newer checkpoint (step {}); a run continues \
             from its newest checkpoint, so use --resume latest (or a new --run-dir)",
            newest.step
        );
    }
    Ok(())
}
