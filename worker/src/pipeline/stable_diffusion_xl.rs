//! The SDXL teacher as diffusers' StableDiffusionXLPipeline runs it
//! (shared/SPEC.md, "SDXL (diffusers layout)"): two tokenizers and text
//! encoders whose penultimate hidden states are concatenated, the second
//! encoder's projected pooled output, the micro-conditioning `add_time_ids`
//! (original size, crop top-left, target size), the null condition as zeros
//! where model_index.json sets `force_zeros_for_empty_prompt` (else the
//! encoding of ""), sampling with the folder's DDIMScheduler or
//! EulerDiscreteScheduler, and decoding as for SD 1/2.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::components::Vae;
use super::folder::DiffusersFolder;
use super::stable_diffusion::{PipelineError, load_err};
use super::unet::UNet;
pub use super::xl_text::{XlCondition, XlTextEncoders};
use crate::diffusion::{
    DDIMScheduler, EulerDiscreteScheduler, EulerOptions, OneStepDraw, ScheduleError,
    SchedulerConfig, guide_batched, one_step_x0,
};
use crate::models::text_time_embedding::AddedConditions;
use crate::models::unet_2d_condition::OneOrMany;

/// The class model_index.json records for an SDXL pipeline.
pub const SDXL_PIPELINE_CLASS: &str = "StableDiffusionXLPipeline";

/// The samplers an SDXL folder may name.
#[derive(Debug, Clone, PartialEq)]
pub enum XlSampler {
    Ddim,
    Euler(EulerOptions),
    /// LCMScheduler, which `export --pipeline` writes for a student: its
    /// schedule serves the student's own draw (`sample --student`); the
    /// teacher's multi-step sampling on it is refused.
    StudentOnly,
}

/// A loaded SDXL pipeline (frozen, inference only).
pub struct StableDiffusionXL {
    pub folder: DiffusersFolder,
    pub text: XlTextEncoders,
    pub unet: UNet,
    pub vae: Vae,
    pub scheduler: SchedulerConfig,
    pub sampler: XlSampler,
    device: Device,
    kind: Kind,
}

/// Whether the folder at `dir` holds an SDXL pipeline (by its
/// model_index.json class, or a `text_encoder_2` beside the UNet).
pub fn is_sdxl_folder(folder: &DiffusersFolder) -> bool {
    folder.class_name() == Some(SDXL_PIPELINE_CLASS)
        || folder.component_class("text_encoder_2").is_some()
}

