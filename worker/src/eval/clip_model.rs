//! transformers' `CLIPModel`: the text and vision towers and their
//! projections into one embedding space, for scoring how well a picture
//! matches its prompt (CLIP score). Loaded from a Hugging Face CLIP folder
//! (`config.json` with `text_config`/`vision_config`, `model.safetensors`)
//! strictly by transformers' names: `text_model.*` (the same network as
//! SD's text encoder), `vision_model.*`, `text_projection.weight`,
//! `visual_projection.weight`, `logit_scale`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn};

use crate::models::clip::{
    Activation, CLIPEncoderLayer, CLIPTextConfig, CLIPTextModel, LayerNorm, TowerDims, param,
    safetensors_files,
};
use crate::models::{ModelError, read_json_config, weights};

/// transformers' `CLIPVisionConfig`; defaults are transformers' (ViT-B/32).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct CLIPVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for CLIPVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl CLIPVisionConfig {
    fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ] {
            if value <= 0 {
                return Err(format!("vision_config.{key} must be positive, got {value}"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "vision_config.hidden_size ({}) is not a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.image_size % self.patch_size != 0 {
            return Err(format!(
                "vision_config.image_size ({}) is not a multiple of patch_size ({})",
                self.image_size, self.patch_size
            ));
        }
        Activation::parse(&self.hidden_act).map(|_| ())
    }

    /// Patches along one side of the (square) input.
    fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

/// The text tower's token ids that pooling needs; transformers' default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct TextIds {
    eos_token_id: i64,
}

impl Default for TextIds {
    fn default() -> Self {
        Self {
            eos_token_id: 49407,
        }
    }
}

/// transformers' `CLIPConfig`, read from a CLIP folder's config.json.
#[derive(Debug, Clone)]
pub struct CLIPModelConfig {
    pub text_config: CLIPTextConfig,
    pub vision_config: CLIPVisionConfig,
    pub projection_dim: i64,
    /// 2 marks configs written before transformers fixed the id: the pooled
    /// position is then the largest token id's (see `CLIPModel::text_embeds`).
    pub eos_token_id: i64,
}

impl CLIPModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            architectures: Vec<String>,
            #[serde(default)]
            model_type: String,
            #[serde(default)]
            text_config: serde_json::Value,
            #[serde(default)]
            vision_config: serde_json::Value,
            #[serde(default = "default_projection_dim")]
            projection_dim: i64,
        }
        fn default_projection_dim() -> i64 {
            512
        }
        let raw: Raw = read_json_config(path)?;
        let invalid = |message: String| ModelError::Config {
            path: path.to_owned(),
            message,
        };
        // One tower alone (a Stable Diffusion text_encoder/, say) would
        // fail as hundreds of missing and unexpected tensors: say what it is.
        let tower = match raw.model_type.as_str() {
            "clip_text_model" => Some("CLIPTextModel"),
            "clip_vision_model" => Some("CLIPVisionModel"),
            _ => raw
                .architectures
                .iter()
                .find(|a| a.starts_with("CLIPTextModel") || a.starts_with("CLIPVisionModel"))
                .map(String::as_str),
        };
        if let Some(tower) = tower {
            return Err(invalid(format!(
                "this is a {tower} folder (one tower of CLIP, as a Stable Diffusion \
                 pipeline's text_encoder/ is); the CLIP score needs a full CLIPModel folder \
                 (config.json with text_config and vision_config, e.g. \
                 openai/clip-vit-large-patch14)"
            )));
        }
        let object = |v: serde_json::Value| match v {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            v => v,
        };
        let (text, vision) = (object(raw.text_config), object(raw.vision_config));
        let text_config: CLIPTextConfig = serde_json::from_value(text.clone())
            .map_err(|e| invalid(format!("text_config: {e}")))?;
        let ids: TextIds =
            serde_json::from_value(text).map_err(|e| invalid(format!("text_config: {e}")))?;
        let vision_config: CLIPVisionConfig =
            serde_json::from_value(vision).map_err(|e| invalid(format!("vision_config: {e}")))?;
        text_config
            .validate()
            .map_err(|e| invalid(format!("text_config: {e}")))?;
        vision_config.validate().map_err(invalid)?;
        if raw.projection_dim <= 0 {
            return Err(invalid(format!(
                "projection_dim must be positive, got {}",
                raw.projection_dim
            )));
        }
        Ok(Self {
            text_config,
            vision_config,
            projection_dim: raw.projection_dim,
            eos_token_id: ids.eos_token_id,
        })
    }
}

/// transformers' `CLIPVisionEmbeddings` + `CLIPVisionTransformer`: patches
/// and a class token, position embeddings, pre-norm, the encoder (not
/// causal), the class token's state post-normed.
#[derive(Debug)]
struct CLIPVisionTransformer {
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<CLIPEncoderLayer>,
    post_layernorm: LayerNorm,
    patch_size: i64,
    image_size: i64,
}

