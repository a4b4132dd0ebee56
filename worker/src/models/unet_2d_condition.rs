//! diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x/2.x: its
//! config.json schema ([`UNet2DConditionConfig`], diffusers' defaults for
//! absent keys, unsupported features refused up front with the key and
//! value named), and the model: time embedding, conv_in, down blocks, mid
//! block, up blocks, conv_norm_out, conv_out. The timestep is a tensor with
//! one value per sample, as variational score distillation needs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{TchError, Tensor, nn};

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::layers::{Activation, Conv2d, GroupNorm};
use super::unet_2d_blocks::{
    CrossAttnConfig, CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D,
    CrossAttnUpBlock2DConfig, DownBlock2D, DownBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
    UNetMidBlock2DCrossAttn, UNetMidBlock2DCrossAttnConfig, UpBlock2D, UpBlock2DConfig,
};
use super::{ModelError, read_json_config};

/// A config value given once for all blocks or as one value per block
/// (`attention_head_dim: 8` or `[5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// One value per block; a list must have exactly `num_blocks` entries.
    pub fn per_block(&self, key: &str, num_blocks: usize) -> Result<Vec<T>, String> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); num_blocks]),
            Self::Many(vs) if vs.len() == num_blocks => Ok(vs.clone()),
            Self::Many(vs) => Err(format!(
                "{key} has {} entries but there are {num_blocks} down blocks",
                vs.len()
            )),
        }
    }
}

