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
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::VsdStep {
            config,
            teacher,
            steps,
            device,
            json,
        } => {
            let mut cfg = load_config(&config, teacher)?;
            if let Some(d) = device {
                cfg.train.device = d;
            }
            let report = swiftbrush_worker::bench::bench_vsd_step(cfg, steps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
    }
}
