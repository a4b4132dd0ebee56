//! The teacher as diffusers' StableDiffusionPipeline runs it: tokenizer,
//! CLIP text encoder, UNet, VAE and scheduler config loaded strictly from a
//! diffusers folder, prompt encoding with the empty prompt as the null
//! condition, DDIM sampling with classifier-free guidance, and decoding to
//! images in [0, 1].
//!
//! A pixel-space pipeline (the toy world: model_index.json lists no `vae`)
//! decodes nothing: its latents are the image in [-1, 1].

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::components::{ComponentError, TextEncoder, Vae};
use super::folder::{DiffusersFolder, FolderError};
use super::unet::{UNet, UNetError};
use crate::diffusion::{
    DDIMScheduler, OneStepDraw, ScheduleError, SchedulerConfig, guide_batched, one_step_x0,
};
use crate::models::tokenizer::{ClipTokenizer, TokenizerError};
use crate::models::unet_2d_condition::OneOrMany;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Not a pipeline folder, or a component it needs is absent.
    #[error(transparent)]
    Folder(#[from] FolderError),
    /// A component is present but cannot be loaded.
    #[error("cannot load the pipeline's `{component}`: {cause}")]
    Load {
        component: &'static str,
        cause: LoadCause,
    },
    /// Components that load but do not fit together.
    #[error("{}: the components do not fit together: {message}", .dir.display())]
    Mismatch { dir: PathBuf, message: String },
    /// Inputs to sampling that cannot work with this pipeline.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// What went wrong inside one component.
#[derive(Debug, thiserror::Error)]
pub enum LoadCause {
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error(transparent)]
    UNet(#[from] UNetError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
}

pub(super) fn load_err<E: Into<LoadCause>>(
    component: &'static str,
) -> impl FnOnce(E) -> PipelineError {
    move |e| PipelineError::Load {
        component,
        cause: e.into(),
    }
}

/// Text embeddings for a batch and the null condition, both [B, L, D].
#[derive(Debug)]
pub struct PromptEmbeddings {
    pub cond: Tensor,
    /// The empty prompt's embedding repeated B times (diffusers encodes
    /// B empty strings; the rows are identical).
    pub uncond: Tensor,
}

/// A loaded Stable Diffusion pipeline (frozen, inference only).
pub struct StableDiffusion {
    pub folder: DiffusersFolder,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: TextEncoder,
    pub unet: UNet,
    /// None for a pixel-space pipeline (no `vae` in model_index.json).
    pub vae: Option<Vae>,
    pub scheduler: SchedulerConfig,
    device: Device,
    kind: Kind,
}

impl StableDiffusion {
    /// Loads every component of the folder at `dir` strictly, on `device`,
    /// with the text encoder and the UNet in `kind` (the VAE: see
    /// [`Vae::load`]). A `vae` that model_index.json lists must be present.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, PipelineError> {
        Self::load_with_text_kind(dir, device, kind, kind)
    }

    /// [`Self::load`] with the text encoder in `text_kind` (a student
    /// trained with `precision.text_encoder_dtype`); its states are then
    /// handed on in `kind`, as the trainer hands its conditions on in
    /// float32.
    pub fn load_with_text_kind(
        dir: &Path,
        device: Device,
        kind: Kind,
        text_kind: Kind,
    ) -> Result<Self, PipelineError> {
        let folder = DiffusersFolder::open(dir)?;
        let tokenizer = ClipTokenizer::from_dir(&folder.component("tokenizer")?.dir)
            .map_err(load_err("tokenizer"))?;
        let scheduler_dir = folder.component("scheduler")?.dir;
        let scheduler = SchedulerConfig::from_file(&scheduler_dir.join("scheduler_config.json"))
            .map_err(load_err("scheduler"))?;
        let text_encoder = TextEncoder::load(&folder.component("text_encoder")?, device, text_kind)
            .map_err(load_err("text_encoder"))?;
        folder.component("unet")?;
        let unet = UNet::load_as(&folder, device, kind).map_err(load_err("unet"))?;
        // A pipeline without a VAE does not list one; a listed VAE whose
        // folder is gone is a broken download, not a pixel-space model.
        let vae = if folder.component_class("vae").is_some() {
            Some(Vae::load(&folder.component("vae")?, device, kind).map_err(load_err("vae"))?)
        } else {
            None
        };
        let pipeline = Self {
            folder,
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            device,
            kind,
        };
        pipeline.check_fit()?;
        Ok(pipeline)
    }

    /// Shapes that must agree between components (each loaded alone).
    fn check_fit(&self) -> Result<(), PipelineError> {
        let unet = &self.unet.config;
        let hidden = self.text_encoder.config.hidden_size;
        let cross = match &unet.cross_attention_dim {
            OneOrMany::One(d) => vec![*d],
            OneOrMany::Many(ds) => ds.clone(),
        };
        let mut problems = Vec::new();
        if cross.iter().any(|d| *d != hidden) {
            problems.push(format!(
                "the text encoder's hidden_size is {hidden} but the unet's \
                 cross_attention_dim is {cross:?}"
            ));
        }
        if unet.out_channels != unet.in_channels {
            problems.push(format!(
                "the unet has in_channels {} but out_channels {}: it cannot denoise its own input",
                unet.in_channels, unet.out_channels
            ));
        }
        if let Some(vae) = &self.vae
            && vae.config.latent_channels != unet.in_channels
        {
            problems.push(format!(
                "the vae's latent_channels is {} but the unet's in_channels is {}",
                vae.config.latent_channels, unet.in_channels
            ));
        }
        if self.tokenizer.max_length() as i64 > self.text_encoder.config.max_position_embeddings {
            problems.push(format!(
                "the tokenizer's model_max_length is {} but the text encoder has {} positions",
                self.tokenizer.max_length(),
                self.text_encoder.config.max_position_embeddings
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PipelineError::Mismatch {
                dir: self.folder.root().to_owned(),
                message: problems.join("; "),
            })
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The teacher's identity (see [`super::fingerprint`]), for checkpoints.
    pub fn fingerprint(&self) -> Result<String, super::FingerprintError> {
        super::teacher_fingerprint(self.folder.root())
    }

    /// The dtype of the text encoder and the UNet.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Channels of the latents the UNet denoises.
    pub fn latent_channels(&self) -> i64 {
        self.unet.config.in_channels
    }

    /// Pixels per latent along each side (1 without a VAE), as diffusers'
    /// `vae_scale_factor`.
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.as_ref().map_or(1, Vae::scale_factor)
    }

    /// The default image size (height, width) in pixels: the UNet's
    /// `sample_size` times the VAE scale factor, as diffusers computes it;
    /// None when the UNet config has no sample_size.
    pub fn default_size(&self) -> Option<(i64, i64)> {
        let f = self.vae_scale_factor();
        match self.unet.config.sample_size.as_ref()? {
            OneOrMany::One(s) => Some((s * f, s * f)),
            OneOrMany::Many(v) => match v.as_slice() {
                [h, w] => Some((h * f, w * f)),
                _ => None,
            },
        }
    }

    /// The latent shape [batch, C, h, w] for an image of height x width
    /// pixels; both must be multiples of the VAE scale factor.
    pub fn latent_shape(
        &self,
        batch: i64,
        height: i64,
        width: i64,
    ) -> Result<[i64; 4], PipelineError> {
        let f = self.vae_scale_factor();
        if height < f || width < f || height % f != 0 || width % f != 0 {
            return Err(PipelineError::Input(format!(
                "height and width must be positive multiples of {f} (the VAE scale factor), \
                 got {height}x{width}"
            )));
        }
        Ok([batch, self.latent_channels(), height / f, width / f])
    }

    /// Last hidden states [B, L, D] for `prompts`, in the pipeline's dtype.
    pub fn encode_prompts<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor, PipelineError> {
        let batch = self.tokenizer.encode_batch(prompts, self.device)?;
        let hidden = tch::no_grad(|| self.text_encoder.model.f_forward(&batch.input_ids))?;
        // In `kind` whatever the encoder's (libtorch's no-op where they agree).
        Ok(hidden.f_to_kind(self.kind)?)
    }

    /// Embeddings of `prompts` and of the null condition (the empty
    /// prompt), from one text-encoder pass.
    pub fn encode_with_null<S: AsRef<str>>(
        &self,
        prompts: &[S],
    ) -> Result<PromptEmbeddings, PipelineError> {
        let mut texts: Vec<&str> = prompts.iter().map(AsRef::as_ref).collect();
        texts.push("");
        let all = self.encode_prompts(&texts)?;
        let b = prompts.len() as i64;
        let cond = all.f_narrow(0, 0, b)?;
        let uncond = all.f_narrow(0, b, 1)?.f_expand([b, -1, -1], false)?;
        Ok(PromptEmbeddings { cond, uncond })
    }

    /// Checks that `latents` can be denoised with `num_prompts` prompts.
    pub fn check_latents(&self, latents: &Tensor, num_prompts: usize) -> Result<(), PipelineError> {
        let size = latents.size();
        let c = self.latent_channels();
        match size.as_slice() {
            [b, ch, h, w] if *b == num_prompts as i64 && *ch == c && *h > 0 && *w > 0 => Ok(()),
            _ => Err(PipelineError::Input(format!(
                "latents must have shape [{num_prompts}, {c}, h, w] ({num_prompts} prompt(s), \
                 {c} latent channels), got {size:?}"
            ))),
        }
    }

    /// Images [B, 3, H, W] in [0, 1] (float32, on the pipeline's device)
    /// from `latents` [B, C, h, w] (the initial noise, any float dtype and
    /// device), exactly as diffusers' StableDiffusionPipeline with a
    /// DDIMScheduler (eta 0): latents times init_noise_sigma; per step the
    /// UNet on cat([latents] * 2) with cat([uncond, cond]), guidance, one
    /// DDIM step with the scheduler's prediction_type; then decoding. No
    /// guidance (a single batch) when `guidance_scale` <= 1.
    pub fn sample_ddim<S: AsRef<str>>(
        &self,
        prompts: &[S],
        latents: &Tensor,
        num_inference_steps: i64,
        guidance_scale: f64,
    ) -> Result<Tensor, PipelineError> {
        if prompts.is_empty() {
            return Err(PipelineError::Input("no prompts to sample".into()));
        }
        if !guidance_scale.is_finite() {
            return Err(PipelineError::Input(format!(
                "guidance scale must be a finite number, got {guidance_scale}"
            )));
        }
        self.check_latents(latents, prompts.len())?;
        let scheduler = DDIMScheduler::new(&self.scheduler, num_inference_steps, self.device)?;
        let guided = guidance_scale > 1.0;
        tch::no_grad(|| {
            let context = if guided {
                let e = self.encode_with_null(prompts)?;
                Tensor::f_cat(&[&e.uncond, &e.cond], 0)?
            } else {
                self.encode_prompts(prompts)?
            };
            let latents = latents.f_to_device(self.device)?.f_to_kind(self.kind)?;
            let latents =
                scheduler.sample(&latents, |x, timestep| -> Result<_, PipelineError> {
                    let input = if guided {
                        Tensor::f_cat(&[x, x], 0)?
                    } else {
                        x.shallow_clone()
                    };
                    let output = self.unet.model.f_forward(&input, timestep, &context)?;
                    Ok(if guided {
                        guide_batched(&output, guidance_scale)?
                    } else {
                        output
                    })
                })?;
            self.decode(&latents)
        })
    }

    /// SwiftBrush's one-step sampling (shared/SPEC.md, "Inference"): one
    /// UNet pass at `timestep` on the noise `z`, the output as epsilon,
    /// x0 = (z - sqrt(1 - A) eps) / sqrt(A), decoded. No guidance.
    pub fn sample_one_step<S: AsRef<str>>(
        &self,
        prompts: &[S],
        z: &Tensor,
        timestep: i64,
        alpha_bar: f64,
    ) -> Result<Tensor, PipelineError> {
        if prompts.is_empty() {
            return Err(PipelineError::Input("no prompts to sample".into()));
        }
        if !(alpha_bar > 0.0 && alpha_bar < 1.0) {
            return Err(PipelineError::Input(format!(
                "the student's alpha-bar must be in (0, 1), got {alpha_bar}"
            )));
        }
        self.check_latents(z, prompts.len())?;
        tch::no_grad(|| {
            let cond = self.encode_prompts(prompts)?;
            let z = z.f_to_device(self.device)?.f_to_kind(Kind::Float)?;
            let draw = OneStepDraw {
                timestep,
                alpha_bar,
                prediction: self.scheduler.prediction()?,
            };
            self.decode(&one_step_x0(&self.unet, &z, &cond, &draw)?)
        })
    }

    /// Latents [B, C, h, w] (as the UNet sees them) -> images [B, 3, H, W]
    /// in [0, 1], float32: `vae.decode(latents / scaling_factor)`, or the
    /// latents themselves without a VAE; then (x / 2 + 0.5).clamp(0, 1).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        self.check_latents(
            latents,
            latents.size().first().copied().unwrap_or(0) as usize,
        )?;
        Ok(super::components::decode_images(
            self.vae.as_ref(),
            latents,
        )?)
    }
}
