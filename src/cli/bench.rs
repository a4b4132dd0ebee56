//! `swiftbrush bench ...`: timings live here, never in tests.

use std::path::PathBuf;

use clap::Subcommand;

use super::load_config;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Median time, images/s and peak memory of the SwiftBrush training step.
    VsdStep {
        #[arg(long)]
        config: PathBuf,
        /// Overrides model.teacher.
        #[arg(long)]
        teacher: Option<String>,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 10)]
        steps: u64,
        /// Overrides train.device.
        #[arg(long)]
        device: Option<String>,
        /// Overrides train.micro_batch (what fits in memory is what this
        /// measures).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        micro_batch: Option<u32>,
        /// Sets train.gradient_checkpointing: true (activations recomputed,
        /// memory for the chunk instead of the batch).
        #[arg(long)]
        gradient_checkpointing: bool,
        /// Overrides train.recompute_rows (with --gradient-checkpointing or
        /// the config's).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        recompute_rows: Option<u32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What N workers heartbeating at 1 Hz cost a coordinator (a child
    /// process): heartbeat latency p50/p99/max, its CPU per heartbeat and
    /// cores, its memory, JobStatus latency.
    Coordinator(super::bench_coordinator::CoordinatorBenchArgs),
    /// Bandwidth of a collective backend: W ranks as threads of this
    /// process (tcp: a ring on loopback; nccl: one GPU each) all-reduce one
    /// float32 buffer (or --tensors gradients); median time, algorithm and
    /// bus bandwidth.
    Allreduce {
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "nccl"])]
        backend: String,
        /// Ranks (nccl: GPUs 0..W-1).
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// Buffer size in MB (the trainer's buckets are 25 MB).
        #[arg(long, default_value_t = 25.0)]
        size_mb: f64,
        /// Timed all-reduces (after one checked warm-up).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Split the buffer into this many gradients of equal size (a
        /// model's parameter list: NCCL packs them into buckets).
        #[arg(long, default_value_t = 1)]
        tensors: usize,
        /// nccl: bytes of gradients per bucket, MiB (default 25).
        #[arg(long)]
        bucket_mib: Option<f64>,
        /// nccl: bytes of buckets per ncclGroupStart/End, MiB (default
        /// 1024; 0: one bucket per group).
        #[arg(long)]
        group_mib: Option<f64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// MiB as bytes; a negative or non-finite value is refused naming its flag.
fn mib(flag: &str, value: Option<f64>) -> anyhow::Result<Option<usize>> {
    match value {
        None => Ok(None),
        Some(v) if v >= 0.0 && v.is_finite() => Ok(Some((v * (1u64 << 20) as f64) as usize)),
        Some(v) => anyhow::bail!("--{flag} {v}: expected a size in MiB, 0 or more"),
    }
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::VsdStep {
            config,
            teacher,
            steps,
            device,
            micro_batch,
            gradient_checkpointing,
            recompute_rows,
            json,
        } => {
            let mut cfg = load_config(&config, teacher)?;
            if let Some(d) = device {
                cfg.train.device = d;
            }
            if micro_batch.is_some() {
                cfg.train.micro_batch = micro_batch;
            }
            if gradient_checkpointing {
                cfg.train.gradient_checkpointing = true;
            }
            if let Some(rows) = recompute_rows {
                cfg.train.recompute_rows = rows;
            }
            cfg.validate()?;
            let report = swiftbrush_worker::bench::bench_vsd_step(cfg, steps)?;
            print_report(&report, report.table(), json)
        }
        BenchCommand::Coordinator(args) => super::bench_coordinator::run(args),
        BenchCommand::Allreduce {
            backend,
            world,
            size_mb,
            iters,
            tensors,
            bucket_mib,
            group_mib,
            json,
        } => {
            use swiftbrush_worker::collective::Backend;
            use swiftbrush_worker::collective::bench::{AllReduceSpec, bench_allreduce};
            let backend = Backend::from_name(&backend)
                .ok_or_else(|| anyhow::anyhow!("--backend {backend}: expected tcp or nccl"))?;
            let report = bench_allreduce(&AllReduceSpec {
                tensors,
                bucket_bytes: mib("bucket-mib", bucket_mib)?,
                group_bytes: mib("group-mib", group_mib)?,
                ..AllReduceSpec::new(backend, size_mb, world, iters)
            })?;
            print_report(&report, report.table(), json)
        }
    }
}

/// A benchmark's report on stdout: JSON with `--json`, else its table.
fn print_report(report: &impl serde::Serialize, table: String, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{table}");
    }
    Ok(())
}