/// diffusers' UNet2DConditionModel config.json. Absent keys take diffusers'
/// defaults; keys this crate does not know (`_class_name`, ...) are ignored.
/// Values that would need modules SD 1.x/2.x never use are accepted by the
/// parser and refused by [`UNet2DConditionModel::new`] (and
/// [`UNet2DConditionConfig::from_file`]) with the key named.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<OneOrMany<i64>>,
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: OneOrMany<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<i64>,
    pub norm_eps: f64,
    pub cross_attention_dim: OneOrMany<i64>,
    /// An int or one int per block; nested lists (asymmetric UNets) are
    /// refused.
    pub transformer_layers_per_block: serde_json::Value,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<i64>,
    pub encoder_hid_dim_type: Option<String>,
    /// Read by diffusers as the number of heads when `num_attention_heads`
    /// is absent (a naming mistake diffusers keeps for old configs): SD 1.5's
    /// 8 means 8 heads per block, SD 2.x's [5, 10, 20, 20] 5 to 20 heads of
    /// 64 channels.
    pub attention_head_dim: OneOrMany<i64>,
    /// diffusers refuses to build with this set; so does this crate.
    pub num_attention_heads: Option<OneOrMany<i64>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<i64>,
    pub num_class_embeds: Option<i64>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<i64>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<i64>,
    pub conv_in_kernel: i64,
    pub conv_out_kernel: i64,
    pub projection_class_embeddings_input_dim: Option<i64>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    pub addition_embed_type_num_heads: i64,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: serde_json::Value::from(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

/// runwayml/stable-diffusion-v1-5 unet/config.json.
const SD_V1_5_JSON: &str = include_str!("configs/sd15_unet.json");
/// stabilityai/stable-diffusion-2-1-base unet/config.json.
const SD_V2_1_BASE_JSON: &str = include_str!("configs/sd21_base_unet.json");

impl UNet2DConditionConfig {
    /// Stable Diffusion 1.5's UNet (859,520,964 parameters).
    pub fn sd_v1_5() -> Self {
        serde_json::from_str(SD_V1_5_JSON).expect("the embedded SD 1.5 config parses")
    }

    /// Stable Diffusion 2.1-base's UNet (865,910,724 parameters).
    pub fn sd_v2_1_base() -> Self {
        serde_json::from_str(SD_V2_1_BASE_JSON).expect("the embedded SD 2.1-base config parses")
    }

    /// Reads a diffusers unet/config.json and checks that this crate can
    /// build it, naming the file, the key and the value otherwise.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let cfg: Self = read_json_config(path)?;
        cfg.layout().map_err(|message| ModelError::Config {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    /// Resolves per-block values and checks everything `new` relies on.
    fn layout(&self) -> Result<Layout, String> {
        self.refuse_unsupported()?;
        let num_blocks = self.block_out_channels.len();
        if num_blocks == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != num_blocks || self.up_block_types.len() != num_blocks {
            return Err(format!(
                "down_block_types ({}), up_block_types ({}) and block_out_channels ({}) \
                 must have the same length",
                self.down_block_types.len(),
                self.up_block_types.len(),
                num_blocks
            ));
        }
        let act = Activation::from_name(&self.act_fn).ok_or_else(|| {
            format!(
                "act_fn = {:?} is not supported (supported: silu, swish, mish, gelu, relu)",
                self.act_fn
            )
        })?;
        let groups = self
            .norm_num_groups
            .ok_or("norm_num_groups = null (no output norm) is not supported")?;
        positive("norm_num_groups", groups)?;
        positive("in_channels", self.in_channels)?;
        positive("out_channels", self.out_channels)?;
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return Err(format!("norm_eps = {} must be positive", self.norm_eps));
        }
        if self.mid_block_scale_factor == 0.0 {
            return Err("mid_block_scale_factor must not be 0".into());
        }
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k <= 0 || k % 2 == 0 {
                return Err(format!("{key} = {k} must be a positive odd number"));
            }
        }
        if !(0..=16).contains(&self.downsample_padding) {
            return Err(format!(
                "downsample_padding = {} is out of range",
                self.downsample_padding
            ));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            positive(&format!("block_out_channels[{i}]"), c)?;
            if c % groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not divisible by norm_num_groups = {groups}"
                ));
            }
        }
        let time_embed_dim = self
            .time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4);
        positive("time_embedding_dim", time_embed_dim)?;

        let layers = self
            .layers_per_block
            .per_block("layers_per_block", num_blocks)?;
        let heads = self
            .attention_head_dim
            .per_block("attention_head_dim", num_blocks)?;
        let cross_dims = self
            .cross_attention_dim
            .per_block("cross_attention_dim", num_blocks)?;
        let transformer_layers = self.transformer_layers(num_blocks)?;
        for i in 0..num_blocks {
            if layers[i] < 1 {
                return Err(format!(
                    "layers_per_block[{i}] = {} must be >= 1",
                    layers[i]
                ));
            }
            positive(&format!("attention_head_dim[{i}]"), heads[i])?;
            positive(&format!("cross_attention_dim[{i}]"), cross_dims[i])?;
            positive(
                &format!("transformer_layers_per_block[{i}]"),
                transformer_layers[i],
            )?;
        }
        let attn = |i: usize| CrossAttnConfig {
            transformer_layers_per_block: transformer_layers[i],
            num_attention_heads: heads[i],
            cross_attention_dim: cross_dims[i],
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
        };
        // Heads split the block's channels evenly.
        let check_heads = |what: String, channels: i64, heads: i64| {
            if channels % heads == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{what}: {channels} channels cannot be split into {heads} attention heads \
                     (attention_head_dim is read as the number of heads)"
                ))
            }
        };

        let mut down = Vec::with_capacity(num_blocks);
        let mut out_channels = self.block_out_channels[0];
        for (i, name) in self.down_block_types.iter().enumerate() {
            let kind = DownBlockType::parse(i, name)?;
            let in_channels = out_channels;
            out_channels = self.block_out_channels[i];
            if kind == DownBlockType::CrossAttnDownBlock2D {
                check_heads(format!("down block {i}"), out_channels, heads[i])?;
            }
            down.push(DownSpec {
                kind,
                in_channels,
                out_channels,
                cfg: DownBlock2DConfig {
                    num_layers: layers[i],
                    resnet_eps: self.norm_eps,
                    resnet_act_fn: act,
                    resnet_groups: groups,
                    output_scale_factor: 1.0,
                    add_downsample: i + 1 < num_blocks,
                    downsample_padding: self.downsample_padding,
                },
                attn: attn(i),
            });
        }

        let last = num_blocks - 1;
        let mid_channels = self.block_out_channels[last];
        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some(name) => {
                let kind = MidBlockType::parse(name)?;
                if kind == MidBlockType::UNetMidBlock2DCrossAttn {
                    check_heads("mid block".into(), mid_channels, heads[last])?;
                }
                Some(MidSpec {
                    kind,
                    attn: attn(last),
                })
            }
        };

        let rev = |v: &[i64]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rev_channels, rev_layers) = (rev(&self.block_out_channels), rev(&layers));
        let (rev_heads, rev_cross, rev_tl) =
            (rev(&heads), rev(&cross_dims), rev(&transformer_layers));
        let mut up = Vec::with_capacity(num_blocks);
        let mut out_channels = rev_channels[0];
        for (i, name) in self.up_block_types.iter().enumerate() {
            let kind = UpBlockType::parse(i, name)?;
            let prev_output_channel = out_channels;
            out_channels = rev_channels[i];
            let in_channels = rev_channels[(i + 1).min(last)];
            if kind == UpBlockType::CrossAttnUpBlock2D {
                check_heads(format!("up block {i}"), out_channels, rev_heads[i])?;
            }
            up.push(UpSpec {
                kind,
                in_channels,
                prev_output_channel,
                out_channels,
                cfg: UpBlock2DConfig {
                    num_layers: rev_layers[i] + 1,
                    resnet_eps: self.norm_eps,
                    resnet_act_fn: act,
                    resnet_groups: groups,
                    output_scale_factor: 1.0,
                    add_upsample: i < last,
                },
                attn: CrossAttnConfig {
                    transformer_layers_per_block: rev_tl[i],
                    num_attention_heads: rev_heads[i],
                    cross_attention_dim: rev_cross[i],
                    use_linear_projection: self.use_linear_projection,
                    upcast_attention: self.upcast_attention,
                },
            });
        }
        Ok(Layout {
            act,
            groups,
            time_embed_dim,
            down,
            mid,
            up,
        })
    }

    fn transformer_layers(&self, num_blocks: usize) -> Result<Vec<i64>, String> {
        let key = "transformer_layers_per_block";
        let value: OneOrMany<i64> =
            serde_json::from_value(self.transformer_layers_per_block.clone()).map_err(|_| {
                format!(
                    "{key} = {} is not supported (an int or one int per block; \
                     nested lists describe asymmetric UNets)",
                    self.transformer_layers_per_block
                )
            })?;
        value.per_block(key, num_blocks)
    }

    /// Features SD 1.x/2.x do not use: refused, not silently dropped.
    fn refuse_unsupported(&self) -> Result<(), String> {
        let unsupported = |key: &str, value: String| {
            Err(format!(
                "{key} = {value} is not supported by this UNet2DConditionModel (SD 1.x/2.x only)"
            ))
        };
        if let Some(v) = &self.num_attention_heads {
            // diffusers itself raises here (its issue #2011).
            return unsupported("num_attention_heads", json(v));
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", "true".into());
        }
        let only_cross = match &self.only_cross_attention {
            OneOrMany::One(v) => *v,
            OneOrMany::Many(v) => v.contains(&true),
        };
        if only_cross {
            return unsupported("only_cross_attention", json(&self.only_cross_attention));
        }
        let options: [(&str, Option<String>); 9] = [
            ("class_embed_type", self.class_embed_type.as_ref().map(json)),
            ("num_class_embeds", self.num_class_embeds.as_ref().map(json)),
            (
                "addition_embed_type",
                self.addition_embed_type.as_ref().map(json),
            ),
            ("encoder_hid_dim", self.encoder_hid_dim.as_ref().map(json)),
            (
                "encoder_hid_dim_type",
                self.encoder_hid_dim_type.as_ref().map(json),
            ),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.as_ref().map(json),
            ),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.as_ref().map(json),
            ),
            (
                "timestep_post_act",
                self.timestep_post_act.as_ref().map(json),
            ),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block.as_ref().map(json),
            ),
        ];
        for (key, value) in options {
            if let Some(value) = value {
                return unsupported(key, value);
            }
        }
        for (key, value, expected) in [
            (
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            ),
            (
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            ),
            ("attention_type", &self.attention_type, "default"),
        ] {
            if value != expected {
                return unsupported(key, json(value));
            }
        }
        if self.dropout != 0.0 {
            // The forward pass has no training mode to apply dropout in.
            return unsupported("dropout", self.dropout.to_string());
        }
        Ok(())
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "?".into())
}

