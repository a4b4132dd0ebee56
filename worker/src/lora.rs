//! LoRA adapters on the UNet's attention projections, PEFT-compatible.
//!
//! The LoRA teacher is the frozen teacher plus adapters: one copy of the
//! base weights serves both, and a shared switch turns the adapters off
//! (teacher eps_phi) or on (LoRA teacher eps_psi). Adapter variables live in
//! their own VarStore under PEFT's names
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`),
//! so `set_peft_model_state_dict` loads them and the optimizer sees only them.
//! A is Kaiming-uniform (a = sqrt 5), B is zero: at step 0 the LoRA teacher
//! equals the teacher.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor, nn};

use crate::models::attention::{Attention, Linear};
use crate::models::transformer_2d::Transformer2DModel;
use crate::models::unet_2d_condition::{
    UNet2DConditionModel, UNetDownBlock, UNetMidBlock, UNetUpBlock,
};

/// Adapters on or off, shared by every adapter of one model.
#[derive(Debug, Clone)]
pub struct LoraSwitch(Arc<AtomicBool>);

impl LoraSwitch {
    pub fn new(enabled: bool) -> Self {
        Self(Arc::new(AtomicBool::new(enabled)))
    }

    pub fn set(&self, enabled: bool) {
        self.0.store(enabled, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// One projection's low-rank update: scale * B(A(x)).
#[derive(Debug)]
pub struct LoraAdapter {
    /// [rank, in_features]
    pub a: Tensor,
    /// [out_features, rank]
    pub b: Tensor,
    pub scale: f64,
    switch: LoraSwitch,
}

impl LoraAdapter {
    /// The update for input `x`, or None while the adapters are off.
    pub fn forward(&self, x: &Tensor) -> Option<Tensor> {
        if !self.switch.enabled() {
            return None;
        }
        let x = x.to_kind(self.a.kind());
        Some(
            x.linear::<&Tensor>(&self.a, None)
                .linear::<&Tensor>(&self.b, None)
                * self.scale,
        )
    }
}

/// Which projections get adapters, and their size.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: i64,
    pub alpha: f64,
    /// Any of `to_q`, `to_k`, `to_v`, `to_out.0`.
    pub target_modules: Vec<String>,
}

impl From<&swiftbrush_proto::config::LoraConfig> for LoraSpec {
    fn from(c: &swiftbrush_proto::config::LoraConfig) -> Self {
        Self {
            rank: i64::from(c.rank),
            alpha: c.alpha,
            target_modules: c.target_modules.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA rank must be at least 1, got {0}")]
    Rank(i64),
    #[error("unknown LoRA target module {0:?}: expected one of to_q, to_k, to_v, to_out.0")]
    Target(String),
    #[error("the UNet has no attention projection named {0}")]
    NoTargets(String),
    #[error("adapter weights do not match:\n{0}")]
    Mismatch(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// The adapters attached to one UNet: their variables and their switch.
pub struct LoraSet {
    pub vs: nn::VarStore,
    pub switch: LoraSwitch,
    pub spec: LoraSpec,
}

impl LoraSet {
    /// The trainable adapter tensors by PEFT name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Copies adapter weights in by PEFT name (as saved by
    /// `get_peft_model_state_dict`): every adapter must be present with its
    /// shape, nothing else may be.
    pub fn load(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), LoraError> {
        let vars = self.vs.variables();
        let mut problems = Vec::new();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in names {
            match tensors.get(name) {
                None => problems.push(format!("missing {name}")),
                Some(t) if t.size() != vars[name].size() => problems.push(format!(
                    "{name}: expected shape {:?}, found {:?}",
                    vars[name].size(),
                    t.size()
                )),
                Some(_) => {}
            }
        }
        let mut extra: Vec<&String> = tensors.keys().filter(|k| !vars.contains_key(*k)).collect();
        extra.sort();
        problems.extend(extra.iter().map(|k| format!("unexpected {k}")));
        if !problems.is_empty() {
            return Err(LoraError::Mismatch(problems.join("\n")));
        }
        tch::no_grad(|| -> Result<(), LoraError> {
            for (name, mut var) in vars {
                let src = tensors[&name]
                    .f_to_kind(var.kind())?
                    .f_to_device(var.device())?;
                var.f_copy_(&src)?;
            }
            Ok(())
        })
    }
}

/// Attaches fresh adapters (A Kaiming-uniform, B zero, fp32) to every
/// targeted projection of every attention in `unet`, enabled.
pub fn attach_lora(
    unet: &mut UNet2DConditionModel,
    spec: &LoraSpec,
    device: Device,
) -> Result<LoraSet, LoraError> {
    if spec.rank < 1 {
        return Err(LoraError::Rank(spec.rank));
    }
    for t in &spec.target_modules {
        if !matches!(t.as_str(), "to_q" | "to_k" | "to_v" | "to_out.0") {
            return Err(LoraError::Target(t.clone()));
        }
    }
    let vs = nn::VarStore::new(device);
    let switch = LoraSwitch::new(true);
    let scale = spec.alpha / spec.rank as f64;
    let mut attached = 0;
    for attn in unet_attentions(unet) {
        for target in &spec.target_modules {
            let linear = projection(attn, target);
            attach_one(linear, &vs.root(), spec.rank, scale, &switch)?;
            attached += 1;
        }
    }
    if attached == 0 {
        return Err(LoraError::NoTargets(spec.target_modules.join(", ")));
    }
    Ok(LoraSet {
        vs,
        switch,
        spec: spec.clone(),
    })
}

fn attach_one(
    linear: &mut Linear,
    root: &nn::Path,
    rank: i64,
    scale: f64,
    switch: &LoraSwitch,
) -> Result<(), LoraError> {
    let mut p = root.clone();
    for part in linear.path.split('.') {
        p = p.sub(part);
    }
    let (fan_in, fan_out) = (linear.in_features(), linear.out_features());
    // PEFT: kaiming_uniform_(a = sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    let bound = 1.0 / (fan_in as f64).sqrt();
    let a = p.sub("lora_A").f_var(
        "weight",
        &[rank, fan_in],
        nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b = p
        .sub("lora_B")
        .f_var("weight", &[fan_out, rank], nn::Init::Const(0.0))?;
    linear.lora = Some(LoraAdapter {
        a,
        b,
        scale,
        switch: switch.clone(),
    });
    Ok(())
}

fn projection<'a>(attn: &'a mut Attention, target: &str) -> &'a mut Linear {
    match target {
        "to_q" => &mut attn.to_q,
        "to_k" => &mut attn.to_k,
        "to_v" => &mut attn.to_v,
        _ => &mut attn.to_out,
    }
}

/// Every attention module of the UNet (self and cross), in module order.
fn unet_attentions(unet: &mut UNet2DConditionModel) -> Vec<&mut Attention> {
    let mut out = Vec::new();
    for block in unet.down_blocks.iter_mut() {
        if let UNetDownBlock::CrossAttn(b) = block {
            transformer_attentions(&mut b.attentions, &mut out);
        }
    }
    match unet.mid_block.as_mut() {
        Some(UNetMidBlock::CrossAttn(m)) => transformer_attentions(&mut m.attentions, &mut out),
        Some(UNetMidBlock::Plain(m)) => out.extend(m.attentions.iter_mut()),
        None => {}
    }
    for block in unet.up_blocks.iter_mut() {
        if let UNetUpBlock::CrossAttn(b) = block {
            transformer_attentions(&mut b.attentions, &mut out);
        }
    }
    out
}

fn transformer_attentions<'a>(
    transformers: &'a mut [Transformer2DModel],
    out: &mut Vec<&'a mut Attention>,
) {
    for t in transformers {
        for block in t.transformer_blocks.iter_mut() {
            out.push(&mut block.attn1);
            if let Some(a) = block.attn2.as_mut() {
                out.push(a);
            }
        }
    }
}

/// Casts adapter tensors for saving (PEFT files are usually fp32).
pub fn adapter_tensors(set: &LoraSet, kind: Kind) -> Vec<(String, Tensor)> {
    set.named_parameters()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_kind(kind).to_device(Device::Cpu)))
        .collect()
}
