//! `swiftbrush export`: a trained student as a diffusers folder.

use std::path::PathBuf;

use clap::ValueEnum;
use swiftbrush_worker::export::{ONE_STEP_FILE, StudentCheckpoint, StudentWeights, export};

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
    let written = export(
        &ckpt,
        which,
        &args.out,
        args.pipeline,
        args.teacher.as_deref(),
    )?;
    println!(
        "exported step {} ({:?} weights) to {}:",
        ckpt.manifest.step,
        which,
        args.out.display()
    );
    for (i, path) in written.iter().enumerate() {
        let what = match path.file_name().and_then(|n| n.to_str()) {
            _ if i == 0 => "the student UNet (config.json, diffusion_pytorch_model.safetensors)",
            Some("text_encoder") => "the teacher's text encoder",
            Some("tokenizer") => "the teacher's tokenizer",
            Some("text_encoder_2") => "the teacher's second text encoder (SDXL)",
            Some("tokenizer_2") => "the teacher's second tokenizer (SDXL)",
            Some("vae") => "the teacher's VAE",
            Some("scheduler") => {
                "LCMScheduler on the teacher's schedule (diffusers draws the student)"
            }
            Some("model_index.json") => "the pipeline index",
            Some(ONE_STEP_FILE) => "how the student draws (timesteps, alpha-bar)",
            _ => "",
        };
        println!("  {:<40} {what}", path.display());
    }
    Ok(())
}
