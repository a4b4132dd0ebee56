//! A full student's difference to its teacher as a LoRA: per targeted
//! layer, D = W_student − W_teacher (a conv's flattened to
//! [out, in·k·k]) and its truncated SVD D ≈ U_r S_r V_rᵀ, written as
//! B = U_r √S_r, A = √S_r V_rᵀ with alpha = rank (scale 1), as kohya's
//! `extract_lora_from_models.py` (without its clamping of outliers at the
//! 99th percentile, which would break a full-rank extraction's exactness).
//! The square root splits S evenly between the factors, so neither holds
//! values far from the other's scale when stored in half precision.
//!
//! A layer whose update has fewer than `rank` singular values (min(out,
//! in·k·k) < rank) keeps all of them and is padded with zero rows of A and
//! columns of B: exact, and one rank for the whole file, which every
//! loader reads without a per-layer rank pattern.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::{LoraLayer, LoraWeights};
use crate::export::ExportError;
use crate::lora::{ATTENTION_TARGETS, CONV_TARGETS};

/// The default targets: what a LoRA student trains (PEFT's suffix names).
pub fn default_targets() -> Vec<String> {
    ATTENTION_TARGETS
        .iter()
        .chain(CONV_TARGETS.iter())
        .map(|s| (*s).to_owned())
        .collect()
}

/// How well one layer's difference is reconstructed.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub module: String,
    /// ||D||_F.
    pub change: f64,
    /// ||D − B·A||_F / ||D||_F, from the float32 factors written (0 when
    /// the layer did not change).
    pub relative_error: f64,
    /// Singular values kept (below `rank` when the layer has fewer).
    pub kept: i64,
}

pub struct Extracted {
    pub lora: LoraWeights,
    pub layers: Vec<LayerReport>,
    /// Σ||D||² over the targeted layers / Σ||ΔW||² over every tensor of
    /// the UNet: the share of the student's change the targets can carry
    /// (norms, biases and untargeted layers stay the teacher's).
    pub targeted_share: f64,
}

impl Extracted {
    /// The norm-weighted relative error over all layers:
    /// sqrt(Σ||D − BA||² / Σ||D||²).
    pub fn overall_error(&self) -> f64 {
        let (num, den) = self.layers.iter().fold((0.0, 0.0), |(n, d), l| {
            (
                n + (l.relative_error * l.change).powi(2),
                d + l.change.powi(2),
            )
        });
        if den == 0.0 { 0.0 } else { (num / den).sqrt() }
    }

    pub fn max_error(&self) -> f64 {
        self.layers
            .iter()
            .map(|l| l.relative_error)
            .fold(0.0, f64::max)
    }
}

