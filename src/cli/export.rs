//! `swiftbrush export`: a trained student as a diffusers folder.

use std::path::PathBuf;

use clap::ValueEnum;
use swiftbrush_worker::export::{StudentCheckpoint, StudentWeights, export};

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A run directory (its newest valid checkpoint) or RUN/checkpoints/step-N.
    #[arg(long)]
    student: String,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Also copy the teacher's text encoder, tokenizer, VAE and scheduler.
    #[arg(long)]
    pipeline: bool,
    /// `ema` (the averaged weights, the paper's export) or `student`.
    #[arg(long, value_enum, default_value_t = WeightsArg::Ema)]
    weights: WeightsArg,
    /// The teacher folder, if it moved since training (the run records it).
    #[arg(long)]
    teacher: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WeightsArg {
    Ema,
    Student,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let ckpt = StudentCheckpoint::open(&args.student)?;
    let which = match args.weights {
        WeightsArg::Ema => StudentWeights::Ema,
        WeightsArg::Student => StudentWeights::Raw,
    };
    let unet = export(
        &ckpt,
        which,
        &args.out,
        args.pipeline,
        args.teacher.as_deref(),
    )?;
    println!(
        "exported step {} ({:?} weights): UNet in {}",
        ckpt.manifest.step,
        which,
        unet.display()
    );
    Ok(())
}
