//! What a teacher folder is, in words, from its config files alone (no
//! weights read): the family this crate loads it as (SD 1.x/2.x or SDXL,
//! as `AnyPipeline::load` picks), the pipeline class, and the UNet's
//! conditioning widths. `doctor --teacher` and `config check` print it.

use std::path::Path;

use super::folder::DiffusersFolder;
use super::stable_diffusion::PipelineError;
use super::stable_diffusion_xl::is_sdxl_folder;
use crate::models::unet_2d_condition::{OneOrMany, UNet2DConditionConfig};

/// E.g. "Stable Diffusion XL (StableDiffusionXLPipeline; UNet
/// cross_attention_dim 2048, text_time conditioning with pooled width
/// 1280; 2 text encoders)". A UNet config this crate cannot build is an
/// error naming the key.
pub fn teacher_architecture(dir: &Path) -> Result<String, PipelineError> {
    let folder = DiffusersFolder::open(dir)?;
    let unet = UNet2DConditionConfig::from_file(&folder.component("unet")?.config_path()?)
        .map_err(|e| PipelineError::Input(e.to_string()))?;
    let cross = match &unet.cross_attention_dim {
        OneOrMany::One(d) => d.to_string(),
        OneOrMany::Many(ds) => format!("{ds:?}"),
    };
    let class = folder.class_name().unwrap_or("no _class_name");
    let (family, extra) = if is_sdxl_folder(&folder) {
        let pooled = unet
            .text_time()
            .ok()
            .flatten()
            .map_or_else(|| "none".to_owned(), |d| d.pooled_dim().to_string());
        (
            "Stable Diffusion XL",
            format!(", text_time conditioning with pooled width {pooled}; 2 text encoders"),
        )
    } else if folder.component_class("vae").is_none() {
        (
            "pixel-space Stable Diffusion layout (no VAE)",
            String::new(),
        )
    } else {
        ("Stable Diffusion 1.x/2.x", String::new())
    };
    Ok(format!(
        "{family} ({class}; UNet cross_attention_dim {cross}{extra})"
    ))
}
