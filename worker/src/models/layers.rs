//! The primitive layers the UNet and the VAE share (linear, 2-D
//! convolution, group and layer norm, activations) and how every variable
//! of those models is created: with PyTorch's default initialisation, or,
//! inside [`without_init`], backed by memory that is never written until
//! weights are loaded.
//!
//! [`Linear`] and [`Conv2d`] are the layers LoRA adapters attach to (the
//! attention projections and the ResNet convolutions): each can carry a
//! [`LoraAdapter`].

use std::cell::Cell;

use tch::{TchError, Tensor, nn};

use super::lora_layer::LoraAdapter;

thread_local! {
    static SKIP_INIT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `build` with variable initialisation switched off, like accelerate's
/// `init_empty_weights`: every variable created inside (on this thread) is
/// backed by `Tensor::empty`. On the CPU the OS commits such pages only
/// when they are written, so building the full SD UNet this way takes
/// milliseconds and almost no resident memory until weights are loaded (on
/// a GPU the memory is reserved but nothing is spent filling it).
///
/// The values are garbage until then. Use it for models whose weights are
/// loaded next ([`super::weights::load_strict`] writes every variable or
/// fails before touching any) or to inspect names and shapes.
pub fn without_init<T>(build: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SKIP_INIT.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SKIP_INIT.with(|s| s.replace(true)));
    build()
}

/// How a new variable is filled outside [`without_init`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    Zeros,
    Ones,
    /// Uniform in [-bound, bound]. PyTorch's default for linear and conv
    /// weights (kaiming-uniform with a = sqrt 5) and biases both come down
    /// to bound = 1 / sqrt(fan_in).
    Uniform(f64),
}

/// Creates a trainable variable `name` under `vs` in the store's kind.
pub(crate) fn new_var(
    vs: &nn::Path,
    name: &str,
    dims: &[i64],
    init: Init,
) -> Result<Tensor, TchError> {
    let opts = (vs.kind(), vs.device());
    let tensor = if SKIP_INIT.with(Cell::get) {
        Tensor::f_empty(dims, opts)?
    } else {
        match init {
            Init::Zeros => Tensor::f_zeros(dims, opts)?,
            Init::Ones => Tensor::f_ones(dims, opts)?,
            Init::Uniform(bound) => Tensor::f_empty(dims, opts)?.f_uniform_(-bound, bound)?,
        }
    };
    Ok(vs.add(name, tensor, true))
}

fn fan_in_bound(fan_in: i64) -> f64 {
    1.0 / (fan_in.max(1) as f64).sqrt()
}

/// torch.nn.Linear (`weight` [out, in], optional `bias`). Every attention
/// projection is one of these, so adapters can be attached to it by name
/// (`crate::lora`): with an enabled adapter ([`LoraAdapter`]) the output
/// gains scale * B(A(x)), as PEFT's LoRA layer computes it.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The module's state-dict path, e.g.
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    /// Its adapters, one per set attached (the switch picks at most one).
    pub lora: Vec<LoraAdapter>,
}

impl Linear {
    pub fn new(
        vs: &nn::Path,
        in_features: i64,
        out_features: i64,
        bias: bool,
    ) -> Result<Self, TchError> {
        let bound = 1.0 / (in_features.max(1) as f64).sqrt();
        let weight = new_var(
            vs,
            "weight",
            &[out_features, in_features],
            Init::Uniform(bound),
        )?;
        let bias = if bias {
            Some(new_var(vs, "bias", &[out_features], Init::Uniform(bound))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            path: vs.components().collect::<Vec<_>>().join("."),
            lora: Vec::new(),
        })
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let y = x.f_linear(&self.weight, self.bias.as_ref())?;
        self.lora.iter().try_fold(y, |y, lora| lora.apply(x, y))
    }
}

