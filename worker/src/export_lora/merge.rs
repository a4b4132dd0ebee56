//! A LoRA folded into its base UNet: each adapted weight becomes
//! W + alpha/rank · B·A (a conv's kernel B(1x1)∘A(k x k) = B·A over the
//! rank), written as a full diffusers UNet folder (config.json +
//! diffusion_pytorch_model.safetensors, the layout `export` writes), which
//! `UNet2DConditionModel.from_pretrained` loads with no LoRA machinery.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::LoraWeights;
use crate::export::ExportError;
use crate::models::weights::read_safetensors;
use crate::pipeline::DiffusersFolder;
use crate::trainer::checkpoint::tensor_bytes;

/// The UNet weights of a diffusers folder by name (CPU, stored dtype).
pub fn unet_weights(folder: &DiffusersFolder) -> Result<HashMap<String, Tensor>, ExportError> {
    let mut out = HashMap::new();
    for file in folder.component("unet")?.weight_files()? {
        let tensors = read_safetensors(&file).map_err(|e| ExportError::Invalid(e.to_string()))?;
        out.extend(tensors);
    }
    Ok(out)
}

/// `base` with the LoRA folded in: each adapted weight summed in float64
/// and stored back in its own dtype; every other tensor untouched.
pub fn merged(
    lora: &LoraWeights,
    mut base: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, ExportError> {
    let scale = lora.scale();
    let mut problems = Vec::new();
    for layer in &lora.layers {
        let name = format!("{}.weight", layer.module);
        let Some(w) = base.get(&name) else {
            problems.push(format!("{name}: not in the base UNet"));
            continue;
        };
        let delta = layer.delta(scale)?;
        if delta.size() != w.size() {
            problems.push(format!(
                "{name}: the adapter's update is {:?}, the weight {:?}",
                delta.size(),
                w.size()
            ));
            continue;
        }
        let folded = (w.f_to_kind(Kind::Double)? + delta).f_to_kind(w.kind())?;
        base.insert(name, folded);
    }
    if !problems.is_empty() {
        return Err(ExportError::Invalid(format!(
            "the LoRA does not fit the teacher's UNet:\n{}",
            problems.join("\n")
        )));
    }
    Ok(base)
}

/// The teacher's UNet with the LoRA folded in, as one safetensors blob
/// (diffusion_pytorch_model.safetensors' bytes).
pub fn merged_bytes(lora: &LoraWeights, teacher: &DiffusersFolder) -> Result<Vec<u8>, ExportError> {
    let weights = merged(lora, unet_weights(teacher)?)?;
    let named: Vec<(String, Tensor)> = weights.into_iter().collect();
    tensor_bytes::to_bytes(&named).map_err(|e| ExportError::Invalid(e.to_string()))
}
