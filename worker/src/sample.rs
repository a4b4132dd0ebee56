//! `swiftbrush sample`: images from a diffusers teacher folder (DDIM with
//! classifier-free guidance) or from a trained one-step student (a run
//! directory, one checkpoint, or an exported pipeline), written as a PNG (a
//! grid for several prompts) and/or the float images as safetensors.
//! Everything a user passes is checked before the model is loaded where it
//! can be.

use std::path::{Path, PathBuf};
use std::time::Instant;

use swiftbrush_proto::config::Dtype;
use tch::{Device, Kind, Tensor};

use crate::diffusion::{NoiseSchedule, StudentChain, draw_chain_noise, draw_latents, draw_renoise};
use crate::export::{ONE_STEP_FILE, OneStep, StudentCheckpoint, StudentWeights};
use crate::image_io::{ImageError, grid_columns, save_png};
use crate::models::weights;
use crate::pipeline::{AnyPipeline, PipelineError, StableDiffusion};
use crate::torch::device::{DeviceError, parse_device};
use crate::torch::precision::kind_of;
use crate::trainer::checkpoint::tensor_bytes;

/// The tensor name `--latents` files hold.
pub const LATENTS_KEY: &str = "latents";
/// The tensor name `--raw-out` files hold.
pub const IMAGES_KEY: &str = "images";
/// Where images go when neither `--out` nor `--raw-out` is given.
pub const DEFAULT_OUT: &str = "sample.png";

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{path}: {reason}")]
    Prompts { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Latents { path: PathBuf, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// What to sample and where to write it (the command line, parsed).
#[derive(Debug, Clone)]
pub struct SampleRequest {
    pub model: SampleModel,
    pub prompts: Vec<String>,
    /// DDIM steps of a teacher.
    pub steps: i64,
    /// A student's steps (a few-step student's first `n` steps; at most
    /// what it was trained for). None: all of them (1 for SwiftBrush).
    pub student_steps: Option<usize>,
    pub guidance: f64,
    /// Seeds the initial noise when `latents` is None.
    pub seed: u64,
    /// A safetensors file with `latents` [B,C,h,w] used as initial noise.
    pub latents: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub raw_out: Option<PathBuf>,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Text encoder and UNet dtype (the VAE: see `pipeline::components`).
    pub dtype: Dtype,
    /// Prompts per sampling pass (bounds memory, not the result).
    pub batch_size: usize,
    pub height: Option<i64>,
    pub width: Option<i64>,
}

/// Which model draws.
#[derive(Debug, Clone)]
pub enum SampleModel {
    /// A diffusers folder, sampled with DDIM (`steps`, `guidance`).
    Teacher(PathBuf),
    /// A student: a run directory (its newest valid checkpoint),
    /// `RUN/checkpoints/step-N`, or an exported pipeline folder; one step.
    /// `teacher` overrides the teacher folder the run recorded (for the
    /// text encoder, tokenizer and VAE).
    Student {
        path: String,
        teacher: Option<PathBuf>,
    },
}

impl SampleModel {
    pub fn describe(&self) -> String {
        match self {
            SampleModel::Teacher(p) => format!("teacher {}", p.display()),
            SampleModel::Student { path, .. } => format!("student {path}"),
        }
    }
}

/// What [`sample_teacher`] did.
#[derive(Debug, Clone)]
pub struct SampleReport {
    pub written: Vec<PathBuf>,
    pub num_images: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// What was loaded, in words (see [`Drawn::loaded`]).
    pub loaded: String,
    pub load_seconds: f64,
    /// Wall time of sampling and decoding divided by the number of images.
    pub seconds_per_image: f64,
}

/// One prompt a line; blank lines are skipped (a line of spaces is not a
/// prompt anyone means), trailing `\r` removed.
pub fn read_prompts(path: &Path) -> Result<Vec<String>, SampleError> {
    let bad = |reason: String| SampleError::Prompts {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let prompts: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if prompts.is_empty() {
        return Err(bad("no prompts (one prompt a line)".into()));
    }
    Ok(prompts)
}

/// The `latents` tensor [B,C,h,w] of a safetensors file, as float32 on
/// the CPU.
pub fn read_latents(path: &Path) -> Result<Tensor, SampleError> {
    let bad = |reason: String| SampleError::Latents {
        path: path.to_owned(),
        reason,
    };
    let tensors = Tensor::read_safetensors(path).map_err(|e| bad(e.to_string()))?;
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let (_, latents) = tensors
        .iter()
        .find(|(n, _)| n == LATENTS_KEY)
        .ok_or_else(|| {
            bad(format!(
                "no tensor named `{LATENTS_KEY}` (tensors in the file: {names:?})"
            ))
        })?;
    if latents.dim() != 4 || !latents.is_floating_point() {
        return Err(bad(format!(
            "`{LATENTS_KEY}` must be a float tensor [batch, channels, height, width], \
             got {:?} {:?}",
            latents.kind(),
            latents.size()
        )));
    }
    Ok(latents.f_to_kind(Kind::Float)?)
}

/// Fails early (before any model is loaded) on an output whose folder does
/// not exist.
fn check_writable(path: &Path) -> Result<(), SampleError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if parent.is_dir() {
        Ok(())
    } else {
        Err(SampleError::Write {
            path: path.to_owned(),
            reason: format!("{} is not a directory", parent.display()),
        })
    }
}

/// Samples the teacher and writes the requested files.
pub fn sample_teacher(req: &SampleRequest) -> Result<SampleReport, SampleError> {
    let out = match (&req.out, &req.raw_out) {
        (None, None) => Some(PathBuf::from(DEFAULT_OUT)),
        (out, _) => out.clone(),
    };
    for path in out.iter().chain(req.raw_out.iter()) {
        check_writable(path)?;
    }
    let mut images = Vec::new();
    let drawn = draw_in_batches(req, |_, _, imgs| {
        images.push(imgs.shallow_clone());
        Ok::<(), SampleError>(())
    })?;
    let images = Tensor::f_cat(&images, 0)?;
    let num = req.prompts.len();

    let mut written = Vec::new();
    if let Some(path) = &out {
        save_png(&images, path, grid_columns(num))?;
        written.push(path.clone());
    }
    if let Some(path) = &req.raw_out {
        Tensor::write_safetensors(&[(IMAGES_KEY, images.f_contiguous()?)], path).map_err(|e| {
            SampleError::Write {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        written.push(path.clone());
    }
    Ok(SampleReport {
        written,
        num_images: num,
        device: drawn.device,
        loaded: drawn.loaded,
        load_seconds: drawn.load_seconds,
        seconds_per_image: drawn.seconds_per_image,
    })
}

/// What [`draw_in_batches`] did, besides handing out the pictures.
#[derive(Debug, Clone)]
pub struct Drawn {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// What was loaded, in words: `teacher DIR`, `student RUN (checkpoint
    /// step 8, EMA weights)`, ...
    pub loaded: String,
    pub load_seconds: f64,
    /// Wall time of sampling, decoding and the callback per image.
    pub seconds_per_image: f64,
}

/// Loads the request's model and draws its prompts `batch_size` at a time,
/// handing each batch's pictures ([b,3,H,W] in [0,1], on the CPU) to `each`
/// with the index of its first prompt and its prompts, then drops them: a
/// long prompt list never holds more than one batch of pictures. The noise
/// is the whole list's (seeded as `sample` seeds it), so a picture does not
/// depend on the batch size.
/// `each`'s own error type passes through (a scorer's, say), so stopping
/// at its first error needs nothing more than `?`.
pub fn draw_in_batches<E: From<SampleError>>(
    req: &SampleRequest,
    mut each: impl FnMut(usize, &[String], &Tensor) -> Result<(), E>,
) -> Result<Drawn, E> {
    let PreparedDraw {
        pipe,
        one_step,
        chain,
        latents,
        device,
        loaded,
        load_seconds,
    } = prepare_draw(req)?;
    let started = Instant::now();
    for (i, chunk) in req.prompts.chunks(req.batch_size).enumerate() {
        let start = i * req.batch_size;
        let imgs = (|| -> Result<Tensor, SampleError> {
            let part = latents.f_narrow(0, start as i64, chunk.len() as i64)?;
            let imgs = match (&one_step, &chain) {
                (_, Some(c)) => {
                    let noises: Vec<Tensor> = c
                        .noises
                        .iter()
                        .map(|e| e.f_narrow(0, start as i64, chunk.len() as i64))
                        .collect::<Result<_, _>>()?;
                    pipe.sample_few_step(chunk, &part, &noises, &c.chain, c.steps)?
                }
                (Some(o), None) => {
                    pipe.sample_one_step(chunk, &part, o.student_timestep, o.student_alpha_bar)?
                }
                (None, None) => pipe.sample_teacher(chunk, &part, req.steps, req.guidance)?,
            };
            Ok(imgs.f_to_device(Device::Cpu)?)
        })()?;
        each(start, chunk, &imgs)?;
    }
    Ok(Drawn {
        device: match device {
            Device::Cuda(n) => format!("cuda:{n}"),
            other => format!("{other:?}").to_lowercase(),
        },
        loaded,
        load_seconds,
        seconds_per_image: started.elapsed().as_secs_f64() / req.prompts.len() as f64,
    })
}

/// Everything `draw_in_batches` checks and loads before the first batch.
struct PreparedDraw {
    pipe: AnyPipeline,
    /// A student's one-step settings (None: the teacher, with DDIM).
    one_step: Option<OneStep>,
    /// A few-step student's chain, its noise and the steps drawn (None:
    /// a one-step student draws with `one_step` alone).
    chain: Option<ChainDraw>,
    /// The whole prompt list's noise.
    latents: Tensor,
    device: Device,
    /// What was loaded, in words (see [`load_model_described`]).
    loaded: String,
    load_seconds: f64,
}

fn prepare_draw(req: &SampleRequest) -> Result<PreparedDraw, SampleError> {
    if req.prompts.is_empty() {
        return Err(SampleError::Input("no prompts given".into()));
    }
    if req.batch_size == 0 {
        return Err(SampleError::Input("batch size must be at least 1".into()));
    }
    let num = req.prompts.len();
    let given_latents = match &req.latents {
        Some(path) => {
            let latents = read_latents(path)?;
            let b = latents.size()[0];
            if b != num as i64 {
                return Err(SampleError::Latents {
                    path: path.clone(),
                    reason: format!(
                        "`{LATENTS_KEY}` holds {b} sample(s) but {num} prompt(s) were given"
                    ),
                });
            }
            Some(latents)
        }
        None => None,
    };
    let device = parse_device(&req.device)?;

    let started = Instant::now();
    let (pipe, one_step, loaded) = load_model_described(&req.model, device, kind_of(req.dtype))?;
    let load_seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        model = %loaded,
        ?device,
        seconds = format!("{load_seconds:.2}"),
        "model loaded"
    );

    let latents = match given_latents {
        Some(latents) => {
            check_size(&pipe, &latents, req)?;
            pipe.check_latents(&latents, num)
                .map_err(|e| SampleError::Latents {
                    path: req.latents.clone().unwrap_or_default(),
                    reason: e.to_string(),
                })?;
            latents
        }
        None => {
            let (height, width) = match (req.height, req.width, pipe.default_size()) {
                (Some(h), Some(w), _) => (h, w),
                (h, w, Some((dh, dw))) => (h.unwrap_or(dh), w.unwrap_or(dw)),
                (_, _, None) => {
                    return Err(SampleError::Input(
                        "the UNet config has no sample_size: pass --height and --width".into(),
                    ));
                }
            };
            draw_latents(req.seed, &pipe.latent_shape(num as i64, height, width)?)?
        }
    };
    let chain = match &one_step {
        Some(o) => chain_draw(&pipe, o, req, &latents)?,
        None => None,
    };
    Ok(PreparedDraw {
        pipe,
        one_step,
        chain,
        latents,
        device,
        loaded,
        load_seconds,
    })
}

/// A few-step student's draw: its chain, the steps drawn and the
/// re-noising noise of the whole prompt list.
struct ChainDraw {
    chain: StudentChain,
    steps: usize,
    noises: Vec<Tensor>,
}

/// The chain a student `o` draws through, when it has more than one step
/// (or `--steps` asks a one-step student for more, which is refused):
/// `req.student_steps` of them (all by default), with noise seeded by
/// `--seed` after the latents (`draw_chain_noise`), or from the seed alone
/// when latents were given: what diffusers' pipeline with that
/// generator draws.
fn chain_draw(
    pipe: &AnyPipeline,
    o: &OneStep,
    req: &SampleRequest,
    latents: &Tensor,
) -> Result<Option<ChainDraw>, SampleError> {
    let trained = o.steps().len();
    let steps = req.student_steps.unwrap_or(trained);
    if steps == 0 || steps > trained {
        return Err(SampleError::Input(format!(
            "--steps {steps}: this student was trained for {trained} step(s) \
             (its timesteps {:?}); draw it with 1..={trained} steps",
            o.steps()
        )));
    }
    if trained == 1 {
        return Ok(None);
    }
    let schedule = NoiseSchedule::new(pipe.scheduler(), Device::Cpu)
        .map_err(|e| SampleError::Input(e.to_string()))?;
    let chain = o
        .chain(&schedule)
        .map_err(student_error)?
        .ok_or_else(|| SampleError::Input("a few-step student without a chain".into()))?;
    let shape = latents.size();
    let noises = match req.latents {
        Some(_) => draw_renoise(req.seed, &shape, steps)?,
        None => draw_chain_noise(req.seed, &shape, steps)?.1,
    };
    Ok(Some(ChainDraw {
        chain,
        steps,
        noises,
    }))
}

/// The pipeline to draw with, and for a student its one-step settings
/// (with the alpha-bar resolved from the schedule when the run asked so).
/// An SD 1.x/2.x model only (the toy world's evaluation).
pub fn load_model(
    model: &SampleModel,
    device: Device,
    kind: Kind,
) -> Result<(StableDiffusion, Option<OneStep>), SampleError> {
    match load_model_described(model, device, kind)? {
        (AnyPipeline::Sd(pipe), one_step, _) => Ok((*pipe, one_step)),
        (AnyPipeline::Xl(_), _, what) => Err(SampleError::Input(format!(
            "{what} is a Stable Diffusion XL pipeline; this command takes SD 1.x/2.x only"
        ))),
    }
}

/// As [`load_model`], with what was loaded in words: `teacher DIR`,
/// `student RUN (checkpoint step 8, EMA weights)` or `student DIR
/// (exported pipeline, swiftbrush.json)`.
pub fn load_model_described(
    model: &SampleModel,
    device: Device,
    kind: Kind,
) -> Result<(AnyPipeline, Option<OneStep>, String), SampleError> {
    match model {
        SampleModel::Teacher(dir) => Ok((
            AnyPipeline::load(dir, device, kind)?,
            None,
            model.describe(),
        )),
        SampleModel::Student { path, teacher } => {
            let dir = Path::new(path);
            let (pipe, mut one_step, what) = if dir.join("model_index.json").is_file() {
                let one_step = OneStep::from_export(dir).map_err(student_error)?;
                let what = format!("student {path} (exported pipeline, {ONE_STEP_FILE})");
                (AnyPipeline::load(dir, device, kind)?, one_step, what)
            } else {
                let ckpt = StudentCheckpoint::open(path).map_err(student_error)?;
                let folder = ckpt.teacher(teacher.as_deref()).map_err(student_error)?;
                // The conditions the run's own samples were drawn with: its
                // text encoder dtype, unless --dtype asks for half precision
                // throughout.
                let text_kind = match kind {
                    Kind::Float => kind_of(ckpt.text_encoder_dtype().map_err(student_error)?),
                    other => other,
                };
                let mut pipe =
                    AnyPipeline::load_with_text_kind(folder.root(), device, kind, text_kind)?;
                let bytes = ckpt.weights(StudentWeights::Ema).map_err(student_error)?;
                let what = format!("{path}: checkpoint step {} EMA weights", ckpt.manifest.step);
                let tensors = tensor_bytes::from_bytes(&bytes, &what)
                    .map_err(|e| SampleError::Input(e.to_string()))?;
                match ckpt.student_lora().map_err(student_error)? {
                    // A LoRA student: the teacher's UNet with the EMA
                    // adapters attached, its only set (on in every pass).
                    Some(spec) => {
                        let unet = pipe.unet_mut();
                        let device = unet.vs.device();
                        let mut set = crate::lora::attach_lora(&mut unet.model, &spec, device)
                            .map_err(|e| SampleError::Input(format!("{what}: {e}")))?;
                        // The layers hold the adapters' tensors: they
                        // outlive the set's store.
                        set.load(&tensors)
                            .map_err(|e| SampleError::Input(format!("{what}: {e}")))?;
                    }
                    None => {
                        weights::load_tensors_strict(pipe.unet_vs_mut(), tensors, &[what.into()])
                            .map_err(|e| SampleError::Input(e.to_string()))?
                    }
                }
                let what = format!(
                    "student {path} (checkpoint step {}, EMA weights)",
                    ckpt.manifest.step
                );
                (pipe, ckpt.one_step().map_err(student_error)?, what)
            };
            if one_step.alpha_bar_from_schedule {
                let schedule = NoiseSchedule::new(pipe.scheduler(), Device::Cpu)
                    .map_err(|e| SampleError::Input(e.to_string()))?;
                one_step.student_alpha_bar = schedule
                    .alpha_bar(one_step.student_timestep)
                    .map_err(|e| SampleError::Input(e.to_string()))?;
            }
            Ok((pipe, Some(one_step), what))
        }
    }
}

fn student_error(e: crate::export::ExportError) -> SampleError {
    SampleError::Input(e.to_string())
}

/// Given latents fix the image size; explicit --height/--width must agree.
fn check_size(
    pipe: &AnyPipeline,
    latents: &Tensor,
    req: &SampleRequest,
) -> Result<(), SampleError> {
    let size = latents.size();
    let f = pipe.vae_scale_factor();
    let (h, w) = (size[2] * f, size[3] * f);
    let disagree = req.height.is_some_and(|x| x != h) || req.width.is_some_and(|x| x != w);
    if disagree {
        return Err(SampleError::Input(format!(
            "the latents {size:?} make {h}x{w} images, but --height/--width ask for {}x{}",
            req.height.unwrap_or(h),
            req.width.unwrap_or(w)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_file_skips_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.txt");
        std::fs::write(&p, "a cat\r\n\n  \na dog\n").unwrap();
        assert_eq!(read_prompts(&p).unwrap(), ["a cat", "a dog"]);
        std::fs::write(&p, "\n\n").unwrap();
        let e = read_prompts(&p).unwrap_err().to_string();
        assert!(e.contains("no prompts"), "{e}");
    }

    #[test]
    fn latents_file_needs_a_4d_float_tensor_named_latents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.safetensors");
        let t = Tensor::zeros([2, 4, 8], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&[("latents", &t)], &p).unwrap();
        let e = read_latents(&p).unwrap_err().to_string();
        assert!(e.contains("[2, 4, 8]"), "{e}");
        Tensor::write_safetensors(&[("noise", &t)], &p).unwrap();
        let e = read_latents(&p).unwrap_err().to_string();
        assert!(
            e.contains("no tensor named `latents`") && e.contains("noise"),
            "{e}"
        );
        let t = Tensor::zeros([1, 4, 2, 2], (Kind::Half, Device::Cpu));
        Tensor::write_safetensors(&[("latents", &t)], &p).unwrap();
        assert_eq!(read_latents(&p).unwrap().kind(), Kind::Float);
    }
}
