//! The initial noise of a sampling run, drawn from a seeded CPU generator:
//! `swiftbrush sample --seed` and the trainer's progress pictures draw the
//! same numbers this way.

use tch::{Device, Kind, TchError, Tensor};

/// Standard normal noise of `shape` from a CPU generator seeded by `seed`:
/// the same numbers on every device, and the same as diffusers draws with
/// `generator=torch.Generator("cpu").manual_seed(seed)`.
pub fn draw_latents(seed: u64, shape: &[i64]) -> Result<Tensor, TchError> {
    tch::manual_seed(seed as i64);
    Tensor::f_randn(shape, (Kind::Float, Device::Cpu))
}

// Seeded noise is checked through the binary (tests/cli_sample.rs): the
// generator is process-global and unit tests share the process.
