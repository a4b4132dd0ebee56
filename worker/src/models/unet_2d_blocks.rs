//! diffusers' unet_2d_blocks.py, the blocks SD 1.x/2.x use: the UNet's
//! [`DownBlock2D`], [`CrossAttnDownBlock2D`], [`UNetMidBlock2DCrossAttn`],
//! [`UpBlock2D`], [`CrossAttnUpBlock2D`], and the VAE's
//! [`DownEncoderBlock2D`], [`UNetMidBlock2D`], [`UpDecoderBlock2D`].
//! Down blocks return their output and the skip tensors the matching up
//! block consumes (last first).

use tch::{TchError, Tensor, nn};

use super::attention::{Attention, AttentionConfig};
use super::layers::Activation;
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use super::transformer_2d::{Transformer2DModel, Transformer2DModelConfig};

fn resnet_config(
    out_channels: i64,
    temb_channels: Option<i64>,
    groups: i64,
    eps: f64,
    act: Activation,
    output_scale_factor: f64,
) -> ResnetBlock2DConfig {
    ResnetBlock2DConfig {
        out_channels: Some(out_channels),
        temb_channels,
        groups,
        groups_out: None,
        eps,
        non_linearity: act,
        output_scale_factor,
        use_in_shortcut: None,
    }
}

/// The cross-attention part shared by the CrossAttn blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossAttnConfig {
    pub transformer_layers_per_block: i64,
    /// Heads; each head is `channels / num_attention_heads` wide.
    pub num_attention_heads: i64,
    pub cross_attention_dim: i64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

impl Default for CrossAttnConfig {
    fn default() -> Self {
        Self {
            transformer_layers_per_block: 1,
            num_attention_heads: 1,
            cross_attention_dim: 1280,
            use_linear_projection: false,
            upcast_attention: false,
        }
    }
}

impl CrossAttnConfig {
    fn transformer(
        &self,
        vs: nn::Path,
        channels: i64,
        groups: i64,
    ) -> Result<Transformer2DModel, TchError> {
        let cfg = Transformer2DModelConfig {
            num_attention_heads: self.num_attention_heads,
            attention_head_dim: channels / self.num_attention_heads,
            num_layers: self.transformer_layers_per_block,
            cross_attention_dim: Some(self.cross_attention_dim),
            norm_num_groups: groups,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
            ..Default::default()
        };
        Transformer2DModel::new(vs, channels, cfg)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DownBlock2DConfig {
    pub num_layers: i64,
    pub resnet_eps: f64,
    pub resnet_act_fn: Activation,
    pub resnet_groups: i64,
    pub output_scale_factor: f64,
    pub add_downsample: bool,
    pub downsample_padding: i64,
}

impl Default for DownBlock2DConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_act_fn: Activation::Silu,
            resnet_groups: 32,
            output_scale_factor: 1.0,
            add_downsample: true,
            downsample_padding: 1,
        }
    }
}

fn down_resnets(
    vs: &nn::Path,
    in_channels: i64,
    out_channels: i64,
    temb_channels: Option<i64>,
    cfg: &DownBlock2DConfig,
) -> Result<Vec<ResnetBlock2D>, TchError> {
    let rcfg = resnet_config(
        out_channels,
        temb_channels,
        cfg.resnet_groups,
        cfg.resnet_eps,
        cfg.resnet_act_fn,
        cfg.output_scale_factor,
    );
    let resnets = vs / "resnets";
    (0..cfg.num_layers)
        .map(|i| {
            let in_c = if i == 0 { in_channels } else { out_channels };
            ResnetBlock2D::new(&resnets / i, in_c, rcfg)
        })
        .collect()
}

fn downsampler(
    vs: &nn::Path,
    channels: i64,
    cfg: &DownBlock2DConfig,
) -> Result<Option<Downsample2D>, TchError> {
    if !cfg.add_downsample {
        return Ok(None);
    }
    let path = vs / "downsamplers" / 0;
    Ok(Some(Downsample2D::new(
        path,
        channels,
        channels,
        cfg.downsample_padding,
    )?))
}

