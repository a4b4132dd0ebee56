//! Sampling and judging toy models: a teacher folder with DDIM and
//! classifier-free guidance, or a distilled student with one UNet pass (a
//! few-step student: its whole chain, the re-noising draws continuing each
//! image's noise stream).
//! Both go through the same pipeline code as `swiftbrush sample`
//! (`StableDiffusion` in pixel space: no VAE). Image i's starting noise is
//! seeded by (seed, i) whatever the model, so a teacher and a student
//! sampled with the same seed start from the same noise, and results do
//! not depend on batching.

use std::path::PathBuf;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::ToyError;
use super::evaluator::ToyReport;
use super::rng::ToyRng;
use super::shapes::{CHANNELS, Caption, SIZE, tensor_to_pixels};
use crate::diffusion::{NoiseSchedule, StudentChain};
use crate::export::OneStep;
use crate::pipeline::StableDiffusion;
use crate::sample::{SampleModel, load_model};

const STREAM_EVAL: u64 = 2;
/// Images sampled together.
const CHUNK: usize = 54;

/// Which toy model draws.
#[derive(Debug, Clone)]
pub enum ToyModel {
    /// A toy teacher folder: DDIM with guidance.
    Teacher(PathBuf),
    /// A student: a run directory, `RUN/checkpoints/step-N` or an exported
    /// pipeline; `teacher` overrides the teacher folder the run recorded.
    Student {
        path: String,
        teacher: Option<PathBuf>,
    },
}

impl ToyModel {
    pub fn describe(&self) -> String {
        match self {
            Self::Teacher(p) => format!("teacher {}", p.display()),
            Self::Student { path, .. } => format!("student {path}"),
        }
    }

    fn as_sample_model(&self) -> SampleModel {
        match self {
            Self::Teacher(p) => SampleModel::Teacher(p.clone()),
            Self::Student { path, teacher } => SampleModel::Student {
                path: path.clone(),
                teacher: teacher.clone(),
            },
        }
    }
}

/// How to sample for an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    pub samples_per_caption: usize,
    /// DDIM steps of a teacher (a student always takes one pass).
    pub num_inference_steps: i64,
    /// Guidance of a teacher (a student uses none).
    pub guidance_scale: f64,
    pub seed: u64,
}

/// Sampled images with their captions.
#[derive(Debug, Clone)]
pub struct Samples {
    pub captions: Vec<Caption>,
    /// HWC bytes, image after image.
    pub pixels: Vec<u8>,
    /// Wall time of sampling (model loading excluded) per image.
    pub seconds_per_image: f64,
}

impl Samples {
    /// The images as float [N, 3, 32, 32] in [0, 1], for `image_io::save_png`.
    pub fn to_unit_tensor(&self) -> Tensor {
        let n = self.captions.len() as i64;
        let side = SIZE as i64;
        Tensor::from_slice(&self.pixels)
            .view([n, side, side, CHANNELS as i64])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            / 255.0
    }

    /// Judges every image against its caption (with the sampling time).
    pub fn report(&self) -> ToyReport {
        let mut report = ToyReport::from_images(&self.captions, &self.pixels);
        report.seconds_per_image = Some(self.seconds_per_image);
        report
    }
}

/// A loaded toy model, ready to draw.
pub struct ToySampler {
    pipe: StableDiffusion,
    /// Some for a student.
    one_step: Option<OneStep>,
    /// A few-step student's chain (drawn through all its steps).
    chain: Option<StudentChain>,
    pub load_seconds: f64,
}

