//! The CLIP text encoder of Stable Diffusion (transformers' `CLIPTextModel`):
//! its config, the network, and loading its weights from either on-disk
//! layout. The output SD conditions on is the last hidden state after the
//! final layer norm, [B, 77, hidden]; no pooling or projection.
//!
//! Variables live under the keys of the real SD repositories
//! (`text_model.encoder.layers.0.self_attn.q_proj.weight`). transformers 5
//! saves the same tensors without the `text_model.` prefix and older files
//! carry an extra `text_model.embeddings.position_ids` buffer;
//! [`load_text_encoder_weights`] accepts all of these and nothing else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Tensor, nn};

use super::ModelError;
use super::weights;

/// Root of every variable; the prefix the real SD files use.
pub const TEXT_MODEL_PREFIX: &str = "text_model";

/// The non-persistent buffer transformers < 4.31 saved; constant arange(77).
const POSITION_IDS_KEY: &str = "text_model.embeddings.position_ids";

/// transformers' `CLIPTextConfig`, read from a text encoder's config.json.
/// Defaults are transformers' (openai/clip-vit-base-patch32's text tower);
/// fields that do not change the network (token ids, dropout, init ranges)
/// are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct CLIPTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for CLIPTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// The shipped copies of the real config.json files (see `configs/`).
const SD15_CONFIG: &str = include_str!("configs/sd15_text_encoder.json");
const SD21_CONFIG: &str = include_str!("configs/sd21_text_encoder.json");

impl CLIPTextConfig {
    /// Stable Diffusion 1.5's text encoder (OpenAI CLIP ViT-L/14).
    pub fn sd_v1_5() -> Self {
        Self::from_json_str(SD15_CONFIG).expect("shipped sd15_text_encoder.json parses")
    }

    /// Stable Diffusion 2.1-base's text encoder (OpenCLIP ViT-H/14, 23 layers).
    pub fn sd_v2_1_base() -> Self {
        Self::from_json_str(SD21_CONFIG).expect("shipped sd21_text_encoder.json parses")
    }

    /// Reads and validates `text_encoder/config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let cfg: Self = super::read_json_config(path)?;
        cfg.validate().map_err(|message| ModelError::Config {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    fn from_json_str(text: &str) -> Result<Self, String> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The checks transformers makes at construction, plus a known activation.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, value) in positive {
            if value <= 0 {
                return Err(format!("{key} must be positive, got {value}"));
            }
        }
        if self.num_hidden_layers < 0 {
            return Err(format!(
                "num_hidden_layers must not be negative, got {}",
                self.num_hidden_layers
            ));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size ({}) is not a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Activation::parse(&self.hidden_act)?;
        Ok(())
    }

    /// Number of parameters the model has (without building it).
    pub fn num_params(&self) -> i64 {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let embeddings = (self.vocab_size + self.max_position_embeddings) * h;
        let attention = 4 * (h * h + h);
        let mlp = h * i + i + i * h + h;
        let norms = 2 * 2 * h;
        embeddings + self.num_hidden_layers * (attention + mlp + norms) + 2 * h
    }
}

/// transformers' ACT2FN entries that CLIP configs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> Result<Self, String> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => Err(format!(
                "hidden_act {other:?} is not supported \
                 (expected quick_gelu, gelu, gelu_new or gelu_pytorch_tanh)"
            )),
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor, tch::TchError> {
        match self {
            // transformers' QuickGELUActivation: x * sigmoid(1.702 x).
            Self::QuickGelu => xs.f_mul(&(xs * 1.702).f_sigmoid()?),
            Self::Gelu => xs.f_gelu("none"),
            Self::GeluTanh => xs.f_gelu("tanh"),
        }
    }
}

/// Variables are allocated uninitialised: this encoder is frozen and only
/// ever runs with loaded weights, which [`weights::load_strict`] writes into
/// every one of them. Untouched pages are never committed by the OS, so
/// building SD 2.x's 340M parameters costs no memory until loading.
pub(crate) fn param(vs: &nn::Path, name: &str, dims: &[i64]) -> Result<Tensor, tch::TchError> {
    let t = Tensor::f_empty(dims, (vs.kind(), vs.device()))?;
    Ok(vs.add(name, t, true))
}

