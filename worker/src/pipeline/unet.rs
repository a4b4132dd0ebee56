//! The UNet of a diffusers folder with the VarStore that owns its weights:
//! loaded strictly by name from `unet/`, copied, its weights by name, and
//! its pass as a [`Denoiser`]. The teacher, the fake score and the student
//! are all one of these (the score networks are `crate::vsd`'s).

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Device, Kind, TchError, Tensor, nn};

use super::{DiffusersFolder, FolderError};
use crate::diffusion::Denoiser;
use crate::models::layers::without_init;
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::{ModelError, weights};

#[derive(Debug, thiserror::Error)]
pub enum UNetError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error("{0}")]
    Torch(#[from] TchError),
}

/// A UNet and the VarStore that owns its weights.
pub struct UNet {
    pub vs: nn::VarStore,
    pub model: UNet2DConditionModel,
    pub config: UNet2DConditionConfig,
}

impl UNet {
    /// Loads `unet/` of a diffusers folder strictly by name, in float32.
    pub fn load(folder: &DiffusersFolder, device: Device) -> Result<Self, UNetError> {
        Self::load_as(folder, device, Kind::Float)
    }

    /// As [`Self::load`], with the weights in `kind` (each tensor converted
    /// as it is copied in: no float32 copy of the model is ever made).
    pub fn load_as(
        folder: &DiffusersFolder,
        device: Device,
        kind: Kind,
    ) -> Result<Self, UNetError> {
        let component = folder.component("unet")?;
        let config = UNet2DConditionConfig::from_file(&component.config_path()?)?;
        let files = component.weight_files()?;
        let mut vs = nn::VarStore::new(device);
        // Sets the kind new variables are created in (the store is empty).
        vs.set_kind(kind);
        let model = without_init(|| UNet2DConditionModel::new(vs.root(), &config))?;
        weights::load_strict(&mut vs, &files).map_err(ModelError::from)?;
        Ok(Self { vs, model, config })
    }

    /// A UNet of `config` with PyTorch's default initialisation (random
    /// weights) in float32: what `swiftbrush plan` measures passes with,
    /// from a folder that may hold only config files.
    pub fn from_config(config: &UNet2DConditionConfig, device: Device) -> Result<Self, UNetError> {
        let vs = nn::VarStore::new(device);
        let model = UNet2DConditionModel::new(vs.root(), config)?;
        Ok(Self {
            vs,
            model,
            config: config.clone(),
        })
    }

    /// A new UNet with the same architecture and a copy of the weights.
    pub fn duplicate(&self) -> Result<Self, UNetError> {
        let mut vs = nn::VarStore::new(self.vs.device());
        let model = without_init(|| UNet2DConditionModel::new(vs.root(), &self.config))?;
        vs.copy(&self.vs)?;
        Ok(Self {
            vs,
            model,
            config: self.config.clone(),
        })
    }

    /// The weights by diffusers name, sorted (the order optimizers, EMA and
    /// checkpoints use).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Copies saved weights in, strictly by name and shape; `origin` names
    /// them in errors.
    pub fn load_tensors(
        &mut self,
        tensors: HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<(), UNetError> {
        weights::load_tensors_strict(&mut self.vs, tensors, &[PathBuf::from(origin)])
            .map_err(ModelError::from)?;
        Ok(())
    }
}

impl Denoiser for UNet {
    /// Inputs are cast to the weights' dtype (a bf16 teacher takes float32
    /// latents) and the output comes back as float32.
    /// An SDXL UNet takes its condition packed (`xl_condition.rs`).
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Result<Tensor, TchError> {
        let k = self.vs.kind();
        if let Ok(Some(dims)) = self.config.text_time() {
            let (hidden, added) =
                super::xl_condition::unpack(&cond.f_to_kind(k)?, dims.pooled_dim())?;
            return self
                .model
                .f_forward_added(&x.f_to_kind(k)?, t, &hidden, Some(&added))?
                .f_to_kind(Kind::Float);
        }
        self.model
            .f_forward(&x.f_to_kind(k)?, t, &cond.f_to_kind(k)?)?
            .f_to_kind(Kind::Float)
    }
}