impl ToySampler {
    pub fn load(model: &ToyModel, device: Device) -> Result<Self, ToyError> {
        let started = Instant::now();
        let (pipe, one_step) = load_model(&model.as_sample_model(), device, Kind::Float)
            .map_err(|e| ToyError::Sample(format!("{}: {e}", model.describe())))?;
        if pipe.latent_channels() != CHANNELS as i64 || pipe.vae_scale_factor() != 1 {
            return Err(ToyError::Sample(format!(
                "{} is not a toy (pixel-space, 3-channel) model",
                model.describe()
            )));
        }
        let chain = match &one_step {
            Some(o) => {
                let schedule = NoiseSchedule::new(&pipe.scheduler, Device::Cpu)
                    .map_err(|e| ToyError::Sample(format!("{}: {e}", model.describe())))?;
                o.chain(&schedule)
                    .map_err(|e| ToyError::Sample(format!("{}: {e}", model.describe())))?
            }
            None => None,
        };
        Ok(Self {
            pipe,
            one_step,
            chain,
            load_seconds: started.elapsed().as_secs_f64(),
        })
    }

    pub fn is_student(&self) -> bool {
        self.one_step.is_some()
    }

    /// How many passes a student draws with (1 for a teacher's sampler).
    pub fn student_steps(&self) -> usize {
        self.chain.as_ref().map_or(1, |c| c.len())
    }

    /// Draws `samples_per_caption` images of each caption (samples of one
    /// caption together, captions in the order given).
    pub fn sample(&self, captions: &[Caption], opts: &SampleOptions) -> Result<Samples, ToyError> {
        let captions: Vec<Caption> = captions
            .iter()
            .flat_map(|c| std::iter::repeat_n(*c, opts.samples_per_caption))
            .collect();
        let side = SIZE as i64;
        let mut pixels = Vec::with_capacity(captions.len() * SIZE * SIZE * CHANNELS);
        let started = Instant::now();
        for (chunk_index, chunk) in captions.chunks(CHUNK).enumerate() {
            let mut noise = Vec::with_capacity(chunk.len() * CHANNELS * SIZE * SIZE);
            // A few-step student's re-noising draws: image i's continue its
            // own stream after its starting noise.
            let renoises = self.chain.as_ref().map_or(0, |c| c.len() - 1);
            let mut chain_noise = vec![Vec::new(); renoises];
            for i in 0..chunk.len() {
                let index = (chunk_index * CHUNK + i) as u64;
                let mut rng = ToyRng::stream(opts.seed, index, STREAM_EVAL);
                noise.extend(rng.normals_f32(CHANNELS * SIZE * SIZE));
                for buffer in &mut chain_noise {
                    buffer.extend(rng.normals_f32(CHANNELS * SIZE * SIZE));
                }
            }
            let shape = [chunk.len() as i64, CHANNELS as i64, side, side];
            let z = Tensor::from_slice(&noise).view(shape);
            let prompts: Vec<String> = chunk.iter().map(Caption::text).collect();
            let images = match (&self.one_step, &self.chain) {
                (_, Some(chain)) => {
                    let noises: Vec<Tensor> = chain_noise
                        .iter()
                        .map(|n| Tensor::from_slice(n).view(shape))
                        .collect();
                    self.pipe
                        .sample_few_step(&prompts, &z, &noises, chain, chain.len())?
                }
                (Some(o), None) => self.pipe.sample_one_step(
                    &prompts,
                    &z,
                    o.student_timestep,
                    o.student_alpha_bar,
                )?,
                (None, None) => self.pipe.sample_ddim(
                    &prompts,
                    &z,
                    opts.num_inference_steps,
                    opts.guidance_scale,
                )?,
            };
            // [0, 1] back to the toy world's [-1, 1] pixels.
            pixels.extend(tensor_to_pixels(&(images * 2.0 - 1.0))?);
        }
        let seconds_per_image = started.elapsed().as_secs_f64() / captions.len().max(1) as f64;
        Ok(Samples {
            captions,
            pixels,
            seconds_per_image,
        })
    }
}

/// Samples a toy model on all 54 captions and judges every image.
pub fn evaluate(
    model: &ToyModel,
    opts: &SampleOptions,
    device: Device,
) -> Result<(Samples, ToyReport), ToyError> {
    let sampler = ToySampler::load(model, device)?;
    let samples = sampler.sample(&Caption::all(), opts)?;
    let report = samples.report();
    Ok((samples, report))
}
