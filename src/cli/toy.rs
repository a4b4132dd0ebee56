//! `swiftbrush toy ...`: the shapes32 toy world (docs/TOYWORLD.md).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use swiftbrush_worker::toy::compare::TOY_TEACHER_GUIDANCE;
use swiftbrush_worker::toy::{DEFAULT_TOP_TIMESTEPS, TeacherSettings, TopTimesteps};

#[derive(Debug, Subcommand)]
pub enum ToyCommand {
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
        /// Offset noise: a per-channel constant of this standard deviation
        /// added to each sample's noise (0 turns it off).
        #[arg(long, default_value_t = TeacherSettings::default().noise_offset)]
        noise_offset: f64,
        /// From this step on, part of each batch trains near the top of the
        /// schedule (where the one-step student starts; docs/TOYWORLD.md) ...
        #[arg(long, default_value_t = DEFAULT_TOP_TIMESTEPS.from_step)]
        top_t_from_step: u64,
        /// ... this share of its samples (0 turns the phase off) ...
        #[arg(long, default_value_t = DEFAULT_TOP_TIMESTEPS.fraction)]
        top_t_fraction: f64,
        /// ... with t drawn from [this, 999].
        #[arg(long, default_value_t = DEFAULT_TOP_TIMESTEPS.min_t)]
        top_t_min: u64,
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
    /// The toy world end to end (what `make demo` runs): the teacher, the
    /// distillation through `swiftbrush train` on the 54 captions, then
    /// OUT/compare.png and OUT/report.md (teacher vs student, same seeds).
    Demo {
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// The distillation's job config.
        #[arg(long, default_value = "configs/toy.yaml")]
        config: PathBuf,
        /// A few-step student's job config (`method.student_timesteps`),
        /// distilled after the one-step student into OUT/student-few-step
        /// and compared beside it (`make demo`: configs/toy-few-step.yaml).
        #[arg(long, value_name = "FILE")]
        few_step_config: Option<PathBuf>,
        /// A trained toy teacher folder to copy into OUT/teacher (the repo
        /// commits one in assets/toy-teacher); without it one is trained.
        #[arg(long)]
        teacher: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        samples_per_caption: usize,
        /// DDIM steps of the teacher.
        #[arg(long, default_value_t = 25)]
        teacher_steps: i64,
        /// Guidance of the teacher's sampling (the toy teacher is best at
        /// 1-1.5; stronger guidance oversaturates it: docs/TOYWORLD.md).
        #[arg(long, default_value_t = TOY_TEACHER_GUIDANCE)]
        guidance: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Arguments passed on to `swiftbrush train` (after `--`).
        #[arg(last = true)]
        train_args: Vec<String>,
    },
    /// Sample a toy teacher (DDIM with guidance) or a distilled student
    /// (its one step, or a few-step student's chain) on the 54 captions and judge every image.
    #[command(group(clap::ArgGroup::new("model").required(true).multiple(true).args(["teacher", "student"])))]
    Eval {
        /// A toy teacher folder. With --student: overrides the teacher the
        /// run recorded (text encoder and tokenizer).
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// A distilled student: a run directory (newest checkpoint, EMA
        /// weights), RUN/checkpoints/step-N, or an exported pipeline.
        #[arg(long)]
        student: Option<String>,
        #[arg(long, default_value_t = 10)]
        samples_per_caption: usize,
        /// DDIM steps of a teacher.
        #[arg(long, default_value_t = 25)]
        steps: i64,
        /// Classifier-free guidance scale of a teacher.
        #[arg(long, default_value_t = TOY_TEACHER_GUIDANCE)]
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

pub fn run(command: ToyCommand) -> anyhow::Result<()> {
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
            noise_offset,
            top_t_from_step,
            top_t_fraction,
            top_t_min,
            checkpoint_every,
            resume,
            device,
            threads,
        } => {
            set_threads(threads)?;
            let device = swiftbrush_worker::torch::device::parse_device(&device)?;
            let settings = TeacherSettings {
                steps,
                batch_size,
                seed,
                lr,
                noise_offset,
                top_timesteps: (top_t_fraction > 0.0).then_some(TopTimesteps {
                    from_step: top_t_from_step,
                    fraction: top_t_fraction,
                    min_t: top_t_min,
                }),
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
        ToyCommand::Demo {
            out,
            config,
            few_step_config,
            teacher,
            samples_per_caption,
            teacher_steps,
            guidance,
            seed,
            device,
            train_args,
        } => {
            use swiftbrush_worker::toy::{compare::CompareOptions, demo};
            let opts = demo::DemoOptions {
                out,
                config,
                few_step_config,
                teacher_source: teacher,
                exe: std::env::current_exe().context("cannot find the swiftbrush binary")?,
                train_args,
                compare: CompareOptions {
                    samples_per_caption,
                    teacher_steps,
                    teacher_guidance: guidance,
                    seed,
                    picture_samples: samples_per_caption.min(4),
                    ..CompareOptions::default()
                },
                device: swiftbrush_worker::torch::device::parse_device(&device)?,
            };
            let outcome = demo::run_demo(&opts).context("toy demo")?;
            for path in &outcome.written {
                println!("wrote {}", path.display());
            }
            let c = &outcome.comparison;
            println!(
                "teacher all-three {:.1} %, student all-three {:.1} %, one-step speed-up {:.1}x",
                100.0 * c.teacher.report.all_three_accuracy,
                100.0 * c.student.report.all_three_accuracy,
                c.speedup
            );
            if let Some(f) = &c.few_step {
                println!(
                    "{}-step student all-three {:.1} %, speed-up {:.1}x",
                    f.steps,
                    100.0 * f.report.all_three_accuracy,
                    c.few_step_speedup.unwrap_or(f64::NAN)
                );
            }
            for bar in &c.bars {
                println!(
                    "  {:<42} {:>8.3} (needs >= {}) {}",
                    bar.what,
                    bar.value,
                    bar.required,
                    if bar.met { "ok" } else { "NOT MET" }
                );
            }
            Ok(())
        }
        ToyCommand::Eval {
            teacher,
            student,
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
            let device = swiftbrush_worker::torch::device::parse_device(&device)?;
            let model = match (student, teacher) {
                (Some(path), teacher) => eval::ToyModel::Student { path, teacher },
                (None, Some(dir)) => eval::ToyModel::Teacher(dir),
                (None, None) => anyhow::bail!("give --teacher DIR or --student PATH"),
            };
            let opts = eval::SampleOptions {
                samples_per_caption,
                num_inference_steps: steps,
                guidance_scale: guidance,
                seed,
            };
            let (samples, report) = eval::evaluate(&model, &opts, device)
                .with_context(|| format!("evaluating the toy {}", model.describe()))?;
            if let Some(path) = grid {
                let images = samples.to_unit_tensor();
                swiftbrush_worker::image_io::save_png(&images, &path, samples_per_caption.max(1))?;
            }
            if json {
                println!("{}", report.to_json_pretty());
            } else {
                print!("{}", report.to_table());
            }
            Ok(())
        }
    }
}
