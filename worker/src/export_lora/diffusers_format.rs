//! diffusers' own LoRA file, as `StableDiffusionPipeline.save_lora_weights`
//! writes it: `pytorch_lora_weights.safetensors` with the keys
//! `unet.<PEFT name>` and the adapter's config in the header metadata
//! (`lora_adapter_metadata`: `unet.r`, `unet.lora_alpha`,
//! `unet.target_modules`). `pipe.load_lora_weights(DIR)` builds its
//! `LoraConfig` from that metadata; without it diffusers takes
//! alpha = rank (`get_peft_kwargs`), so a LoRA trained with alpha != rank
//! would load at the wrong scale.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{LoraWeights, safetensors_bytes};
use crate::export::{ExportError, write as write_file};

/// The file name `load_lora_weights(DIR)` looks for first.
pub const FILE: &str = "pytorch_lora_weights.safetensors";
/// The header key diffusers reads the adapter config from
/// (`diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY`).
pub const METADATA_KEY: &str = "lora_adapter_metadata";

/// `lora`'s tensors as they are (`write_lora` casts them to the export's
/// dtype).
pub fn write(lora: &LoraWeights, out: &Path) -> Result<PathBuf, ExportError> {
    let mut tensors = Vec::with_capacity(2 * lora.layers.len());
    for layer in &lora.layers {
        let m = &layer.module;
        tensors.push((format!("unet.{m}.lora_A.weight"), layer.a.shallow_clone()));
        tensors.push((format!("unet.{m}.lora_B.weight"), layer.b.shallow_clone()));
    }
    // The exact module paths as targets: PEFT matches them by suffix, and
    // a full path names one module only.
    let targets: Vec<&str> = lora.layers.iter().map(|l| l.module.as_str()).collect();
    let config = serde_json::json!({
        "unet.r": lora.rank,
        "unet.lora_alpha": lora.alpha,
        "unet.target_modules": targets,
    });
    let metadata = HashMap::from([
        ("format".to_owned(), "pt".to_owned()),
        (METADATA_KEY.to_owned(), config.to_string()),
    ]);
    let path = out.join(FILE);
    write_file(&path, &safetensors_bytes(&tensors, metadata)?)?;
    Ok(path)
}