#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(vs: nn::Path, in_dim: i64, out_dim: i64) -> Result<Self, tch::TchError> {
        Ok(Self {
            weight: param(&vs, "weight", &[out_dim, in_dim])?,
            bias: param(&vs, "bias", &[out_dim])?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, tch::TchError> {
        xs.f_linear(&self.weight, Some(&self.bias))
    }
}

/// The sizes of one transformer tower (CLIP's text or vision encoder) and
/// whether its attention is causal (text) or not (vision).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TowerDims {
    pub hidden: i64,
    pub intermediate: i64,
    pub heads: i64,
    pub eps: f64,
    pub activation: Activation,
    pub causal: bool,
}

impl TowerDims {
    fn text(cfg: &CLIPTextConfig, activation: Activation) -> Self {
        Self {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            activation,
            causal: true,
        }
    }
}

#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(vs: nn::Path, dim: i64, eps: f64) -> Result<Self, tch::TchError> {
        Ok(Self {
            weight: param(&vs, "weight", &[dim])?,
            bias: param(&vs, "bias", &[dim])?,
            eps,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor, tch::TchError> {
        let dim = self.weight.size();
        xs.f_layer_norm(dim, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// transformers' `CLIPTextEmbeddings`.
#[derive(Debug)]
struct CLIPTextEmbeddings {
    token_embedding: Tensor,
    position_embedding: Tensor,
}

impl CLIPTextEmbeddings {
    fn new(vs: nn::Path, cfg: &CLIPTextConfig) -> Result<Self, tch::TchError> {
        let h = cfg.hidden_size;
        Ok(Self {
            token_embedding: param(&(&vs / "token_embedding"), "weight", &[cfg.vocab_size, h])?,
            position_embedding: param(
                &(&vs / "position_embedding"),
                "weight",
                &[cfg.max_position_embeddings, h],
            )?,
        })
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor, tch::TchError> {
        let seq_len = *input_ids.size().last().unwrap_or(&0);
        let tokens = Tensor::f_embedding(&self.token_embedding, input_ids, -1, false, false)?;
        let positions = self.position_embedding.f_narrow(0, 0, seq_len)?;
        tokens.f_add(&positions)
    }
}

/// transformers' `CLIPAttention`: causal in the text tower.
#[derive(Debug)]
struct CLIPAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: i64,
    causal: bool,
}

impl CLIPAttention {
    fn new(vs: nn::Path, dims: &TowerDims) -> Result<Self, tch::TchError> {
        let h = dims.hidden;
        Ok(Self {
            q_proj: Linear::new(&vs / "q_proj", h, h)?,
            k_proj: Linear::new(&vs / "k_proj", h, h)?,
            v_proj: Linear::new(&vs / "v_proj", h, h)?,
            out_proj: Linear::new(&vs / "out_proj", h, h)?,
            num_heads: dims.heads,
            causal: dims.causal,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, tch::TchError> {
        let (b, n, c) = xs.size3()?;
        let head_dim = c / self.num_heads;
        let heads = |t: Tensor| -> Result<Tensor, tch::TchError> {
            t.f_view([b, n, self.num_heads, head_dim])?
                .f_transpose(1, 2)
        };
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        // The default scale is head_dim^-0.5, CLIP's. SD never passes a padding
        // mask to the text encoder: the causal mask alone, as diffusers runs it.
        let attn = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            self.causal,
            None,
            false,
        )?;
        let attn = attn.f_transpose(1, 2)?.f_reshape([b, n, c])?;
        self.out_proj.forward(&attn)
    }
}

/// transformers' `CLIPMLP`.
#[allow(clippy::upper_case_acronyms)] // transformers' class name
#[derive(Debug)]
struct CLIPMLP {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl CLIPMLP {
    fn new(vs: nn::Path, dims: &TowerDims) -> Result<Self, tch::TchError> {
        Ok(Self {
            fc1: Linear::new(&vs / "fc1", dims.hidden, dims.intermediate)?,
            fc2: Linear::new(&vs / "fc2", dims.intermediate, dims.hidden)?,
            activation: dims.activation,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, tch::TchError> {
        let xs = self.fc1.forward(xs)?;
        self.fc2.forward(&self.activation.apply(&xs)?)
    }
}

/// transformers' `CLIPEncoderLayer` (pre-norm).
#[derive(Debug)]
pub(crate) struct CLIPEncoderLayer {
    self_attn: CLIPAttention,
    layer_norm1: LayerNorm,
    mlp: CLIPMLP,
    layer_norm2: LayerNorm,
}

impl CLIPEncoderLayer {
    pub(crate) fn new(vs: nn::Path, dims: &TowerDims) -> Result<Self, tch::TchError> {
        let (h, eps) = (dims.hidden, dims.eps);
        Ok(Self {
            self_attn: CLIPAttention::new(&vs / "self_attn", dims)?,
            layer_norm1: LayerNorm::new(&vs / "layer_norm1", h, eps)?,
            mlp: CLIPMLP::new(&vs / "mlp", dims)?,
            layer_norm2: LayerNorm::new(&vs / "layer_norm2", h, eps)?,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor, tch::TchError> {
        let xs = xs.f_add(&self.self_attn.forward(&self.layer_norm1.forward(xs)?)?)?;
        xs.f_add(&self.mlp.forward(&self.layer_norm2.forward(&xs)?)?)
    }
}

/// transformers' `CLIPTextModel` (the `text_model` of the SD files).
#[derive(Debug)]
pub struct CLIPTextModel {
    embeddings: CLIPTextEmbeddings,
    layers: Vec<CLIPEncoderLayer>,
    final_layer_norm: LayerNorm,
    max_position_embeddings: i64,
}

impl CLIPTextModel {
    /// Builds the network under `vs / "text_model"`. Its variables hold no
    /// values until weights are loaded (see [`load_text_encoder_weights`]).
    pub fn new(vs: nn::Path, cfg: &CLIPTextConfig) -> Result<Self, ModelError> {
        let invalid = |message| ModelError::Config {
            path: PathBuf::from("<CLIPTextConfig>"),
            message,
        };
        cfg.validate().map_err(invalid)?;
        let activation = Activation::parse(&cfg.hidden_act).map_err(invalid)?;
        let vs = &vs / TEXT_MODEL_PREFIX;
        let embeddings = CLIPTextEmbeddings::new(&vs / "embeddings", cfg)?;
        let encoder = &vs / "encoder" / "layers";
        let dims = TowerDims::text(cfg, activation);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| CLIPEncoderLayer::new(&encoder / i, &dims))
            .collect::<Result<Vec<_>, _>>()?;
        let final_layer_norm = LayerNorm::new(
            &vs / "final_layer_norm",
            cfg.hidden_size,
            cfg.layer_norm_eps,
        )?;
        Ok(Self {
            embeddings,
            layers,
            final_layer_norm,
            max_position_embeddings: cfg.max_position_embeddings,
        })
    }

    /// Last hidden state [B, L, hidden] for token ids [B, L] (int64, L <= 77).
    pub fn f_forward(&self, input_ids: &Tensor) -> Result<Tensor, tch::TchError> {
        let size = input_ids.size();
        if !matches!(size.as_slice(), [_, l] if *l <= self.max_position_embeddings) {
            return Err(tch::TchError::Shape(format!(
                "CLIP text encoder expects input_ids [batch, <= {}], got {size:?}",
                self.max_position_embeddings
            )));
        }
        let mut xs = self.embeddings.forward(input_ids)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// transformers' `hidden_states[-2]` [B, L, hidden]: the input of the
    /// last encoder layer, without the final layer norm (what SDXL
    /// conditions on). The same ops as [`Self::f_forward`] up to there.
    pub fn f_penultimate(&self, input_ids: &Tensor) -> Result<Tensor, tch::TchError> {
        let size = input_ids.size();
        if !matches!(size.as_slice(), [_, l] if *l <= self.max_position_embeddings) {
            return Err(tch::TchError::Shape(format!(
                "CLIP text encoder expects input_ids [batch, <= {}], got {size:?}",
                self.max_position_embeddings
            )));
        }
        let mut xs = self.embeddings.forward(input_ids)?;
        let n = self.layers.len().saturating_sub(1);
        for layer in &self.layers[..n] {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }

    /// The last hidden state (after the final layer norm) from
    /// [`Self::f_penultimate`]'s output: the last layer, then the norm.
    pub fn f_last_from_penultimate(&self, xs: &Tensor) -> Result<Tensor, tch::TchError> {
        match self.layers.last() {
            Some(layer) => self.final_layer_norm.forward(&layer.forward(xs)?),
            None => self.final_layer_norm.forward(xs),
        }
    }

    /// As [`Self::f_forward`]; panics on a malformed `input_ids`, which only
    /// the caller's code (not a user's file) can produce.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        match self.f_forward(input_ids) {
            Ok(t) => t,
            Err(e) => panic!("CLIPTextModel::forward: {e}"),
        }
    }
}

impl nn::Module for CLIPTextModel {
    fn forward(&self, input_ids: &Tensor) -> Tensor {
        CLIPTextModel::forward(self, input_ids)
    }
}

/// Loads text encoder weights strictly into `vs` (built by
/// [`CLIPTextModel::new`] on its root). Files in transformers 5's layout
/// (no `text_model.` prefix) get the prefix; the legacy `position_ids`
/// buffer is dropped. Anything else missing,
/// unexpected or mis-shaped is an error listing every offending name.
pub fn load_text_encoder_weights(
    vs: &mut nn::VarStore,
    files: &[PathBuf],
) -> Result<(), ModelError> {
    let mut tensors = HashMap::new();
    for f in files {
        for (name, t) in weights::read_safetensors(f)? {
            tensors.insert(name, t);
        }
    }
    let tensors = normalize_text_encoder_keys(tensors);
    weights::load_tensors_strict(vs, tensors, files)?;
    Ok(())
}

/// Maps either on-disk layout to the prefixed one (see the module docs).
pub fn normalize_text_encoder_keys(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let prefix = format!("{TEXT_MODEL_PREFIX}.");
    let mut out: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            if k.starts_with(&prefix) {
                (k, v)
            } else {
                (format!("{prefix}{k}"), v)
            }
        })
        .collect();
    // transformers recomputes this buffer rather than loading it (some
    // converted checkpoints carry it corrupted, cast to fp16 and back), and
    // forward uses positions 0..L likewise.
    out.remove(POSITION_IDS_KEY);
    out
}

/// Reads `dir/config.json` and the weights in `dir` (`model.safetensors`, or
/// the shards listed by `model.safetensors.index.json`) and returns the
/// loaded, frozen encoder in fp32 on `device`.
pub fn load_text_encoder(
    dir: &Path,
    device: Device,
) -> Result<(nn::VarStore, CLIPTextModel, CLIPTextConfig), ModelError> {
    let cfg = CLIPTextConfig::from_file(&dir.join("config.json"))?;
    let mut vs = nn::VarStore::new(device);
    let model = CLIPTextModel::new(vs.root(), &cfg)?;
    let files = safetensors_files(dir, "model")?;
    load_text_encoder_weights(&mut vs, &files)?;
    vs.freeze();
    Ok((vs, model, cfg))
}

/// `<stem>.safetensors`, or the shards of `<stem>.safetensors.index.json`.
pub fn safetensors_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.exists() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let parsed: Index = super::read_json_config(&index)?;
        let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
        shards.sort();
        shards.dedup();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    Err(ModelError::Io {
        path: single,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no {stem}.safetensors nor {stem}.safetensors.index.json in this folder"),
        ),
    })
}

/// Total number of elements over all variables of `vs`.
pub fn count_params(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}
