//! diffusers' `UNet2DConditionModel` config.json for Stable Diffusion
//! 1.x/2.x and XL: its serde mirror ([`UNet2DConditionConfig`], diffusers'
//! defaults for absent keys, the SD 1.5 and 2.1-base presets), reading it
//! from a file, and the validation that refuses unsupported features up
//! front with the key and value named and resolves the per-block layout
//! the network (`unet_2d_condition.rs`) is built from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::layers::Activation;
use super::unet_2d_blocks::{CrossAttnConfig, DownBlock2DConfig, UpBlock2DConfig};
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
///
/// [`UNet2DConditionModel::new`]: super::unet_2d_condition::UNet2DConditionModel::new
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
    /// SDXL's config.json writes `null`, which diffusers reads as false.
    #[serde(deserialize_with = "null_as_false")]
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
/// stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
const SDXL_BASE_JSON: &str = include_str!("configs/sdxl_base_unet.json");

impl UNet2DConditionConfig {
    /// Stable Diffusion 1.5's UNet (859,520,964 parameters).
    pub fn sd_v1_5() -> Self {
        serde_json::from_str(SD_V1_5_JSON).expect("the embedded SD 1.5 config parses")
    }

    /// Stable Diffusion 2.1-base's UNet (865,910,724 parameters).
    pub fn sd_v2_1_base() -> Self {
        serde_json::from_str(SD_V2_1_BASE_JSON).expect("the embedded SD 2.1-base config parses")
    }

    /// Stable Diffusion XL base 1.0's UNet (2,567,463,684 parameters).
    pub fn sdxl_base() -> Self {
        serde_json::from_str(SDXL_BASE_JSON).expect("the embedded SDXL base config parses")
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
    pub(super) fn layout(&self) -> Result<Layout, String> {
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
            text_time: self.text_time()?,
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

    /// SDXL's added conditioning (`addition_embed_type: "text_time"`): the
    /// sinusoid width per time id and the width of the pooled text
    /// embedding plus the six embedded ids; None without it. Another
    /// addition_embed_type, or text_time without both sizes, is refused.
    pub fn text_time(&self) -> Result<Option<TextTimeDims>, String> {
        match self.addition_embed_type.as_deref() {
            None => Ok(None),
            Some("text_time") => {
                let need = |key: &str, v: Option<i64>| {
                    v.ok_or_else(|| {
                        format!("addition_embed_type = \"text_time\" needs {key} (SDXL sets it)")
                    })
                    .and_then(|v| positive(key, v).map(|_| v))
                };
                let time_embed_dim = need("addition_time_embed_dim", self.addition_time_embed_dim)?;
                let input_dim = need(
                    "projection_class_embeddings_input_dim",
                    self.projection_class_embeddings_input_dim,
                )?;
                if input_dim <= 6 * time_embed_dim {
                    return Err(format!(
                        "projection_class_embeddings_input_dim = {input_dim} leaves no room for \
                         the pooled text embedding beside 6 x addition_time_embed_dim = {}",
                        6 * time_embed_dim
                    ));
                }
                Ok(Some(TextTimeDims {
                    time_embed_dim,
                    input_dim,
                }))
            }
            Some(other) => Err(format!(
                "addition_embed_type = {} is not supported (supported: \"text_time\", SDXL's, \
                 or null)",
                json(&other)
            )),
        }
    }

    /// Features SD 1.x/2.x/XL do not use: refused, not silently dropped.
    fn refuse_unsupported(&self) -> Result<(), String> {
        let unsupported = |key: &str, value: String| {
            Err(format!(
                "{key} = {value} is not supported by this UNet2DConditionModel (SD 1.x/2.x/XL only)"
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
        self.text_time()?;
        let options: [(&str, Option<String>); 8] = [
            ("class_embed_type", self.class_embed_type.as_ref().map(json)),
            ("num_class_embeds", self.num_class_embeds.as_ref().map(json)),
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

/// `null` or a bool; `null` is false, as Python's truthiness reads it.
fn null_as_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
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

/// The sizes of SDXL's added conditioning (see
/// [`UNet2DConditionConfig::text_time`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeDims {
    /// `addition_time_embed_dim`: sinusoid channels per time id.
    pub time_embed_dim: i64,
    /// `projection_class_embeddings_input_dim`: pooled width + 6 x the above.
    pub input_dim: i64,
}

impl TextTimeDims {
    /// The pooled text embedding's width the UNet expects.
    pub fn pooled_dim(&self) -> i64 {
        self.input_dim - 6 * self.time_embed_dim
    }
}

/// A validated config, resolved per block.
pub(super) struct Layout {
    pub(super) act: Activation,
    pub(super) groups: i64,
    pub(super) time_embed_dim: i64,
    pub(super) text_time: Option<TextTimeDims>,
    pub(super) down: Vec<DownSpec>,
    pub(super) mid: Option<MidSpec>,
    pub(super) up: Vec<UpSpec>,
}

pub(super) struct DownSpec {
    pub(super) kind: DownBlockType,
    pub(super) in_channels: i64,
    pub(super) out_channels: i64,
    pub(super) cfg: DownBlock2DConfig,
    pub(super) attn: CrossAttnConfig,
}

pub(super) struct MidSpec {
    pub(super) kind: MidBlockType,
    pub(super) attn: CrossAttnConfig,
}

pub(super) struct UpSpec {
    pub(super) kind: UpBlockType,
    pub(super) in_channels: i64,
    pub(super) prev_output_channel: i64,
    pub(super) out_channels: i64,
    pub(super) cfg: UpBlock2DConfig,
    pub(super) attn: CrossAttnConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for cfg in [
            UNet2DConditionConfig::sd_v1_5(),
            UNet2DConditionConfig::sd_v2_1_base(),
            UNet2DConditionConfig::sdxl_base(),
        ] {
            cfg.layout().unwrap();
        }
        let xl = UNet2DConditionConfig::sdxl_base();
        assert!(!xl.upcast_attention, "null reads as false");
        let dims = xl.text_time().unwrap().unwrap();
        assert_eq!((dims.time_embed_dim, dims.pooled_dim()), (256, 1280));
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
                    addition_embed_type: Some("text".into()),
                    ..Default::default()
                },
                "addition_embed_type = \"text\" is not supported",
            ),
            (
                UNet2DConditionConfig {
                    addition_embed_type: Some("text_time".into()),
                    addition_time_embed_dim: Some(256),
                    ..Default::default()
                },
                "needs projection_class_embeddings_input_dim",
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
