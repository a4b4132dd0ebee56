//! Noise schedules, samplers and guidance (diffusers-compatible): the DDPM
//! schedule and forward process ([`schedule`]), the DDIM sampler ([`ddim`]),
//! and classifier-free guidance ([`guidance`]).

pub mod ddim;
pub mod guidance;
pub mod schedule;

pub use ddim::{DDIMScheduler, DDIMStepOutput, ddim_timesteps};
pub use guidance::{classifier_free_guidance, guide_batched};
pub use schedule::{
    BetaSchedule, NoiseSchedule, PredictionType, ScheduleError, SchedulerConfig, TimestepSpacing,
};