fn positive(key: &str, value: i64) -> Result<(), String> {
    if value > 0 {
        Ok(())
    } else {
        Err(format!("{key} = {value} must be positive"))
    }
}

/// The down block types this crate builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockType {
    CrossAttnDownBlock2D,
    DownBlock2D,
}

impl DownBlockType {
    fn parse(index: usize, name: &str) -> Result<Self, String> {
        // diffusers accepts the "UNetRes" prefix of old configs.
        match name.strip_prefix("UNetRes").unwrap_or(name) {
            "CrossAttnDownBlock2D" => Ok(Self::CrossAttnDownBlock2D),
            "DownBlock2D" => Ok(Self::DownBlock2D),
            _ => Err(format!(
                "down_block_types[{index}] = {name:?} is not supported \
                 (supported: CrossAttnDownBlock2D, DownBlock2D)"
            )),
        }
    }
}

/// The mid block types this crate builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidBlockType {
    UNetMidBlock2DCrossAttn,
    UNetMidBlock2D,
}

impl MidBlockType {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "UNetMidBlock2DCrossAttn" => Ok(Self::UNetMidBlock2DCrossAttn),
            "UNetMidBlock2D" => Ok(Self::UNetMidBlock2D),
            _ => Err(format!(
                "mid_block_type = {name:?} is not supported \
                 (supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D, null)"
            )),
        }
    }
}

