//! Diffusers pipeline folders: finding components and weights (`folder`),
//! loading the text encoder and VAE (`components`) and the UNet (`unet`),
//! the assembled teacher pipeline with DDIM sampling (`stable_diffusion`),
//! and a cheap identity of a teacher folder (`fingerprint`).

pub mod components;
mod few_step;
pub mod fingerprint;
pub mod folder;
pub mod stable_diffusion;
pub mod unet;

pub use fingerprint::{FingerprintError, teacher_fingerprint};
pub use folder::{Component, DiffusersFolder, FolderError};
pub use stable_diffusion::{PipelineError, PromptEmbeddings, StableDiffusion};
pub use unet::{UNet, UNetError};
