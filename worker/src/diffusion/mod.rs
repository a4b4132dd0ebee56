//! Noise schedules, samplers and guidance (diffusers-compatible): the DDPM
//! schedule, the forward process and the conversions between epsilon, v and
//! x0 ([`schedule`]), the DDIM sampler ([`ddim`]), SDXL's default Euler
//! sampler ([`euler`]), the student's one-step draw ([`one_step`]), a
//! few-step student's chain ([`few_step`]), classifier-free guidance
//! ([`guidance`]) and the seeded initial noise of sampling ([`latents`]).
//! Each formula lives here once; the VSD step calls them.

pub mod ddim;
pub mod euler;
pub mod few_step;
pub mod guidance;
pub mod latents;
pub mod one_step;
pub mod schedule;

pub use ddim::{DDIMScheduler, DDIMStepOutput, ddim_timesteps};
pub use euler::{EulerDiscreteScheduler, EulerOptions};
pub use few_step::{StudentChain, draw_chain_noise, draw_renoise};
pub use guidance::{classifier_free_guidance, guide_batched};
pub use latents::draw_latents;
pub use one_step::{Denoiser, OneStepDraw, one_step_output, one_step_x0, x0_of_output};
pub use schedule::{
    BetaSchedule, NoiseSchedule, PredictionType, ScheduleError, SchedulerConfig, TimestepSpacing,
    add_noise_at, one_minus, to_epsilon, to_x0,
};
