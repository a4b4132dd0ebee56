//! The shim's multi-tensor ops (csrc/foreach.cpp) for the per-parameter
//! loops of a step: one call per list instead of one op per tensor (on
//! CUDA, a few multi-tensor kernels instead of a launch per parameter and
//! op). Each runs the op sequence its per-tensor loop ran, so the results
//! are the same (bit for bit on the CPU: the optimizer goldens and
//! scripts/bitcheck hold them to it).
//!
//! Adam's and the EMA's foreach ops allocate temporaries the size of the
//! list they are given (Adam: `g * (1 - b2)`, then `sqrt(v)` and `m /
//! denom`; the EMA: `s - p`). Over a whole model that is gigabytes at the
//! step's peak (SD 2.1's fp32 student: 3.5 GB per list), so the callers
//! (optim.rs, ema.rs) hand them the list in chunks of about
//! [`CHUNK_BYTES`] of parameters ([`chunks`]). Every op is elementwise
//! within a tensor, so the chunking changes which call a tensor is in,
//! never its arithmetic: the results are the same bit for bit
//! (tests/optim.rs, `chunked_optimizer_matches_unchunked_bitwise`).

use std::ffi::c_void;
use std::ops::Range;

use tch::{Kind, Tensor};

use crate::torch::shim;

/// About how many bytes of parameters one multi-tensor call takes.
pub const CHUNK_BYTES: usize = 256 << 20;

/// Splits a list of tensors, `bytes[i]` bytes each, into consecutive,
/// non-empty ranges of at most `max_bytes` each (a tensor larger than that
/// is a range of its own), in order and covering every index once.
pub fn chunks(bytes: &[usize], max_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0usize);
    for (i, &b) in bytes.iter().enumerate() {
        if i > start && sum.saturating_add(b) > max_bytes {
            out.push(start..i);
            (start, sum) = (i, 0);
        }
        sum = sum.saturating_add(b);
    }
    if start < bytes.len() {
        out.push(start..bytes.len());
    }
    out
}

/// The largest chunk [`chunks`] makes: the bytes one temporary list of a
/// chunked call holds at most (Adam holds two such lists at once, the
/// EMA one).
pub fn peak_temporary_bytes(bytes: &[usize], max_bytes: usize) -> usize {
    chunks(bytes, max_bytes)
        .into_iter()
        .map(|c| bytes[c].iter().sum::<usize>())
        .max()
        .unwrap_or(0)
}

/// The bytes of each tensor's elements.
pub fn tensor_bytes(tensors: &[Tensor]) -> Vec<usize> {
    tensors
        .iter()
        .map(|t| t.numel() * t.kind().elt_size_in_bytes())
        .collect()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_list_in_order_within_the_bound() {
        let bytes = [100, 200, 50, 400, 10, 10, 300, 5];
        for max in [1, 100, 250, 300, 500, 10_000] {
            let cs = chunks(&bytes, max);
            // Contiguous, in order, covering every index once.
            let mut next = 0;
            for c in &cs {
                assert_eq!(c.start, next, "{cs:?}");
                assert!(c.end > c.start, "{cs:?}");
                next = c.end;
                let sum: usize = bytes[c.clone()].iter().sum();
                // Within the bound, unless one tensor alone exceeds it.
                assert!(sum <= max || c.len() == 1, "max {max}: {cs:?}");
            }
            assert_eq!(next, bytes.len());
        }
        assert!(chunks(&[], 10).is_empty());
        assert_eq!(chunks(&bytes, usize::MAX), vec![0..bytes.len()]);
    }

    #[test]
    fn peak_temporaries_are_bounded_by_the_chunk_not_the_model() {
        // An SD 2.1-sized fp32 list: 3.46 GB in ~690 tensors of up to 59 MB.
        let mut bytes = Vec::new();
        for i in 0..690usize {
            bytes.push(4 * [1280 * 1280 * 9, 1280 * 640, 320, 1280 * 1280][i % 4]);
        }
        let model: usize = bytes.iter().sum();
        let largest = *bytes.iter().max().unwrap();
        let peak = peak_temporary_bytes(&bytes, CHUNK_BYTES);
        assert!(peak <= CHUNK_BYTES.max(largest), "{peak}");
        assert!(peak * 10 < model, "{peak} of {model}");
        // One whole-list call holds the model's size per temporary list.
        assert_eq!(peak_temporary_bytes(&bytes, usize::MAX), model);
    }
}
