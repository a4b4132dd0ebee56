//! One network's sharded training state on one rank: Adam's moments (and
//! the student's EMA) for the rank's slice of the flattened parameters
//! only, the sharded step (reduce-scatter the gradients, step the slice,
//! all-gather the weights) and the gather of the full state for a
//! checkpoint (in bounded pieces, to host memory: `gather.rs`).

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::layout::FlatLayout;
use crate::ema::Ema;
use crate::optim::Adam;
use crate::trainer::gradient_sync::{GradientSync, SyncError};

/// The slice's name inside its Adam and EMA.
const SHARD: &str = "shard";

pub struct ShardedNet {
    layout: FlatLayout,
    /// The network's parameters, in name order (the layout's).
    params: Vec<Tensor>,
    /// Adam over the slice's moments (no parameters of its own).
    adam: Adam,
    /// The EMA of the slice (the student's, when enabled).
    ema: Option<Ema>,
    /// ZeRO-2: the parameters' gradients are freed after the
    /// reduce-scatter, until [`Self::restore_grads`].
    release_grads: bool,
}

/// A network's full state gathered from every rank's slice, named as the
/// unsharded Adam and EMA name it (what a checkpoint holds), in host
/// memory.
pub struct GatheredNet {
    pub adam: Vec<(String, Tensor)>,
    pub ema: Option<Vec<(String, Tensor)>>,
}

impl ShardedNet {
    /// Takes this rank's slice (`sync.shard_range`) of `full`'s moments
    /// and of `ema`'s weights, then frees `full`'s moments (the caller
    /// drops the full EMA). `params`: the network's, as `full` was built
    /// over.
    pub fn enter(
        full: &mut Adam,
        params: Vec<(String, Tensor)>,
        ema: Option<(&Ema, f64)>,
        sync: &dyn GradientSync,
        release_grads: bool,
    ) -> Result<Self, String> {
        let rank = sync.rank();
        let layout = FlatLayout::new(&params, |n| sync.shard_range(n, rank))?;
        if layout.names() != full.names() {
            return Err("the optimizer's parameters are not the network's".to_owned());
        }
        let mut params = params;
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let slice = |flat: Tensor| layout.slice_of(&flat).copy();
        let (m, v) = full.moments();
        let (m, v) = (slice(layout.flatten(m)), slice(layout.flatten(v)));
        let adam = Adam::over_moments(
            vec![SHARD.to_owned()],
            vec![m],
            vec![v],
            full.num_steps(),
            *full.config(),
        );
        full.release_moments();
        let ema = ema.map(|(ema, max_decay)| {
            let weights: Vec<Tensor> = ema.tensors().into_iter().map(|(_, t)| t).collect();
            let mine = slice(layout.flatten(&weights));
            let mut sliced = Ema::new([(SHARD.to_owned(), mine.shallow_clone())], max_decay);
            let updates = ema.num_updates();
            sliced
                .load(&HashMap::from([(SHARD.to_owned(), mine)]), updates)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(sliced)
        });
        Ok(Self {
            layout,
            params: params.into_iter().map(|(_, t)| t).collect(),
            adam,
            ema: ema.transpose()?,
            release_grads,
        })
    }

    /// Back to the unsharded state's shapes: `full`'s moments zeros (a
    /// checkpoint is loaded into them next, or they are the initial ones).
    pub fn leave(self, full: &mut Adam) {
        full.reset_moments();
    }

