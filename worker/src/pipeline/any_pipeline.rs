//! A teacher folder of either family, chosen by what the folder holds: an
//! SD 1.x/2.x pipeline ([`StableDiffusion`]) or an SDXL one
//! ([`StableDiffusionXL`], model_index.json's StableDiffusionXLPipeline).
//! `sample` and `eval` draw through this; each family keeps its own code.

use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::folder::DiffusersFolder;
use super::stable_diffusion::{PipelineError, StableDiffusion};
use super::stable_diffusion_xl::{StableDiffusionXL, is_sdxl_folder};
use crate::diffusion::SchedulerConfig;

pub enum AnyPipeline {
    Sd(Box<StableDiffusion>),
    Xl(Box<StableDiffusionXL>),
}

impl AnyPipeline {
    /// Opens the folder and loads it as its family.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, PipelineError> {
        Self::load_with_text_kind(dir, device, kind, kind)
    }

    /// [`Self::load`] with the text encoder(s) in `text_kind`, their
    /// states handed on in `kind`.
    pub fn load_with_text_kind(
        dir: &Path,
        device: Device,
        kind: Kind,
        text_kind: Kind,
    ) -> Result<Self, PipelineError> {
        let folder = DiffusersFolder::open(dir)?;
        Ok(if is_sdxl_folder(&folder) {
            Self::Xl(Box::new(StableDiffusionXL::load_with_text_kind(
                dir, device, kind, text_kind,
            )?))
        } else {
            Self::Sd(Box::new(StableDiffusion::load_with_text_kind(
                dir, device, kind, text_kind,
            )?))
        })
    }

    /// The architecture in words, for logs and `doctor`.
    pub fn architecture(&self) -> &'static str {
        match self {
            Self::Sd(_) => "Stable Diffusion 1.x/2.x",
            Self::Xl(_) => "Stable Diffusion XL",
        }
    }

    pub fn scheduler(&self) -> &SchedulerConfig {
        match self {
            Self::Sd(p) => &p.scheduler,
            Self::Xl(p) => &p.scheduler,
        }
    }

    /// The UNet's weights (a student's are copied in here).
    pub fn unet_vs_mut(&mut self) -> &mut nn::VarStore {
        match self {
            Self::Sd(p) => &mut p.unet.vs,
            Self::Xl(p) => &mut p.unet.vs,
        }
    }

    /// The UNet (a LoRA student's adapters are attached to it).
    pub fn unet_mut(&mut self) -> &mut super::UNet {
        match self {
            Self::Sd(p) => &mut p.unet,
            Self::Xl(p) => &mut p.unet,
        }
    }

    pub fn vae_scale_factor(&self) -> i64 {
        match self {
            Self::Sd(p) => p.vae_scale_factor(),
            Self::Xl(p) => p.vae_scale_factor(),
        }
    }

    pub fn default_size(&self) -> Option<(i64, i64)> {
        match self {
            Self::Sd(p) => p.default_size(),
            Self::Xl(p) => p.default_size(),
        }
    }

    pub fn check_latents(&self, latents: &Tensor, num_prompts: usize) -> Result<(), PipelineError> {
        match self {
            Self::Sd(p) => p.check_latents(latents, num_prompts),
            Self::Xl(p) => p.check_latents(latents, num_prompts),
        }
    }

    /// The latent shape for `batch` images of height x width pixels.
    pub fn latent_shape(
        &self,
        batch: i64,
        height: i64,
        width: i64,
    ) -> Result<[i64; 4], PipelineError> {
        match self {
            Self::Sd(p) => p.latent_shape(batch, height, width),
            Self::Xl(p) => {
                let f = p.vae_scale_factor();
                if height < f || width < f || height % f != 0 || width % f != 0 {
                    return Err(PipelineError::Input(format!(
                        "height and width must be positive multiples of {f} (the VAE scale \
                         factor), got {height}x{width}"
                    )));
                }
                Ok([batch, p.unet.config.in_channels, height / f, width / f])
            }
        }
    }

    /// The teacher's pictures: DDIM for SD 1/2 (as today, whatever the
    /// folder's scheduler class), the folder's sampler for SDXL.
    pub fn sample_teacher<S: AsRef<str>>(
        &self,
        prompts: &[S],
        latents: &Tensor,
        steps: i64,
        guidance: f64,
    ) -> Result<Tensor, PipelineError> {
        match self {
            Self::Sd(p) => p.sample_ddim(prompts, latents, steps, guidance),
            Self::Xl(p) => p.sample(prompts, latents, steps, guidance),
        }
    }

    pub fn sample_one_step<S: AsRef<str>>(
        &self,
        prompts: &[S],
        z: &Tensor,
        timestep: i64,
        alpha_bar: f64,
    ) -> Result<Tensor, PipelineError> {
        match self {
            Self::Sd(p) => p.sample_one_step(prompts, z, timestep, alpha_bar),
            Self::Xl(p) => p.sample_one_step(prompts, z, timestep, alpha_bar),
        }
    }
}
