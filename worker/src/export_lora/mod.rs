//! LoRA exports that other tools load where people draw: a LoRA in memory
//! (PEFT-named adapters and their [`LoraSpec`]) written as diffusers'
//! `pytorch_lora_weights.safetensors` ([`diffusers_format`]) or with the
//! `lora_unet_...` names kohya's scripts, ComfyUI and A1111 read
//! ([`kohya_format`]), folded into a full UNet folder ([`merge`]), and a
//! full student's difference to its teacher extracted as a LoRA by
//! truncated SVD ([`extract`]).
//!
//! Every writer takes the adapters by PEFT name without prefix, exactly
//! as `LoraSet::named_parameters()` names them
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`,
//! `....resnets.0.conv1.lora_B.weight`): a LoRA student's checkpoint and
//! the extractor both produce that form.

pub mod diffusers_format;
pub mod extract;
pub mod kohya_format;
pub mod merge;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use swiftbrush_proto::config::Dtype;

use crate::export::ExportError;
use crate::lora::LoraSpec;

/// Which file layout a LoRA export takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// diffusers' own: `pytorch_lora_weights.safetensors`, keys
    /// `unet.<PEFT name>`, the adapter config in the file's metadata.
    Diffusers,
    /// kohya's `lora_unet_...` keys with `.alpha` (ComfyUI, A1111).
    Kohya,
}

/// A LoRA file as `export` writes it: its layout and its tensors' dtype
/// (`export --dtype`; float32 unset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraFile {
    pub format: LoraFormat,
    pub dtype: Option<Dtype>,
}

impl LoraFile {
    fn kind(self) -> Kind {
        self.dtype
            .map_or(Kind::Float, crate::torch::precision::kind_of)
    }
}

/// One adapted layer: its module path (PEFT's, without `.lora_A.weight`),
/// A (`[r, in]`, or a conv `[r, in, k, k]`) and B (`[out, r]`, or
/// `[out, r, 1, 1]`).
pub struct LoraLayer {
    pub module: String,
    pub a: Tensor,
    pub b: Tensor,
}

impl LoraLayer {
    pub fn is_conv(&self) -> bool {
        self.a.dim() == 4
    }

    /// scale · B·A in the base weight's shape, float64: for a conv, the
    /// 1x1 B after the k x k A is one k x k conv whose kernel is B·A over
    /// the rank (A keeps the base's stride and padding).
    pub fn delta(&self, scale: f64) -> Result<Tensor, ExportError> {
        let a = self.a.f_to_kind(Kind::Double)?;
        let b = self.b.f_to_kind(Kind::Double)?;
        let rank = a.size()[0];
        let a_flat = a.f_reshape([rank, -1])?;
        let b_flat = b.f_reshape([b.size()[0], rank])?;
        let mut shape = vec![b.size()[0]];
        shape.extend_from_slice(&a.size()[1..]);
        Ok((b_flat.f_matmul(&a_flat)? * scale).f_reshape(&shape)?)
    }
}

/// A LoRA: its layers sorted by module path, rank and alpha (the update a
/// layer adds is alpha / rank · B·A, PEFT's and kohya's convention).
pub struct LoraWeights {
    pub layers: Vec<LoraLayer>,
    pub rank: i64,
    pub alpha: f64,
}

const A_SUFFIX: &str = ".lora_A.weight";
const B_SUFFIX: &str = ".lora_B.weight";

impl LoraWeights {
    /// Pairs PEFT-named adapters (`<module>.lora_A.weight`,
    /// `<module>.lora_B.weight`) and checks them against `spec`: every
    /// module one of its targets, A and B of its rank and of shapes that
    /// compose. Every problem is listed in one error.
    pub fn from_adapters(
        adapters: &HashMap<String, Tensor>,
        spec: &LoraSpec,
    ) -> Result<Self, ExportError> {
        let mut pairs: BTreeMap<String, (Option<&Tensor>, Option<&Tensor>)> = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, t) in adapters {
            if let Some(m) = name.strip_suffix(A_SUFFIX) {
                pairs.entry(m.to_owned()).or_default().0 = Some(t);
            } else if let Some(m) = name.strip_suffix(B_SUFFIX) {
                pairs.entry(m.to_owned()).or_default().1 = Some(t);
            } else {
                problems.push(format!(
                    "{name}: not an adapter tensor (expected <module>{A_SUFFIX} or <module>{B_SUFFIX})"
                ));
            }
        }
        let mut layers = Vec::new();
        let mut untargeted = Vec::new();
        for (module, pair) in pairs {
            let (a, b) = match pair {
                (Some(a), Some(b)) => (a, b),
                (None, _) => {
                    problems.push(format!("{module}{A_SUFFIX} missing"));
                    continue;
                }
                (_, None) => {
                    problems.push(format!("{module}{B_SUFFIX} missing"));
                    continue;
                }
            };
            if !spec
                .target_modules
                .iter()
                .any(|t| module == *t || module.ends_with(&format!(".{t}")))
            {
                untargeted.push(module.clone());
            }
            let (sa, sb) = (a.size(), b.size());
            let shapes_fit = match (sa.len(), sb.len()) {
                (2, 2) => sb[1] == sa[0],
                (4, 4) => sb[1] == sa[0] && sb[2] == 1 && sb[3] == 1,
                _ => false,
            };
            if !shapes_fit {
                problems.push(format!(
                    "{module}: A {sa:?} and B {sb:?} do not compose (linear: A [r, in], B [out, r]; \
                     conv: A [r, in, k, k], B [out, r, 1, 1])"
                ));
            } else if sa[0] != spec.rank {
                problems.push(format!(
                    "{module}: rank {} but the LoRA's rank is {}",
                    sa[0], spec.rank
                ));
            }
            layers.push(LoraLayer {
                module,
                a: a.shallow_clone(),
                b: b.shallow_clone(),
            });
        }
        if !untargeted.is_empty() {
            // One line, however many: a wrong spec names every layer.
            let shown: Vec<&str> = untargeted.iter().take(3).map(String::as_str).collect();
            problems.push(format!(
                "{} adapted modules are not among the LoRA's target modules {:?}: {}{}",
                untargeted.len(),
                spec.target_modules,
                shown.join(", "),
                if untargeted.len() > 3 { ", ..." } else { "" }
            ));
        }
        if layers.is_empty() && problems.is_empty() {
            problems.push("no adapters".to_owned());
        }
        if !problems.is_empty() {
            return Err(ExportError::Invalid(format!(
                "LoRA adapters do not fit:\n{}",
                problems.join("\n")
            )));
        }
        Ok(Self {
            layers,
            rank: spec.rank,
            alpha: spec.alpha,
        })
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The same adapters with A and B in `kind`, contiguous (the writers
    /// write them as they are).
    pub fn in_kind(&self, kind: Kind) -> Result<Self, ExportError> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let name = |m: &str| format!("{}{m}", l.module);
                Ok(LoraLayer {
                    module: l.module.clone(),
                    a: crate::export_dtype::to_kind(&name(A_SUFFIX), &l.a, kind)?,
                    b: crate::export_dtype::to_kind(&name(B_SUFFIX), &l.b, kind)?,
                })
            })
            .collect::<Result<_, ExportError>>()?;
        Ok(Self {
            layers,
            rank: self.rank,
            alpha: self.alpha,
        })
    }
}

/// Writes the LoRA as `file` says into the folder `out`; returns the file.
/// `unet_config` is the base UNet's config.json (kohya's SDXL names follow
/// its block layout).
pub fn write_lora(
    lora: &LoraWeights,
    file: LoraFile,
    out: &Path,
    unet_config: &Path,
) -> Result<PathBuf, ExportError> {
    // Every tensor cast (and fp16's range checked) before the folder is made.
    let lora = lora.in_kind(file.kind())?;
    crate::export::create_dir(out)?;
    match file.format {
        LoraFormat::Diffusers => diffusers_format::write(&lora, out),
        LoraFormat::Kohya => kohya_format::write(&lora, out, unet_config),
    }
}

/// Serializes named tensors with safetensors metadata.
fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, ExportError> {
    crate::trainer::checkpoint::tensor_bytes::to_bytes_with_metadata(tensors, Some(metadata))
        .map_err(|e| ExportError::Invalid(e.to_string()))
}

/// A LoRA student's adapters (PEFT names, `LoraSet::named_parameters()`'s)
/// written as `file` into `out`, for the teacher it was trained on.
/// `export --lora` calls this with the checkpoint's adapters and the run's
/// spec.
pub fn export_lora_student(
    adapters: &HashMap<String, Tensor>,
    spec: &LoraSpec,
    teacher: &crate::pipeline::DiffusersFolder,
    file: LoraFile,
    out: &Path,
) -> Result<PathBuf, ExportError> {
    let lora = LoraWeights::from_adapters(adapters, spec)?;
    write_lora(&lora, file, out, &teacher.component("unet")?.config_path()?)
}

/// A LoRA student's adapters folded into the teacher's UNet, as the bytes
/// of diffusion_pytorch_model.safetensors (`export --merge`, with or
/// without `--pipeline`).
pub fn merged_unet_bytes(
    adapters: &HashMap<String, Tensor>,
    spec: &LoraSpec,
    teacher: &crate::pipeline::DiffusersFolder,
) -> Result<Vec<u8>, ExportError> {
    let lora = LoraWeights::from_adapters(adapters, spec)?;
    merge::merged_bytes(&lora, teacher)
}

/// A full student's checkpoint weights minus its teacher's, as a rank-`rank`
/// LoRA on `targets` written as `file` into `out` (`export --extract-lora`).
pub fn export_extracted(
    ckpt: &crate::export::StudentCheckpoint,
    which: crate::export::StudentWeights,
    teacher: Option<&Path>,
    rank: i64,
    targets: &[String],
    file: LoraFile,
    out: &Path,
) -> Result<(extract::Extracted, PathBuf), ExportError> {
    // Asked as `export` asks it (the run's method.student.kind), before
    // any weights are read.
    if ckpt.student_lora()?.is_some() {
        return Err(ExportError::Invalid(
            "this run's student is LoRA adapters, not a full UNet: it is a LoRA already \
             (export it with --lora, or fold it in with --merge)"
                .to_owned(),
        ));
    }
    let folder = ckpt.teacher(teacher)?;
    let bytes = ckpt.weights(which)?;
    let student =
        crate::trainer::checkpoint::tensor_bytes::from_bytes(&bytes, "the student's weights")
            .map_err(|e| ExportError::Invalid(e.to_string()))?;
    let base = merge::unet_weights(&folder)?;
    let extracted = extract::extract(&student, &base, rank, targets)?;
    let unet_config = folder.component("unet")?.config_path()?;
    let path = write_lora(&extracted.lora, file, out, &unet_config)?;
    Ok((extracted, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoraSpec {
        LoraSpec {
            rank: 2,
            alpha: 4.0,
            target_modules: vec!["to_q".into(), "conv1".into()],
        }
    }

    #[test]
    fn adapters_are_paired_and_checked_against_the_spec() {
        let z = |s: &[i64]| Tensor::zeros(s, (Kind::Float, tch::Device::Cpu));
        let mut ok = HashMap::new();
        ok.insert("a.attn1.to_q.lora_A.weight".to_owned(), z(&[2, 8]));
        ok.insert("a.attn1.to_q.lora_B.weight".to_owned(), z(&[6, 2]));
        ok.insert("r.conv1.lora_A.weight".to_owned(), z(&[2, 3, 3, 3]));
        ok.insert("r.conv1.lora_B.weight".to_owned(), z(&[5, 2, 1, 1]));
        let lora = LoraWeights::from_adapters(&ok, &spec()).unwrap();
        assert_eq!(lora.layers.len(), 2);
        assert_eq!(lora.scale(), 2.0);
        assert_eq!(lora.layers[1].delta(1.0).unwrap().size(), vec![5, 3, 3, 3]);

        let mut bad = HashMap::new();
        bad.insert("a.attn1.to_q.lora_A.weight".to_owned(), z(&[3, 8]));
        bad.insert("a.attn1.to_q.lora_B.weight".to_owned(), z(&[6, 3]));
        bad.insert("a.attn1.to_k.lora_A.weight".to_owned(), z(&[2, 8]));
        bad.insert("a.attn1.to_k.lora_B.weight".to_owned(), z(&[6, 2]));
        bad.insert("r.conv1.lora_A.weight".to_owned(), z(&[2, 3, 3, 3]));
        bad.insert("stray.weight".to_owned(), z(&[1]));
        let e = LoraWeights::from_adapters(&bad, &spec())
            .err()
            .unwrap()
            .to_string();
        for want in [
            "a.attn1.to_q: rank 3 but the LoRA's rank is 2",
            "1 adapted modules are not among the LoRA's target modules [\"to_q\", \"conv1\"]: a.attn1.to_k",
            "r.conv1.lora_B.weight missing",
            "stray.weight: not an adapter tensor",
        ] {
            assert!(e.contains(want), "{want} not in: {e}");
        }
    }
}
