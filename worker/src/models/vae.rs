//! diffusers' `AutoencoderKL` (autoencoder_kl.py, vae.py): its config.json
//! schema ([`AutoencoderKLConfig`]), the [`Encoder`] and [`Decoder`],
//! `quant_conv`/`post_quant_conv`, and the posterior
//! ([`DiagonalGaussianDistribution`]). Latent scaling is the caller's:
//! `f_decode(latents / scaling_factor)`. Every pass returns a
//! `tch::TchError` on a shape, device or out-of-memory error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{TchError, Tensor, nn};

use super::layers::{Activation, Conv2d, GroupNorm};
use super::unet_2d_blocks::{
    DownBlock2DConfig, DownEncoderBlock2D, UNetMidBlock2D, UNetMidBlock2DConfig, UpBlock2DConfig,
    UpDecoderBlock2D,
};
use super::unet_2d_condition::OneOrMany;
use super::{ModelError, read_json_config};

/// diffusers' AutoencoderKL config.json. Absent keys take diffusers'
/// defaults; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub act_fn: String,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub sample_size: Option<OneOrMany<i64>>,
    /// Latents the UNet sees are `scaling_factor * z`.
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs this VAE in float32 even in fp16 pipelines.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(OneOrMany::One(32)),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

/// The SD 1.x/2.x VAE's vae/config.json (83,653,863 parameters).
const SD_VAE_JSON: &str = include_str!("configs/sd_vae.json");

impl AutoencoderKLConfig {
    /// Stable Diffusion 1.x/2.x's VAE (the same architecture in both).
    pub fn sd() -> Self {
        serde_json::from_str(SD_VAE_JSON).expect("the embedded SD VAE config parses")
    }

    /// Reads a diffusers vae/config.json and checks that this crate can
    /// build it, naming the file, the key and the value otherwise.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let cfg: Self = read_json_config(path)?;
        cfg.validate().map_err(|message| ModelError::Config {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<Activation, String> {
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
        for (key, types, supported) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some((i, name)) = types.iter().enumerate().find(|(_, t)| *t != supported) {
                return Err(format!(
                    "{key}[{i}] = {name:?} is not supported (supported: {supported})"
                ));
            }
        }
        let act = Activation::from_name(&self.act_fn).ok_or_else(|| {
            format!(
                "act_fn = {:?} is not supported (supported: silu, swish, mish, gelu, relu)",
                self.act_fn
            )
        })?;
        for (key, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if value <= 0 {
                return Err(format!("{key} = {value} must be positive"));
            }
        }
        if self.layers_per_block < 1 {
            return Err(format!(
                "layers_per_block = {} must be >= 1",
                self.layers_per_block
            ));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c <= 0 || c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} must be positive and divisible by \
                     norm_num_groups = {}",
                    self.norm_num_groups
                ));
            }
        }
        Ok(act)
    }
}

/// diffusers fixes the VAE's resnet and norm eps; the config has no key.
const EPS: f64 = 1e-6;

fn mid_block(
    vs: nn::Path,
    channels: i64,
    cfg: &AutoencoderKLConfig,
    act: Activation,
) -> Result<UNetMidBlock2D, TchError> {
    UNetMidBlock2D::new(
        vs,
        channels,
        None,
        UNetMidBlock2DConfig {
            num_layers: 1,
            resnet_eps: EPS,
            resnet_act_fn: act,
            resnet_groups: cfg.norm_num_groups,
            attn_groups: None,
            add_attention: cfg.mid_block_add_attention,
            // One head over all channels.
            attention_head_dim: channels,
            output_scale_factor: 1.0,
        },
    )
}

