//! Diffusers pipeline folders: finding components and weights (`folder`),
//! loading the text encoder and VAE (`components`) and the UNet (`unet`),
//! the assembled teacher pipeline with DDIM sampling (`stable_diffusion`),
//! SDXL's (`stable_diffusion_xl`),
//! and a cheap identity of a teacher folder (`fingerprint`).

pub mod any_pipeline;
pub mod architecture;
pub mod components;
mod few_step;
pub mod fingerprint;
pub mod folder;
pub mod stable_diffusion;
pub mod stable_diffusion_xl;
pub mod unet;
pub mod xl_condition;
pub mod xl_text;

pub use any_pipeline::AnyPipeline;
pub use architecture::teacher_architecture;
pub use fingerprint::{FingerprintError, teacher_fingerprint};
pub use folder::{Component, DiffusersFolder, FolderError};
pub use stable_diffusion::{PipelineError, PromptEmbeddings, StableDiffusion};
pub use stable_diffusion_xl::{StableDiffusionXL, XlCondition, is_sdxl_folder};
pub use unet::{UNet, UNetError};
