//! diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x/2.x and XL,
//! the network: time embedding (plus SDXL's added text/time embedding,
//! `text_time_embedding.rs`), conv_in, down blocks, mid block, up blocks,
//! conv_norm_out, conv_out, built from a validated
//! [`UNet2DConditionConfig`] (its config.json schema lives in
//! `unet_2d_condition_config.rs` and is re-exported here). The timestep is a
//! tensor with one value per sample, as variational score distillation
//! needs.

use std::path::PathBuf;

use tch::{TchError, Tensor, nn};

use super::ModelError;
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::layers::{Activation, Conv2d, GroupNorm};
use super::text_time_embedding::{AddedConditions, TextTimeEmbedding};
use super::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D, CrossAttnUpBlock2DConfig,
    DownBlock2D, UNetMidBlock2D, UNetMidBlock2DConfig, UNetMidBlock2DCrossAttn,
    UNetMidBlock2DCrossAttnConfig, UpBlock2D,
};
pub use super::unet_2d_condition_config::{
    DownBlockType, MidBlockType, OneOrMany, UNet2DConditionConfig, UpBlockType,
};

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
    /// SDXL's `add_time_proj` and `add_embedding`; None for SD 1.x/2.x.
    pub add_embedding: Option<TextTimeEmbedding>,
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
        let add_embedding = match layout.text_time {
            Some(dims) => Some(TextTimeEmbedding::new(
                &vs,
                dims,
                cfg.flip_sin_to_cos,
                cfg.freq_shift,
                layout.time_embed_dim,
            )?),
            None => None,
        };

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
            add_embedding,
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
    /// dtype or device mismatch, or running out of memory, is an error,
    /// and so is an SDXL UNet (which needs [`AddedConditions`]: see
    /// [`Self::f_forward_added`]).
    pub fn f_forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor, TchError> {
        self.f_forward_added(sample, timestep, encoder_hidden_states, None)
    }

    /// As [`Self::f_forward`], with SDXL's added conditions, which an SDXL
    /// UNet (`addition_embed_type: "text_time"`) needs and any other
    /// refuses. With None the SD 1.x/2.x pass is unchanged op for op.
    pub fn f_forward_added(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
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
        let emb = match (&self.add_embedding, added) {
            (None, None) => emb,
            (Some(add), Some(added)) => emb.f_add(&add.forward(added, emb.kind())?)?,
            (Some(_), None) => {
                return Err(TchError::Shape(
                    "this UNet has addition_embed_type \"text_time\" (SDXL): it needs the \
                     pooled text embedding and the time ids"
                        .into(),
                ));
            }
            (None, Some(_)) => {
                return Err(TchError::Shape(
                    "added conditions (text_embeds, time_ids) were given to a UNet without \
                     addition_embed_type \"text_time\""
                        .into(),
                ));
            }
        };
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