/// The up block types this crate builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockType {
    CrossAttnUpBlock2D,
    UpBlock2D,
}

impl UpBlockType {
    fn parse(index: usize, name: &str) -> Result<Self, String> {
        match name.strip_prefix("UNetRes").unwrap_or(name) {
            "CrossAttnUpBlock2D" => Ok(Self::CrossAttnUpBlock2D),
            "UpBlock2D" => Ok(Self::UpBlock2D),
            _ => Err(format!(
                "up_block_types[{index}] = {name:?} is not supported \
                 (supported: CrossAttnUpBlock2D, UpBlock2D)"
            )),
        }
    }
}

/// A validated config, resolved per block.
struct Layout {
    act: Activation,
    groups: i64,
    time_embed_dim: i64,
    down: Vec<DownSpec>,
    mid: Option<MidSpec>,
    up: Vec<UpSpec>,
}

struct DownSpec {
    kind: DownBlockType,
    in_channels: i64,
    out_channels: i64,
    cfg: DownBlock2DConfig,
    attn: CrossAttnConfig,
}

struct MidSpec {
    kind: MidBlockType,
    attn: CrossAttnConfig,
}

struct UpSpec {
    kind: UpBlockType,
    in_channels: i64,
    prev_output_channel: i64,
    out_channels: i64,
    cfg: UpBlock2DConfig,
    attn: CrossAttnConfig,
}

#[derive(Debug)]
pub enum UNetDownBlock {
    CrossAttn(CrossAttnDownBlock2D),
    Plain(DownBlock2D),
}

#[derive(Debug)]
pub enum UNetMidBlock {
    CrossAttn(UNetMidBlock2DCrossAttn),
    Plain(UNetMidBlock2D),
}

#[derive(Debug)]
pub enum UNetUpBlock {
    CrossAttn(CrossAttnUpBlock2D),
    Plain(UpBlock2D),
}

