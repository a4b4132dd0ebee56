//! `export --dtype`: the number format of the weights an export writes.
//!
//! Unset, every export writes what it wrote before (a full student's and a
//! LoRA's tensors in float32, a merged UNet in the teacher's stored dtype).
//! fp16 or bf16 halves the file, as the half-precision variants users
//! publish are. Only floating tensors change; a tensor that fp16 cannot
//! hold (a finite value beyond its largest, 65504) is refused by name
//! before anything is written, rather than written as infinities.

use std::collections::HashMap;

use safetensors::SafeTensors;
use tch::{Kind, Tensor};

use crate::export::ExportError;
use crate::trainer::checkpoint::tensor_bytes;

/// fp16's largest finite value.
const FP16_MAX: f64 = 65504.0;

/// `t` (named `name` in errors) in `kind` if it is floating, contiguous.
pub fn to_kind(name: &str, t: &Tensor, kind: Kind) -> Result<Tensor, ExportError> {
    if !t.is_floating_point() {
        return Ok(t.shallow_clone());
    }
    if kind == Kind::Half && t.kind() != Kind::Half {
        let finite = t.f_isfinite()?;
        let largest = t
            .f_abs()?
            .f_masked_select(&finite)?
            .f_max()
            .ok()
            .map(|m| m.double_value(&[]));
        if let Some(largest) = largest.filter(|&m| m > FP16_MAX) {
            return Err(ExportError::Invalid(format!(
                "--dtype fp16: tensor {name} holds {largest:e}, beyond fp16's largest value \
                 ({FP16_MAX}); export it as bf16 (float32's range) or float32"
            )));
        }
    }
    Ok(t.f_to_kind(kind)?.f_contiguous()?)
}

/// A safetensors blob with its floating tensors in `kind`; the header's
/// metadata is kept.
pub fn cast_bytes(bytes: &[u8], kind: Kind, what: &str) -> Result<Vec<u8>, ExportError> {
    let bad = |e: tensor_bytes::TensorBytesError| ExportError::Invalid(e.to_string());
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| ExportError::Invalid(format!("{what}: {e}")))?;
    let metadata: Option<HashMap<String, String>> = header.metadata().clone();
    let tensors = tensor_bytes::from_bytes(bytes, what).map_err(bad)?;
    let mut cast = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = to_kind(&name, &t, kind)?;
        cast.push((name, t));
    }
    tensor_bytes::to_bytes_with_metadata(&cast, metadata).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casts_floats_keeps_integers_and_metadata() {
        let tensors = vec![
            ("w".to_owned(), Tensor::from_slice(&[1.5f32, -2.25, 1e-3])),
            ("ids".to_owned(), Tensor::from_slice(&[1i64, 2, 3])),
        ];
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let bytes = tensor_bytes::to_bytes_with_metadata(&tensors, Some(meta.clone())).unwrap();
        let half = cast_bytes(&bytes, Kind::Half, "t").unwrap();
        let (_, header) = SafeTensors::read_metadata(&half).unwrap();
        assert_eq!(header.metadata().as_ref(), Some(&meta));
        let back = tensor_bytes::from_bytes(&half, "t").unwrap();
        assert_eq!(back["w"].kind(), Kind::Half);
        assert!(back["w"].equal(&tensors[0].1.to_kind(Kind::Half)));
        assert_eq!(back["ids"].kind(), Kind::Int64);
        assert!(back["ids"].equal(&tensors[1].1));
    }

    #[test]
    fn fp16_refuses_what_it_cannot_hold_and_bf16_takes_it() {
        let t = Tensor::from_slice(&[1.0f32, -7.0e4, f32::NAN]);
        let e = to_kind("down_blocks.0.w", &t, Kind::Half)
            .unwrap_err()
            .to_string();
        assert!(e.contains("down_blocks.0.w") && e.contains("bf16"), "{e}");
        let b = to_kind("down_blocks.0.w", &t, Kind::BFloat16).unwrap();
        assert_eq!(b.kind(), Kind::BFloat16);
        // Non-finite values are the tensor's own, not an overflow.
        let inf = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        assert!(to_kind("x", &inf, Kind::Half).is_ok());
    }
}
