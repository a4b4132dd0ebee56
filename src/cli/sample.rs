//! `swiftbrush sample`: images from a teacher (DDIM with guidance) or a
//! trained student (one step, or a few-step student's chain).

use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgGroup, Args};

use super::dtype_arg::DtypeArg;
use swiftbrush_worker::sample::{SampleModel, SampleRequest, read_prompts, sample_teacher};

/// DDIM steps and guidance scale of a teacher unless given.
const DEFAULT_STEPS: i64 = 25;
const DEFAULT_GUIDANCE: f64 = 4.5;

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    draw: DrawArgs,
    /// The PNG to write (a grid for several prompts); sample.png when
    /// neither --out nor --raw-out is given.
    #[arg(long, value_name = "OUT.png")]
    out: Option<PathBuf>,
    /// Also write the float images [B,3,H,W] in [0,1] (tensor `images`).
    #[arg(long, value_name = "OUT.safetensors")]
    raw_out: Option<PathBuf>,
}

/// What draws which pictures: shared by `sample` and `eval`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("model").required(true).multiple(true).args(["teacher", "student"])))]
#[command(group(ArgGroup::new("text").required(true).args(["prompt", "prompts"])))]
pub struct DrawArgs {
    /// A diffusers Stable Diffusion folder, sampled with DDIM and
    /// classifier-free guidance as diffusers' StableDiffusionPipeline does;
    /// an SDXL folder as StableDiffusionXLPipeline does, with its own
    /// scheduler (EulerDiscreteScheduler or DDIMScheduler).
    #[arg(long, value_name = "DIR")]
    teacher: Option<PathBuf>,
    /// A trained student (one step, or the K steps it was trained for): a run directory (its newest valid
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
    /// Sampling steps of --teacher (DDIM for SD 1/2; an SDXL folder's own
    /// DDIM or Euler scheduler) [default: 25]; with --student, how many of
    /// a few-step student's steps to draw [default: all it was trained for].
    #[arg(long)]
    steps: Option<i64>,
    /// Classifier-free guidance scale of --teacher; <= 1 turns guidance off
    /// [default: 4.5]. Not with --student (no guidance).
    #[arg(long)]
    guidance: Option<f64>,
    /// Seeds the initial noise (drawn on the CPU: the same on every device).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Initial noise instead of --seed: a safetensors file with a tensor
    /// `latents` [number of prompts, channels, height, width].
    #[arg(long, value_name = "FILE.safetensors")]
    latents: Option<PathBuf>,
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

impl DrawArgs {
    /// The request, writing `out` and `raw_out` when `sample` runs it.
    pub fn request(
        self,
        out: Option<PathBuf>,
        raw_out: Option<PathBuf>,
    ) -> anyhow::Result<SampleRequest> {
        // A student draws without guidance: --guidance would change
        // nothing (and --teacher only names where its text encoder,
        // tokenizer and VAE come from). Checked here, not by clap: clap's
        // conflicts ignore defaults, and these have none to ignore.
        // --steps picks a few-step student's steps (checked against what it
        // was trained for once it is loaded).
        if self.student.is_some() {
            anyhow::ensure!(
                self.guidance.is_none(),
                "--guidance sets the DDIM sampling of --teacher; a --student draws \
                 without guidance, so it would change nothing: drop it",
            );
            if let Some(steps) = self.steps {
                anyhow::ensure!(
                    steps >= 1,
                    "--steps {steps}: a student draws with at least 1 step"
                );
            }
        }
        let student_steps = match &self.student {
            Some(_) => self.steps.map(|s| usize::try_from(s).unwrap_or(usize::MAX)),
            None => None,
        };
        // With --student, --teacher overrides the teacher the run recorded.
        let model = match (self.teacher, self.student) {
            (teacher, Some(path)) => SampleModel::Student {
                path: path.display().to_string(),
                teacher,
            },
            (Some(dir), None) => SampleModel::Teacher(dir),
            (None, None) => anyhow::bail!("give --teacher DIR or --student PATH"),
        };
        let prompts = match (self.prompt, self.prompts) {
            (Some(p), _) => vec![p],
            (None, Some(file)) => read_prompts(&file)?,
            (None, None) => anyhow::bail!("give --prompt TEXT or --prompts FILE"),
        };
        Ok(SampleRequest {
            model,
            prompts,
            steps: self.steps.unwrap_or(DEFAULT_STEPS),
            student_steps,
            guidance: self.guidance.unwrap_or(DEFAULT_GUIDANCE),
            seed: self.seed,
            latents: self.latents,
            out,
            raw_out,
            device: self.device,
            dtype: self.dtype.into(),
            batch_size: usize::try_from(self.batch_size).unwrap_or(usize::MAX),
            height: self.height,
            width: self.width,
        })
    }
}

pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    let request = args.draw.request(args.out, args.raw_out)?;
    let report = sample_teacher(&request).context("cannot sample")?;
    for path in &report.written {
        println!("wrote {}", path.display());
    }
    println!(
        "{} image(s) on {}: {:.3} s per image ({} loaded in {:.2} s)",
        report.num_images,
        report.device,
        report.seconds_per_image,
        report.loaded,
        report.load_seconds
    );
    Ok(())
}