impl CLIPVisionTransformer {
    fn new(vs: nn::Path, cfg: &CLIPVisionConfig) -> Result<Self, ModelError> {
        let activation =
            Activation::parse(&cfg.hidden_act).map_err(|message| ModelError::Config {
                path: PathBuf::from("<CLIPVisionConfig>"),
                message,
            })?;
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let dims = TowerDims {
            hidden: h,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            eps,
            activation,
            causal: false,
        };
        let emb = &vs / "embeddings";
        let positions = cfg.grid() * cfg.grid() + 1;
        let encoder = &vs / "encoder" / "layers";
        Ok(Self {
            class_embedding: param(&emb, "class_embedding", &[h])?,
            patch_embedding: param(
                &(&emb / "patch_embedding"),
                "weight",
                &[h, cfg.num_channels, cfg.patch_size, cfg.patch_size],
            )?,
            position_embedding: param(&(&emb / "position_embedding"), "weight", &[positions, h])?,
            pre_layrnorm: LayerNorm::new(&vs / "pre_layrnorm", h, eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| CLIPEncoderLayer::new(&encoder / i, &dims))
                .collect::<Result<Vec<_>, _>>()?,
            post_layernorm: LayerNorm::new(&vs / "post_layernorm", h, eps)?,
            patch_size: cfg.patch_size,
            image_size: cfg.image_size,
        })
    }

    /// The pooled (class token) output [B, hidden] for pixel values
    /// [B, C, S, S] as CLIPImageProcessor prepares them.
    fn pooled(&self, pixel_values: &Tensor) -> Result<Tensor, tch::TchError> {
        let size = pixel_values.size();
        let s = self.image_size;
        if !matches!(size.as_slice(), [_, _, h, w] if *h == s && *w == s) {
            return Err(tch::TchError::Shape(format!(
                "the CLIP vision tower expects pixel values [batch, channels, {s}, {s}], got {size:?}"
            )));
        }
        let b = size[0];
        let patches = pixel_values
            .f_conv2d(
                &self.patch_embedding,
                None::<Tensor>,
                [self.patch_size, self.patch_size],
                [0, 0],
                [1, 1],
                1,
            )?
            .f_flatten(2, -1)?
            .f_transpose(1, 2)?;
        let class = self.class_embedding.f_expand([b, 1, -1], false)?;
        let mut xs = Tensor::f_cat(&[class, patches], 1)?.f_add(&self.position_embedding)?;
        xs = self.pre_layrnorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.post_layernorm.forward(&xs.f_select(1, 0)?)
    }
}

/// transformers' `CLIPModel`, frozen: both towers and their projections.
#[derive(Debug)]
pub struct CLIPModel {
    text: CLIPTextModel,
    vision: CLIPVisionTransformer,
    text_projection: Tensor,
    visual_projection: Tensor,
    eos_token_id: i64,
}

/// Buffers older transformers saved and that it recomputes on load.
const DROPPED_BUFFERS: [&str; 2] = [
    "text_model.embeddings.position_ids",
    "vision_model.embeddings.position_ids",
];

impl CLIPModel {
    /// Builds the network on `vs`'s root; the weights come from
    /// [`Self::load`].
    fn new(vs: nn::Path, cfg: &CLIPModelConfig) -> Result<Self, ModelError> {
        let p = cfg.projection_dim;
        let vision = CLIPVisionTransformer::new(&vs / "vision_model", &cfg.vision_config)?;
        let model = Self {
            text: CLIPTextModel::new(vs.clone(), &cfg.text_config)?,
            vision,
            text_projection: param(
                &(&vs / "text_projection"),
                "weight",
                &[p, cfg.text_config.hidden_size],
            )?,
            visual_projection: param(
                &(&vs / "visual_projection"),
                "weight",
                &[p, cfg.vision_config.hidden_size],
            )?,
            eos_token_id: cfg.eos_token_id,
        };
        // Unused for scoring, but part of the file: strict loading wants it.
        let _logit_scale = param(&vs, "logit_scale", &[])?;
        Ok(model)
    }

    /// Loads a CLIP folder (config.json and model.safetensors, or its
    /// shards) strictly, frozen, in float32 on `device`.
    pub fn load(dir: &Path, device: Device) -> Result<(nn::VarStore, Self), ModelError> {
        let cfg = CLIPModelConfig::from_file(&dir.join("config.json"))?;
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(vs.root(), &cfg)?;
        let files = safetensors_files(dir, "model")?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for f in &files {
            tensors.extend(weights::read_safetensors(f)?);
        }
        for key in DROPPED_BUFFERS {
            tensors.remove(key);
        }
        weights::load_tensors_strict(&mut vs, tensors, &files)?;
        vs.freeze();
        Ok((vs, model))
    }

    /// Projected image embeddings [B, P] (not normalised) of pixel values
    /// [B, C, S, S].
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor, tch::TchError> {
        tch::no_grad(|| {
            let pooled = self.vision.pooled(&pixel_values.f_to_kind(Kind::Float)?)?;
            pooled.f_linear(&self.visual_projection, None::<Tensor>)
        })
    }

    /// Projected text embeddings [B, P] (not normalised) of token ids
    /// [B, L]: the final state at the first end-of-text token, or, for
    /// configs from before transformers fixed `eos_token_id` (it is 2
    /// there), at the largest id (which is end-of-text, first occurrence).
    pub fn text_embeds(&self, input_ids: &Tensor) -> Result<Tensor, tch::TchError> {
        tch::no_grad(|| {
            let states = self.text.f_forward(input_ids)?;
            let position = if self.eos_token_id == 2 {
                input_ids.f_argmax(-1, false)?
            } else {
                input_ids
                    .f_eq(self.eos_token_id)?
                    .f_to_kind(Kind::Int)?
                    .f_argmax(-1, false)?
            };
            let b = states.size()[0];
            let rows = Tensor::f_arange(b, (Kind::Int64, states.device()))?;
            let pooled = states.f_index(&[Some(rows), Some(position)])?;
            pooled.f_linear(&self.text_projection, None::<Tensor>)
        })
    }
}
