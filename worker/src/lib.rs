//! The swiftbrush worker: diffusers-compatible models in tch, the diffusion
//! schedules and samplers, the SwiftBrush step and the trainer.

pub mod bench;
pub mod collective;
pub mod cuda_driver;
pub mod device;
pub mod diffusion;
pub mod distributed;
pub mod doctor;
pub mod ema;
pub mod eval;
pub mod export;
pub mod foreach;
pub mod host_memory;
pub mod host_read;
pub mod image_io;
pub mod libtorch;
pub mod lora;
pub mod models;
pub mod optim;
pub mod pipeline;
pub mod precision;
pub mod sample;
/// The C ABI of the C++ shim in csrc/ (autocast, CUDA stream).
mod shim;
pub mod threads;
pub mod toy;
pub mod trainer;
pub mod vsd;
