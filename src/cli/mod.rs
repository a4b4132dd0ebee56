//! Command-line surface: one subcommand per user action, each in its own
//! module (flags and the few lines that call into the crates).

mod bench;
mod bench_coordinator;
mod cancel;
mod coordinator;
mod dtype_arg;
mod eval;
mod export;
mod launch;
mod plan;
mod remote;
mod sample;
mod status;
mod toy;
mod train;
mod worker;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::LogFormat;

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
        // The coordinator's own --log-json (shared with its binary) counts too.
        if matches!(&self.command, Command::Coordinator(args) if args.log_json) {
            return LogFormat::Json;
        }
        match self.log_format {
            LogFormatArg::Human => LogFormat::Human,
            LogFormatArg::Json => LogFormat::Json,
        }
    }

    /// Whether the command computes with libtorch (and so may use CUDA).
    /// The operator commands and the coordinator do not: they skip loading
    /// the CUDA backend, a large library.
    pub fn uses_torch(&self) -> bool {
        !matches!(
            self.command,
            Command::Config(_)
                | Command::Coordinator(_)
                | Command::Launch(_)
                | Command::Status(_)
                | Command::Cancel(_)
        )
    }

    /// The log filter when RUST_LOG is unset. `train` runs a coordinator
    /// inside the process: its bookkeeping is noise there, its warnings not.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Train(_) => {
                "info,swiftbrush_coordinator=warn,swiftbrush_proto::run_store=warn"
            }
            _ => "info",
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Job configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print what this install loaded and sees: libtorch, its CUDA backend
    /// and libnccl (each with where it came from), the GPUs, CPU threads
    /// (and those a `swiftbrush worker` with these flags would take).
    Doctor {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        threads: worker::ThreadArgs,
        /// Also name the architecture of this teacher folder (from its
        /// config files: SD 1.x/2.x or SDXL).
        #[arg(long, value_name = "DIR")]
        teacher: Option<PathBuf>,
    },
    /// Distill the teacher into a one-step student (SwiftBrush) on this
    /// machine (a coordinator in-process, --workers N). Resumes from the run
    /// directory's newest checkpoint when there is one.
    Train(train::TrainArgs),
    /// Join a coordinator's job as one data-parallel worker on one device.
    Worker(Box<worker::WorkerArgs>),
    /// Write a trained student as a diffusers UNet folder (EMA weights by
    /// default), or with --pipeline a whole diffusers pipeline folder.
    Export(export::ExportArgs),
    /// Benchmarks (timings live here, never in tests).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Each worker's memory before launch: the resident parts (exact, from
    /// the teacher's config.json files), the activations of each pass
    /// (measured on this CPU), and the largest micro-batch that fits each
    /// GPU size, with and without gradient checkpointing (predicted).
    Plan(Box<plan::PlanArgs>),
    /// Draw images: from a teacher (diffusers folder, DDIM with guidance).
    Sample(Box<sample::SampleArgs>),
    /// Judge a teacher's or a student's pictures (CLIP score, FID).
    #[command(subcommand)]
    Eval(Box<eval::EvalCommand>),
    /// The shapes32 toy world (docs/TOYWORLD.md): train and judge a toy teacher.
    #[command(subcommand)]
    Toy(toy::ToyCommand),
    /// Serve the coordinator of a multi-node job (the same server and flags
    /// as the libtorch-free `swiftbrush-coordinator`).
    Coordinator(coordinator::CoordinatorArgs),
    /// Submit a job to a running coordinator; its workers then train it.
    Launch(launch::LaunchArgs),
    /// Show a coordinator's job: phase, world, progress, workers.
    Status(status::StatusArgs),
    /// End a coordinator's job, after a final checkpoint unless --now.
    Cancel(cancel::CancelArgs),
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
            for warning in missing_paths(&config) {
                tracing::warn!("{warning}");
            }
            if let Some(dir) = config.model.teacher.as_deref() {
                let dir = std::path::Path::new(dir);
                if dir.join("model_index.json").is_file() {
                    match swiftbrush_worker::pipeline::teacher_architecture(dir) {
                        Ok(a) => tracing::info!(architecture = %a, "teacher"),
                        Err(e) => tracing::warn!("model.teacher: {e}"),
                    }
                }
            }
            tracing::info!(
                file = %file.display(),
                fingerprint = %config.fingerprint(),
                "config is valid"
            );
            print!("{}", config.to_yaml());
            Ok(())
        }
        Command::Train(args) => train::run(args),
        Command::Worker(args) => worker::run(*args),
        Command::Bench(command) => bench::run(command),
        Command::Export(args) => export::run(args),
        Command::Toy(command) => toy::run(command),
        Command::Doctor {
            json,
            threads,
            teacher,
        } => {
            let report = swiftbrush_worker::doctor::report(threads.request());
            let architecture = teacher.as_ref().map(|dir| {
                swiftbrush_worker::pipeline::teacher_architecture(dir).map_err(|e| e.to_string())
            });
            if json {
                let mut value = serde_json::to_value(&report)?;
                value["swiftbrush"] = env!("CARGO_PKG_VERSION").into();
                if let (Some(dir), Some(found)) = (&teacher, &architecture) {
                    value["teacher"] = match found {
                        Ok(a) => serde_json::json!({"dir": dir, "architecture": a}),
                        Err(e) => serde_json::json!({"dir": dir, "error": e}),
                    };
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("swiftbrush {}", env!("CARGO_PKG_VERSION"));
                print!("{}", report.table());
                if let (Some(dir), Some(found)) = (&teacher, &architecture) {
                    match found {
                        Ok(a) => println!("{:<14} {}: {a}", "teacher", dir.display()),
                        Err(e) => println!("{:<14} {}: missing: {e}", "teacher", dir.display()),
                    }
                }
            }
            Ok(())
        }
        Command::Plan(args) => plan::run(*args),
        Command::Sample(args) => sample::run(*args),
        Command::Eval(command) => eval::run(*command),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Launch(args) => launch::run(args),
        Command::Status(args) => status::run(args),
        Command::Cancel(args) => cancel::run(args),
    }
}

/// What a valid config names on this machine that is not there: the
/// teacher folder and local caption files (URLs are not checked: a cluster
/// reads them elsewhere). Warnings, not errors: the config may be meant for
/// another machine.
fn missing_paths(config: &JobConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(teacher) = &config.model.teacher {
        let path = std::path::Path::new(teacher);
        if !path.is_dir() {
            warnings.push(format!(
                "model.teacher: {teacher} is not a folder on this machine (expected the \
                 diffusers pipeline folder holding model_index.json)"
            ));
        } else if !path.join("model_index.json").is_file() {
            warnings.push(format!(
                "model.teacher: {teacher} holds no model_index.json (not a diffusers pipeline folder)"
            ));
        }
    }
    for source in &config.data.captions {
        let local = match source.strip_prefix("file://") {
            Some(path) => Some(path),
            None if !source.contains("://") => Some(source.as_str()),
            None => None,
        };
        if let Some(path) = local
            && !std::path::Path::new(path).is_file()
        {
            warnings.push(format!(
                "data.captions: {source} does not exist on this machine"
            ));
        }
    }
    warnings
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
