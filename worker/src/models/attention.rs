//! diffusers' attention.py and attention_processor.py as Stable Diffusion uses
//! them: [`Attention`] (self- and cross-attention through
//! `scaled_dot_product_attention`, also the VAE's spatial self-attention),
//! [`BasicTransformerBlock`] and [`FeedForward`] with [`GEGLU`]. Their
//! projections (`to_q`, `to_k`, `to_v`, `to_out.0`) are [`Linear`]s.

use tch::{Kind, TchError, Tensor, nn};

use super::layers::{GroupNorm, LayerNorm, Linear};

/// The knobs of diffusers' `Attention` that SD's UNet and VAE use; Default
/// holds diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    pub heads: i64,
    pub dim_head: i64,
    /// Bias on to_q, to_k, to_v.
    pub bias: bool,
    /// Bias on to_out.0.
    pub out_bias: bool,
    /// Computes attention in float32 when the model runs in half precision.
    /// diffusers' default SDPA processor ignores this flag; SD 2.x was
    /// trained with it, and upcasting only removes fp16 overflow risk.
    pub upcast_attention: bool,
    /// A GroupNorm over channels before the projections (VAE attention).
    pub norm_num_groups: Option<i64>,
    pub eps: f64,
    pub residual_connection: bool,
    pub rescale_output_factor: f64,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        Self {
            heads: 8,
            dim_head: 64,
            bias: false,
            out_bias: true,
            upcast_attention: false,
            norm_num_groups: None,
            eps: 1e-5,
            residual_connection: false,
            rescale_output_factor: 1.0,
        }
    }
}

/// diffusers' `Attention` with the default `AttnProcessor2_0`.
#[derive(Debug)]
pub struct Attention {
    pub group_norm: Option<GroupNorm>,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    heads: i64,
    upcast_attention: bool,
    residual_connection: bool,
    rescale_output_factor: f64,
}

impl Attention {
    /// `cross_attention_dim` None: self-attention (keys from the queries'
    /// input).
    pub fn new(
        vs: nn::Path,
        query_dim: i64,
        cross_attention_dim: Option<i64>,
        cfg: AttentionConfig,
    ) -> Result<Self, TchError> {
        let inner_dim = cfg.heads * cfg.dim_head;
        let context_dim = cross_attention_dim.unwrap_or(query_dim);
        let group_norm = match cfg.norm_num_groups {
            Some(groups) => Some(GroupNorm::new(
                &(&vs / "group_norm"),
                groups,
                query_dim,
                cfg.eps,
            )?),
            None => None,
        };
        Ok(Self {
            group_norm,
            to_q: Linear::new(&(&vs / "to_q"), query_dim, inner_dim, cfg.bias)?,
            to_k: Linear::new(&(&vs / "to_k"), context_dim, inner_dim, cfg.bias)?,
            to_v: Linear::new(&(&vs / "to_v"), context_dim, inner_dim, cfg.bias)?,
            // to_out.1 is a Dropout: no variables.
            to_out: Linear::new(&(&vs / "to_out" / 0), inner_dim, query_dim, cfg.out_bias)?,
            heads: cfg.heads,
            upcast_attention: cfg.upcast_attention,
            residual_connection: cfg.residual_connection,
            rescale_output_factor: cfg.rescale_output_factor,
        })
    }