impl StableDiffusionXL {
    /// Loads every component strictly, on `device`, the text encoders and
    /// the UNet in `kind` (the VAE: see [`Vae::load`]).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, PipelineError> {
        Self::load_with_text_kind(dir, device, kind, kind)
    }

    /// [`Self::load`] with both text encoders in `text_kind` (a student
    /// trained with `precision.text_encoder_dtype`); their outputs and
    /// the time ids are then handed on in `kind`.
    pub fn load_with_text_kind(
        dir: &Path,
        device: Device,
        kind: Kind,
        text_kind: Kind,
    ) -> Result<Self, PipelineError> {
        let folder = DiffusersFolder::open(dir)?;
        let scheduler_dir = folder.component("scheduler")?.dir;
        let scheduler_file = scheduler_dir.join("scheduler_config.json");
        let scheduler =
            SchedulerConfig::from_file(&scheduler_file).map_err(load_err("scheduler"))?;
        let sampler = match folder.component_class("scheduler") {
            Some("DDIMScheduler") => XlSampler::Ddim,
            Some("EulerDiscreteScheduler") => XlSampler::Euler(
                EulerOptions::from_file(&scheduler_file).map_err(load_err("scheduler"))?,
            ),
            Some("LCMScheduler") => XlSampler::StudentOnly,
            other => {
                return Err(PipelineError::Load {
                    component: "scheduler",
                    cause: ScheduleError::Invalid(format!(
                        "{}: scheduler class {other:?} is not supported for SDXL \
                         (supported: EulerDiscreteScheduler, DDIMScheduler)",
                        folder.root().join("model_index.json").display()
                    ))
                    .into(),
                });
            }
        };
        let text = XlTextEncoders::load(&folder, device, text_kind)?;
        folder.component("unet")?;
        let unet = UNet::load_as(&folder, device, kind).map_err(load_err("unet"))?;
        let vae = Vae::load(&folder.component("vae")?, device, kind).map_err(load_err("vae"))?;
        let pipeline = Self {
            folder,
            text,
            unet,
            vae,
            scheduler,
            sampler,
            device,
            kind,
        };
        pipeline.check_fit()?;
        Ok(pipeline)
    }

    fn check_fit(&self) -> Result<(), PipelineError> {
        let unet = &self.unet.config;
        let (h1, h2) = (
            self.text.text_encoder.config.hidden_size,
            self.text.text_encoder_2.model.config.hidden_size,
        );
        let mut problems = Vec::new();
        let cross = match &unet.cross_attention_dim {
            OneOrMany::One(d) => vec![*d],
            OneOrMany::Many(ds) => ds.clone(),
        };
        if cross.iter().any(|d| *d != h1 + h2) {
            problems.push(format!(
                "the text encoders' hidden sizes {h1} + {h2} do not make the unet's \
                 cross_attention_dim {cross:?}"
            ));
        }
        match unet.text_time() {
            Ok(Some(dims)) => {
                let p = self.text.pooled_dim();
                if dims.pooled_dim() != p {
                    problems.push(format!(
                        "text_encoder_2's projection_dim is {p} but the unet's \
                         projection_class_embeddings_input_dim {} minus 6 x \
                         addition_time_embed_dim {} is {}",
                        dims.input_dim,
                        dims.time_embed_dim,
                        dims.pooled_dim()
                    ));
                }
            }
            _ => problems
                .push("the unet has no addition_embed_type \"text_time\": not an SDXL UNet".into()),
        }
        if self.vae.config.latent_channels != unet.in_channels {
            problems.push(format!(
                "the vae's latent_channels is {} but the unet's in_channels is {}",
                self.vae.config.latent_channels, unet.in_channels
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

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn root(&self) -> PathBuf {
        self.folder.root().to_owned()
    }

    /// Pixels per latent along each side.
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.scale_factor()
    }

    /// `prompt_embeds` (both encoders' penultimate states, concatenated)
    /// and `pooled_prompt_embeds` for `prompts`, in the pipeline's dtype.
    pub fn encode_prompts<S: AsRef<str>>(
        &self,
        prompts: &[S],
    ) -> Result<XlCondition, PipelineError> {
        let c = self.text.encode(prompts)?.0;
        Ok(XlCondition {
            hidden: c.hidden.f_to_kind(self.kind)?,
            pooled: c.pooled.f_to_kind(self.kind)?,
        })
    }

    /// The null condition shaped like `cond` (see [`XlTextEncoders::null_condition`]).
    pub fn null_condition(&self, cond: &XlCondition) -> Result<XlCondition, PipelineError> {
        let c = self.text.null_condition(cond)?;
        Ok(XlCondition {
            hidden: c.hidden.f_to_kind(self.kind)?,
            pooled: c.pooled.f_to_kind(self.kind)?,
        })
    }

    /// diffusers' `_get_add_time_ids` (see [`XlTextEncoders::add_time_ids`]).
    pub fn add_time_ids(
        &self,
        batch: i64,
        height: i64,
        width: i64,
    ) -> Result<Tensor, tch::TchError> {
        self.text
            .add_time_ids(batch, height, width)?
            .f_to_kind(self.kind)
    }

    /// The default image size (height, width): sample_size times the VAE
    /// scale factor, as diffusers' `default_sample_size * vae_scale_factor`.
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

    /// Checks that `latents` can be denoised with `num_prompts` prompts.
    pub fn check_latents(&self, latents: &Tensor, num_prompts: usize) -> Result<(), PipelineError> {
        let size = latents.size();
        let c = self.unet.config.in_channels;
        match size.as_slice() {
            [b, ch, h, w] if *b == num_prompts as i64 && *ch == c && *h > 0 && *w > 0 => Ok(()),
            _ => Err(PipelineError::Input(format!(
                "latents must have shape [{num_prompts}, {c}, h, w] ({num_prompts} prompt(s), \
                 {c} latent channels), got {size:?}"
            ))),
        }
    }

    /// Images [B, 3, H, W] in [0, 1] (float32) from the initial noise
    /// `latents` [B, C, h, w], exactly as StableDiffusionXLPipeline with the
    /// folder's scheduler: the guided batch is cat([null, cond]) for the
    /// hidden states, the pooled embeddings and the time ids alike; no
    /// guidance when `guidance_scale` <= 1. The time ids use the image
    /// size the latents make.
    pub fn sample<S: AsRef<str>>(
        &self,
        prompts: &[S],
        latents: &Tensor,
        num_inference_steps: i64,
        guidance_scale: f64,
    ) -> Result<Tensor, PipelineError> {
        if prompts.is_empty() {
            return Err(PipelineError::Input("no prompts to sample".into()));
        }
        // Refused before any prompt is encoded.
        if self.sampler == XlSampler::StudentOnly {
            return Err(self.not_a_teacher_sampler());
        }
        if !guidance_scale.is_finite() {
            return Err(PipelineError::Input(format!(
                "guidance scale must be a finite number, got {guidance_scale}"
            )));
        }
        self.check_latents(latents, prompts.len())?;
        let guided = guidance_scale > 1.0;
        let size = latents.size();
        let f = self.vae_scale_factor();
        let b = prompts.len() as i64;
        tch::no_grad(|| {
            let cond = self.encode_prompts(prompts)?;
            let cond = if guided {
                XlCondition::cat(&self.null_condition(&cond)?, &cond)?
            } else {
                cond
            };
            let rows = if guided { 2 * b } else { b };
            let added = AddedConditions {
                text_embeds: cond.pooled.shallow_clone(),
                time_ids: self.add_time_ids(rows, size[2] * f, size[3] * f)?,
            };
            let latents = latents.f_to_device(self.device)?.f_to_kind(self.kind)?;
            let pass = |input: &Tensor, t: &Tensor| -> Result<Tensor, PipelineError> {
                let input = if guided {
                    Tensor::f_cat(&[input, input], 0)?
                } else {
                    input.shallow_clone()
                };
                let out = self
                    .unet
                    .model
                    .f_forward_added(&input, t, &cond.hidden, Some(&added))?;
                Ok(if guided {
                    guide_batched(&out, guidance_scale)?
                } else {
                    out
                })
            };
            let latents = match &self.sampler {
                XlSampler::StudentOnly => return Err(self.not_a_teacher_sampler()),
                XlSampler::Ddim => {
                    DDIMScheduler::new(&self.scheduler, num_inference_steps, self.device)?
                        .sample(&latents, pass)?
                }
                XlSampler::Euler(_) => {
                    let s = EulerDiscreteScheduler::new(&self.scheduler, num_inference_steps)?;
                    let mut x = latents.f_mul_scalar(f64::from(s.init_noise_sigma()))?;
                    for (i, &t) in s.timesteps().iter().enumerate() {
                        let input = s.scale_model_input(&x, i)?;
                        let t = Tensor::from(t as f32).f_to_device(self.device)?;
                        let out = pass(&input, &t)?;
                        x = s.step(&out, i, &x)?;
                    }
                    x
                }
            };
            self.decode(&latents)
        })
    }

    /// The student's one-step draw (as `StableDiffusion::sample_one_step`)
    /// with SDXL's conditions: no guidance, the prompt's pooled embedding
    /// and the time ids of the image size the noise makes.
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
        let size = z.size();
        let f = self.vae_scale_factor();
        tch::no_grad(|| {
            let cond = self.encode_prompts(prompts)?;
            let added = AddedConditions {
                text_embeds: cond.pooled.shallow_clone(),
                time_ids: self.add_time_ids(size[0], size[2] * f, size[3] * f)?,
            };
            let z = z.f_to_device(self.device)?.f_to_kind(Kind::Float)?;
            let draw = OneStepDraw {
                timestep,
                alpha_bar,
                prediction: self.scheduler.prediction()?,
            };
            let student = XlDenoiser {
                unet: &self.unet,
                added: &added,
            };
            self.decode(&one_step_x0(&student, &z, &cond.hidden, &draw)?)
        })
    }

    fn not_a_teacher_sampler(&self) -> PipelineError {
        PipelineError::Input(format!(
            "{}: LCMScheduler is an exported student's scheduler (draw it with \
             sample --student); a teacher's sampling needs EulerDiscreteScheduler \
             or DDIMScheduler",
            self.folder.root().join("model_index.json").display()
        ))
    }

    /// Latents -> images in [0, 1], float32, as for SD 1/2.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        Ok(super::components::decode_images(Some(&self.vae), latents)?)
    }
}

/// An SDXL UNet with its added conditions bound, as a [`crate::diffusion::Denoiser`].
pub struct XlDenoiser<'a> {
    pub unet: &'a UNet,
    pub added: &'a AddedConditions,
}

impl crate::diffusion::Denoiser for XlDenoiser<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Result<Tensor, tch::TchError> {
        let k = self.unet.vs.kind();
        let added = AddedConditions {
            text_embeds: self.added.text_embeds.f_to_kind(k)?,
            time_ids: self.added.time_ids.shallow_clone(),
        };
        self.unet
            .model
            .f_forward_added(&x.f_to_kind(k)?, t, &cond.f_to_kind(k)?, Some(&added))?
            .f_to_kind(Kind::Float)
    }
}
