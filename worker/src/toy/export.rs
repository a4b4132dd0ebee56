//! The toy teacher as a diffusers pipeline folder, shaped like Stable
//! Diffusion's without the VAE and safety checker: `model_index.json`,
//! `unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`. diffusers'
//! `UNet2DConditionModel.from_pretrained` and transformers'
//! `CLIPTextModel` / `CLIPTokenizer` load each component, and so do our own
//! loaders (`pipeline::UNet::load`, `clip::load_text_encoder`,
//! `ClipTokenizer::from_dir`).

use std::path::Path;

use serde_json::json;
use tch::{Kind, Tensor};

use super::ToyError;
use super::vocab::write_json;
use crate::diffusion::SchedulerConfig;
use crate::models::unet_2d_condition::UNet2DConditionConfig;

/// The diffusers release whose config keys these files use.
const DIFFUSERS_VERSION: &str = "0.36.0";

/// Stable Diffusion's training schedule (scaled_linear, 0.00085..0.012,
/// abar_999 = 0.0047), so the toy SwiftBrush run uses the paper's student
/// constant A = 0.0047 unchanged; `clip_sample` is on because the model's
/// x0 is pixels in [-1, 1].
pub fn toy_scheduler_config() -> SchedulerConfig {
    SchedulerConfig {
        clip_sample: true,
        ..SchedulerConfig::stable_diffusion()
    }
}

pub fn scheduler_json(cfg: &SchedulerConfig) -> serde_json::Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "trained_betas": cfg.trained_betas,
        "prediction_type": cfg.prediction_type,
        "clip_sample": cfg.clip_sample,
        "clip_sample_range": cfg.clip_sample_range,
        "set_alpha_to_one": cfg.set_alpha_to_one,
        "steps_offset": cfg.steps_offset,
        "timestep_spacing": cfg.timestep_spacing,
        "thresholding": cfg.thresholding,
        "rescale_betas_zero_snr": cfg.rescale_betas_zero_snr,
    })
}

pub fn unet_json(cfg: &UNet2DConditionConfig) -> Result<serde_json::Value, ToyError> {
    let mut value = serde_json::to_value(cfg)
        .map_err(|e| ToyError::Settings(format!("UNet config does not serialize: {e}")))?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("_class_name".into(), "UNet2DConditionModel".into());
        obj.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
    }
    Ok(value)
}

pub fn model_index_json() -> serde_json::Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [null, null],
    })
}

/// Writes JSON, creating the parent folder.
pub fn put_json(path: &Path, value: &serde_json::Value) -> Result<(), ToyError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(ToyError::io(dir))?;
    }
    write_json(path, value).map_err(ToyError::io(path))
}

/// Writes `unet/config.json` and `unet/diffusion_pytorch_model.safetensors`
/// (float32). The weights go to a temporary name first and are renamed, so
/// a reader during training never sees half a file.
pub fn write_unet(
    root: &Path,
    cfg: &UNet2DConditionConfig,
    weights: &[(String, Tensor)],
) -> Result<(), ToyError> {
    let dir = root.join("unet");
    put_json(&dir.join("config.json"), &unet_json(cfg)?)?;
    let mut named: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.detach()
                    .to_kind(Kind::Float)
                    .to_device(tch::Device::Cpu)
                    .contiguous(),
            )
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let tmp = dir.join("diffusion_pytorch_model.safetensors.partial");
    Tensor::write_safetensors(&named, &tmp)?;
    let dst = dir.join("diffusion_pytorch_model.safetensors");
    std::fs::rename(&tmp, &dst).map_err(ToyError::io(&dst))
}