    /// `hidden_states`: [B, N, C] tokens or a [B, C, H, W] feature map
    /// (attended over its H*W positions and returned in the same layout).
    /// `encoder_hidden_states`: [B, M, cross_attention_dim] or None for
    /// self-attention. Tokens that are neither 3-D nor 4-D, or a context
    /// whose width does not fit, are an error.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<Tensor, TchError> {
        let spatial = (hidden_states.dim() == 4).then(|| hidden_states.size());
        let mut x = match &spatial {
            Some(s) => hidden_states
                .f_reshape([s[0], s[1], s[2] * s[3]])?
                .f_transpose(1, 2)?,
            None => hidden_states.shallow_clone(),
        };
        if let Some(norm) = &self.group_norm {
            x = norm.forward(&x.f_transpose(1, 2)?)?.f_transpose(1, 2)?;
        }
        let (batch, _, _) = x.size3()?;
        let context = encoder_hidden_states.unwrap_or(&x);
        let split_heads = |t: Tensor| -> Result<Tensor, TchError> {
            let (_, _, width) = t.size3()?;
            t.f_reshape([batch, -1, self.heads, width / self.heads])?
                .f_transpose(1, 2)
        };
        let query = split_heads(self.to_q.forward(&x)?)?;
        let key = split_heads(self.to_k.forward(context)?)?;
        let value = split_heads(self.to_v.forward(context)?)?;
        let kind = query.f_kind()?;
        let out = if self.upcast_attention && matches!(kind, Kind::Half | Kind::BFloat16) {
            sdpa(
                &query.f_to_kind(Kind::Float)?,
                &key.f_to_kind(Kind::Float)?,
                &value.f_to_kind(Kind::Float)?,
            )?
            .f_to_kind(kind)?
        } else {
            sdpa(&query, &key, &value)?
        };
        let (_, heads, _, head_dim) = out.size4()?;
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([batch, -1, heads * head_dim])?;
        let out = self.to_out.forward(&out)?;
        let out = match &spatial {
            Some(s) => out.f_transpose(-1, -2)?.f_reshape(s.as_slice())?,
            None => out,
        };
        let out = if self.residual_connection {
            out.f_add(hidden_states)?
        } else {
            out
        };
        if self.rescale_output_factor != 1.0 {
            out.f_div_scalar(self.rescale_output_factor)
        } else {
            Ok(out)
        }
    }
}

/// Softmax(q k^T / sqrt(d)) v on [B, heads, N, d], no mask, no dropout.
fn sdpa(query: &Tensor, key: &Tensor, value: &Tensor) -> Result<Tensor, TchError> {
    Tensor::f_scaled_dot_product_attention(
        query,
        key,
        value,
        None::<Tensor>,
        0.0,
        false,
        None,
        false,
    )
}

/// diffusers' `GEGLU`: one projection to twice the width, half of it gating
/// the other through exact GELU.
#[derive(Debug)]
pub struct GEGLU {
    pub proj: Linear,
}

