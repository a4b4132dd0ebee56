//! `swiftbrush export`: a trained student as a diffusers folder; a LoRA
//! student's adapters as a LoRA file (`--lora`) or folded into the
//! teacher's UNet (`--merge`); or (with `--extract-lora`) a full student's
//! difference to its teacher as a LoRA.

use std::path::PathBuf;

use clap::ValueEnum;
use swiftbrush_proto::config::Dtype;
use swiftbrush_worker::export::{ONE_STEP_FILE, StudentCheckpoint, StudentWeights, export};
use swiftbrush_worker::export_lora::{
    LoraFile, LoraFormat, export_extracted, export_lora_student, extract,
};

use super::dtype_arg::DtypeArg;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A run directory (its newest valid checkpoint) or RUN/checkpoints/step-N.
    #[arg(long)]
    student: String,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Also copy the teacher's text encoder, tokenizer, VAE and scheduler.
    #[arg(long, conflicts_with_all = ["extract_lora", "lora"])]
    pipeline: bool,
    /// A LoRA student (`method.student.kind: lora`): write its adapters as a
    /// LoRA file for the teacher's pipeline (`--format`) instead of a UNet.
    #[arg(long, conflicts_with_all = ["extract_lora", "merge"])]
    lora: bool,
    /// A LoRA student: fold its adapters into the teacher's UNet and write
    /// that (a UNet folder, or with `--pipeline` a whole pipeline).
    #[arg(long, conflicts_with = "extract_lora")]
    merge: bool,
    /// `ema` (the averaged weights, the paper's export) or `student`.
    #[arg(long, value_enum, default_value_t = WeightsArg::Ema)]
    weights: WeightsArg,
    /// The teacher folder, if it moved since training (the run records it).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Write the student's difference to the teacher as a LoRA of this rank
    /// (truncated SVD per layer; each layer's reconstruction error is
    /// printed) instead of a UNet folder.
    #[arg(long, value_name = "RANK")]
    extract_lora: Option<i64>,
    /// The LoRA file's layout: `diffusers` (pytorch_lora_weights.safetensors,
    /// for `pipe.load_lora_weights(OUT)`) or `kohya` (lora_unet_... keys,
    /// for ComfyUI and A1111; diffusers loads it too); with `--lora` or
    /// `--extract-lora`.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Layers the extracted LoRA covers, as module-path suffixes (default:
    /// to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut, the layers a
    /// LoRA student trains).
    #[arg(long, value_delimiter = ',', requires = "extract_lora")]
    targets: Option<Vec<String>>,
    /// Number format of the written weights (the UNet, or the LoRA file):
    /// fp16 or bf16 halve the file. Default: as stored (float32; a merged
    /// UNet in the teacher's dtype). The teacher's components that
    /// `--pipeline` copies keep theirs.
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WeightsArg {
    Ema,
    Student,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Diffusers,
    Kohya,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let ckpt = StudentCheckpoint::open(&args.student)?;
    let which = match args.weights {
        WeightsArg::Ema => StudentWeights::Ema,
        WeightsArg::Student => StudentWeights::Raw,
    };
    if args.format.is_some() && !args.lora && args.extract_lora.is_none() {
        anyhow::bail!(
            "--format chooses a LoRA file's layout: give it with --lora (a LoRA student) or \
             --extract-lora RANK (a full student)"
        );
    }
    if let Some(rank) = args.extract_lora {
        return run_extract(&args, &ckpt, which, rank);
    }
    if args.lora {
        return run_lora(&args, &ckpt, which);
    }
    let written = export(
        &ckpt,
        which,
        &args.out,
        args.pipeline,
        args.merge,
        args.teacher.as_deref(),
        args.dtype.map(Dtype::from),
    )?;
    println!(
        "exported step {} ({:?} weights) to {}:",
        ckpt.manifest.step,
        which,
        args.out.display()
    );
    for (i, path) in written.iter().enumerate() {
        let what = match path.file_name().and_then(|n| n.to_str()) {
            _ if i == 0 && args.merge => {
                "the teacher's UNet with the student's adapters folded in (config.json, \
                 diffusion_pytorch_model.safetensors)"
            }
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

fn lora_format(format: Option<FormatArg>) -> LoraFormat {
    match format.unwrap_or(FormatArg::Diffusers) {
        FormatArg::Diffusers => LoraFormat::Diffusers,
        FormatArg::Kohya => LoraFormat::Kohya,
    }
}

fn lora_file(args: &ExportArgs, format: LoraFormat) -> LoraFile {
    LoraFile {
        format,
        dtype: args.dtype.map(Dtype::from),
    }
}

/// `--lora`: a LoRA student's adapters (or their EMA) as a LoRA file.
fn run_lora(
    args: &ExportArgs,
    ckpt: &StudentCheckpoint,
    which: StudentWeights,
) -> anyhow::Result<()> {
    let Some(spec) = ckpt.student_lora()? else {
        anyhow::bail!(
            "--lora writes a LoRA student's adapters, and checkpoint step {} is a full student \
             (method.student.kind: full): export it as a UNet, or as a LoRA of its difference to \
             the teacher with --extract-lora RANK",
            ckpt.manifest.step
        );
    };
    let format = lora_format(args.format);
    let adapters = ckpt.student_adapters(which)?;
    let teacher = ckpt.teacher(args.teacher.as_deref())?;
    let path = export_lora_student(
        &adapters,
        &spec,
        &teacher,
        lora_file(args, format),
        &args.out,
    )?;
    println!(
        "exported step {} ({which:?} weights) as a rank-{} LoRA (alpha {}, {} adapted layers, \
         {format:?} format) for the teacher {}:\n  {}",
        ckpt.manifest.step,
        spec.rank,
        spec.alpha,
        adapters.len() / 2,
        teacher.root().display(),
        path.display()
    );
    Ok(())
}

/// `--extract-lora RANK`: writes the LoRA and reports every layer's
/// relative reconstruction error, then a summary.
fn run_extract(
    args: &ExportArgs,
    ckpt: &StudentCheckpoint,
    which: StudentWeights,
    rank: i64,
) -> anyhow::Result<()> {
    let format = lora_format(args.format);
    let targets = args
        .targets
        .clone()
        .unwrap_or_else(extract::default_targets);
    let (extracted, path) = export_extracted(
        ckpt,
        which,
        args.teacher.as_deref(),
        rank,
        &targets,
        lora_file(args, format),
        &args.out,
    )?;
    println!(
        "extracted a rank-{rank} LoRA (alpha {rank}) from step {} ({which:?} weights) minus \
         the teacher, {} layers:",
        ckpt.manifest.step,
        extracted.layers.len()
    );
    println!(
        "  {:<64} {:>5} {:>12} {:>12}",
        "layer", "kept", "||dW||", "rel. error"
    );
    for l in &extracted.layers {
        println!(
            "  {:<64} {:>5} {:>12.4e} {:>12.4e}",
            l.module, l.kept, l.change, l.relative_error
        );
    }
    println!(
        "relative error: max {:.4e}, overall {:.4e} (sqrt(sum ||dW - BA||^2 / sum ||dW||^2))",
        extracted.max_error(),
        extracted.overall_error()
    );
    println!(
        "the targeted layers hold {:.2}% of the student's change (sum of squares over all \
         UNet tensors; the rest, norms, biases and other layers, stays the teacher's)",
        100.0 * extracted.targeted_share
    );
    println!("wrote {} ({format:?} format)", path.display());
    Ok(())
}
