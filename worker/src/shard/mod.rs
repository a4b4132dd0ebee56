//! ZeRO stages 1 and 2 (`world.shard_state`, SPEC "Sharded optimizer
//! state"): data-parallel ranks hold identical copies of Adam's moments,
//! the EMA and the reduced gradients; sharded, each rank keeps them only
//! for its 1/W slice of the flattened parameters. The gradients are
//! reduce-scattered (the rank receives the mean of its slice), Adam and
//! the EMA update the slice, and the new weights are all-gathered: the
//! all-reduce's two halves, so the bytes on the wire stay the same.
//!
//! The student and DMD2's full fake score are sharded; the LoRA adapters
//! are small and stay replicated. The trainer enters sharding when it
//! joins a world (the slices depend on the world's size and this rank)
//! and leaves it when it restores a checkpoint, which holds the full,
//! world-independent state: a checkpoint gathers every slice first.
//! `none` never builds any of this.

pub mod gather;
pub mod layout;
pub mod net;

use tch::Tensor;

pub use net::{GatheredNet, ShardedNet};
use swiftbrush_proto::config::ShardState;

use crate::ema::Ema;
use crate::optim::Adam;
use crate::trainer::gradient_sync::{GradientSync, SyncError};

/// A rank's sharded training state.
pub struct ShardedState {
    pub student: ShardedNet,
    /// DMD2's full fake score; None: the LoRA adapters, replicated.
    pub fake_score: Option<ShardedNet>,
    /// Whether the student had an EMA (it lives in `student` meanwhile).
    had_ema: bool,
    /// A checkpoint asked for at a boundary (the coordinator's order
    /// reaches ranks at different boundaries), voted in the next step so
    /// every rank gathers at the same one.
    checkpoint_requested: bool,
}

/// The full state gathered from every rank's slices (host tensors).
pub struct Gathered {
    pub student: GatheredNet,
    pub fake_score: Option<GatheredNet>,
}

impl ShardedState {
    /// Shards the student's optimizer and EMA (taken from `ema`, dropped
    /// here) and, when `fake_params` is given (DMD2's full copy), the fake
    /// score's optimizer, for this rank of `sync`'s world.
    pub fn enter(
        stage: ShardState,
        sync: &dyn GradientSync,
        student: (&mut Adam, Vec<(String, Tensor)>),
        ema: Option<(Ema, f64)>,
        fake_score: Option<(&mut Adam, Vec<(String, Tensor)>)>,
    ) -> Result<Self, String> {
        let release = stage.shards_gradients();
        let had_ema = ema.is_some();
        let student = ShardedNet::enter(
            student.0,
            student.1,
            ema.as_ref().map(|(e, d)| (e, *d)),
            sync,
            release,
        )?;
        drop(ema);
        let fake_score = fake_score
            .map(|(adam, params)| ShardedNet::enter(adam, params, None, sync, release))
            .transpose()?;
        Ok(Self {
            student,
            fake_score,
            had_ema,
            checkpoint_requested: false,
        })
    }

    /// Back to the full shapes (zeros): `student` and `fake_score` are the
    /// unsharded Adams. Returns whether the student had an EMA (the caller
    /// rebuilds it).
    pub fn leave(self, student: &mut Adam, fake_score: &mut Adam) -> bool {
        self.student.leave(student);
        if let Some(f) = self.fake_score {
            f.leave(fake_score);
        }
        self.had_ema
    }

    pub fn request_checkpoint(&mut self) {
        self.checkpoint_requested = true;
    }

    /// The request to put into this step's vote (cleared).
    pub fn take_checkpoint_request(&mut self) -> bool {
        std::mem::take(&mut self.checkpoint_requested)
    }

    /// Gives ZeRO-2's freed gradients back their shapes, before a backward.
    pub fn restore_grads(&mut self) {
        self.student.restore_grads();
        if let Some(f) = self.fake_score.as_mut() {
            f.restore_grads();
        }
    }

    /// Every slice gathered, in bounded pieces, into host memory
    /// (collective: every rank calls it). Only a rank with `keep` (the one
    /// that writes the checkpoint) keeps the pieces; the others get None.
    pub fn gather(
        &self,
        sync: &mut dyn GradientSync,
        keep: bool,
    ) -> Result<Option<Gathered>, SyncError> {
        let student = self.student.gather_state(sync, keep)?;
        let fake_score = match &self.fake_score {
            Some(f) => f.gather_state(sync, keep)?,
            None => None,
        };
        Ok(student.map(|student| Gathered {
            student,
            fake_score,
        }))
    }

    /// Bytes of the slices' moments and EMA this rank keeps.
    pub fn slice_bytes(&self) -> usize {
        self.student.slice_bytes() + self.fake_score.as_ref().map_or(0, ShardedNet::slice_bytes)
    }
}

/// Bytes of `tensors`' elements.
pub fn bytes_of(tensors: &[Tensor]) -> usize {
    tensors
        .iter()
        .map(|t| t.numel() * t.kind().elt_size_in_bytes())
        .sum()
}

/// Bytes of the gradients `params` hold now.
pub fn grad_bytes(params: &[Tensor]) -> usize {
    let grads: Vec<Tensor> = params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect();
    bytes_of(&grads)
}

/// The same count for an unsharded network: its Adam's moments, its
/// EMA's weights and its gradients.
pub fn replicated_bytes(adam: &Adam, ema: Option<&Ema>) -> usize {
    let (m, v) = adam.moments();
    let ema: Vec<Tensor> = ema
        .iter()
        .flat_map(|e| e.tensors().into_iter().map(|(_, t)| t))
        .collect();
    bytes_of(m) + bytes_of(v) + bytes_of(&ema) + grad_bytes(adam.params())
}
