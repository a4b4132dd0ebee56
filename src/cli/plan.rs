//! `swiftbrush plan`: each worker's memory before launch (worker/src/plan/).

use std::path::PathBuf;

use clap::Args;
use swiftbrush_worker::plan::{PlanOptions, parse_memory, plan};

use super::load_config;

/// The GPU sizes planned when --gpu-memory is not given.
const DEFAULT_GPUS: [&str; 4] = ["24GB", "40GB", "80GB", "141GB"];

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[arg(long)]
    config: PathBuf,
    /// Overrides model.teacher (a diffusers folder; its config.json files
    /// suffice, no weights needed).
    #[arg(long)]
    teacher: Option<String>,
    /// Workers in the world (default world.min_size: the largest share of
    /// the batch a worker may get).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    world: Option<u32>,
    /// GPU memory to fit, e.g. 80GiB, 80GB, 80000MiB; repeatable (default
    /// 24GB, 40GB, 80GB and 141GB).
    #[arg(long = "gpu-memory")]
    gpu_memory: Vec<String>,
    /// Overrides train.micro_batch for the CPU prediction.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    micro_batch: Option<u32>,
    /// Rows the checkpointed student forward re-runs at a time (default:
    /// train.recompute_rows).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    checkpoint_chunk: Option<u32>,
    /// Rows r the probe runs each pass at (then 2r): nearer the planned
    /// micro-batch extrapolates less, at more memory and time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    probe_rows: u32,
    /// 2: measure at r and 2r rows; 1: at r only (half the probe's memory;
    /// every byte counted per sample, an overestimate).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
    probe_points: u32,
    /// Resident parts only: no measured activations, no fits.
    #[arg(long)]
    no_probe: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let mut cfg = load_config(&args.config, args.teacher)?;
    if args.micro_batch.is_some() {
        cfg.train.micro_batch = args.micro_batch;
    }
    let sizes: Vec<String> = if args.gpu_memory.is_empty() {
        DEFAULT_GPUS.iter().map(|s| s.to_string()).collect()
    } else {
        args.gpu_memory
    };
    let gpu_memory = sizes
        .iter()
        .map(|s| parse_memory(s).map_err(|e| anyhow::anyhow!("--gpu-memory {e}")))
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let opts = PlanOptions {
        world: args.world.unwrap_or(cfg.world.min_size),
        gpu_memory,
        probe: !args.no_probe,
        probe_rows: args.probe_rows,
        probe_points: args.probe_points,
        checkpoint_chunk: args.checkpoint_chunk.unwrap_or(cfg.train.recompute_rows),
        student_autocast: cfg.precision.student_autocast,
        gradient_checkpointing: cfg.train.gradient_checkpointing,
    };
    let plan = plan(&cfg, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", plan.table());
    }
    Ok(())
}