/// Resnets, then an optional stride-2 downsampler.
#[derive(Debug)]
pub struct DownBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        out_channels: i64,
        temb_channels: Option<i64>,
        cfg: DownBlock2DConfig,
    ) -> Result<Self, TchError> {
        Ok(Self {
            resnets: down_resnets(&vs, in_channels, out_channels, temb_channels, &cfg)?,
            downsampler: downsampler(&vs, out_channels, &cfg)?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>), TchError> {
        let mut x = x.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for resnet in &self.resnets {
            x = resnet.forward(&x, temb)?;
            skips.push(x.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.shallow_clone());
        }
        Ok((x, skips))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CrossAttnDownBlock2DConfig {
    pub downblock: DownBlock2DConfig,
    pub attn: CrossAttnConfig,
}

/// Resnet + transformer pairs, then an optional downsampler.
#[derive(Debug)]
pub struct CrossAttnDownBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        out_channels: i64,
        temb_channels: Option<i64>,
        cfg: CrossAttnDownBlock2DConfig,
    ) -> Result<Self, TchError> {
        let db = &cfg.downblock;
        let attentions = &vs / "attentions";
        Ok(Self {
            resnets: down_resnets(&vs, in_channels, out_channels, temb_channels, db)?,
            attentions: (0..db.num_layers)
                .map(|i| {
                    cfg.attn
                        .transformer(&attentions / i, out_channels, db.resnet_groups)
                })
                .collect::<Result<_, _>>()?,
            downsampler: downsampler(&vs, out_channels, db)?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>), TchError> {
        let mut x = x.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            x = attn.forward(&resnet.forward(&x, temb)?, Some(context))?;
            skips.push(x.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.shallow_clone());
        }
        Ok((x, skips))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UNetMidBlock2DCrossAttnConfig {
    pub num_layers: i64,
    pub resnet_eps: f64,
    pub resnet_act_fn: Activation,
    pub resnet_groups: i64,
    pub output_scale_factor: f64,
    pub attn: CrossAttnConfig,
}

impl Default for UNetMidBlock2DCrossAttnConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_act_fn: Activation::Silu,
            resnet_groups: 32,
            output_scale_factor: 1.0,
            attn: CrossAttnConfig::default(),
        }
    }
}

/// A resnet, then (transformer, resnet) pairs, at constant width.
#[derive(Debug)]
pub struct UNetMidBlock2DCrossAttn {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        temb_channels: Option<i64>,
        cfg: UNetMidBlock2DCrossAttnConfig,
    ) -> Result<Self, TchError> {
        let rcfg = resnet_config(
            in_channels,
            temb_channels,
            cfg.resnet_groups,
            cfg.resnet_eps,
            cfg.resnet_act_fn,
            cfg.output_scale_factor,
        );
        let (resnets, attentions) = (&vs / "resnets", &vs / "attentions");
        Ok(Self {
            resnets: (0..=cfg.num_layers)
                .map(|i| ResnetBlock2D::new(&resnets / i, in_channels, rcfg))
                .collect::<Result<_, _>>()?,
            attentions: (0..cfg.num_layers)
                .map(|i| {
                    cfg.attn
                        .transformer(&attentions / i, in_channels, cfg.resnet_groups)
                })
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
        context: &Tensor,
    ) -> Result<Tensor, TchError> {
        let mut x = self.resnets[0].forward(x, temb)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(&attn.forward(&x, Some(context))?, temb)?;
        }
        Ok(x)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UNetMidBlock2DConfig {
    pub num_layers: i64,
    pub resnet_eps: f64,
    pub resnet_act_fn: Activation,
    pub resnet_groups: i64,
    /// None: same as `resnet_groups`.
    pub attn_groups: Option<i64>,
    pub add_attention: bool,
    /// Width of one attention head; heads = channels / attention_head_dim.
    pub attention_head_dim: i64,
    pub output_scale_factor: f64,
}

impl Default for UNetMidBlock2DConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_act_fn: Activation::Silu,
            resnet_groups: 32,
            attn_groups: None,
            add_attention: true,
            attention_head_dim: 1,
            output_scale_factor: 1.0,
        }
    }
}

