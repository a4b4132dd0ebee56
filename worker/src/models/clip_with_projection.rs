//! transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`):
//! the CLIP text tower of `clip.rs` plus `text_projection` (a linear map
//! without bias) of the pooled output, the last hidden state at the end
//! token. SDXL uses the projected pooled output (`text_embeds`) and the
//! penultimate hidden state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Kind, Tensor, nn};

use super::ModelError;
use super::clip::{CLIPTextConfig, CLIPTextModel, normalize_text_encoder_keys, param};
use super::weights;

/// The weight of the projection, at the file's top level.
pub const TEXT_PROJECTION_KEY: &str = "text_projection.weight";

/// The keys of text_encoder_2/config.json beyond [`CLIPTextConfig`]'s.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ProjectionConfig {
    pub projection_dim: i64,
    /// transformers pools at the first `eos_token_id`, except that the
    /// legacy value 2 (SDXL's files carry it) means "the largest id", which
    /// is the end token in CLIP's vocabulary.
    pub eos_token_id: i64,
}

impl Default for ProjectionConfig {
    fn default() -> Self {
        // transformers' CLIPTextConfig defaults.
        Self {
            projection_dim: 512,
            eos_token_id: 2,
        }
    }
}

#[derive(Debug)]
pub struct CLIPTextModelWithProjection {
    pub text_model: CLIPTextModel,
    text_projection: Tensor,
    pub config: CLIPTextConfig,
    pub projection: ProjectionConfig,
}

/// What SDXL takes from the second encoder.
#[derive(Debug)]
pub struct PenultimateAndPooled {
    /// `hidden_states[-2]`, [B, L, hidden].
    pub penultimate: Tensor,
    /// `text_embeds`, [B, projection_dim].
    pub text_embeds: Tensor,
}

impl CLIPTextModelWithProjection {
    /// Reads config.json (both parts) and builds the network under `vs`
    /// (uninitialised, see `clip::param`).
    pub fn new(vs: nn::Path, config_path: &Path) -> Result<Self, ModelError> {
        let config = CLIPTextConfig::from_file(config_path)?;
        let projection: ProjectionConfig = super::read_json_config(config_path)?;
        if projection.projection_dim <= 0 {
            return Err(ModelError::Config {
                path: config_path.to_owned(),
                message: format!(
                    "projection_dim must be positive, got {}",
                    projection.projection_dim
                ),
            });
        }
        let text_model = CLIPTextModel::new(vs.clone(), &config)?;
        let text_projection = param(
            &(&vs / "text_projection"),
            "weight",
            &[projection.projection_dim, config.hidden_size],
        )?;
        Ok(Self {
            text_model,
            text_projection,
            config,
            projection,
        })
    }

    /// The penultimate hidden state and the projected pooled output for
    /// token ids [B, L].
    pub fn f_forward(&self, input_ids: &Tensor) -> Result<PenultimateAndPooled, tch::TchError> {
        let penultimate = self.text_model.f_penultimate(input_ids)?;
        let last = self.text_model.f_last_from_penultimate(&penultimate)?;
        let ids = input_ids.f_to_device(last.device())?;
        let position = if self.projection.eos_token_id == 2 {
            ids.f_to_kind(Kind::Int)?.f_argmax(-1, false)?
        } else {
            ids.f_to_kind(Kind::Int)?
                .f_eq(self.projection.eos_token_id)?
                .f_to_kind(Kind::Int)?
                .f_argmax(-1, false)?
        };
        let rows = Tensor::f_arange(last.size()[0], (Kind::Int64, last.device()))?;
        let pooled = last.f_index(&[Some(rows), Some(position)])?;
        let text_embeds = pooled.f_linear::<Tensor>(&self.text_projection, None)?;
        Ok(PenultimateAndPooled {
            penultimate,
            text_embeds,
        })
    }
}

/// Loads `files` strictly into `vs` (built by
/// [`CLIPTextModelWithProjection::new`] on its root): the tower's keys in
/// either layout (see `clip::normalize_text_encoder_keys`) and
/// `text_projection.weight`.
pub fn load_with_projection_weights(
    vs: &mut nn::VarStore,
    files: &[PathBuf],
) -> Result<(), ModelError> {
    let mut tensors = HashMap::new();
    for f in files {
        tensors.extend(weights::read_safetensors(f)?);
    }
    let projection = tensors.remove(TEXT_PROJECTION_KEY);
    let mut tensors = normalize_text_encoder_keys(tensors);
    if let Some(p) = projection {
        tensors.insert(TEXT_PROJECTION_KEY.to_owned(), p);
    }
    weights::load_tensors_strict(vs, tensors, files)?;
    Ok(())
}
