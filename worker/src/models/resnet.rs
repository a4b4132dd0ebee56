//! diffusers' resnet.py, downsampling.py and upsampling.py as Stable
//! Diffusion uses them: [`ResnetBlock2D`] (with a time embedding in the UNet,
//! without one in the VAE), [`Downsample2D`] and [`Upsample2D`], both with
//! their convolution. Shared by the UNet and the VAE.

use tch::{TchError, Tensor, nn};

use super::layers::{Activation, Conv2d, GroupNorm, Linear};

/// ResnetBlock2D's knobs with time_embedding_norm "default"; Default holds
/// diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetBlock2DConfig {
    /// None: same as the input channels.
    pub out_channels: Option<i64>,
    /// None: no time embedding (VAE).
    pub temb_channels: Option<i64>,
    pub groups: i64,
    /// None: same as `groups`.
    pub groups_out: Option<i64>,
    pub eps: f64,
    pub non_linearity: Activation,
    pub output_scale_factor: f64,
    /// None: a 1x1 shortcut conv exactly when the channel count changes.
    pub use_in_shortcut: Option<bool>,
}

impl Default for ResnetBlock2DConfig {
    fn default() -> Self {
        Self {
            out_channels: None,
            temb_channels: Some(512),
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            non_linearity: Activation::Silu,
            output_scale_factor: 1.0,
            use_in_shortcut: None,
        }
    }
}

/// Two GroupNorm-act-conv stages with the projected time embedding added in
/// between, and a residual connection.
#[derive(Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::Path, in_channels: i64, cfg: ResnetBlock2DConfig) -> Result<Self, TchError> {
        let out_channels = cfg.out_channels.unwrap_or(in_channels);
        let groups_out = cfg.groups_out.unwrap_or(cfg.groups);
        let time_emb_proj = match cfg.temb_channels {
            Some(temb) => Some(Linear::new(
                &(&vs / "time_emb_proj"),
                temb,
                out_channels,
                true,
            )?),
            None => None,
        };
        let use_in_shortcut = cfg.use_in_shortcut.unwrap_or(in_channels != out_channels);
        let conv_shortcut = if use_in_shortcut {
            Some(Conv2d::new(
                &(&vs / "conv_shortcut"),
                in_channels,
                out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(&(&vs / "norm1"), cfg.groups, in_channels, cfg.eps)?,
            conv1: Conv2d::new(&(&vs / "conv1"), in_channels, out_channels, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(&(&vs / "norm2"), groups_out, out_channels, cfg.eps)?,
            conv2: Conv2d::new(&(&vs / "conv2"), out_channels, out_channels, 3, 1, 1)?,
            conv_shortcut,
            act: cfg.non_linearity,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `x`: [B, C, H, W]; `temb`: [B, temb_channels] (ignored by a block
    /// built without `temb_channels`).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor, TchError> {
        let h = self
            .conv1
            .forward(&self.act.forward(&self.norm1.forward(x)?)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let temb = proj.forward(&self.act.forward(temb)?)?;
                h.f_add(&temb.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?
            }
            _ => h,
        };
        let h = self
            .conv2
            .forward(&self.act.forward(&self.norm2.forward(&h)?)?)?;
        let out = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?.f_add(&h)?,
            None => x.f_add(&h)?,
        };
        if self.output_scale_factor != 1.0 {
            out.f_div_scalar(self.output_scale_factor)
        } else {
            Ok(out)
        }
    }
}

/// diffusers' `Downsample2D(use_conv=True, name="op")`: a stride-2 3x3
/// convolution (`conv`). With padding 0 (the VAE) the input is first padded
/// by one on the right and bottom only, as in diffusers.
#[derive(Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    padding: i64,
}

impl Downsample2D {
    pub fn new(
        vs: nn::Path,
        channels: i64,
        out_channels: i64,
        padding: i64,
    ) -> Result<Self, TchError> {
        Ok(Self {
            conv: Conv2d::new(&(&vs / "conv"), channels, out_channels, 3, 2, padding)?,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        if self.padding == 0 {
            self.conv.forward(&x.f_constant_pad_nd([0, 1, 0, 1])?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D(use_conv=True)`: nearest-neighbour upsampling by 2
/// (or to an explicit size) followed by a 3x3 convolution (`conv`).
#[derive(Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vs: nn::Path, channels: i64, out_channels: i64) -> Result<Self, TchError> {
        Ok(Self {
            conv: Conv2d::new(&(&vs / "conv"), channels, out_channels, 3, 1, 1)?,
        })
    }

    /// `output_size`: (H, W) to interpolate to instead of doubling; the UNet
    /// passes it when the input size is not a multiple of its total
    /// upsampling factor.
    pub fn forward(&self, x: &Tensor, output_size: Option<(i64, i64)>) -> Result<Tensor, TchError> {
        let up = match output_size {
            Some((h, w)) => x.f_upsample_nearest2d([h, w], None, None)?,
            None => {
                let (_, _, h, w) = x.size4()?;
                x.f_upsample_nearest2d([h * 2, w * 2], Some(2.0), Some(2.0))?
            }
        };
        self.conv.forward(&up)
    }
}
