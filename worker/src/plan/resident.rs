//! What a worker holds for the whole run, counted exactly from the
//! teacher folder's config.json files: the networks are built with
//! `without_init` (variables backed by untouched memory, so even SD's
//! UNet costs nothing resident) and their variables counted, the text
//! encoder by transformers' formula (`CLIPTextConfig::num_params`). No
//! weight file is read: a folder of config files plans as well as a full
//! one.

use serde::Serialize;
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{Dtype, FakeScore};
use tch::{Device, nn};

use super::PlanError;
use crate::lora::{LoraSpec, attach_lora};
use crate::models::clip::CLIPTextConfig;
use crate::models::layers::without_init;
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::pipeline::DiffusersFolder;

/// Element counts of the networks a run builds.
#[derive(Debug, Clone)]
pub struct Counts {
    pub unet_config: UNet2DConditionConfig,
    /// The UNet's parameters (teacher, student, DMD2's copy: each one).
    pub unet: u64,
    /// Elements of each UNet variable, sorted by name (the order the
    /// optimizer's chunks take them in).
    pub unet_tensors: Vec<u64>,
    /// The LoRA adapters' parameters (method.lora on this UNet).
    pub lora: u64,
    pub lora_tensors: Vec<u64>,
    /// A LoRA student's adapters (`method.student.kind: lora`, on the same
    /// base); empty for a full student.
    pub student_lora_tensors: Vec<u64>,
    pub text_encoder: u64,
    /// The VAE, when the run loads it (train.sample_every_steps with a
    /// latent-space teacher).
    pub vae: Option<u64>,
}

/// Counts the networks of `folder` as `cfg` builds them.
pub fn count(cfg: &JobConfig, folder: &DiffusersFolder) -> Result<Counts, PlanError> {
    let unet_config = UNet2DConditionConfig::from_file(&folder.component("unet")?.config_path()?)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let mut model = without_init(|| UNet2DConditionModel::new(vs.root(), &unet_config))?;
    let unet_tensors = sorted_numels(&vs);
    // Adapters are small and drawn at once (A is Kaiming-uniform).
    let lora = attach_lora(&mut model, &LoraSpec::from(&cfg.method.lora), Device::Cpu)?;
    let lora_tensors: Vec<u64> = lora
        .named_parameters()
        .iter()
        .map(|(_, t)| t.numel() as u64)
        .collect();
    let student_lora_tensors: Vec<u64> = match cfg.method.student.lora_adapters() {
        Some(l) => attach_lora(&mut model, &LoraSpec::from(&l), Device::Cpu)?
            .named_parameters()
            .iter()
            .map(|(_, t)| t.numel() as u64)
            .collect(),
        None => Vec::new(),
    };
    let text = CLIPTextConfig::from_file(&folder.component("text_encoder")?.config_path()?)?;
    let samples = cfg.train.sample_every_steps > 0 && !cfg.train.sample_prompts.is_empty();
    let vae = if samples && folder.has("vae") {
        let vae_config = AutoencoderKLConfig::from_file(&folder.component("vae")?.config_path()?)?;
        let vs = nn::VarStore::new(Device::Cpu);
        without_init(|| AutoencoderKL::new(vs.root(), &vae_config))?;
        Some(sorted_numels(&vs).iter().sum())
    } else {
        None
    };
    Ok(Counts {
        unet_config,
        unet: unet_tensors.iter().sum(),
        unet_tensors,
        lora: lora_tensors.iter().sum(),
        lora_tensors,
        student_lora_tensors,
        text_encoder: text.num_params() as u64 + second_encoder(folder)?,
        vae,
    })
}

/// SDXL's text_encoder_2 (with its projection), 0 for SD 1/2.
fn second_encoder(folder: &DiffusersFolder) -> Result<u64, PlanError> {
    if !crate::pipeline::is_sdxl_folder(folder) {
        return Ok(0);
    }
    let path = folder.component("text_encoder_2")?.config_path()?;
    let text = CLIPTextConfig::from_file(&path)?;
    let projection: crate::models::clip_with_projection::ProjectionConfig =
        crate::models::read_json_config(&path)?;
    Ok((text.num_params() + projection.projection_dim * text.hidden_size) as u64)
}

fn sorted_numels(vs: &nn::VarStore) -> Vec<u64> {
    let mut v: Vec<(String, u64)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.numel() as u64))
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

/// One resident part of a worker.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub name: String,
    pub elements: u64,
    pub dtype: &'static str,
    pub bytes: u64,
}

fn part(name: &str, elements: u64, dtype: Dtype) -> Part {
    Part {
        name: name.to_owned(),
        elements,
        dtype: dtype.name(),
        bytes: elements * dtype_bytes(dtype),
    }
}

pub fn dtype_bytes(d: Dtype) -> u64 {
    match d {
        Dtype::Fp32 => 4,
        Dtype::Bf16 | Dtype::Fp16 => 2,
    }
}

