//! The non-UNet networks of a Stable Diffusion folder, each loaded strictly
//! from its component folder in a chosen dtype: the CLIP text encoder and
//! the VAE, and SDXL's second text encoder. (The UNet is `unet::UNet`: the trainer gives it roles.)

use std::collections::HashMap;

use tch::{Device, Kind, Tensor, nn};

use crate::models::ModelError;
use crate::models::clip::{CLIPTextConfig, CLIPTextModel, load_text_encoder_weights};
use crate::models::clip_with_projection::{
    CLIPTextModelWithProjection, load_with_projection_weights,
};
use crate::models::layers::without_init;
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig, rename_deprecated_attention_keys};
use crate::models::weights;
use crate::pipeline::folder::{Component, FolderError};

/// Why one component could not be loaded (the caller names the component).
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
}

/// The frozen CLIP text encoder and the store that owns its weights.
pub struct TextEncoder {
    pub vs: nn::VarStore,
    pub model: CLIPTextModel,
    pub config: CLIPTextConfig,
}

impl TextEncoder {
    /// `text_encoder/config.json` and its safetensors weights (either key
    /// layout, see `models::clip`), in `kind` on `device`.
    pub fn load(component: &Component, device: Device, kind: Kind) -> Result<Self, ComponentError> {
        let config = CLIPTextConfig::from_file(&component.config_path()?)?;
        let files = component.weight_files()?;
        let mut vs = new_store(device, kind);
        let model = CLIPTextModel::new(vs.root(), &config)?;
        load_text_encoder_weights(&mut vs, &files)?;
        vs.freeze();
        Ok(Self { vs, model, config })
    }
}

/// The frozen AutoencoderKL and the store that owns its weights.
pub struct Vae {
    pub vs: nn::VarStore,
    pub model: AutoencoderKL,
    pub config: AutoencoderKLConfig,
}

impl Vae {
    /// `vae/config.json` and its safetensors weights, in `kind` on `device`,
    /// except that a VAE whose config sets `force_upcast` (diffusers' mark
    /// for VAEs unsafe in half precision, and its default) stays in float32:
    /// decoding in float32 costs little next to the UNet and cannot
    /// overflow. Pre-0.14 attention key names are accepted.
    pub fn load(component: &Component, device: Device, kind: Kind) -> Result<Self, ComponentError> {
        let config = AutoencoderKLConfig::from_file(&component.config_path()?)?;
        let kind = if config.force_upcast {
            Kind::Float
        } else {
            kind
        };
        let files = component.weight_files()?;
        let mut vs = new_store(device, kind);
        let model = without_init(|| AutoencoderKL::new(vs.root(), &config))?;
        let mut tensors = HashMap::new();
        for f in &files {
            tensors.extend(weights::read_safetensors(f)?);
        }
        let tensors = rename_deprecated_attention_keys(tensors);
        weights::load_tensors_strict(&mut vs, tensors, &files)?;
        vs.freeze();
        Ok(Self { vs, model, config })
    }

    /// The dtype decoding runs in.
    pub fn kind(&self) -> Kind {
        self.vs.kind()
    }

    /// Pixels per latent along each side: 2^(number of blocks - 1).
    pub fn scale_factor(&self) -> i64 {
        1 << (self.config.block_out_channels.len().saturating_sub(1))
    }
}

/// Latents [B, C, h, w] (as the UNet sees them) -> images [B, 3, H, W] in
/// [0, 1], float32, without gradients: `vae.decode(latents /
/// scaling_factor)`, or the latents themselves for a pixel-space pipeline
/// (no VAE); then (x / 2 + 0.5).clamp(0, 1), as diffusers does.
pub fn decode_images(vae: Option<&Vae>, latents: &Tensor) -> Result<Tensor, tch::TchError> {
    tch::no_grad(|| {
        let image = match vae {
            Some(vae) => {
                let z = latents
                    .f_to_kind(vae.kind())?
                    .f_div_scalar(vae.config.scaling_factor)?;
                vae.model.f_decode(&z)?
            }
            None => latents.shallow_clone(),
        };
        image
            .f_div_scalar(2.0)?
            .f_add_scalar(0.5)?
            .f_clamp(0.0, 1.0)?
            .f_to_kind(Kind::Float)
    })
}

/// An empty store whose new variables are created in `kind`.
fn new_store(device: Device, kind: Kind) -> nn::VarStore {
    let mut vs = nn::VarStore::new(device);
    vs.set_kind(kind);
    vs
}

/// SDXL's frozen `text_encoder_2` (CLIPTextModelWithProjection) and the
/// store that owns its weights.
pub struct TextEncoderWithProjection {
    pub vs: nn::VarStore,
    pub model: CLIPTextModelWithProjection,
}

impl TextEncoderWithProjection {
    /// `text_encoder_2/config.json` and its safetensors weights, in `kind`
    /// on `device`.
    pub fn load(component: &Component, device: Device, kind: Kind) -> Result<Self, ComponentError> {
        let files = component.weight_files()?;
        let mut vs = new_store(device, kind);
        let model = CLIPTextModelWithProjection::new(vs.root(), &component.config_path()?)?;
        load_with_projection_weights(&mut vs, &files)?;
        vs.freeze();
        Ok(Self { vs, model })
    }
}
