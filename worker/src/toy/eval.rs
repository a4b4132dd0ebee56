//! Judging a toy teacher folder: DDIM sampling with classifier-free
//! guidance (diffusers' StableDiffusionPipeline loop in pixel space: no
//! VAE), then the evaluator on every image. Each image's starting noise is
//! seeded by (seed, image index), so results do not depend on batching.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::ToyError;
use super::evaluator::ToyReport;
use super::rng::ToyRng;
use super::shapes::{CHANNELS, Caption, SIZE, tensor_to_pixels};
use crate::diffusion::{DDIMScheduler, SchedulerConfig, guide_batched};
use crate::models::clip::load_text_encoder;
use crate::models::tokenizer::ClipTokenizer;
use crate::pipeline::DiffusersFolder;
use crate::roles::UNet;

const STREAM_EVAL: u64 = 2;
/// Images denoised together (each runs as a guided pair).
const CHUNK: usize = 54;

/// How to sample for an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    pub samples_per_caption: usize,
    pub num_inference_steps: i64,
    pub guidance_scale: f64,
    pub seed: u64,
}

/// Sampled images with their captions.
#[derive(Debug, Clone)]
pub struct Samples {
    pub captions: Vec<Caption>,
    /// HWC bytes, image after image.
    pub pixels: Vec<u8>,
}

/// Draws `samples_per_caption` images of each of the 54 captions from the
/// teacher in `folder` (captions in id order, samples of one caption
/// together).
pub fn sample_teacher(
    folder: &Path,
    opts: &SampleOptions,
    device: Device,
) -> Result<Samples, ToyError> {
    let pipeline = DiffusersFolder::open(folder)?;
    let unet = UNet::load(&pipeline, device)?;
    let te_dir = pipeline.component("text_encoder")?.dir;
    let (_te_vs, text_model, _) = load_text_encoder(&te_dir, device)?;
    let tokenizer = ClipTokenizer::from_dir(&pipeline.component("tokenizer")?.dir)?;
    let scheduler_dir = pipeline.component("scheduler")?.dir;
    let sched_cfg = SchedulerConfig::from_file(&scheduler_dir.join("scheduler_config.json"))?;
    let ddim = DDIMScheduler::new(&sched_cfg, opts.num_inference_steps, device)?;

    let all = Caption::all();
    let mut prompts: Vec<String> = all.iter().map(Caption::text).collect();
    prompts.push(String::new());
    let ids = tokenizer.encode_batch(&prompts, device)?;
    let table = tch::no_grad(|| text_model.f_forward(&ids.input_ids))?;
    let null_row = all.len() as i64;

    let captions: Vec<Caption> = all
        .iter()
        .flat_map(|c| std::iter::repeat_n(*c, opts.samples_per_caption))
        .collect();
    let side = SIZE as i64;
    let mut pixels = Vec::with_capacity(captions.len() * SIZE * SIZE * CHANNELS);
    for (chunk_index, chunk) in captions.chunks(CHUNK).enumerate() {
        let b = chunk.len();
        let mut noise = Vec::with_capacity(b * CHANNELS * SIZE * SIZE);
        for i in 0..b {
            let index = (chunk_index * CHUNK + i) as u64;
            let mut rng = ToyRng::stream(opts.seed, index, STREAM_EVAL);
            noise.extend(rng.normals_f32(CHANNELS * SIZE * SIZE));
        }
        let mut x = Tensor::from_slice(&noise)
            .view([b as i64, CHANNELS as i64, side, side])
            .to_device(device);
        let mut rows: Vec<i64> = vec![null_row; b];
        rows.extend(chunk.iter().map(|c| c.id() as i64));
        let cond = table.f_index_select(0, &Tensor::from_slice(&rows).to_device(device))?;
        x = tch::no_grad(|| -> Result<Tensor, ToyError> {
            for &t in ddim.timesteps() {
                let input = Tensor::f_cat(&[&x, &x], 0)?;
                let tt = Tensor::full([2 * b as i64], t, (Kind::Int64, device));
                let out = unet.model.forward(&input, &tt, &cond);
                let eps = guide_batched(&out, opts.guidance_scale)?;
                x = ddim.step(&eps, t, &x)?.prev_sample;
            }
            Ok(x)
        })?;
        pixels.extend(tensor_to_pixels(&x)?);
    }
    Ok(Samples { captions, pixels })
}

/// Samples the teacher and judges every image: the toy world's measure of
/// a teacher (25 steps and guidance 3-7 are the intended settings).
pub fn evaluate_teacher(
    folder: &Path,
    samples_per_caption: usize,
    steps: i64,
    guidance: f64,
    seed: u64,
    device: Device,
) -> Result<ToyReport, ToyError> {
    let opts = SampleOptions {
        samples_per_caption,
        num_inference_steps: steps,
        guidance_scale: guidance,
        seed,
    };
    let s = sample_teacher(folder, &opts, device)?;
    Ok(ToyReport::from_images(&s.captions, &s.pixels))
}

/// Samples -> float [N, 3, 32, 32] in [0, 1], for `image_io::save_png`.
pub fn samples_to_unit_tensor(s: &Samples) -> Tensor {
    let n = s.captions.len() as i64;
    let side = SIZE as i64;
    Tensor::from_slice(&s.pixels)
        .view([n, side, side, CHANNELS as i64])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0
}
