//! `swiftbrush train`: the SwiftBrush loop on one process.

use std::path::PathBuf;

use anyhow::Context;
use swiftbrush_proto::JobConfig;
use swiftbrush_worker::trainer::Resume;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The YAML job config (configs/sd21-base.yaml, ...).
    #[arg(long)]
    config: PathBuf,
    /// The teacher's diffusers folder (overrides model.teacher).
    #[arg(long)]
    teacher: Option<String>,
    /// Caption files, .txt or .jsonl, paths or object-store URLs; repeat
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
    /// `latest` (the default when checkpoints exist) or a step number.
    #[arg(long)]
    resume: Option<String>,
    /// auto, cpu or cuda:N (overrides train.device).
    #[arg(long)]
    device: Option<String>,
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
    config
        .validate()
        .with_context(|| format!("{} is not a valid job config", args.config.display()))?;
    let resume =
        match args.resume.as_deref() {
            None | Some("latest") => Resume::Auto,
            Some(step) => Resume::Step(step.parse().with_context(|| {
                format!("--resume {step:?}: expected `latest` or a step number")
            })?),
        };
    let run_dir = config.checkpoint.run_dir.clone();
    let summary = swiftbrush_worker::trainer::single::train(config, resume)?;
    println!(
        "trained steps {}..{} in {:.1}s; last checkpoint: {}; run directory: {run_dir}",
        summary.start_step,
        summary.end_step,
        summary.seconds,
        summary
            .last_checkpoint
            .map_or("none".to_owned(), |s| format!("step {s}")),
    );
    if let Some(l) = summary.last_losses {
        println!("last losses: vsd {:.6e}, lora {:.6}", l.vsd, l.lora);
    }
    if summary.num_nonfinite_steps > 0 || summary.num_truncated_captions > 0 {
        println!(
            "skipped non-finite steps: {}; captions truncated to 77 tokens: {}",
            summary.num_nonfinite_steps, summary.num_truncated_captions
        );
    }
    Ok(())
}
