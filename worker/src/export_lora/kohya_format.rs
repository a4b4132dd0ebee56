//! kohya's LoRA file (sd-scripts' `networks/lora.py`), which ComfyUI and
//! A1111 load and diffusers converts (`_convert_non_diffusers_lora_to_diffusers`):
//! one key stem per layer, `lora_unet_<module path, dots as underscores>`,
//! with `.lora_down.weight` (our A), `.lora_up.weight` (our B) and `.alpha`
//! (a scalar; the update is alpha / rank · up·down, as PEFT's). Convolution
//! layers are LoCon's: down a conv with the layer's kernel, up a 1x1 conv,
//! exactly PEFT's Conv2d LoRA.
//!
//! The module path is the one kohya's own UNet spells:
//! - SD 1.x/2.x: sd-scripts trains those on diffusers' UNet, so the path
//!   is diffusers' (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`).
//! - SDXL: sd-scripts trains on its own copy of the original (SGM) UNet,
//!   so the shared SDXL LoRAs say `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`
//!   and a ResNet's conv1 is `in_layers_2`, conv2 `out_layers_3`,
//!   conv_shortcut `skip_connection`. diffusers maps those back by the
//!   UNet's `layers_per_block` (`_maybe_map_sgm_blocks_to_diffusers`), and
//!   ComfyUI and A1111 read them as their own model's keys.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::{LoraWeights, safetensors_bytes};
use crate::export::{ExportError, write as write_file};
use crate::models::unet_2d_condition::UNet2DConditionConfig;

/// The file written into the export folder (diffusers' `load_lora_weights(DIR)`
/// finds a folder's one safetensors file by itself).
pub const FILE: &str = "swiftbrush_lora_kohya.safetensors";

/// How the base UNet's modules are named in kohya keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KohyaNames {
    /// diffusers' module paths (SD 1.x/2.x).
    Diffusers,
    /// The original UNet's (SDXL), with this many ResNets per down block;
    /// `up_attention[i]`: up block i has attentions (its upsampler is then
    /// the third module of its last output block, else the second).
    Sgm {
        layers_per_block: usize,
        up_attention: Vec<bool>,
    },
}

impl KohyaNames {
    /// SGM names for an SDXL UNet (its `addition_embed_type` is
    /// `text_time`), diffusers' otherwise.
    pub fn for_unet(config: &UNet2DConditionConfig) -> Result<Self, ExportError> {
        if config.addition_embed_type.as_deref() != Some("text_time") {
            return Ok(Self::Diffusers);
        }
        let blocks = config.down_block_types.len();
        let per_block = config
            .layers_per_block
            .per_block("layers_per_block", blocks)
            .map_err(ExportError::Invalid)?;
        match per_block.first() {
            Some(&l) if per_block.iter().all(|&x| x == l) && l > 0 => Ok(Self::Sgm {
                layers_per_block: l as usize,
                up_attention: config
                    .up_block_types
                    .iter()
                    .map(|t| t.contains("CrossAttn"))
                    .collect(),
            }),
            _ => Err(ExportError::Invalid(format!(
                "kohya's SDXL key names number blocks by one layers_per_block; this UNet has \
                 {per_block:?}: use --format diffusers"
            ))),
        }
    }

    /// kohya's key stem for a module (without `.lora_down.weight`).
    pub fn key(&self, module: &str) -> Result<String, ExportError> {
        let path = match self {
            Self::Diffusers => module.to_owned(),
            Self::Sgm {
                layers_per_block,
                up_attention,
            } => sgm_path(module, *layers_per_block, up_attention)?,
        };
        Ok(format!("lora_unet_{}", path.replace('.', "_")))
    }
}

/// diffusers' module path -> the original UNet's (SDXL's block layout:
/// input block 0 is conv_in, each down block is L ResNet(+attention)
/// blocks and a downsampler, the middle block is ResNet, attention,
/// ResNet, each up block L + 1 ResNet(+attention) blocks; a down block's
/// downsampler is the next input block's `op`, an up block's upsampler the
/// last module of its last output block).
fn sgm_path(module: &str, l: usize, up_attention: &[bool]) -> Result<String, ExportError> {
    let unsupported = || {
        ExportError::Invalid(format!(
            "{module}: no SDXL (SGM) kohya name for this layer (mapped: the attention blocks' \
             layers, the ResNets' conv1, conv2, conv_shortcut and time_emb_proj, the down- \
             and upsamplers' conv); use --format diffusers"
        ))
    };
    let parts: Vec<&str> = module.split('.').collect();
    let num = |s: &str| s.parse::<usize>().map_err(|_| unsupported());
    let (block, kind, rest) = match parts.as_slice() {
        ["down_blocks", i, "downsamplers", "0", "conv"] => {
            return Ok(format!("input_blocks.{}.0.op", (num(i)? + 1) * (l + 1)));
        }
        ["up_blocks", i, "upsamplers", "0", "conv"] => {
            let i = num(i)?;
            let at = if *up_attention.get(i).ok_or_else(unsupported)? {
                2
            } else {
                1
            };
            return Ok(format!("output_blocks.{}.{at}.conv", i * (l + 1) + l));
        }
        ["down_blocks", i, kind, j, rest @ ..] => (
            format!("input_blocks.{}", 1 + num(i)? * (l + 1) + num(j)?),
            *kind,
            rest,
        ),
        ["up_blocks", i, kind, j, rest @ ..] => (
            format!("output_blocks.{}", num(i)? * (l + 1) + num(j)?),
            *kind,
            rest,
        ),
        ["mid_block", "resnets", j, rest @ ..] => {
            (format!("middle_block.{}", 2 * num(j)?), "mid", rest)
        }
        ["mid_block", "attentions", "0", rest @ ..] => {
            ("middle_block.1".to_owned(), "mid_attention", rest)
        }
        _ => return Err(unsupported()),
    };
    let rest = rest.join(".");
    let inner = match kind {
        "attentions" => format!("1.{rest}"),
        "resnets" => format!("0.{}", sgm_resnet_layer(&rest).ok_or_else(unsupported)?),
        "mid" => sgm_resnet_layer(&rest).ok_or_else(unsupported)?.to_owned(),
        "mid_attention" => rest,
        _ => return Err(unsupported()),
    };
    Ok(format!("{block}.{inner}"))
}