/// Every part a worker holds from its first step to its last (trainer/:
/// `load.rs`, `optimizers.rs`, the EMA, `samples.rs`). Gradients are kept
/// between steps (zeroed in place), Adam's moments exist from the start.
/// With `world.shard_state` in a world of `world` ranks (crate::shard) the
/// student's and DMD2's fake score's moments and the EMA are the rank's
/// slice, at most ceil(n / W) elements; the gradients are counted whole
/// either way: ZeRO-2 frees them after the reduce-scatter, but the next
/// backward fills them again, and the plan is of the peak.
pub fn parts(cfg: &JobConfig, c: &Counts, world: u32) -> Vec<Part> {
    let f32 = Dtype::Fp32;
    let sharded = !cfg.world.shard_state.is_none();
    let slice = |n: u64| {
        if sharded {
            n.div_ceil(u64::from(world.max(1)))
        } else {
            n
        }
    };
    let of_slice = |name: &str| {
        if sharded {
            format!("{name} (this rank's slice)")
        } else {
            name.to_owned()
        }
    };
    let mut parts = vec![
        part("teacher UNet", c.unet, cfg.precision.teacher_dtype),
        part(
            "text encoder",
            c.text_encoder,
            cfg.precision.text_encoder_dtype,
        ),
    ];
    if let Some(vae) = c.vae {
        parts.push(part("VAE (train.sample_every_steps)", vae, f32));
    }
    if cfg.method.student.lora_adapters().is_some() {
        // A LoRA student: its adapters on the teacher's base (no copy of
        // the UNet), replicated (world.shard_state is refused with it).
        let n: u64 = c.student_lora_tensors.iter().sum();
        parts.extend([
            part("student LoRA adapters", n, f32),
            part("student LoRA gradients", n, f32),
            part("student LoRA Adam exp_avg", n, f32),
            part("student LoRA Adam exp_avg_sq", n, f32),
        ]);
        if cfg.method.ema.enabled {
            parts.push(part("student LoRA EMA", n, f32));
        }
    } else {
        parts.extend([
            part("student", c.unet, f32),
            part("student gradients", c.unet, f32),
            part(&of_slice("student Adam exp_avg"), slice(c.unet), f32),
            part(&of_slice("student Adam exp_avg_sq"), slice(c.unet), f32),
        ]);
        if cfg.method.ema.enabled {
            parts.push(part(&of_slice("student EMA"), slice(c.unet), f32));
        }
    }
    let (what, n, moments) = match cfg.method.fake_score.kind {
        // The adapters stay replicated.
        FakeScore::Lora => ("LoRA adapters", c.lora, c.lora),
        FakeScore::Unet => ("fake score UNet (DMD2)", c.unet, slice(c.unet)),
    };
    let fake_name = |suffix: &str| {
        let name = format!("{what} {suffix}");
        if moments < n { of_slice(&name) } else { name }
    };
    parts.extend([
        part(what, n, f32),
        part(&format!("{what} gradients"), n, f32),
        part(&fake_name("Adam exp_avg"), moments, f32),
        part(&fake_name("Adam exp_avg_sq"), moments, f32),
    ]);
    parts
}

/// The optimizer step's transient: the multi-tensor Adam
/// (`csrc/foreach.cpp`) holds at most two temporary lists at once, each
/// the size of its chunk (`torch::foreach::chunks` of CHUNK_BYTES, the
/// split the optimizer makes), float32.
pub fn optimizer_transient(cfg: &JobConfig, c: &Counts) -> u64 {
    let largest_chunk = |numels: &[u64]| -> u64 {
        let bytes: Vec<usize> = numels.iter().map(|n| (*n * 4) as usize).collect();
        crate::torch::foreach::chunks(&bytes, crate::torch::foreach::CHUNK_BYTES)
            .into_iter()
            .map(|r| bytes[r].iter().sum::<usize>() as u64)
            .max()
            .unwrap_or(0)
    };
    let fake = match cfg.method.fake_score.kind {
        FakeScore::Lora => largest_chunk(&c.lora_tensors),
        FakeScore::Unet => largest_chunk(&c.unet_tensors),
    };
    let student = if c.student_lora_tensors.is_empty() {
        largest_chunk(&c.unet_tensors)
    } else {
        largest_chunk(&c.student_lora_tensors)
    };
    let chunks = 2 * student.max(fake);
    if cfg.world.shard_state.is_none() {
        return chunks;
    }
    // Sharded (crate::shard): the flattened gradients and their
    // collective's copy (the ring's host buffer, NCCL's padded one), then
    // the flattened weights for the all-gather: two float32 buffers of a
    // whole UNet at most.
    chunks.max(2 * 4 * c.unet)
}

/// The gather of the sharded state for a checkpoint or the sample step
/// (`crate::shard::gather`), between steps (no activations alive). None
/// unsharded.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GatherTransient {
    /// One gathered piece on the device, all ranks' parts together:
    /// `shard::gather::PIECE_BYTES` at most, less when the whole network
    /// is smaller.
    pub device_piece: u64,
    /// Rank 0's copy of the full state in host memory: the student's two
    /// Adam moments and its EMA, DMD2's fake score's two moments (the
    /// unsharded run's resident bytes, which sharding only moves here for
    /// the checkpoint), and the piece's host copy.
    pub host: u64,
    /// The same on a CPU run (the device is the host): the state, the
    /// piece and the TCP ring's copies of it (its host float32 buffer,
    /// the gathered result, the part it receives).
    pub cpu: u64,
}

/// Rank 0's gather transient in a world of `world` ranks.
pub fn gather_transient(cfg: &JobConfig, c: &Counts, world: u32) -> Option<GatherTransient> {
    if cfg.world.shard_state.is_none() {
        return None;
    }
    let w = u64::from(world.max(1));
    // shard::gather: `per` float32 a rank a piece, no more than a slice.
    let per =
        (crate::shard::gather::PIECE_BYTES as u64 / (w * 4)).clamp(1, c.unet.div_ceil(w).max(1));
    let piece = w * per * 4;
    let student = if cfg.method.ema.enabled { 3 } else { 2 };
    let fake = match cfg.method.fake_score.kind {
        FakeScore::Unet => 2,
        FakeScore::Lora => 0,
    };
    let state = (student + fake) * 4 * c.unet;
    Some(GatherTransient {
        device_piece: piece,
        host: state + piece,
        cpu: state + 3 * piece + per * 4,
    })
}