/// Extracts a rank-`rank` LoRA from `student` − `teacher` (UNet weights by
/// diffusers name) on every 2-D (Linear) or 4-D (Conv2d) `.weight` whose
/// module path ends with one of `targets`.
pub fn extract(
    student: &HashMap<String, Tensor>,
    teacher: &HashMap<String, Tensor>,
    rank: i64,
    targets: &[String],
) -> Result<Extracted, ExportError> {
    if rank < 1 {
        return Err(ExportError::Invalid(format!(
            "--extract-lora rank must be at least 1, got {rank}"
        )));
    }
    let mut names: Vec<&String> = teacher.keys().collect();
    names.sort();
    let mut missing: Vec<String> = names
        .iter()
        .filter(|n| !student.contains_key(n.as_str()))
        .map(|n| format!("{n}: in the teacher, not in the student"))
        .collect();
    for (n, s) in student {
        match teacher.get(n) {
            None => missing.push(format!("{n}: in the student, not in the teacher")),
            Some(t) if t.size() != s.size() => missing.push(format!(
                "{n}: student {:?}, teacher {:?}",
                s.size(),
                t.size()
            )),
            Some(_) => {}
        }
    }
    if !missing.is_empty() {
        missing.sort();
        return Err(ExportError::Invalid(format!(
            "the student's UNet is not the teacher's architecture:\n{}",
            missing.join("\n")
        )));
    }
    let matches = |module: &str, t: &str| module == t || module.ends_with(&format!(".{t}"));
    let mut used = vec![false; targets.len()];
    let (mut layers, mut reports) = (Vec::new(), Vec::new());
    let (mut total, mut targeted) = (0.0f64, 0.0f64);
    for name in names {
        let t = teacher[name].f_to_kind(Kind::Double)?;
        let d = (student[name].f_to_kind(Kind::Double)? - &t).f_detach()?;
        let sq = d.f_square()?.f_sum(Kind::Double)?.double_value(&[]);
        total += sq;
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !(d.dim() == 2 || d.dim() == 4) {
            continue;
        }
        let hits: Vec<usize> = (0..targets.len())
            .filter(|&i| matches(module, &targets[i]))
            .collect();
        if hits.is_empty() {
            continue;
        }
        hits.iter().for_each(|&i| used[i] = true);
        targeted += sq;
        let (layer, report) = factor(module, &d, rank, sq.sqrt())?;
        layers.push(layer);
        reports.push(report);
    }
    let unused: Vec<&String> = targets
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|(t, _)| t)
        .collect();
    if !unused.is_empty() {
        return Err(ExportError::Invalid(format!(
            "--targets {unused:?} name no Linear or Conv2d weight of the UNet \
             (targets are module-path suffixes, e.g. to_q, to_out.0, conv1, proj_in, ff.net.2)"
        )));
    }
    Ok(Extracted {
        lora: LoraWeights {
            layers,
            rank,
            alpha: rank as f64,
        },
        layers: reports,
        targeted_share: if total == 0.0 { 0.0 } else { targeted / total },
    })
}

/// One layer's truncated SVD as float32 A and B of rank `rank` (zero
/// padded), and how well B·A reconstructs `d`.
fn factor(
    module: &str,
    d: &Tensor,
    rank: i64,
    change: f64,
) -> Result<(LoraLayer, LayerReport), ExportError> {
    let shape = d.size();
    let out = shape[0];
    let flat = d.f_reshape([out, -1])?;
    let inputs = flat.size()[1];
    // torch.svd (reduced): libtorch's linalg_svd binding always passes a
    // driver, which CPU tensors refuse. flat = U diag(S) Vᵀ.
    let (u, s, v) = flat.f_svd(true, true)?;
    let vh = v.f_transpose(0, 1)?;
    let kept = rank.min(out.min(inputs));
    let root = s.f_narrow(0, 0, kept)?.f_sqrt()?;
    let b = u.f_narrow(1, 0, kept)? * root.f_unsqueeze(0)?;
    let a = vh.f_narrow(0, 0, kept)? * root.f_unsqueeze(1)?;
    let (b, a) = if kept < rank {
        (
            b.f_constant_pad_nd([0, rank - kept])?,
            a.f_constant_pad_nd([0, 0, 0, rank - kept])?,
        )
    } else {
        (b, a)
    };
    let (a, b) = (a.f_to_kind(Kind::Float)?, b.f_to_kind(Kind::Float)?);
    let recon = b
        .f_to_kind(Kind::Double)?
        .f_matmul(&a.f_to_kind(Kind::Double)?)?;
    let residual = (&flat - recon)
        .f_square()?
        .f_sum(Kind::Double)?
        .double_value(&[])
        .sqrt();
    let relative_error = if change == 0.0 {
        0.0
    } else {
        residual / change
    };
    let (a, b) = if shape.len() == 4 {
        (
            a.f_reshape([rank, shape[1], shape[2], shape[3]])?,
            b.f_reshape([out, rank, 1, 1])?,
        )
    } else {
        (a, b)
    };
    Ok((
        LoraLayer {
            module: module.to_owned(),
            a: a.f_contiguous()?,
            b: b.f_contiguous()?,
        },
        LayerReport {
            module: module.to_owned(),
            change,
            relative_error,
            kept,
        },
    ))
}
