//! Named tensors to and from safetensors bytes in memory, for checkpoint
//! files that go to an object store rather than a local path.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TensorBytesError {
    #[error("tensor {name}: unsupported dtype {kind:?}")]
    Kind { name: String, kind: Kind },
    #[error("{what}: {reason}")]
    Format { what: String, reason: String },
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

fn dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Serializes tensors (any device) as one safetensors blob, names sorted.
pub fn to_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>, TensorBytesError> {
    to_bytes_with_metadata(tensors, None)
}

/// As [`to_bytes`], with the header's `__metadata__` (string pairs), as
/// diffusers writes a LoRA's adapter config.
pub fn to_bytes_with_metadata(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, TensorBytesError> {
    let mut host: Vec<(String, Tensor, Dtype)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dt = dtype(t.kind()).ok_or_else(|| TensorBytesError::Kind {
            name: name.clone(),
            kind: t.kind(),
        })?;
        host.push((
            name.clone(),
            t.detach().to_device(Device::Cpu).contiguous(),
            dt,
        ));
    }
    host.sort_by(|a, b| a.0.cmp(&b.0));
    let mut buffers = Vec::with_capacity(host.len());
    for (name, t, _) in &host {
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)
            .map_err(|e| TensorBytesError::Format {
                what: name.clone(),
                reason: e.to_string(),
            })?;
        buffers.push(data);
    }
    let views = host
        .iter()
        .zip(&buffers)
        .map(|((name, t, dt), data)| {
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            TensorView::new(*dt, shape, data)
                .map(|v| (name.clone(), v))
                .map_err(|e| TensorBytesError::Format {
                    what: name.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, metadata).map_err(|e| TensorBytesError::Format {
        what: "safetensors".to_owned(),
        reason: e.to_string(),
    })
}

/// Parses a safetensors blob into CPU tensors by name. `what` names the
/// source in errors.
pub fn from_bytes(bytes: &[u8], what: &str) -> Result<HashMap<String, Tensor>, TensorBytesError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| TensorBytesError::Format {
        what: what.to_owned(),
        reason: e.to_string(),
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let k = kind(view.dtype()).ok_or_else(|| TensorBytesError::Format {
            what: format!("{what}: {name}"),
            reason: format!("unsupported dtype {:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, k)?;
        out.insert(name, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_bitwise() {
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::from_slice(&[7i64]);
        let c = Tensor::randn([2], (Kind::BFloat16, Device::Cpu));
        let bytes = to_bytes(&[
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
            ("c".into(), c.shallow_clone()),
        ])
        .unwrap();
        let back = from_bytes(&bytes, "test").unwrap();
        assert!(back["a"].equal(&a) && back["b"].equal(&b) && back["c"].equal(&c));
        let e = from_bytes(&bytes[..bytes.len() - 3], "ckpt/student.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ckpt/student.safetensors"), "{e}");
    }
}
