//! The networks of SwiftBrush (shared/SPEC.md): the frozen teacher, the
//! fake score that learns the student's distribution, and the student, a
//! full trainable copy initialised from the teacher. The fake score is
//! SwiftBrush's LoRA teacher ([`TeacherUNet`]: adapters over the teacher's
//! own weights) or DMD2's full trainable copy ([`FullFakeScore`],
//! `method.fake_score.kind: unet`); [`ScorePair`] is either, and every one
//! of them answers [`Scores::real`] and [`Scores::fake`].

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Device, Kind, TchError, Tensor, nn};

use crate::diffusion::Denoiser;
use crate::lora::{LoraError, LoraSet, LoraSpec, attach_lora};
use crate::models::layers::without_init;
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::{ModelError, weights};
use crate::pipeline::DiffusersFolder;
use crate::vsd::{FakeScore, Scores};

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Folder(#[from] crate::pipeline::FolderError),
    #[error(transparent)]
    Lora(#[from] LoraError),
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

    /// Copies saved weights in, strictly by name and shape; `origin` names
    /// them in errors.
    pub fn load_tensors(
        &mut self,
        tensors: HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<(), RoleError> {
        weights::load_tensors_strict(&mut self.vs, tensors, &[PathBuf::from(origin)])
            .map_err(ModelError::from)?;
        Ok(())
    }
}

impl Denoiser for UNet {
    /// Inputs are cast to the weights' dtype (a bf16 teacher takes float32
    /// latents) and the output comes back as float32.
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Result<Tensor, TchError> {
        let k = self.vs.kind();
        self.model
            .f_forward(&x.f_to_kind(k)?, t, &cond.f_to_kind(k)?)?
            .f_to_kind(Kind::Float)
    }
}

/// The teacher's UNet, frozen, with LoRA adapters: the teacher with the
/// adapters off, the LoRA teacher with them on (one copy of the base
/// weights).
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

impl Scores for TeacherUNet {
    fn real(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        let _off = self.lora.switch.off();
        self.unet.predict(x, t, c)
    }

    fn fake(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        self.unet.predict(x, t, c)
    }

    fn form(&self) -> FakeScore {
        FakeScore::Lora
    }

    /// One pass over [x; x]: the teacher on the first half (adapters off
    /// there), the LoRA teacher on the second.
    fn both(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        let n = x.size()[0];
        let out = {
            let _first_half_off = self.lora.switch.rows_from(n);
            self.unet.predict(
                &Tensor::f_cat(&[x, x], 0)?,
                &Tensor::f_cat(&[t, t], 0)?,
                &Tensor::f_cat(&[c, c], 0)?,
            )?
        };
        Ok((out.f_narrow(0, 0, n)?, out.f_narrow(0, n, n)?))
    }
}

/// The frozen teacher beside a full trainable copy of it as the fake score
/// (DMD2).
pub struct FullFakeScore {
    pub teacher: UNet,
    pub fake: UNet,
}

impl FullFakeScore {
    /// `fake` is a copy of the teacher in float32 (made before the teacher
    /// is cast to a half dtype): it trains.
    pub fn new(mut teacher: UNet, fake: UNet) -> Self {
        teacher.vs.freeze();
        Self { teacher, fake }
    }
}

impl Scores for FullFakeScore {
    fn real(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        self.teacher.predict(x, t, c)
    }

    fn fake(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        self.fake.predict(x, t, c)
    }

    fn form(&self) -> FakeScore {
        FakeScore::Unet
    }
}

/// The frozen teacher and the fake score, in either form: what the trainer
/// holds.
pub enum ScorePair {
    Lora(Box<TeacherUNet>),
    Unet(Box<FullFakeScore>),
}

impl ScorePair {
    /// The fake score's trainable tensors by name, sorted: the adapters by
    /// PEFT name, or the copy's weights by diffusers name.
    pub fn fake_parameters(&self) -> Vec<(String, Tensor)> {
        match self {
            ScorePair::Lora(t) => t.lora.named_parameters(),
            ScorePair::Unet(t) => t.fake.named_parameters(),
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
            ScorePair::Lora(t) => Ok(t.lora.load(&tensors)?),
            ScorePair::Unet(t) => t.fake.load_tensors(tensors, origin),
        }
    }

    fn scores(&self) -> &dyn Scores {
        match self {
            ScorePair::Lora(m) => m.as_ref(),
            ScorePair::Unet(m) => m.as_ref(),
        }
    }
}

impl Scores for ScorePair {
    fn real(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        self.scores().real(x, t, c)
    }

    fn fake(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        self.scores().fake(x, t, c)
    }

    fn form(&self) -> FakeScore {
        self.scores().form()
    }

    fn both(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        self.scores().both(x, t, c)
    }
}
