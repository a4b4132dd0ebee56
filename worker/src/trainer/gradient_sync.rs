//! How ranks agree: gradient averaging and the all-ranks-finite vote. The
//! trainer only sees this trait; the single-process implementation is here,
//! the collective ones (NCCL, TCP ring) live with the distributed runtime.

use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("collective failed: {0}")]
    Collective(String),
}

pub trait GradientSync {
    fn rank(&self) -> u64;
    fn world_size(&self) -> u64;
    /// Replaces each gradient by its mean over all ranks, in place.
    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<(), SyncError>;
    /// True when every rank passes `ok` (one NaN anywhere skips the step
    /// everywhere, so replicas never diverge).
    fn all_ok(&mut self, ok: bool) -> Result<bool, SyncError>;
}

/// One process: nothing to average, nobody to ask.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl GradientSync for SingleProcess {
    fn rank(&self) -> u64 {
        0
    }
    fn world_size(&self) -> u64 {
        1
    }
    fn all_reduce_mean(&mut self, _grads: &[Tensor]) -> Result<(), SyncError> {
        Ok(())
    }
    fn all_ok(&mut self, ok: bool) -> Result<bool, SyncError> {
        Ok(ok)
    }
}

/// The defined gradients of `params` (a parameter without one is skipped).
pub fn gradients(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect()
}

/// Whether every gradient entry is finite.
pub fn all_finite(grads: &[Tensor]) -> bool {
    grads
        .iter()
        .all(|g| g.isfinite().all().to_kind(Kind::Bool).int64_value(&[]) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finiteness() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]);
        let b = Tensor::from_slice(&[1.0f32, f32::NAN]);
        let c = Tensor::from_slice(&[f32::INFINITY]);
        assert!(all_finite(&[a.shallow_clone()]));
        assert!(!all_finite(&[a.shallow_clone(), b]));
        assert!(!all_finite(&[c]));
        let mut s = SingleProcess;
        assert!(!s.all_ok(false).unwrap());
    }
}
