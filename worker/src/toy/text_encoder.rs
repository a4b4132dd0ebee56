//! The toy teacher's text encoder: a small transformers `CLIPTextModel`
//! with seeded random weights, frozen from the start. It is never trained:
//! the UNet learns to read whatever distinct embeddings it gives, and a
//! fixed seed makes it the same in every run.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, nn};

use super::init::{Fill, init_varstore};
use crate::models::ModelError;
use crate::models::clip::{CLIPTextConfig, CLIPTextModel};

/// Embedding width; the UNet's cross_attention_dim.
pub const HIDDEN_SIZE: i64 = 64;

/// The toy encoder's config for a vocabulary of `vocab_size` tokens.
pub fn toy_text_config(vocab_size: i64) -> CLIPTextConfig {
    CLIPTextConfig {
        vocab_size,
        hidden_size: HIDDEN_SIZE,
        intermediate_size: 4 * HIDDEN_SIZE,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
    }
}

/// transformers' config.json for `cfg` (the keys `CLIPTextModel` reads).
pub fn config_json(cfg: &CLIPTextConfig, bos_id: i64, eos_id: i64) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "projection_dim": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "float32",
    })
}

/// Builds the encoder with seeded weights, frozen.
pub fn build_text_encoder(
    cfg: &CLIPTextConfig,
    seed: u64,
    device: Device,
) -> Result<(nn::VarStore, CLIPTextModel), ModelError> {
    let mut vs = nn::VarStore::new(device);
    let model = CLIPTextModel::new(vs.root(), cfg)?;
    // Token embeddings dominate position embeddings, so each position's
    // vector mostly says which word stands there and captions that differ in
    // one word differ clearly where it stands.
    let special = HashMap::from([
        (
            "text_model.embeddings.token_embedding.weight".to_owned(),
            Fill::Normal(1.0),
        ),
        (
            "text_model.embeddings.position_embedding.weight".to_owned(),
            Fill::Normal(0.1),
        ),
    ]);
    init_varstore(&vs, seed, &special).map_err(|message| ModelError::Config {
        path: "toy text encoder".into(),
        message,
    })?;
    vs.freeze();
    Ok((vs, model))
}

/// Writes `config.json` and `model.safetensors` (transformers' names, with
/// the `text_model.` prefix of the SD repositories).
pub fn save_text_encoder(
    dir: &Path,
    vs: &nn::VarStore,
    cfg: &CLIPTextConfig,
    bos_id: i64,
    eos_id: i64,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join("config.json");
    super::vocab::write_json(&path, &config_json(cfg, bos_id, eos_id))
        .map_err(|source| ModelError::Io { path, source })?;
    crate::models::weights::save_varstore(vs, &dir.join("model.safetensors"), tch::Kind::Float)?;
    Ok(())
}
