//! The networks that give SwiftBrush's scores (shared/SPEC.md): the frozen
//! teacher and the fake score that learns the student's distribution (the
//! student, a full trainable copy of the teacher, is a plain
//! [`UNet`]). The fake score is SwiftBrush's LoRA teacher ([`TeacherUNet`]:
//! adapters over the teacher's own weights) or DMD2's full trainable copy
//! ([`FullFakeScore`], `method.fake_score.kind: unet`); [`ScorePair`] is
//! either, and every one of them answers [`Scores::real`] and
//! [`Scores::fake`].

use std::collections::HashMap;

use tch::{TchError, Tensor};

use super::{FakeScore, Scores};
use crate::diffusion::Denoiser;
use crate::lora::{LoraError, LoraSet, LoraSpec, attach_lora, attach_lora_set};
use crate::models::lora_layer::LoraSwitch;
use crate::pipeline::{UNet, UNetError};

/// Building a score network or loading the fake score's tensors.
#[derive(Debug, thiserror::Error)]
pub enum ScoreNetworkError {
    #[error(transparent)]
    UNet(#[from] UNetError),
    #[error(transparent)]
    Lora(#[from] LoraError),
}

/// The teacher's UNet, frozen, with LoRA adapters: the teacher with the
/// adapters off, the LoRA teacher with them on (one copy of the base
/// weights).
pub struct TeacherUNet {
    pub unet: UNet,
    pub lora: LoraSet,
}

impl TeacherUNet {
    pub fn new(mut unet: UNet, spec: &LoraSpec) -> Result<Self, ScoreNetworkError> {
        unet.vs.freeze();
        let device = unet.vs.device();
        let lora = attach_lora(&mut unet.model, spec, device)?;
        Ok(Self { unet, lora })
    }
}

impl Scores for TeacherUNet {
    fn real(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        // Every set off: a LoRA student's adapters too.
        let _off = self.lora.switch.off();
        self.unet.predict(x, t, c)
    }

    fn fake(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        let _fake = self.lora.on();
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
            let _first_half_off = self.lora.on_rows_from(n);
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
    /// The switch of the adapters a LoRA student put on the teacher (None:
    /// the teacher carries none).
    teacher_adapters: Option<LoraSwitch>,
}

impl FullFakeScore {
    /// `fake` is a copy of the teacher in float32 (made before the teacher
    /// is cast to a half dtype): it trains.
    pub fn new(mut teacher: UNet, fake: UNet) -> Self {
        teacher.vs.freeze();
        Self {
            teacher,
            fake,
            teacher_adapters: None,
        }
    }
}

impl Scores for FullFakeScore {
    fn real(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        let _off = self.teacher_adapters.as_ref().map(LoraSwitch::off);
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
    ) -> Result<(), ScoreNetworkError> {
        match self {
            ScorePair::Lora(t) => Ok(t.lora.load(&tensors)?),
            ScorePair::Unet(t) => Ok(t.fake.load_tensors(tensors, origin)?),
        }
    }

    /// The frozen teacher's UNet: the base a LoRA student's adapters sit
    /// on (with a LoRA fake score, the fake score's too).
    pub fn base(&self) -> &UNet {
        match self {
            ScorePair::Lora(t) => &t.unet,
            ScorePair::Unet(t) => &t.teacher,
        }
    }

    /// Attaches a LoRA student's adapters (fresh: B zero) to the teacher's
    /// base, beside the fake score's adapters when it has them: one copy of
    /// the base weights then serves all three roles, each pass selecting
    /// its set (the teacher: none).
    pub fn attach_student(&mut self, spec: &LoraSpec) -> Result<LoraSet, ScoreNetworkError> {
        Ok(match self {
            ScorePair::Lora(t) => {
                let device = t.unet.vs.device();
                attach_lora_set(&mut t.unet.model, spec, device, &t.lora.switch)?
            }
            ScorePair::Unet(t) => {
                let device = t.teacher.vs.device();
                let set = attach_lora(&mut t.teacher.model, spec, device)?;
                t.teacher_adapters = Some(set.switch.clone());
                set
            }
        })
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