impl UNetUpBlock {
    fn num_resnets(&self) -> usize {
        match self {
            Self::CrossAttn(b) => b.resnets.len(),
            Self::Plain(b) => b.resnets.len(),
        }
    }

    fn has_upsampler(&self) -> bool {
        match self {
            Self::CrossAttn(b) => b.upsampler.is_some(),
            Self::Plain(b) => b.upsampler.is_some(),
        }
    }
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: Conv2d,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<UNetDownBlock>,
    pub mid_block: Option<UNetMidBlock>,
    pub up_blocks: Vec<UNetUpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    act: Activation,
    center_input_sample: bool,
}

impl UNet2DConditionModel {
    /// Creates the variables under `vs` with diffusers' state-dict names
    /// (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q.weight`),
    /// initialised like PyTorch's defaults, or left unwritten inside
    /// [`super::layers::without_init`]. An unsupported config is a
    /// `ModelError::Config` naming the key and value.
    pub fn new(vs: nn::Path, cfg: &UNet2DConditionConfig) -> Result<Self, ModelError> {
        let layout = cfg.layout().map_err(|message| ModelError::Config {
            path: PathBuf::from("UNet2DConditionConfig"),
            message,
        })?;
        let channels0 = cfg.block_out_channels[0];
        let temb = Some(layout.time_embed_dim);
        let conv_in = Conv2d::new(
            &(&vs / "conv_in"),
            cfg.in_channels,
            channels0,
            cfg.conv_in_kernel,
            1,
            (cfg.conv_in_kernel - 1) / 2,
        )?;
        let time_proj = Timesteps::new(channels0, cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(
            &vs / "time_embedding",
            channels0,
            layout.time_embed_dim,
            layout.act,
        )?;

        let down_path = &vs / "down_blocks";
        let mut down_blocks = Vec::with_capacity(layout.down.len());
        for (i, spec) in layout.down.iter().enumerate() {
            let path = &down_path / i;
            let (in_c, out_c) = (spec.in_channels, spec.out_channels);
            down_blocks.push(match spec.kind {
                DownBlockType::CrossAttnDownBlock2D => {
                    let block_cfg = CrossAttnDownBlock2DConfig {
                        downblock: spec.cfg,
                        attn: spec.attn,
                    };
                    UNetDownBlock::CrossAttn(CrossAttnDownBlock2D::new(
                        path, in_c, out_c, temb, block_cfg,
                    )?)
                }
                DownBlockType::DownBlock2D => {
                    UNetDownBlock::Plain(DownBlock2D::new(path, in_c, out_c, temb, spec.cfg)?)
                }
            });
        }

        let mid_channels = cfg.block_out_channels[cfg.block_out_channels.len() - 1];
        let mid_path = &vs / "mid_block";
        let mid_block = match &layout.mid {
            None => None,
            Some(spec) => Some(match spec.kind {
                MidBlockType::UNetMidBlock2DCrossAttn => {
                    let mid_cfg = UNetMidBlock2DCrossAttnConfig {
                        num_layers: 1,
                        resnet_eps: cfg.norm_eps,
                        resnet_act_fn: layout.act,
                        resnet_groups: layout.groups,
                        output_scale_factor: cfg.mid_block_scale_factor,
                        attn: spec.attn,
                    };
                    UNetMidBlock::CrossAttn(UNetMidBlock2DCrossAttn::new(
                        mid_path,
                        mid_channels,
                        temb,
                        mid_cfg,
                    )?)
                }
                MidBlockType::UNetMidBlock2D => {
                    // diffusers builds this variant with no attention layers.
                    let mid_cfg = UNetMidBlock2DConfig {
                        num_layers: 0,
                        resnet_eps: cfg.norm_eps,
                        resnet_act_fn: layout.act,
                        resnet_groups: layout.groups,
                        add_attention: false,
                        output_scale_factor: cfg.mid_block_scale_factor,
                        ..Default::default()
                    };
                    UNetMidBlock::Plain(UNetMidBlock2D::new(mid_path, mid_channels, temb, mid_cfg)?)
                }
            }),
        };

        let up_path = &vs / "up_blocks";
        let mut up_blocks = Vec::with_capacity(layout.up.len());
        for (i, spec) in layout.up.iter().enumerate() {
            let path = &up_path / i;
            let (in_c, prev, out_c) = (
                spec.in_channels,
                spec.prev_output_channel,
                spec.out_channels,
            );
            up_blocks.push(match spec.kind {
                UpBlockType::CrossAttnUpBlock2D => {
                    let block_cfg = CrossAttnUpBlock2DConfig {
                        upblock: spec.cfg,
                        attn: spec.attn,
                    };
                    UNetUpBlock::CrossAttn(CrossAttnUpBlock2D::new(
                        path, in_c, prev, out_c, temb, block_cfg,
                    )?)
                }
                UpBlockType::UpBlock2D => {
                    UNetUpBlock::Plain(UpBlock2D::new(path, in_c, prev, out_c, temb, spec.cfg)?)
                }
            });
        }

        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &(&vs / "conv_norm_out"),
                layout.groups,
                channels0,
                cfg.norm_eps,
            )?,
            conv_out: Conv2d::new(
                &(&vs / "conv_out"),
                channels0,
                cfg.out_channels,
                cfg.conv_out_kernel,
                1,
                (cfg.conv_out_kernel - 1) / 2,
            )?,
            act: layout.act,
            center_input_sample: cfg.center_input_sample,
        })
    }

    /// The noise (or v) prediction for `sample` [B, in_channels, H, W] at
    /// `timestep` ([B] with one value per sample, [1] or 0-d for all; any
    /// numeric kind, moved to the sample's device) given
    /// `encoder_hidden_states` [B, 77, cross_attention_dim] in the model's
    /// dtype. Works under autograd and under `tch::no_grad`. A shape,
    /// dtype or device mismatch, or running out of memory, is an error.
    pub fn f_forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor, TchError> {
        let (batch, _, height, width) = sample.size4()?;
        let num_upsamplers = self.up_blocks.iter().filter(|b| b.has_upsampler()).count();
        let factor = 1i64 << num_upsamplers;
        // diffusers then upsamples to each skip's size instead of doubling.
        let forward_upsample_size = [height, width].iter().any(|d| d % factor != 0);

        let sample = if self.center_input_sample {
            sample.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?
        } else {
            sample.shallow_clone()
        };
        let timestep = timestep.f_to_device(sample.device())?;
        let timestep = if timestep.dim() == 0 {
            timestep.f_unsqueeze(0)?
        } else {
            timestep
        };
        let t_emb = self
            .time_proj
            .forward(&timestep.f_expand([batch], false)?)?
            .f_to_kind(sample.f_kind()?)?;
        let emb = self.time_embedding.forward(&t_emb)?;
        let temb = Some(&emb);
        let context = encoder_hidden_states;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.shallow_clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = match block {
                UNetDownBlock::CrossAttn(b) => b.forward(&x, temb, context)?,
                UNetDownBlock::Plain(b) => b.forward(&x, temb)?,
            };
            x = out;
            skips.extend(block_skips);
        }
        if let Some(mid) = &self.mid_block {
            x = match mid {
                UNetMidBlock::CrossAttn(b) => b.forward(&x, temb, context)?,
                UNetMidBlock::Plain(b) => b.forward(&x, temb)?,
            };
        }
        let num_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let block_skips = skips.split_off(skips.len() - block.num_resnets());
            let upsample_size = match skips.last() {
                Some(next) if forward_upsample_size && i + 1 < num_up => {
                    let s = next.size();
                    Some((s[2], s[3]))
                }
                _ => None,
            };
            x = match block {
                UNetUpBlock::CrossAttn(b) => {
                    b.forward(&x, &block_skips, temb, context, upsample_size)?
                }
                UNetUpBlock::Plain(b) => b.forward(&x, &block_skips, temb, upsample_size)?,
            };
        }
        let x = self.act.forward(&self.conv_norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }

    /// As [`Self::f_forward`], panicking on error: for tests and callers
    /// whose inputs cannot be malformed and that do not handle running out
    /// of memory.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Tensor {
        match self.f_forward(sample, timestep, encoder_hidden_states) {
            Ok(t) => t,
            Err(e) => panic!("UNet2DConditionModel::forward: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for cfg in [
            UNet2DConditionConfig::sd_v1_5(),
            UNet2DConditionConfig::sd_v2_1_base(),
        ] {
            cfg.layout().unwrap();
        }
        let sd2 = UNet2DConditionConfig::sd_v2_1_base();
        assert_eq!(sd2.attention_head_dim, OneOrMany::Many(vec![5, 10, 20, 20]));
        assert!(sd2.use_linear_projection);
    }

    #[test]
    fn absent_keys_take_diffusers_defaults_and_unknown_keys_are_ignored() {
        let cfg: UNet2DConditionConfig =
            serde_json::from_str(r#"{"_class_name": "UNet2DConditionModel", "whatever": 1}"#)
                .unwrap();
        assert_eq!(cfg, UNet2DConditionConfig::default());
        assert_eq!(cfg.block_out_channels, [320, 640, 1280, 1280]);
        assert_eq!(cfg.cross_attention_dim, OneOrMany::One(1280));
        assert_eq!(
            cfg.mid_block_type.as_deref(),
            Some("UNetMidBlock2DCrossAttn")
        );
        let none: UNet2DConditionConfig =
            serde_json::from_str(r#"{"mid_block_type": null}"#).unwrap();
        assert_eq!(none.mid_block_type, None);
    }

    #[test]
    fn per_block_lists_must_match_the_block_count() {
        let cfg = UNet2DConditionConfig {
            attention_head_dim: OneOrMany::Many(vec![5, 10]),
            ..Default::default()
        };
        let err = cfg.layout().err().unwrap();
        assert!(err.contains("attention_head_dim has 2 entries"), "{err}");
    }

    #[test]
    fn refuses_modules_sd_does_not_use() {
        let cases: Vec<(UNet2DConditionConfig, &str)> = vec![
            (
                UNet2DConditionConfig {
                    class_embed_type: Some("timestep".into()),
                    ..Default::default()
                },
                "class_embed_type = \"timestep\"",
            ),
            (
                UNet2DConditionConfig {
                    only_cross_attention: OneOrMany::Many(vec![false, true, false, false]),
                    ..Default::default()
                },
                "only_cross_attention = [false,true,false,false]",
            ),
            (
                UNet2DConditionConfig {
                    dual_cross_attention: true,
                    ..Default::default()
                },
                "dual_cross_attention = true",
            ),
            (
                UNet2DConditionConfig {
                    num_attention_heads: Some(OneOrMany::One(8)),
                    ..Default::default()
                },
                "num_attention_heads = 8",
            ),
            (
                UNet2DConditionConfig {
                    transformer_layers_per_block: serde_json::json!([[1, 2], [1, 2], [1], [1]]),
                    ..Default::default()
                },
                "transformer_layers_per_block = [[1,2],[1,2],[1],[1]]",
            ),
            (
                UNet2DConditionConfig {
                    mid_block_type: Some("UNetMidBlock2DSimpleCrossAttn".into()),
                    ..Default::default()
                },
                "mid_block_type = \"UNetMidBlock2DSimpleCrossAttn\"",
            ),
            (
                UNet2DConditionConfig {
                    block_out_channels: vec![320, 640, 1280, 1000],
                    ..Default::default()
                },
                "block_out_channels[3] = 1000 is not divisible",
            ),
        ];
        for (cfg, expected) in cases {
            let err = cfg.layout().err().unwrap();
            assert!(err.contains(expected), "{err}");
        }
    }
}
