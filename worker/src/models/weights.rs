//! Strict loading of safetensors weights into a `VarStore` by name.
//!
//! Model modules create their variables under diffusers' state-dict keys
//! (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q.weight`), so
//! a diffusers file loads with no mapping table. Loading is all-or-nothing:
//! every missing, unexpected or mis-shaped tensor is listed in one error and
//! no variable is touched until all checks pass.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor, nn::VarStore};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "{path} is a pickle checkpoint ({kind}); swiftbrush never unpickles files. \
         Convert it to safetensors first, e.g. in Python: \
         `Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
    )]
    Pickle { path: PathBuf, kind: &'static str },
    #[error("weights in {} do not match the model:\n{details}", display_paths(.files))]
    Mismatch {
        files: Vec<PathBuf>,
        details: String,
    },
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads all tensors of one safetensors file (CPU, stored dtype).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, WeightsError> {
    refuse_pickle(path)?;
    // tch reports file errors as Debug text (`IoError(Os { code: 2, .. })`):
    // open it here first for a sentence.
    if let Err(e) = std::fs::File::open(path) {
        return Err(WeightsError::Read {
            path: path.to_owned(),
            reason: match e.kind() {
                std::io::ErrorKind::NotFound => "not found".to_owned(),
                _ => e.to_string(),
            },
        });
    }
    Tensor::read_safetensors(path).map_err(|e| WeightsError::Read {
        path: path.to_owned(),
        reason: explain_read_error(path, &e.to_string()),
    })
}

/// tch reports `safetensors error <path>: MetadataIncompleteBuffer`; say
/// once where, and what such a file usually is.
fn explain_read_error(path: &Path, reason: &str) -> String {
    let prefix = format!("safetensors error {}: ", path.display());
    let reason = reason.strip_prefix(&prefix).unwrap_or(reason);
    const DAMAGED: [&str; 5] = [
        "HeaderTooSmall",
        "HeaderTooLarge",
        "InvalidHeader",
        "MetadataIncompleteBuffer",
        "InvalidOffset",
    ];
    if DAMAGED.iter().any(|d| reason.contains(d)) {
        format!(
            "{reason}: the file is truncated or not a safetensors file \
             (an interrupted download?)"
        )
    } else {
        reason.to_owned()
    }
}

/// `.bin`, `.pt`, `.pth`, `.ckpt` are pickle: refuse with advice.
pub fn refuse_pickle(path: &Path) -> Result<(), WeightsError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let kind = match ext {
        "bin" => "PyTorch .bin",
        "pt" | "pth" => "PyTorch .pt",
        "ckpt" => "checkpoint .ckpt",
        "pkl" | "pickle" => "pickle",
        _ => return Ok(()),
    };
    Err(WeightsError::Pickle {
        path: path.to_owned(),
        kind,
    })
}

/// Loads `files` into `vs`, strictly by name, converting each tensor to its
/// variable's dtype and device.
pub fn load_strict(vs: &mut VarStore, files: &[PathBuf]) -> Result<(), WeightsError> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in files {
        for (name, t) in read_safetensors(f)? {
            tensors.insert(name, t);
        }
    }
    load_tensors_strict(vs, tensors, files)
}

/// As [`load_strict`], from tensors already in memory; `files` only names
/// the source in errors.
pub fn load_tensors_strict(
    vs: &mut VarStore,
    tensors: HashMap<String, Tensor>,
    files: &[PathBuf],
) -> Result<(), WeightsError> {
    let vars = vs.variables();
    let report = compare(&vars, &tensors);
    if !report.is_empty() {
        return Err(WeightsError::Mismatch {
            files: files.to_vec(),
            details: report,
        });
    }
    tch::no_grad(|| -> Result<(), WeightsError> {
        for (name, mut var) in vars {
            let src = &tensors[&name];
            let src = src.f_to_kind(var.kind())?.f_to_device(var.device())?;
            var.f_copy_(&src)?;
        }
        Ok(())
    })
}

/// Lists missing, unexpected and mis-shaped names (empty when all match).
fn compare(vars: &HashMap<String, Tensor>, tensors: &HashMap<String, Tensor>) -> String {
    let sorted = |m: &HashMap<String, Tensor>| -> BTreeMap<String, Vec<i64>> {
        m.iter().map(|(k, v)| (k.clone(), v.size())).collect()
    };
    let (want, have) = (sorted(vars), sorted(tensors));
    let mut out = String::new();
    let missing: Vec<_> = want
        .iter()
        .filter(|(k, _)| !have.contains_key(*k))
        .collect();
    let unexpected: Vec<_> = have
        .iter()
        .filter(|(k, _)| !want.contains_key(*k))
        .collect();
    let misshaped: Vec<_> = want
        .iter()
        .filter_map(|(k, w)| have.get(k).filter(|h| *h != w).map(|h| (k, w, h)))
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(out, "  missing tensors ({}):", missing.len());
        for (k, s) in missing {
            let _ = writeln!(out, "    {k} {s:?}");
        }
    }
    if !unexpected.is_empty() {
        let _ = writeln!(out, "  unexpected tensors ({}):", unexpected.len());
        for (k, s) in unexpected {
            let _ = writeln!(out, "    {k} {s:?}");
        }
    }
    if !misshaped.is_empty() {
        let _ = writeln!(out, "  wrong shapes ({}):", misshaped.len());
        for (k, w, h) in misshaped {
            let _ = writeln!(out, "    {k}: model expects {w:?}, file has {h:?}");
        }
    }
    out
}

/// Writes every variable of `vs` to one safetensors file, as `kind`
/// (float variables only are converted).
pub fn save_varstore(vs: &VarStore, path: &Path, kind: Kind) -> Result<(), WeightsError> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| {
            let v = if v.is_floating_point() {
                v.to_kind(kind)
            } else {
                v
            };
            (k, v.to_device(tch::Device::Cpu).contiguous())
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn store() -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = root.sub("a").zeros("weight", &[2, 3]);
        let _ = root.sub("a").zeros("bias", &[2]);
        vs
    }

    fn write(path: &Path, tensors: &[(&str, Tensor)]) {
        Tensor::write_safetensors(tensors, path).unwrap();
    }

    #[test]
    fn loads_matching_file_and_converts_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.safetensors");
        let w = Tensor::arange(6, (Kind::Half, Device::Cpu)).reshape([2, 3]);
        write(
            &f,
            &[
                ("a.weight", w),
                ("a.bias", Tensor::ones([2], (Kind::Float, Device::Cpu))),
            ],
        );
        let mut vs = store();
        load_strict(&mut vs, &[f]).unwrap();
        let vars = vs.variables();
        assert_eq!(vars["a.weight"].kind(), Kind::Float);
        assert_eq!(
            f64::try_from(vars["a.weight"].sum(Kind::Double)).unwrap(),
            15.0
        );
        assert_eq!(
            f64::try_from(vars["a.bias"].sum(Kind::Double)).unwrap(),
            2.0
        );
    }

    #[test]
    fn lists_missing_unexpected_and_misshaped_and_loads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.safetensors");
        let t = |s: &[i64]| Tensor::ones(s, (Kind::Float, Device::Cpu));
        write(&f, &[("a.weight", t(&[3, 2])), ("b.extra", t(&[1]))]);
        let mut vs = store();
        let err = load_strict(&mut vs, &[f]).unwrap_err().to_string();
        assert!(
            err.contains("missing tensors (1):\n    a.bias [2]"),
            "{err}"
        );
        assert!(
            err.contains("unexpected tensors (1):\n    b.extra [1]"),
            "{err}"
        );
        assert!(
            err.contains("a.weight: model expects [2, 3], file has [3, 2]"),
            "{err}"
        );
        let w = &vs.variables()["a.weight"];
        assert_eq!(f64::try_from(w.abs().sum(Kind::Double)).unwrap(), 0.0);
    }

    #[test]
    fn refuses_pickle_and_names_truncated_files() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("diffusion_pytorch_model.bin");
        std::fs::write(&bin, b"not read").unwrap();
        let err = load_strict(&mut store(), &[bin]).unwrap_err().to_string();
        assert!(
            err.contains("never unpickles") && err.contains("safetensors"),
            "{err}"
        );

        let f = dir.path().join("w.safetensors");
        write(
            &f,
            &[("a.weight", Tensor::ones([2, 3], (Kind::Float, Device::Cpu)))],
        );
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() - 4]).unwrap();
        let err = load_strict(&mut store(), std::slice::from_ref(&f)).unwrap_err();
        assert!(err.to_string().contains("w.safetensors"), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