/// Image [B, in_channels, H, W] -> posterior parameters
/// [B, 2 * latent_channels, H / 2^(n-1), W / 2^(n-1)].
#[derive(Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: UNetMidBlock2D,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    act: Activation,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &AutoencoderKLConfig, act: Activation) -> Result<Self, TchError> {
        let channels = &cfg.block_out_channels;
        let (eps, groups) = (EPS, cfg.norm_num_groups);
        let last = channels.len() - 1;
        let blocks = &vs / "down_blocks";
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut out_c = channels[0];
        for (i, &c) in channels.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let block_cfg = DownBlock2DConfig {
                num_layers: cfg.layers_per_block,
                resnet_eps: eps,
                resnet_act_fn: act,
                resnet_groups: groups,
                output_scale_factor: 1.0,
                add_downsample: i < last,
                downsample_padding: 0,
            };
            down_blocks.push(DownEncoderBlock2D::new(
                &blocks / i,
                in_c,
                out_c,
                block_cfg,
            )?);
        }
        Ok(Self {
            conv_in: Conv2d::new(&(&vs / "conv_in"), cfg.in_channels, channels[0], 3, 1, 1)?,
            down_blocks,
            mid_block: mid_block(&vs / "mid_block", channels[last], cfg, act)?,
            conv_norm_out: GroupNorm::new(&(&vs / "conv_norm_out"), groups, channels[last], eps)?,
            // double_z: mean and logvar.
            conv_out: Conv2d::new(
                &(&vs / "conv_out"),
                channels[last],
                2 * cfg.latent_channels,
                3,
                1,
                1,
            )?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            x = block.forward(&x)?;
        }
        let x = self.mid_block.forward(&x, None)?;
        self.conv_out
            .forward(&self.act.forward(&self.conv_norm_out.forward(&x)?)?)
    }
}

/// Latents [B, latent_channels, h, w] -> image [B, out_channels, h * 2^(n-1), w * 2^(n-1)].
#[derive(Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: UNetMidBlock2D,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    act: Activation,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &AutoencoderKLConfig, act: Activation) -> Result<Self, TchError> {
        let reversed: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let (eps, groups) = (EPS, cfg.norm_num_groups);
        let last = reversed.len() - 1;
        let blocks = &vs / "up_blocks";
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut out_c = reversed[0];
        for (i, &c) in reversed.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let block_cfg = UpBlock2DConfig {
                num_layers: cfg.layers_per_block + 1,
                resnet_eps: eps,
                resnet_act_fn: act,
                resnet_groups: groups,
                output_scale_factor: 1.0,
                add_upsample: i < last,
            };
            up_blocks.push(UpDecoderBlock2D::new(&blocks / i, prev, out_c, block_cfg)?);
        }
        Ok(Self {
            conv_in: Conv2d::new(
                &(&vs / "conv_in"),
                cfg.latent_channels,
                reversed[0],
                3,
                1,
                1,
            )?,
            mid_block: mid_block(&vs / "mid_block", reversed[0], cfg, act)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(&(&vs / "conv_norm_out"), groups, reversed[last], eps)?,
            conv_out: Conv2d::new(
                &(&vs / "conv_out"),
                reversed[last],
                cfg.out_channels,
                3,
                1,
                1,
            )?,
            act,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor, TchError> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid_block.forward(&x, None)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        self.conv_out
            .forward(&self.act.forward(&self.conv_norm_out.forward(&x)?)?)
    }
}

/// The encoder's posterior N(mean, exp(logvar)), logvar clamped to
/// [-30, 20] as in diffusers.
#[derive(Debug)]
pub struct DiagonalGaussianDistribution {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussianDistribution {
    /// Splits [B, 2C, h, w] posterior parameters into mean and logvar.
    pub fn new(parameters: &Tensor) -> Result<Self, TchError> {
        let halves = parameters.f_chunk(2, 1)?;
        match halves.as_slice() {
            [mean, logvar] => Ok(Self {
                mean: mean.shallow_clone(),
                logvar: logvar.f_clamp(-30.0, 20.0)?,
            }),
            _ => Err(TchError::Shape(format!(
                "posterior parameters need an even number (>= 2) of channels in dim 1, got {:?}",
                parameters.size()
            ))),
        }
    }

    pub fn std(&self) -> Result<Tensor, TchError> {
        self.logvar.f_mul_scalar(0.5)?.f_exp()
    }

