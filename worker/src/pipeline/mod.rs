//! Loading diffusers pipeline folders: finding components and weights
//! (`folder`); building the networks from them lands with the models.

pub mod fingerprint;
pub mod folder;

pub use fingerprint::teacher_fingerprint;
pub use folder::{Component, DiffusersFolder, FolderError};
