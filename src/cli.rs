//! Command-line surface: one subcommand per user action.

use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{Dtype, LogFormat};
use swiftbrush_worker::sample::{SampleRequest, read_prompts, sample_teacher};

#[derive(Debug, Parser)]
#[command(
    name = "swiftbrush",
    version,
    about = "Distill a Stable Diffusion teacher into a one-step student (SwiftBrush)"
)]
pub struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Human)]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

impl Cli {
    pub fn log_format(&self) -> LogFormat {
        match self.log_format {
            LogFormatArg::Human => LogFormat::Human,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Job configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print what this install sees: libtorch, CPU threads, CUDA devices.
    Doctor,
    /// Draw images: from a teacher (diffusers folder, DDIM with guidance).
    Sample(Box<SampleArgs>),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("model").required(true).args(["teacher", "student"])))]
#[command(group(ArgGroup::new("text").required(true).args(["prompt", "prompts"])))]
struct SampleArgs {
    /// A diffusers Stable Diffusion folder, sampled with DDIM and
    /// classifier-free guidance as diffusers' StableDiffusionPipeline does.
    #[arg(long, value_name = "DIR")]
    teacher: Option<PathBuf>,
    /// A training run's one-step student (not available yet).
    #[arg(long, value_name = "PATH")]
    student: Option<PathBuf>,
    /// One prompt.
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// A text file with one prompt a line.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// DDIM steps.
    #[arg(long, default_value_t = 25)]
    steps: i64,
    /// Classifier-free guidance scale; <= 1 turns guidance off.
    #[arg(long, default_value_t = 4.5)]
    guidance: f64,
    /// Seeds the initial noise (drawn on the CPU: the same on every device).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Initial noise instead of --seed: a safetensors file with a tensor
    /// `latents` [number of prompts, channels, height, width].
    #[arg(long, value_name = "FILE.safetensors")]
    latents: Option<PathBuf>,
    /// The PNG to write (a grid for several prompts); sample.png when
    /// neither --out nor --raw-out is given.
    #[arg(long, value_name = "OUT.png")]
    out: Option<PathBuf>,
    /// Also write the float images [B,3,H,W] in [0,1] (tensor `images`).
    #[arg(long, value_name = "OUT.safetensors")]
    raw_out: Option<PathBuf>,
    /// auto (first CUDA device, else CPU), cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Number format of the text encoder and UNet (the VAE decodes in fp32).
    #[arg(long, value_enum, default_value_t = DtypeArg::Fp32)]
    dtype: DtypeArg,
    /// Prompts per sampling pass.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Image height in pixels (default: the UNet's sample_size times the
    /// VAE's scale factor).
    #[arg(long)]
    height: Option<i64>,
    /// Image width in pixels (default as for --height).
    #[arg(long)]
    width: Option<i64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DtypeArg {
    Fp32,
    Fp16,
    Bf16,
}

impl From<DtypeArg> for Dtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::Fp32 => Dtype::Fp32,
            DtypeArg::Fp16 => Dtype::Fp16,
            DtypeArg::Bf16 => Dtype::Bf16,
        }
    }
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a job config and print it fully resolved (every default
    /// written out), or name each offending key.
    Check {
        /// The YAML job config.
        file: PathBuf,
        /// The teacher's diffusers folder (overrides model.teacher).
        #[arg(long)]
        teacher: Option<String>,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config(ConfigCommand::Check { file, teacher }) => {
            let config = load_config(&file, teacher)?;
            tracing::info!(
                file = %file.display(),
                fingerprint = %config.fingerprint(),
                "config is valid"
            );
            print!("{}", config.to_yaml());
            Ok(())
        }
        Command::Doctor => {
            println!("swiftbrush {}", env!("CARGO_PKG_VERSION"));
            for (key, value) in swiftbrush_worker::device::describe() {
                println!("{key:>16}: {value}");
            }
            Ok(())
        }
        Command::Sample(args) => sample(*args),
    }
}

fn sample(args: SampleArgs) -> anyhow::Result<()> {
    let Some(teacher) = args.teacher else {
        anyhow::bail!(
            "sampling a student (--student) is not available yet; \
             use --teacher DIR to sample a diffusers teacher"
        );
    };
    let prompts = match (args.prompt, args.prompts) {
        (Some(p), _) => vec![p],
        (None, Some(file)) => read_prompts(&file)?,
        (None, None) => anyhow::bail!("give --prompt TEXT or --prompts FILE"),
    };
    let request = SampleRequest {
        teacher,
        prompts,
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        latents: args.latents,
        out: args.out,
        raw_out: args.raw_out,
        device: args.device,
        dtype: args.dtype.into(),
        batch_size: usize::try_from(args.batch_size).unwrap_or(usize::MAX),
        height: args.height,
        width: args.width,
    };
    let report = sample_teacher(&request)
        .with_context(|| format!("cannot sample the teacher at {}", request.teacher.display()))?;
    for path in &report.written {
        println!("wrote {}", path.display());
    }
    println!(
        "{} image(s) on {}: {:.3} s per image (teacher loaded in {:.2} s)",
        report.num_images, report.device, report.seconds_per_image, report.load_seconds
    );
    Ok(())
}

/// Reads a job config, applies command-line overrides, validates.
fn load_config(file: &std::path::Path, teacher: Option<String>) -> anyhow::Result<JobConfig> {
    let mut config = JobConfig::from_yaml_file(file)?;
    if let Some(t) = teacher {
        config.model.teacher = Some(t);
    }
    config
        .validate()
        .with_context(|| format!("{} is not a valid job config", file.display()))?;
    Ok(config)
}
