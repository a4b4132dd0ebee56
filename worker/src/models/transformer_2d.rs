//! diffusers' `Transformer2DModel` for continuous input, as SD's cross-
//! attention blocks use it: GroupNorm, `proj_in` (1x1 conv in SD 1.x, linear
//! in SD 2.x), a stack of [`BasicTransformerBlock`]s over the H*W positions,
//! `proj_out`, and a residual connection.

use tch::{TchError, Tensor, nn};

use super::attention::{BasicTransformerBlock, BasicTransformerBlockConfig};
use super::layers::{Conv2d, GroupNorm, Linear};

/// Transformer2DModel's knobs; Default holds diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transformer2DModelConfig {
    pub num_attention_heads: i64,
    pub attention_head_dim: i64,
    pub num_layers: i64,
    pub cross_attention_dim: Option<i64>,
    pub norm_num_groups: i64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub attention_bias: bool,
    pub norm_eps: f64,
}

impl Default for Transformer2DModelConfig {
    fn default() -> Self {
        Self {
            num_attention_heads: 16,
            attention_head_dim: 88,
            num_layers: 1,
            cross_attention_dim: None,
            norm_num_groups: 32,
            use_linear_projection: false,
            upcast_attention: false,
            attention_bias: false,
            norm_eps: 1e-5,
        }
    }
}

/// `proj_in`/`proj_out`: the variable shapes differ ([out, in, 1, 1] or
/// [out, in]), so both kinds exist to load either family's weights.
#[derive(Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vs: &nn::Path, in_dim: i64, out_dim: i64, linear: bool) -> Result<Self, TchError> {
        Ok(if linear {
            Self::Linear(Linear::new(vs, in_dim, out_dim, true)?)
        } else {
            Self::Conv(Conv2d::new(vs, in_dim, out_dim, 1, 1, 0)?)
        })
    }
}

#[derive(Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        cfg: Transformer2DModelConfig,
    ) -> Result<Self, TchError> {
        let inner_dim = cfg.num_attention_heads * cfg.attention_head_dim;
        let linear = cfg.use_linear_projection;
        let block_cfg = BasicTransformerBlockConfig {
            num_attention_heads: cfg.num_attention_heads,
            attention_head_dim: cfg.attention_head_dim,
            cross_attention_dim: cfg.cross_attention_dim,
            attention_bias: cfg.attention_bias,
            upcast_attention: cfg.upcast_attention,
            norm_eps: cfg.norm_eps,
        };
        let blocks = &vs / "transformer_blocks";
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| BasicTransformerBlock::new(&blocks / i, inner_dim, block_cfg))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            // diffusers fixes this GroupNorm's eps at 1e-6.
            norm: GroupNorm::new(&(&vs / "norm"), cfg.norm_num_groups, in_channels, 1e-6)?,
            proj_in: Projection::new(&(&vs / "proj_in"), in_channels, inner_dim, linear)?,
            transformer_blocks,
            proj_out: Projection::new(&(&vs / "proj_out"), inner_dim, in_channels, linear)?,
        })
    }

    /// `x`: [B, C, H, W]; `context`: [B, M, cross_attention_dim].
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor, TchError> {
        let (batch, _, height, width) = x.size4()?;
        let h = self.norm.forward(x)?;
        // [B, C, H, W] <-> [B, H*W, C]; the conv projection runs on the map,
        // the linear one on the tokens, as in diffusers.
        let to_tokens = |t: &Tensor| -> Result<Tensor, TchError> {
            let (_, c, _, _) = t.size4()?;
            t.f_permute([0, 2, 3, 1])?
                .f_reshape([batch, height * width, c])
        };
        let to_map = |t: &Tensor| -> Result<Tensor, TchError> {
            let (_, _, c) = t.size3()?;
            t.f_reshape([batch, height, width, c])?
                .f_permute([0, 3, 1, 2])?
                .f_contiguous()
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&h)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&h)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(linear) => to_map(&linear.forward(&tokens)?)?,
        };
        out.f_add(x)
    }
}
