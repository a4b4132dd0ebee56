//! The shim's multi-tensor ops (csrc/foreach.cpp) for the per-parameter
//! loops of a step: one call per list instead of one op per tensor (on
//! CUDA, a few multi-tensor kernels instead of a launch per parameter and
//! op). Each runs the op sequence its per-tensor loop ran, so the results
//! are the same (bit for bit on the CPU: the optimizer goldens and
//! scripts/bitcheck hold them to it).

use std::ffi::c_void;

use tch::{Kind, Tensor};

use crate::torch::shim;

fn handles(tensors: &[Tensor]) -> Vec<*mut c_void> {
    tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

fn all_float(lists: &[&[Tensor]]) -> bool {
    lists
        .iter()
        .all(|l| l.iter().all(|t| t.kind() == Kind::Float))
}

/// The scalars of one Adam step (optim.rs computes them on the host).
#[derive(Debug, Clone, Copy)]
pub struct AdamScalars {
    pub one_minus_beta1: f64,
    pub beta2: f64,
    pub one_minus_beta2: f64,
    pub bias2_sqrt: f64,
    pub eps: f64,
    pub step_size: f64,
}

/// Adam's update of `params` from `grads` and the moments, in place (the
/// lists are aligned; float32 only: false, nothing done, otherwise).
pub fn adam_step(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avg: &[Tensor],
    exp_avg_sq: &[Tensor],
    k: AdamScalars,
) -> Result<bool, String> {
    let n = params.len();
    assert!(grads.len() == n && exp_avg.len() == n && exp_avg_sq.len() == n);
    if n == 0 || !all_float(&[params, grads, exp_avg, exp_avg_sq]) {
        return Ok(n == 0);
    }
    let (p, g, m, v) = (
        handles(params),
        handles(grads),
        handles(exp_avg),
        handles(exp_avg_sq),
    );
    // SAFETY: n valid tch handles per list, alive for the call; the shim
    // provides the error buffer.
    shim::call(|err, len| unsafe {
        shim::sb_foreach_adam_step(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            k.one_minus_beta1,
            k.beta2,
            k.one_minus_beta2,
            k.bias2_sqrt,
            k.eps,
            k.step_size,
            err,
            len,
        )
    })?;
    Ok(true)
}

/// The 2-norm of each tensor (float32 tensors; None otherwise).
pub fn norms(tensors: &[Tensor]) -> Result<Option<Vec<Tensor>>, String> {
    if !all_float(&[tensors]) {
        return Ok(None);
    }
    let h = handles(tensors);
    let mut out: Vec<*mut c_void> = vec![std::ptr::null_mut(); tensors.len()];
    // SAFETY: valid handles; the shim writes one new handle per tensor.
    shim::call(|err, len| unsafe {
        shim::sb_foreach_norm(h.as_ptr(), h.len(), out.as_mut_ptr(), err, len)
    })?;
    // SAFETY: each is a new at::Tensor* the caller owns; tch frees it.
    Ok(Some(
        out.into_iter()
            .map(|p| unsafe { Tensor::from_ptr(p.cast()) })
            .collect(),
    ))
}

/// Multiplies every tensor by `scalar`, in place.
pub fn mul_scalar_(tensors: &[Tensor], scalar: f64) -> Result<(), String> {
    if tensors.is_empty() {
        return Ok(());
    }
    let h = handles(tensors);
    // SAFETY: valid handles for the call.
    shim::call(|err, len| unsafe {
        shim::sb_foreach_mul_scalar_(h.as_ptr(), h.len(), scalar, err, len)
    })
}

/// shadow -= (shadow - params) * one_minus_decay, in place (aligned lists
/// of one kind; false, nothing done, for mixed kinds).
pub fn ema_update(
    shadow: &[Tensor],
    params: &[Tensor],
    one_minus_decay: f64,
) -> Result<bool, String> {
    assert_eq!(shadow.len(), params.len());
    if shadow.is_empty() {
        return Ok(true);
    }
    if shadow.iter().zip(params).any(|(s, p)| s.kind() != p.kind()) {
        return Ok(false);
    }
    let (s, p) = (handles(shadow), handles(params));
    // SAFETY: valid handles for the call.
    shim::call(|err, len| unsafe {
        shim::sb_foreach_ema_update(s.as_ptr(), p.as_ptr(), s.len(), one_minus_decay, err, len)
    })?;
    Ok(true)
}