/// A ResNet block's convolution in the original UNet (`ResBlock`).
fn sgm_resnet_layer(name: &str) -> Option<&'static str> {
    Some(match name {
        "conv1" => "in_layers.2",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        "time_emb_proj" => "emb_layers.1",
        _ => return None,
    })
}

/// `lora`'s tensors as they are (`write_lora` casts them to the export's
/// dtype), alpha in the same dtype.
pub fn write(lora: &LoraWeights, out: &Path, unet_config: &Path) -> Result<PathBuf, ExportError> {
    let config = UNet2DConditionConfig::from_file(unet_config)
        .map_err(|e| ExportError::Invalid(format!("{}: {e}", unet_config.display())))?;
    let names = KohyaNames::for_unet(&config)?;
    // sd-scripts stores alpha in the file's dtype (its save_dtype).
    let kind = lora.layers.first().map_or(Kind::Float, |l| l.a.kind());
    let alpha = Tensor::from(lora.alpha as f32).f_to_kind(kind)?;
    let mut tensors = Vec::with_capacity(3 * lora.layers.len());
    for layer in &lora.layers {
        let stem = names.key(&layer.module)?;
        tensors.push((format!("{stem}.lora_down.weight"), layer.a.shallow_clone()));
        tensors.push((format!("{stem}.lora_up.weight"), layer.b.shallow_clone()));
        tensors.push((format!("{stem}.alpha"), alpha.copy()));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some((dup, _)) = tensors.iter().find(|(k, _)| !seen.insert(k.clone())) {
        return Err(ExportError::Invalid(format!(
            "two layers map to the kohya key {dup}"
        )));
    }
    // sd-scripts' own training metadata, for the tools that show it.
    let has_conv = lora.layers.iter().any(|l| l.is_conv());
    let mut metadata = HashMap::from([
        ("ss_network_module".to_owned(), "networks.lora".to_owned()),
        ("ss_network_dim".to_owned(), lora.rank.to_string()),
        ("ss_network_alpha".to_owned(), lora.alpha.to_string()),
    ]);
    if has_conv {
        metadata.insert(
            "ss_network_args".to_owned(),
            serde_json::json!({
                "conv_dim": lora.rank.to_string(),
                "conv_alpha": lora.alpha.to_string(),
            })
            .to_string(),
        );
    }
    let path = out.join(FILE);
    write_file(&path, &safetensors_bytes(&tensors, metadata)?)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::KohyaNames;

    #[test]
    fn kohya_names_sd1_and_sdxl() {
        let sd1 = KohyaNames::Diffusers;
        assert_eq!(
            sd1.key("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0")
                .unwrap(),
            "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0"
        );
        let xl = KohyaNames::Sgm {
            layers_per_block: 2,
            up_attention: vec![true, true, false],
        };
        let cases = [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            ),
            (
                "down_blocks.2.resnets.1.conv2",
                "lora_unet_input_blocks_8_0_out_layers_3",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut",
                "lora_unet_input_blocks_4_0_skip_connection",
            ),
            (
                "mid_block.resnets.1.conv1",
                "lora_unet_middle_block_2_in_layers_2",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
                "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k",
            ),
            (
                "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_v",
                "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_v",
            ),
            (
                "up_blocks.0.resnets.0.conv1",
                "lora_unet_output_blocks_0_0_in_layers_2",
            ),
            (
                "up_blocks.2.resnets.1.time_emb_proj",
                "lora_unet_output_blocks_7_0_emb_layers_1",
            ),
            (
                "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
                "lora_unet_input_blocks_5_1_transformer_blocks_0_ff_net_0_proj",
            ),
            (
                "down_blocks.1.attentions.0.proj_in",
                "lora_unet_input_blocks_4_1_proj_in",
            ),
            (
                "down_blocks.0.downsamplers.0.conv",
                "lora_unet_input_blocks_3_0_op",
            ),
            (
                "up_blocks.1.upsamplers.0.conv",
                "lora_unet_output_blocks_5_2_conv",
            ),
        ];
        for (module, want) in cases {
            assert_eq!(xl.key(module).unwrap(), want, "{module}");
        }
        assert!(xl.key("conv_in").is_err());
    }
}
