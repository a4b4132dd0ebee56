//! The student the step trains (`method.student.kind`): a full trainable
//! copy of the teacher ([`Student::Full`], SwiftBrush), or LoRA adapters
//! on the teacher's own frozen base ([`Student::Lora`]: no second UNet).
//! A LoRA student's pass runs the score networks' base with its adapter
//! set selected for the pass ([`StudentNet`]), as the scores select theirs:
//! no caller flips a shared switch.

use std::collections::HashMap;

use tch::{TchError, Tensor};

use super::score_networks::{ScoreNetworkError, ScorePair};
use crate::diffusion::Denoiser;
use crate::lora::LoraSet;
use crate::pipeline::UNet;

/// The student's trainable part.
pub enum Student {
    /// A float32 copy of the teacher, every weight trainable.
    Full(Box<UNet>),
    /// Adapters (float32, B zero at the start) on the teacher's base,
    /// which the [`ScorePair`] holds.
    Lora(LoraSet),
}

impl Student {
    /// The student's trainable tensors by name, sorted: the UNet's weights
    /// by diffusers name, or the adapters by PEFT name (no prefix).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        match self {
            Student::Full(u) => u.named_parameters(),
            Student::Lora(l) => l.named_parameters(),
        }
    }

    /// The trainable tensors by name (what the EMA updates and swaps).
    pub fn variables(&self) -> HashMap<String, Tensor> {
        match self {
            Student::Full(u) => u.vs.variables(),
            Student::Lora(l) => l.vs.variables(),
        }
    }

    /// Copies saved tensors in, strictly by name and shape; `origin` names
    /// them in errors.
    pub fn load_tensors(
        &mut self,
        tensors: HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<(), ScoreNetworkError> {
        match self {
            Student::Full(u) => Ok(u.load_tensors(tensors, origin)?),
            Student::Lora(l) => Ok(l.load(&tensors)?),
        }
    }

    /// The student as a network, over `scores`' base for a LoRA student.
    pub fn net<'a>(&'a self, scores: &'a ScorePair) -> StudentNet<'a> {
        match self {
            Student::Full(u) => StudentNet::Full(u),
            Student::Lora(l) => StudentNet::Lora {
                base: scores.base(),
                adapters: l,
            },
        }
    }

    /// The full student's UNet; None for a LoRA student.
    pub fn unet(&self) -> Option<&UNet> {
        match self {
            Student::Full(u) => Some(u.as_ref()),
            Student::Lora(_) => None,
        }
    }
}

/// The student's pass: its own UNet, or the shared base with the student's
/// adapters selected for the pass (and no other set).
#[derive(Clone, Copy)]
pub enum StudentNet<'a> {
    Full(&'a UNet),
    Lora {
        base: &'a UNet,
        adapters: &'a LoraSet,
    },
}

impl Denoiser for StudentNet<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Result<Tensor, TchError> {
        match self {
            StudentNet::Full(u) => u.predict(x, t, cond),
            StudentNet::Lora { base, adapters } => {
                let _student = adapters.on();
                base.predict(x, t, cond)
            }
        }
    }
}
