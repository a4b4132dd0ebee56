//! Command-line surface: one subcommand per user action.

use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{Dtype, LogFormat};
use swiftbrush_worker::sample::{SampleModel, SampleRequest, read_prompts, sample_teacher};
use swiftbrush_worker::toy::TeacherSettings;
use swiftbrush_worker::trainer::Resume;

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
    /// Distill the teacher into a one-step student (SwiftBrush). Resumes
    /// from the run directory's newest checkpoint when there is one.
    Train(TrainArgs),
    /// Write a trained student as a diffusers UNet folder (EMA weights by
    /// default), or with --pipeline a whole diffusers pipeline folder.
    Export(ExportArgs),
    /// Benchmarks (timings live here, never in tests).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Draw images: from a teacher (diffusers folder, DDIM with guidance).
    Sample(Box<SampleArgs>),
    /// The shapes32 toy world (docs/TOYWORLD.md): train and judge a toy teacher.
    #[command(subcommand)]
    Toy(ToyCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
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

#[derive(Debug, clap::Args)]
struct ExportArgs {
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

#[derive(Debug, clap::Args)]
struct TrainArgs {
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

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("model").required(true).multiple(true).args(["teacher", "student"])))]
#[command(group(ArgGroup::new("text").required(true).args(["prompt", "prompts"])))]
struct SampleArgs {
    /// A diffusers Stable Diffusion folder, sampled with DDIM and
    /// classifier-free guidance as diffusers' StableDiffusionPipeline does.
    #[arg(long, value_name = "DIR")]
    teacher: Option<PathBuf>,
    /// A trained one-step student: a run directory (its newest valid
    /// checkpoint, EMA weights), RUN/checkpoints/step-N, or a folder written
    /// by `export --pipeline`. Text encoder, tokenizer and VAE come from the
    /// teacher the run recorded (or the exported folder).
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
enum ToyCommand {
    /// Train the toy teacher (a pixel-space UNet on procedurally drawn
    /// shapes) into a diffusers folder; checkpoints go to OUT/checkpoints.
    Teacher {
        /// The teacher folder to write (model_index.json, unet/, ...).
        #[arg(long)]
        out: PathBuf,
        /// Total optimizer steps.
        #[arg(long, default_value_t = TeacherSettings::default().steps)]
        steps: u64,
        #[arg(long, default_value_t = TeacherSettings::default().batch_size)]
        batch_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Adam learning rate (after a linear warm-up of 100 steps).
        #[arg(long, default_value_t = TeacherSettings::default().lr)]
        lr: f64,
        /// Save a checkpoint and refresh OUT/unet every this many steps.
        #[arg(long, default_value_t = TeacherSettings::default().checkpoint_every)]
        checkpoint_every: u64,
        /// Continue the run in OUT from its newest checkpoint.
        #[arg(long)]
        resume: bool,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// libtorch's CPU threads (default: libtorch's choice). On a busy
        /// machine 1 can be several times faster than more.
        #[arg(long)]
        threads: Option<i32>,
    },
    /// Sample a toy teacher with DDIM and guidance and judge every image.
    Eval {
        /// The teacher folder.
        #[arg(long)]
        teacher: PathBuf,
        #[arg(long, default_value_t = 10)]
        samples_per_caption: usize,
        /// DDIM steps.
        #[arg(long, default_value_t = 25)]
        steps: i64,
        /// Classifier-free guidance scale.
        #[arg(long, default_value_t = 4.0)]
        guidance: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        threads: Option<i32>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write every sample to this PNG (one row per caption).
        #[arg(long)]
        grid: Option<PathBuf>,
    },
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
        Command::Train(args) => train(args),
        Command::Bench(BenchCommand::VsdStep {
            config,
            teacher,
            steps,
            device,
            json,
        }) => {
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
        Command::Export(args) => {
            use swiftbrush_worker::export::{StudentCheckpoint, StudentWeights, export};
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
        Command::Toy(command) => run_toy(command),
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

fn train(args: TrainArgs) -> anyhow::Result<()> {
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

fn sample(args: SampleArgs) -> anyhow::Result<()> {
    // With --student, --teacher overrides the teacher the run recorded.
    let model = match (args.teacher, args.student) {
        (teacher, Some(path)) => SampleModel::Student {
            path: path.display().to_string(),
            teacher,
        },
        (Some(dir), None) => SampleModel::Teacher(dir),
        (None, None) => anyhow::bail!("give --teacher DIR or --student PATH"),
    };
    let prompts = match (args.prompt, args.prompts) {
        (Some(p), _) => vec![p],
        (None, Some(file)) => read_prompts(&file)?,
        (None, None) => anyhow::bail!("give --prompt TEXT or --prompts FILE"),
    };
    let request = SampleRequest {
        model,
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
    let report = sample_teacher(&request).context("cannot sample")?;
    for path in &report.written {
        println!("wrote {}", path.display());
    }
    println!(
        "{} image(s) on {}: {:.3} s per image (teacher loaded in {:.2} s)",
        report.num_images, report.device, report.seconds_per_image, report.load_seconds
    );
    Ok(())
}

fn run_toy(command: ToyCommand) -> anyhow::Result<()> {
    use swiftbrush_worker::toy::{eval, progress::ProgressMode};
    let set_threads = |threads: Option<i32>| -> anyhow::Result<()> {
        match threads {
            Some(n) if n < 1 => anyhow::bail!("--threads must be at least 1, got {n}"),
            Some(n) => swiftbrush_worker::toy::set_cpu_threads(n),
            None => {}
        }
        Ok(())
    };
    match command {
        ToyCommand::Teacher {
            out,
            steps,
            batch_size,
            seed,
            lr,
            checkpoint_every,
            resume,
            device,
            threads,
        } => {
            set_threads(threads)?;
            let device = swiftbrush_worker::device::parse_device(&device)?;
            let settings = TeacherSettings {
                steps,
                batch_size,
                seed,
                lr,
                checkpoint_every,
                ..TeacherSettings::default()
            };
            tracing::info!(out = %out.display(), ?device, steps, batch_size, seed, "training the toy teacher");
            let outcome = swiftbrush_worker::toy::train_teacher(
                &settings,
                &out,
                resume,
                device,
                ProgressMode::Auto,
            )
            .with_context(|| format!("toy teacher in {}", out.display()))?;
            tracing::info!(
                folder = %outcome.folder.display(),
                start_step = outcome.start_step,
                steps = outcome.steps,
                recent_loss = ?outcome.recent_loss,
                secs_per_step = ?outcome.secs_per_step,
                "toy teacher written"
            );
            Ok(())
        }
        ToyCommand::Eval {
            teacher,
            samples_per_caption,
            steps,
            guidance,
            seed,
            device,
            threads,
            json,
            grid,
        } => {
            set_threads(threads)?;
            let device = swiftbrush_worker::device::parse_device(&device)?;
            let opts = eval::SampleOptions {
                samples_per_caption,
                num_inference_steps: steps,
                guidance_scale: guidance,
                seed,
            };
            let samples = eval::sample_teacher(&teacher, &opts, device)
                .with_context(|| format!("sampling the toy teacher in {}", teacher.display()))?;
            if let Some(path) = grid {
                let images = eval::samples_to_unit_tensor(&samples);
                swiftbrush_worker::image_io::save_png(&images, &path, samples_per_caption.max(1))?;
            }
            let report =
                swiftbrush_worker::toy::ToyReport::from_images(&samples.captions, &samples.pixels);
            if json {
                println!("{}", report.to_json_pretty());
            } else {
                print!("{}", report.to_table());
            }
            Ok(())
        }
    }
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
