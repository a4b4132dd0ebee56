//! The swiftbrush worker: diffusers-compatible models in tch, the diffusion
//! schedules and samplers, the SwiftBrush step and the trainer.

pub mod bench;
pub mod collective;
pub mod diffusion;
pub mod distributed;
pub mod doctor;
pub mod ema;
pub mod eval;
pub mod export;
pub mod export_dtype;
pub mod export_lora;
pub mod export_scheduler;
pub mod image_io;
pub mod lora;
pub mod models;
pub mod optim;
pub mod pipeline;
pub mod plan;
pub mod sample;
pub mod shard;
pub mod threads;
pub mod torch;
pub mod toy;
pub mod trainer;
pub mod vsd;
