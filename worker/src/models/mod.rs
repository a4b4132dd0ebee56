//! Stable Diffusion's networks in tch, one file per diffusers module. Type
//! names equal diffusers' class names and variable paths spell diffusers'
//! state-dict keys, so a diffusers safetensors file loads strictly by name
//! and an export needs no mapping table.

pub mod attention;
pub mod clip;
pub mod clip_with_projection;
pub mod embeddings;
pub mod layers;
pub mod lora_layer;
pub mod resnet;
pub mod text_time_embedding;
pub mod tokenizer;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod unet_2d_condition_config;
pub mod vae;
pub mod weights;

use std::path::{Path, PathBuf};

/// Errors building a model from its config or weights.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config.json that does not parse or holds values we cannot build.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// Reads and deserializes a JSON config file, naming the file and the
/// offending field on error.
pub fn read_json_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })
}
