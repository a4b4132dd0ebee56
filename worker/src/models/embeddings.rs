//! diffusers' embeddings.py for the UNet's time conditioning: the sinusoidal
//! [`Timesteps`] projection (no variables) and the [`TimestepEmbedding`] MLP
//! (`time_embedding.linear_1`, `time_embedding.linear_2`).

use tch::{Kind, TchError, Tensor, nn};

use super::layers::{Activation, Linear};

/// diffusers' `get_timestep_embedding`, computed in float32 in the same
/// order of operations so that t = 999 lands on the same phases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timesteps {
    pub num_channels: i64,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
    pub scale: f64,
    pub max_period: f64,
}

impl Timesteps {
    pub fn new(num_channels: i64, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            num_channels,
            flip_sin_to_cos,
            downscale_freq_shift,
            scale: 1.0,
            max_period: 10000.0,
        }
    }

    /// `timesteps`: [N], any numeric kind, may be fractional. Returns
    /// [N, num_channels] float32.
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor, TchError> {
        let half_dim = self.num_channels / 2;
        let exponent = Tensor::f_arange(half_dim, (Kind::Float, timesteps.device()))?
            .f_mul_scalar(-self.max_period.ln())?;
        let exponent = exponent.f_div_scalar(half_dim as f64 - self.downscale_freq_shift)?;
        let emb = timesteps
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(1)?
            .f_mul(&exponent.f_exp()?.f_unsqueeze(0)?)?;
        let emb = if self.scale != 1.0 {
            emb.f_mul_scalar(self.scale)?
        } else {
            emb
        };
        let (sin, cos) = (emb.f_sin()?, emb.f_cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::f_cat(&[cos, sin], -1)?
        } else {
            Tensor::f_cat(&[sin, cos], -1)?
        };
        if self.num_channels % 2 == 1 {
            emb.f_constant_pad_nd([0, 1, 0, 0])
        } else {
            Ok(emb)
        }
    }
}

/// diffusers' `TimestepEmbedding` without the optional condition projection
/// and post-activation (SD uses neither).
#[derive(Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
    act: Activation,
}

impl TimestepEmbedding {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        time_embed_dim: i64,
        act: Activation,
    ) -> Result<Self, TchError> {
        Ok(Self {
            linear_1: Linear::new(&(&vs / "linear_1"), in_channels, time_embed_dim, true)?,
            linear_2: Linear::new(&(&vs / "linear_2"), time_embed_dim, time_embed_dim, true)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(x)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn flip_puts_cosine_first_and_t0_gives_ones_then_zeros() {
        let t = Tensor::from_slice(&[0i64]);
        let emb = Timesteps::new(8, true, 0.0).forward(&t).unwrap();
        let expected = Tensor::from_slice(&[1f32, 1., 1., 1., 0., 0., 0., 0.]).unsqueeze(0);
        assert_eq!(emb, expected);
        let emb = Timesteps::new(7, false, 1.0).forward(&t).unwrap();
        assert_eq!(emb.size(), [1, 7]);
    }

    #[test]
    fn frequencies_follow_max_period_and_shift() {
        // With shift 0 the last of 4 frequencies is 10000^(-3/4).
        let t = Tensor::from_slice(&[1.0f64]).to_device(Device::Cpu);
        let emb = Timesteps::new(8, false, 0.0).forward(&t).unwrap();
        let last_sin = f64::try_from(emb.get(0).get(3)).unwrap();
        assert!((last_sin - (10000f64.powf(-0.75)).sin()).abs() < 1e-7);
    }
}