/// A resnet, then (spatial self-attention, resnet) pairs: the VAE's middle
/// (and the UNet's when `mid_block_type` is "UNetMidBlock2D", without
/// attention).
#[derive(Debug)]
pub struct UNetMidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Attention>,
}

impl UNetMidBlock2D {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        temb_channels: Option<i64>,
        cfg: UNetMidBlock2DConfig,
    ) -> Result<Self, TchError> {
        let rcfg = resnet_config(
            in_channels,
            temb_channels,
            cfg.resnet_groups,
            cfg.resnet_eps,
            cfg.resnet_act_fn,
            cfg.output_scale_factor,
        );
        let attn_cfg = AttentionConfig {
            heads: in_channels / cfg.attention_head_dim,
            dim_head: cfg.attention_head_dim,
            bias: true,
            norm_num_groups: Some(cfg.attn_groups.unwrap_or(cfg.resnet_groups)),
            eps: cfg.resnet_eps,
            residual_connection: true,
            rescale_output_factor: cfg.output_scale_factor,
            ..Default::default()
        };
        let (resnets, attentions) = (&vs / "resnets", &vs / "attentions");
        let num_attentions = if cfg.add_attention { cfg.num_layers } else { 0 };
        Ok(Self {
            resnets: (0..=cfg.num_layers)
                .map(|i| ResnetBlock2D::new(&resnets / i, in_channels, rcfg))
                .collect::<Result<_, _>>()?,
            attentions: (0..num_attentions)
                .map(|i| Attention::new(&attentions / i, in_channels, None, attn_cfg))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor, TchError> {
        let mut x = self.resnets[0].forward(x, temb)?;
        for (i, resnet) in self.resnets[1..].iter().enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, None)?;
            }
            x = resnet.forward(&x, temb)?;
        }
        Ok(x)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpBlock2DConfig {
    pub num_layers: i64,
    pub resnet_eps: f64,
    pub resnet_act_fn: Activation,
    pub resnet_groups: i64,
    pub output_scale_factor: f64,
    pub add_upsample: bool,
}

impl Default for UpBlock2DConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_act_fn: Activation::Silu,
            resnet_groups: 32,
            output_scale_factor: 1.0,
            add_upsample: true,
        }
    }
}

/// Resnet i sees the previous output concatenated with skip tensor i from
/// the end: `prev_output_channel` (first) or `out_channels` wide, plus
/// `in_channels` (last) or `out_channels` of skip.
fn up_resnets(
    vs: &nn::Path,
    in_channels: i64,
    prev_output_channel: i64,
    out_channels: i64,
    temb_channels: Option<i64>,
    cfg: &UpBlock2DConfig,
) -> Result<Vec<ResnetBlock2D>, TchError> {
    let rcfg = resnet_config(
        out_channels,
        temb_channels,
        cfg.resnet_groups,
        cfg.resnet_eps,
        cfg.resnet_act_fn,
        cfg.output_scale_factor,
    );
    let resnets = vs / "resnets";
    (0..cfg.num_layers)
        .map(|i| {
            let skip = if i == cfg.num_layers - 1 {
                in_channels
            } else {
                out_channels
            };
            let resnet_in = if i == 0 {
                prev_output_channel
            } else {
                out_channels
            };
            ResnetBlock2D::new(&resnets / i, resnet_in + skip, rcfg)
        })
        .collect()
}

fn upsampler(
    vs: &nn::Path,
    channels: i64,
    add_upsample: bool,
) -> Result<Option<Upsample2D>, TchError> {
    if !add_upsample {
        return Ok(None);
    }
    Ok(Some(Upsample2D::new(
        vs / "upsamplers" / 0,
        channels,
        channels,
    )?))
}