impl GEGLU {
    pub fn new(vs: nn::Path, dim_in: i64, dim_out: i64) -> Result<Self, TchError> {
        Ok(Self {
            proj: Linear::new(&(&vs / "proj"), dim_in, dim_out * 2, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let projected = self.proj.forward(x)?;
        let halves = projected.f_chunk(2, -1)?;
        halves[0].f_mul(&halves[1].f_gelu("none")?)
    }
}

/// diffusers' `FeedForward` with the "geglu" activation: `net.0` (GEGLU),
/// `net.1` (dropout, no variables), `net.2` (Linear).
#[derive(Debug)]
pub struct FeedForward {
    pub act: GEGLU,
    pub out: Linear,
}

impl FeedForward {
    /// Inner width `mult * dim` as in diffusers (mult = 4 in SD).
    pub fn new(vs: nn::Path, dim: i64, mult: i64) -> Result<Self, TchError> {
        let inner_dim = dim * mult;
        let net = &vs / "net";
        Ok(Self {
            act: GEGLU::new(&net / 0, dim, inner_dim)?,
            out: Linear::new(&(&net / 2), inner_dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        self.out.forward(&self.act.forward(x)?)
    }
}

/// BasicTransformerBlock's knobs (norm_type "layer_norm", activation
/// "geglu"); Default holds diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BasicTransformerBlockConfig {
    pub num_attention_heads: i64,
    pub attention_head_dim: i64,
    /// None: no cross-attention (attn2, norm2 absent).
    pub cross_attention_dim: Option<i64>,
    pub attention_bias: bool,
    pub upcast_attention: bool,
    pub norm_eps: f64,
}

impl Default for BasicTransformerBlockConfig {
    fn default() -> Self {
        Self {
            num_attention_heads: 8,
            attention_head_dim: 64,
            cross_attention_dim: None,
            attention_bias: false,
            upcast_attention: false,
            norm_eps: 1e-5,
        }
    }
}

/// Self-attention, cross-attention and a GEGLU feed-forward, each pre-norm
/// and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: Option<LayerNorm>,
    pub attn2: Option<Attention>,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(vs: nn::Path, dim: i64, cfg: BasicTransformerBlockConfig) -> Result<Self, TchError> {
        let attn_cfg = AttentionConfig {
            heads: cfg.num_attention_heads,
            dim_head: cfg.attention_head_dim,
            bias: cfg.attention_bias,
            upcast_attention: cfg.upcast_attention,
            ..Default::default()
        };
        let (norm2, attn2) = match cfg.cross_attention_dim {
            Some(context_dim) => (
                Some(LayerNorm::new(&(&vs / "norm2"), dim, cfg.norm_eps)?),
                Some(Attention::new(
                    &vs / "attn2",
                    dim,
                    Some(context_dim),
                    attn_cfg,
                )?),
            ),
            None => (None, None),
        };
        Ok(Self {
            norm1: LayerNorm::new(&(&vs / "norm1"), dim, cfg.norm_eps)?,
            attn1: Attention::new(&vs / "attn1", dim, None, attn_cfg)?,
            norm2,
            attn2,
            norm3: LayerNorm::new(&(&vs / "norm3"), dim, cfg.norm_eps)?,
            ff: FeedForward::new(&vs / "ff", dim, 4)?,
        })
    }

    /// `x`: [B, N, dim]; `context`: [B, M, cross_attention_dim]. Without a
    /// context attn2 attends to `x` itself, as in diffusers.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor, TchError> {
        let mut x = self
            .attn1
            .forward(&self.norm1.forward(x)?, None)?
            .f_add(x)?;
        if let (Some(norm2), Some(attn2)) = (&self.norm2, &self.attn2) {
            x = attn2.forward(&norm2.forward(&x)?, context)?.f_add(&x)?;
        }
        self.ff.forward(&self.norm3.forward(&x)?)?.f_add(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, nn::VarStore};

    fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let d = q.size()[3] as f64;
        (q.matmul(&k.transpose(-1, -2)) / d.sqrt())
            .softmax(-1, Kind::Float)
            .matmul(v)
    }

    #[test]
    fn sdpa_is_softmax_attention() {
        tch::manual_seed(0);
        let q = Tensor::randn([2, 3, 5, 4], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([2, 3, 7, 4], (Kind::Float, Device::Cpu));
        let v = Tensor::randn([2, 3, 7, 4], (Kind::Float, Device::Cpu));
        let diff = (sdpa(&q, &k, &v).unwrap() - naive_attention(&q, &k, &v))
            .abs()
            .max();
        assert!(f64::try_from(diff).unwrap() < 1e-5);
    }

    #[test]
    fn upcast_attention_in_bfloat16_stays_close_to_float32() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let cfg = AttentionConfig {
            heads: 2,
            dim_head: 8,
            upcast_attention: true,
            ..Default::default()
        };
        let attn = Attention::new(vs.root() / "attn", 16, Some(12), cfg).unwrap();
        let x = Tensor::randn([2, 6, 16], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 5, 12], (Kind::Float, Device::Cpu));
        let reference = tch::no_grad(|| attn.forward(&x, Some(&ctx))).unwrap();

        let mut vs_bf16 = VarStore::new(Device::Cpu);
        let attn_bf16 = Attention::new(vs_bf16.root() / "attn", 16, Some(12), cfg).unwrap();
        vs_bf16.copy(&vs).unwrap();
        vs_bf16.bfloat16();
        let out = tch::no_grad(|| {
            attn_bf16.forward(
                &x.to_kind(Kind::BFloat16),
                Some(&ctx.to_kind(Kind::BFloat16)),
            )
        })
        .unwrap();
        assert_eq!(out.kind(), Kind::BFloat16);
        let diff = (out.to_kind(Kind::Float) - reference).abs().max();
        assert!(f64::try_from(diff).unwrap() < 5e-2);
    }
}