    /// mean + std * N(0, I), from torch's global generator.
    pub fn sample(&self) -> Result<Tensor, TchError> {
        let std = self.std()?;
        let noise = self.mean.f_randn_like()?;
        self.mean.f_add(&std.f_mul(&noise)?)
    }

    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    /// Creates the variables under `vs` with diffusers' state-dict names
    /// (`encoder.mid_block.attentions.0.to_q.weight`, ...).
    pub fn new(vs: nn::Path, cfg: &AutoencoderKLConfig) -> Result<Self, ModelError> {
        let act = cfg.validate().map_err(|message| ModelError::Config {
            path: PathBuf::from("AutoencoderKLConfig"),
            message,
        })?;
        let latent = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(
                &(&vs / "quant_conv"),
                2 * latent,
                2 * latent,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(
                &(&vs / "post_quant_conv"),
                latent,
                latent,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(&vs / "encoder", cfg, act)?,
            decoder: Decoder::new(&vs / "decoder", cfg, act)?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Latents the UNet works on are `scaling_factor * z`.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Image in [-1, 1], [B, in_channels, H, W] -> posterior over z.
    pub fn f_encode(&self, x: &Tensor) -> Result<DiagonalGaussianDistribution, TchError> {
        let h = self.encoder.forward(x)?;
        let h = match &self.quant_conv {
            Some(conv) => conv.forward(&h)?,
            None => h,
        };
        DiagonalGaussianDistribution::new(&h)
    }

    /// z (unscaled: divide UNet latents by `scaling_factor` first) -> image
    /// in about [-1, 1].
    pub fn f_decode(&self, z: &Tensor) -> Result<Tensor, TchError> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.shallow_clone(),
        };
        self.decoder.forward(&z)
    }
}

/// Renames the VAE attention keys of checkpoints written before diffusers
/// 0.14 (`...attentions.0.query.weight`, `key`, `value`, `proj_attn`) to the
/// current names (`to_q`, `to_k`, `to_v`, `to_out.0`), as diffusers does on
/// load. The SD 1.x/2.x VAE files on the Hub still carry the old names.
pub fn rename_deprecated_attention_keys(
    tensors: HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    const RENAMES: [(&str, &str); 4] = [
        ("query", "to_q"),
        ("key", "to_k"),
        ("value", "to_v"),
        ("proj_attn", "to_out.0"),
    ];
    tensors
        .into_iter()
        .map(|(name, tensor)| {
            let renamed = RENAMES.iter().find_map(|(old, new)| {
                ["weight", "bias"].iter().find_map(|leaf| {
                    let suffix = format!(".{old}.{leaf}");
                    let stem = name.strip_suffix(&suffix)?;
                    stem.contains("mid_block.attentions.")
                        .then(|| format!("{stem}.{new}.{leaf}"))
                })
            });
            (renamed.unwrap_or(name), tensor)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_preset_parses_with_default_scaling() {
        let cfg = AutoencoderKLConfig::sd();
        assert_eq!(cfg.block_out_channels, [128, 256, 512, 512]);
        assert_eq!(cfg.scaling_factor, 0.18215);
        cfg.validate().unwrap();
    }

    #[test]
    fn renames_only_mid_block_attention_keys() {
        let t = || Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let old: HashMap<String, Tensor> = [
            "encoder.mid_block.attentions.0.query.weight",
            "decoder.mid_block.attentions.0.proj_attn.bias",
            "encoder.mid_block.attentions.0.group_norm.weight",
            "encoder.down_blocks.0.resnets.0.conv1.weight",
        ]
        .into_iter()
        .map(|k| (k.to_string(), t()))
        .collect();
        let mut names: Vec<_> = rename_deprecated_attention_keys(old).into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "decoder.mid_block.attentions.0.to_out.0.bias",
                "encoder.down_blocks.0.resnets.0.conv1.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
                "encoder.mid_block.attentions.0.to_q.weight",
            ]
        );
    }
}