    /// Reduce-scatter: this rank's slice of the gradients' mean over the
    /// ranks. ZeRO-2 frees the full gradients after it.
    pub fn reduce_scatter(&mut self, sync: &mut dyn GradientSync) -> Result<Tensor, SyncError> {
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| {
                let g = p.grad();
                // An unused parameter has no gradient: zeros in the flat
                // buffer (the student and DMD2's fake score use them all).
                if g.defined() && g.numel() == p.numel() {
                    g
                } else {
                    p.zeros_like()
                }
            })
            .collect();
        let flat = self.layout.flatten(&grads);
        drop(grads);
        let mine = sync.reduce_scatter_mean(&flat)?;
        if self.release_grads {
            for p in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    g.set_data(&Tensor::empty([0], (g.kind(), g.device())));
                }
            }
        }
        Ok(mine)
    }

    /// Gives freed gradients back their shapes (zeros), before a backward.
    pub fn restore_grads(&mut self) {
        if !self.release_grads {
            return;
        }
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() && g.numel() != p.numel() {
                g.set_data(&p.detach().zeros_like());
            }
        }
    }

    /// The slice's squared L2 norm, float32 on the device (summed over the
    /// ranks in the step vote: the global norm's square).
    pub fn squared_norm(slice: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let n = slice.to_kind(Kind::Float).norm();
            &n * &n
        })
    }

    /// Adam on this rank's slice from its (clipped) gradient `grad`, the
    /// slice's EMA, then the all-gather of the new weights into every
    /// rank's parameters.
    pub fn step(&mut self, sync: &mut dyn GradientSync, grad: &Tensor) -> Result<(), SyncError> {
        let flat = self.layout.flatten(&self.params);
        let mine = self.layout.slice_of(&flat);
        self.adam
            .step_with(std::slice::from_ref(&mine), std::slice::from_ref(grad));
        if let Some(ema) = self.ema.as_mut() {
            ema.update(&HashMap::from([(SHARD.to_owned(), mine.shallow_clone())]));
        }
        sync.all_gather(&flat)?;
        self.layout.write_back(&flat, &self.params);
        Ok(())
    }

    pub fn num_ema_updates(&self) -> Option<i64> {
        self.ema.as_ref().map(Ema::num_updates)
    }

    /// Every rank's slice of one state tensor, gathered piece by piece
    /// into host memory (collective); None where `keep` is false.
    fn gather(
        &self,
        sync: &mut dyn GradientSync,
        slice: &Tensor,
        keep: bool,
    ) -> Result<Option<Tensor>, SyncError> {
        super::gather::to_host(
            sync,
            slice,
            self.layout.total(),
            keep,
            super::gather::PIECE_BYTES,
        )
    }

    /// The full Adam state and EMA weights, named as unsharded, in host
    /// memory (a collective: every rank calls it, in the same order; the
    /// ranks with `keep` get them, the others None).
    pub fn gather_state(
        &self,
        sync: &mut dyn GradientSync,
        keep: bool,
    ) -> Result<Option<GatheredNet>, SyncError> {
        let (m, v) = self.adam.moments();
        let m = self.gather(sync, &m[0], keep)?;
        let v = self.gather(sync, &v[0], keep)?;
        let ema = match &self.ema {
            Some(ema) => self.gather_ema_of(sync, ema, keep)?,
            None => None,
        };
        let (Some(m), Some(v)) = (m, v) else {
            return Ok(None);
        };
        let m = self.layout.split(&m, "exp_avg.");
        let v = self.layout.split(&v, "exp_avg_sq.");
        let mut adam: Vec<(String, Tensor)> =
            m.into_iter().zip(v).flat_map(|(a, b)| [a, b]).collect();
        adam.push(("step".to_owned(), Tensor::from(self.adam.num_steps())));
        Ok(Some(GatheredNet { adam, ema }))
    }

    /// The full EMA weights, named as the network's parameters, in host
    /// memory (collective); None without an EMA or without `keep`.
    pub fn gather_ema(
        &self,
        sync: &mut dyn GradientSync,
        keep: bool,
    ) -> Result<Option<Vec<(String, Tensor)>>, SyncError> {
        match &self.ema {
            Some(ema) => self.gather_ema_of(sync, ema, keep),
            None => Ok(None),
        }
    }

    fn gather_ema_of(
        &self,
        sync: &mut dyn GradientSync,
        ema: &Ema,
        keep: bool,
    ) -> Result<Option<Vec<(String, Tensor)>>, SyncError> {
        let slice = ema.tensors().remove(0).1;
        Ok(self
            .gather(sync, &slice, keep)?
            .map(|flat| self.layout.split(&flat, "")))
    }

    /// Bytes of the slice's moments and EMA.
    pub fn slice_bytes(&self) -> usize {
        let (m, v) = self.adam.moments();
        let ema: Vec<Tensor> = self
            .ema
            .iter()
            .flat_map(|e| e.tensors().into_iter().map(|(_, t)| t))
            .collect();
        super::bytes_of(m) + super::bytes_of(v) + super::bytes_of(&ema)
    }
}
