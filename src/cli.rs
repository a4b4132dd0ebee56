//! Command-line surface: one subcommand per user action.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::LogFormat;
use swiftbrush_worker::toy::TeacherSettings;

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
    /// The shapes32 toy world (docs/TOYWORLD.md): train and judge a toy teacher.
    #[command(subcommand)]
    Toy(ToyCommand),
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
        Command::Toy(command) => run_toy(command),
        Command::Doctor => {
            println!("swiftbrush {}", env!("CARGO_PKG_VERSION"));
            for (key, value) in swiftbrush_worker::device::describe() {
                println!("{key:>16}: {value}");
            }
            Ok(())
        }
    }
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