/// torch.nn.Conv2d with square kernel, stride and padding (`weight`, `bias`).
/// Like [`Linear`] it can carry a LoRA adapter
/// (`crate::lora`): then the output gains scale * B(A(x)), A a conv with the
/// base's kernel, stride and padding, B a 1x1 conv, as PEFT's Conv2d LoRA.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    /// The module's state-dict path, e.g. `down_blocks.0.resnets.0.conv1`.
    pub path: String,
    /// Its adapters, one per set attached (the switch picks at most one).
    pub lora: Vec<LoraAdapter>,
}

impl Conv2d {
    pub fn new(
        vs: &nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel_size: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self, TchError> {
        let bound = fan_in_bound(in_channels * kernel_size * kernel_size);
        let weight = new_var(
            vs,
            "weight",
            &[out_channels, in_channels, kernel_size, kernel_size],
            Init::Uniform(bound),
        )?;
        let bias = Some(new_var(vs, "bias", &[out_channels], Init::Uniform(bound))?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            path: vs.components().collect::<Vec<_>>().join("."),
            lora: Vec::new(),
        })
    }

    pub fn in_channels(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_channels(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn kernel_size(&self) -> i64 {
        self.weight.size()[2]
    }

    pub fn stride(&self) -> i64 {
        self.stride
    }

    pub fn padding(&self) -> i64 {
        self.padding
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let y = x.f_conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )?;
        self.lora.iter().try_fold(y, |y, lora| lora.apply(x, y))
    }
}

/// torch.nn.GroupNorm with affine weight and bias.
#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    num_groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn new(
        vs: &nn::Path,
        num_groups: i64,
        num_channels: i64,
        eps: f64,
    ) -> Result<Self, TchError> {
        Ok(Self {
            weight: new_var(vs, "weight", &[num_channels], Init::Ones)?,
            bias: new_var(vs, "bias", &[num_channels], Init::Zeros)?,
            num_groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_group_norm(
            self.num_groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// torch.nn.LayerNorm over the last dimension, with affine weight and bias.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vs: &nn::Path, dim: i64, eps: f64) -> Result<Self, TchError> {
        Ok(Self {
            weight: new_var(vs, "weight", &[dim], Init::Ones)?,
            bias: new_var(vs, "bias", &[dim], Init::Zeros)?,
            dim,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// diffusers' `get_activation` names (`act_fn`, `resnet_act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Mish,
    Gelu,
    Relu,
}

impl Activation {
    /// The activation for a diffusers name ("silu" and "swish" are the same).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "mish" => Some(Self::Mish),
            "gelu" => Some(Self::Gelu),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Self::Silu => x.f_silu(),
            Self::Mish => x.f_mish(),
            Self::Gelu => x.f_gelu("none"),
            Self::Relu => x.f_relu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, nn::VarStore};

    #[test]
    fn without_init_creates_trainable_variables_and_restores_the_flag() {
        let vs = VarStore::new(Device::Cpu);
        let conv = without_init(|| Conv2d::new(&vs.root(), 2, 3, 3, 1, 1)).unwrap();
        assert!(conv.weight.requires_grad());
        assert_eq!(conv.weight.size(), [3, 2, 3, 3]);
        // Outside the scope, initialisation is back.
        let norm = GroupNorm::new(&(vs.root() / "norm"), 1, 3, 1e-5).unwrap();
        let ones = f64::try_from(norm.weight.sum(Kind::Double)).unwrap();
        assert_eq!(ones, 3.0);
    }

    #[test]
    fn without_init_restores_after_a_panic() {
        let result = std::panic::catch_unwind(|| without_init(|| panic!("boom")));
        assert!(result.is_err());
        assert!(!SKIP_INIT.with(Cell::get));
    }

    #[test]
    fn default_init_is_bounded_by_fan_in() {
        let vs = VarStore::new(Device::Cpu);
        let conv = Conv2d::new(&vs.root(), 4, 8, 3, 1, 1).unwrap();
        let max = f64::try_from(conv.weight.abs().max()).unwrap();
        assert!(max > 0.0 && max <= 1.0 / 36f64.sqrt());
    }
}
