//! SDXL's added conditioning (diffusers' `addition_embed_type: "text_time"`,
//! `UNet2DConditionModel.get_aug_embed`): each of the six micro-conditioning
//! numbers (`add_time_ids`: original size, crop top-left, target size) is
//! embedded with sinusoids (`add_time_proj`), concatenated after the pooled
//! text embedding (`text_embeds`), and mapped by an MLP (`add_embedding`,
//! always SiLU) to a vector the UNet adds to its timestep embedding.

use tch::{Kind, TchError, Tensor, nn};

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::layers::Activation;
use super::unet_2d_condition_config::TextTimeDims;

/// What an SDXL UNet takes besides the sample, the timestep and the text
/// hidden states: `text_embeds` [B, pooled] and `time_ids` [B, 6].
#[derive(Debug)]
pub struct AddedConditions {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

impl AddedConditions {
    /// Rows `start..start + len` of both.
    pub fn narrow(&self, start: i64, len: i64) -> Result<Self, TchError> {
        Ok(Self {
            text_embeds: self.text_embeds.f_narrow(0, start, len)?,
            time_ids: self.time_ids.f_narrow(0, start, len)?,
        })
    }

    /// Both moved to `device` (a no-op where they are).
    pub fn to_device(&self, device: tch::Device) -> Result<Self, TchError> {
        Ok(Self {
            text_embeds: self.text_embeds.f_to_device(device)?,
            time_ids: self.time_ids.f_to_device(device)?,
        })
    }

    /// `cat([a, b])` row-wise, as diffusers' guided batch does.
    pub fn cat(a: &Self, b: &Self) -> Result<Self, TchError> {
        Ok(Self {
            text_embeds: Tensor::f_cat(&[&a.text_embeds, &b.text_embeds], 0)?,
            time_ids: Tensor::f_cat(&[&a.time_ids, &b.time_ids], 0)?,
        })
    }
}

/// `add_time_proj` (no variables) and `add_embedding.linear_{1,2}`.
#[derive(Debug)]
pub struct TextTimeEmbedding {
    pub add_time_proj: Timesteps,
    pub add_embedding: TimestepEmbedding,
    dims: TextTimeDims,
}

impl TextTimeEmbedding {
    pub fn new(
        vs: &nn::Path,
        dims: TextTimeDims,
        flip_sin_to_cos: bool,
        freq_shift: f64,
        time_embed_dim: i64,
    ) -> Result<Self, TchError> {
        Ok(Self {
            add_time_proj: Timesteps::new(dims.time_embed_dim, flip_sin_to_cos, freq_shift),
            // diffusers builds it with TimestepEmbedding's default act_fn.
            add_embedding: TimestepEmbedding::new(
                vs / "add_embedding",
                dims.input_dim,
                time_embed_dim,
                Activation::Silu,
            )?,
            dims,
        })
    }

    /// The vector added to the timestep embedding, [B, time_embed_dim] in
    /// `kind` (the timestep embedding's dtype). The sinusoids run in
    /// float32 as diffusers' do; the pooled embedding joins them in float32
    /// (torch.concat promotes) before the cast.
    pub fn forward(&self, added: &AddedConditions, kind: Kind) -> Result<Tensor, TchError> {
        let text = &added.text_embeds;
        let (batch, width) = text.size2()?;
        if width != self.dims.pooled_dim() {
            return Err(TchError::Shape(format!(
                "text_embeds has width {width} but this UNet's add_embedding expects {} \
                 (projection_class_embeddings_input_dim - 6 x addition_time_embed_dim)",
                self.dims.pooled_dim()
            )));
        }
        let ids = added.time_ids.f_to_device(text.device())?;
        if ids.size() != [batch, 6] {
            return Err(TchError::Shape(format!(
                "time_ids must be [{batch}, 6] (original size, crop top-left, target size), \
                 got {:?}",
                ids.size()
            )));
        }
        let time_embeds = self
            .add_time_proj
            .forward(&ids.f_flatten(0, -1)?)?
            .f_reshape([batch, -1])?;
        let add_embeds = Tensor::f_cat(&[&text.f_to_kind(Kind::Float)?, &time_embeds], -1)?;
        self.add_embedding.forward(&add_embeds.f_to_kind(kind)?)
    }
}
