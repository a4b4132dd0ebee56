//! The three networks of SwiftBrush (shared/SPEC.md): the frozen teacher
//! and the LoRA teacher as one UNet with switchable adapters, and the
//! student, a full trainable copy initialised from the teacher. DMD2's
//! variant replaces the adapters by a full trainable copy
//! (`method.fake_score: unet`): [`FullFakeScore`]; [`Teachers`] is either.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor, nn};

use crate::lora::{LoraError, LoraSet, LoraSpec, attach_lora};
use crate::models::layers::without_init;
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::{ModelError, weights};
use crate::pipeline::DiffusersFolder;
use crate::vsd::{Denoiser, FakeScore, LoraTeacher};

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Folder(#[from] crate::pipeline::FolderError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// A UNet and the VarStore that owns its weights.
pub struct UNet {
    pub vs: nn::VarStore,
    pub model: UNet2DConditionModel,
    pub config: UNet2DConditionConfig,
}

impl UNet {
    /// Loads `unet/` of a diffusers folder strictly by name, in float32.
    pub fn load(folder: &DiffusersFolder, device: Device) -> Result<Self, RoleError> {
        Self::load_as(folder, device, Kind::Float)
    }

    /// As [`Self::load`], with the weights in `kind` (each tensor converted
    /// as it is copied in: no float32 copy of the model is ever made).
    pub fn load_as(
        folder: &DiffusersFolder,
        device: Device,
        kind: Kind,
    ) -> Result<Self, RoleError> {
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

    /// A new UNet with the same architecture and a copy of the weights.
    pub fn duplicate(&self) -> Result<Self, RoleError> {
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

    /// Loads weights saved by [`weights::save_varstore`] (or any file with
    /// diffusers' names) over this UNet.
    pub fn load_weights(&mut self, file: &Path) -> Result<(), RoleError> {
        weights::load_strict(&mut self.vs, &[file.to_owned()]).map_err(ModelError::from)?;
        Ok(())
    }
}

impl Denoiser for UNet {
    /// Inputs are cast to the weights' dtype (a bf16 teacher takes float32
    /// latents) and the output comes back as float32.
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Tensor {
        let k = self.vs.kind();
        self.model
            .forward(&x.to_kind(k), t, &cond.to_kind(k))
            .to_kind(tch::Kind::Float)
    }
}

/// The teacher's UNet, frozen, with LoRA adapters: the teacher when the
/// adapters are off, the LoRA teacher when they are on.
pub struct TeacherUNet {
    pub unet: UNet,
    pub lora: LoraSet,
}

impl TeacherUNet {
    pub fn new(mut unet: UNet, spec: &LoraSpec) -> Result<Self, RoleError> {
        unet.vs.freeze();
        let device = unet.vs.device();
        let lora = attach_lora(&mut unet.model, spec, device)?;
        Ok(Self { unet, lora })
    }
}

impl Denoiser for TeacherUNet {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Tensor {
        self.unet.predict(x, t, cond)
    }
}

impl LoraTeacher for TeacherUNet {
    fn set_adapters_enabled(&self, enabled: bool) {
        self.lora.switch.set(enabled);
    }

    fn fake_score(&self) -> FakeScore {
        FakeScore::Lora
    }
}

/// The frozen teacher beside a full trainable copy of it as the fake score
/// (DMD2): "adapters on" selects the copy.
pub struct FullFakeScore {
    pub teacher: UNet,
    pub fake: UNet,
    fake_on: AtomicBool,
}

impl FullFakeScore {
    /// `fake` is a copy of the teacher in float32 (made before the teacher
    /// is cast to a half dtype): it trains.
    pub fn new(mut teacher: UNet, fake: UNet) -> Self {
        teacher.vs.freeze();
        Self {
            teacher,
            fake,
            fake_on: AtomicBool::new(true),
        }
    }
}

impl Denoiser for FullFakeScore {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Tensor {
        if self.fake_on.load(Ordering::Relaxed) {
            self.fake.predict(x, t, cond)
        } else {
            self.teacher.predict(x, t, cond)
        }
    }
}

impl LoraTeacher for FullFakeScore {
    fn set_adapters_enabled(&self, enabled: bool) {
        self.fake_on.store(enabled, Ordering::Relaxed);
    }

    fn fake_score(&self) -> FakeScore {
        FakeScore::Unet
    }
}

/// The frozen teacher and the fake score, in either form: what the trainer
/// holds.
pub enum Teachers {
    Lora(Box<TeacherUNet>),
    Unet(Box<FullFakeScore>),
}

impl Teachers {
    /// The fake score's trainable tensors by name, sorted: the adapters by
    /// PEFT name, or the copy's weights by diffusers name.
    pub fn fake_parameters(&self) -> Vec<(String, Tensor)> {
        match self {
            Teachers::Lora(t) => t.lora.named_parameters(),
            Teachers::Unet(t) => t.fake.named_parameters(),
        }
    }

    /// Copies saved fake-score tensors in, strictly by name and shape;
    /// `origin` names them in errors.
    pub fn load_fake(
        &mut self,
        tensors: HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<(), RoleError> {
        match self {
            Teachers::Lora(t) => Ok(t.lora.load(&tensors)?),
            Teachers::Unet(t) => {
                weights::load_tensors_strict(&mut t.fake.vs, tensors, &[PathBuf::from(origin)])
                    .map_err(ModelError::from)?;
                Ok(())
            }
        }
    }
}

impl Denoiser for Teachers {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Tensor {
        match self {
            Teachers::Lora(m) => m.predict(x, t, cond),
            Teachers::Unet(m) => m.predict(x, t, cond),
        }
    }
}

impl LoraTeacher for Teachers {
    fn set_adapters_enabled(&self, enabled: bool) {
        match self {
            Teachers::Lora(m) => m.set_adapters_enabled(enabled),
            Teachers::Unet(m) => m.set_adapters_enabled(enabled),
        }
    }

    fn fake_score(&self) -> FakeScore {
        match self {
            Teachers::Lora(m) => m.fake_score(),
            Teachers::Unet(m) => m.fake_score(),
        }
    }
}
