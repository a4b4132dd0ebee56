//! A few-step student's sampling (shared/SPEC.md "Few-step students"):
//! the chain of `diffusion::few_step` on the pipeline's own schedule, from
//! given noise, decoded as the one-step draw is. No guidance.

use tch::{Kind, Tensor};

use super::stable_diffusion_xl::XlDenoiser;
use super::{AnyPipeline, PipelineError, StableDiffusion, StableDiffusionXL};
use crate::diffusion::{NoiseSchedule, StudentChain};
use crate::models::text_time_embedding::AddedConditions;

impl StableDiffusion {
    /// The first `steps` steps of `chain` from the noise `z` [B,C,h,w]
    /// with the re-noising draws `noises` (each like z), decoded to images
    /// [B,3,H,W] in [0,1].
    pub fn sample_few_step<S: AsRef<str>>(
        &self,
        prompts: &[S],
        z: &Tensor,
        noises: &[Tensor],
        chain: &StudentChain,
        steps: usize,
    ) -> Result<Tensor, PipelineError> {
        if prompts.is_empty() {
            return Err(PipelineError::Input("no prompts to sample".into()));
        }
        self.check_latents(z, prompts.len())?;
        let device = self.device();
        let schedule = NoiseSchedule::new(&self.scheduler, device)?;
        tch::no_grad(|| {
            let cond = self.encode_prompts(prompts)?;
            let z = z.f_to_device(device)?.f_to_kind(Kind::Float)?;
            let noises = noises
                .iter()
                .map(|e| e.f_to_device(device))
                .collect::<Result<Vec<_>, _>>()?;
            let x0 = chain.draw(&self.unet, &z, &cond, &noises, steps, &schedule)?;
            self.decode(&x0)
        })
    }
}

impl StableDiffusionXL {
    /// As [`StableDiffusion::sample_few_step`], with SDXL's conditions (the
    /// prompt's pooled embedding and the time ids of the image size the
    /// noise makes), as its one-step draw binds them.
    pub fn sample_few_step<S: AsRef<str>>(
        &self,
        prompts: &[S],
        z: &Tensor,
        noises: &[Tensor],
        chain: &StudentChain,
        steps: usize,
    ) -> Result<Tensor, PipelineError> {
        if prompts.is_empty() {
            return Err(PipelineError::Input("no prompts to sample".into()));
        }
        self.check_latents(z, prompts.len())?;
        let size = z.size();
        let f = self.vae_scale_factor();
        let schedule = NoiseSchedule::new(&self.scheduler, self.device())?;
        tch::no_grad(|| {
            let cond = self.encode_prompts(prompts)?;
            let added = AddedConditions {
                text_embeds: cond.pooled.shallow_clone(),
                time_ids: self.add_time_ids(size[0], size[2] * f, size[3] * f)?,
            };
            let student = XlDenoiser {
                unet: &self.unet,
                added: &added,
            };
            let z = z.f_to_device(self.device())?.f_to_kind(Kind::Float)?;
            let noises = noises
                .iter()
                .map(|e| e.f_to_device(self.device()))
                .collect::<Result<Vec<_>, _>>()?;
            let x0 = chain.draw(&student, &z, &cond.hidden, &noises, steps, &schedule)?;
            self.decode(&x0)
        })
    }
}

impl AnyPipeline {
    pub fn sample_few_step<S: AsRef<str>>(
        &self,
        prompts: &[S],
        z: &Tensor,
        noises: &[Tensor],
        chain: &StudentChain,
        steps: usize,
    ) -> Result<Tensor, PipelineError> {
        match self {
            Self::Sd(p) => p.sample_few_step(prompts, z, noises, chain, steps),
            Self::Xl(p) => p.sample_few_step(prompts, z, noises, chain, steps),
        }
    }
}