/// Pops skip tensors from the end of `skips` for each resnet.
#[derive(Debug)]
pub struct UpBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock2D {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        prev_output_channel: i64,
        out_channels: i64,
        temb_channels: Option<i64>,
        cfg: UpBlock2DConfig,
    ) -> Result<Self, TchError> {
        Ok(Self {
            resnets: up_resnets(
                &vs,
                in_channels,
                prev_output_channel,
                out_channels,
                temb_channels,
                &cfg,
            )?,
            upsampler: upsampler(&vs, out_channels, cfg.add_upsample)?,
        })
    }

    /// `skips`: this block's skip tensors in down order (one per resnet).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: Option<&Tensor>,
        upsample_size: Option<(i64, i64)>,
    ) -> Result<Tensor, TchError> {
        let mut x = x.shallow_clone();
        for (resnet, skip) in self.resnets.iter().zip(skips.iter().rev()) {
            x = resnet.forward(&Tensor::f_cat(&[&x, skip], 1)?, temb)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CrossAttnUpBlock2DConfig {
    pub upblock: UpBlock2DConfig,
    pub attn: CrossAttnConfig,
}

#[derive(Debug)]
pub struct CrossAttnUpBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        prev_output_channel: i64,
        out_channels: i64,
        temb_channels: Option<i64>,
        cfg: CrossAttnUpBlock2DConfig,
    ) -> Result<Self, TchError> {
        let ub = &cfg.upblock;
        let attentions = &vs / "attentions";
        Ok(Self {
            resnets: up_resnets(
                &vs,
                in_channels,
                prev_output_channel,
                out_channels,
                temb_channels,
                ub,
            )?,
            attentions: (0..ub.num_layers)
                .map(|i| {
                    cfg.attn
                        .transformer(&attentions / i, out_channels, ub.resnet_groups)
                })
                .collect::<Result<_, _>>()?,
            upsampler: upsampler(&vs, out_channels, ub.add_upsample)?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: Option<&Tensor>,
        context: &Tensor,
        upsample_size: Option<(i64, i64)>,
    ) -> Result<Tensor, TchError> {
        let mut x = x.shallow_clone();
        let layers = self.resnets.iter().zip(&self.attentions);
        for ((resnet, attn), skip) in layers.zip(skips.iter().rev()) {
            let h = resnet.forward(&Tensor::f_cat(&[&x, skip], 1)?, temb)?;
            x = attn.forward(&h, Some(context))?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}

/// The VAE encoder's block: resnets without time embedding, then an
/// optional downsampler (padding 0 in the VAE: asymmetric pad).
#[derive(Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        out_channels: i64,
        cfg: DownBlock2DConfig,
    ) -> Result<Self, TchError> {
        Ok(Self {
            resnets: down_resnets(&vs, in_channels, out_channels, None, &cfg)?,
            downsampler: downsampler(&vs, out_channels, &cfg)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let mut x = x.shallow_clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x, None)?;
        }
        match &self.downsampler {
            Some(down) => down.forward(&x),
            None => Ok(x),
        }
    }
}

/// The VAE decoder's block: resnets without time embedding or skips, then
/// an optional upsampler.
#[derive(Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        out_channels: i64,
        cfg: UpBlock2DConfig,
    ) -> Result<Self, TchError> {
        let rcfg = resnet_config(
            out_channels,
            None,
            cfg.resnet_groups,
            cfg.resnet_eps,
            cfg.resnet_act_fn,
            cfg.output_scale_factor,
        );
        let resnets = &vs / "resnets";
        Ok(Self {
            resnets: (0..cfg.num_layers)
                .map(|i| {
                    let in_c = if i == 0 { in_channels } else { out_channels };
                    ResnetBlock2D::new(&resnets / i, in_c, rcfg)
                })
                .collect::<Result<_, _>>()?,
            upsampler: upsampler(&vs, out_channels, cfg.add_upsample)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let mut x = x.shallow_clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x, None)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, None),
            None => Ok(x),
        }
    }
}
