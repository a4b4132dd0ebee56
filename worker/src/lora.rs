//! LoRA adapters on the UNet's attention projections (and, optionally, its
//! ResNet convolutions), PEFT-compatible: which layers get them
//! ([`LoraSpec`]), attaching them ([`attach_lora`]) and their variables
//! under PEFT's names ([`LoraSet`]). The adapter layer itself, the update a
//! layer adds and the switch that turns it off, is
//! [`crate::models::lora_layer`].
//!
//! The LoRA teacher is the frozen teacher plus adapters: one copy of the
//! base weights serves both, and a shared switch turns the adapters off
//! for the teacher eps_phi's pass (on, the model is the LoRA teacher
//! eps_psi). A LoRA student is a second set on the same base
//! ([`attach_lora_set`]): each pass selects the one set it runs with. Adapter variables live in
//! their own VarStore under PEFT's names
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`),
//! so `set_peft_model_state_dict` loads them and the optimizer sees only them.
//! A is Kaiming-uniform (a = sqrt 5), B is zero: at step 0 the LoRA teacher
//! equals the teacher.
//!
//! Targets are PEFT's suffix names: `to_q`, `to_k`, `to_v`, `to_out.0` on
//! every attention, and `conv1`, `conv2`, `conv_shortcut` on every ResNet
//! block (PEFT's Conv2d LoRA: A a conv with the base's kernel, stride and
//! padding, B a 1x1 conv). Convolution targets matter for a UNet whose
//! highest resolutions have no attention (the toy teacher): there
//! attention-only adapters cannot follow the student's pixel-level output.

use std::collections::HashMap;

use tch::{Device, Tensor, nn};

use crate::models::attention::Attention;
use crate::models::layers::{Conv2d, Linear};
use crate::models::lora_layer::{AdapterSetId, AdaptersOff, LoraAdapter, LoraSwitch};
use crate::models::resnet::ResnetBlock2D;
use crate::models::transformer_2d::Transformer2DModel;
use crate::models::unet_2d_condition::{
    UNet2DConditionModel, UNetDownBlock, UNetMidBlock, UNetUpBlock,
};

/// Targets on attention projections (Linear).
pub const ATTENTION_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
/// Targets on ResNet blocks (Conv2d).
pub const CONV_TARGETS: [&str; 3] = ["conv1", "conv2", "conv_shortcut"];

/// Which projections get adapters, and their size.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: i64,
    pub alpha: f64,
    /// Any of [`ATTENTION_TARGETS`] and [`CONV_TARGETS`].
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
    #[error(
        "unknown LoRA target module {0:?}: expected one of to_q, to_k, to_v, to_out.0 \
         (attention) or conv1, conv2, conv_shortcut (ResNet blocks)"
    )]
    Target(String),
    #[error("the UNet has no layer named {0} to attach LoRA adapters to")]
    NoTargets(String),
    #[error("adapter weights do not match:\n{0}")]
    Mismatch(String),
    #[error(
        "method.lora.rank = {rank} is larger than {layer} allows: its update has {inputs} \
         inputs and {outputs} outputs, so a rank above {limit} adds parameters, memory and time \
         and no capacity; use a rank of at most {limit} (or target other layers)"
    )]
    RankAboveLayer {
        rank: i64,
        layer: String,
        inputs: i64,
        outputs: i64,
        limit: i64,
    },
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// One set of adapters attached to a UNet: their variables, the model's
/// switch and the set's id on it.
pub struct LoraSet {
    pub vs: nn::VarStore,
    /// The switch every adapter set of the model shares.
    pub switch: LoraSwitch,
    pub spec: LoraSpec,
    /// This set's id on `switch`.
    pub set: AdapterSetId,
}

impl LoraSet {
    /// Until the guard drops, the model runs with this set (and no other)
    /// on every row.
    pub fn on(&self) -> AdaptersOff<'_> {
        self.switch.only(self.set)
    }

    /// Until the guard drops, this set applies to rows `first..` of each
    /// batch only; rows before it run the base alone.
    pub fn on_rows_from(&self, first: i64) -> AdaptersOff<'_> {
        self.switch.rows_from(self.set, first)
    }

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
/// targeted projection of every attention in `unet`, enabled: the model's
/// first adapter set, on a switch of its own.
pub fn attach_lora(
    unet: &mut UNet2DConditionModel,
    spec: &LoraSpec,
    device: Device,
) -> Result<LoraSet, LoraError> {
    attach_lora_set(unet, spec, device, &LoraSwitch::new())
}

/// Attaches a further adapter set beside the ones already on `unet`
/// (their `switch`, which selects among them): a LoRA student's and the
/// fake score's adapters on one base, as peft's `add_adapter`. The new
/// set is off until a pass selects it ([`LoraSet::on`]) unless it is the
/// model's first.
pub fn attach_lora_set(
    unet: &mut UNet2DConditionModel,
    spec: &LoraSpec,
    device: Device,
    switch: &LoraSwitch,
) -> Result<LoraSet, LoraError> {
    if spec.rank < 1 {
        return Err(LoraError::Rank(spec.rank));
    }
    for t in &spec.target_modules {
        if !ATTENTION_TARGETS.contains(&t.as_str()) && !CONV_TARGETS.contains(&t.as_str()) {
            return Err(LoraError::Target(t.clone()));
        }
    }
    let vs = nn::VarStore::new(device);
    let set = switch.next_set();
    let switch = (switch, set);
    let scale = spec.alpha / spec.rank as f64;
    let wants = |name: &str| spec.target_modules.iter().any(|t| t == name);
    let mut attached = 0;
    for attn in unet_attentions(unet) {
        for target in ATTENTION_TARGETS.iter().filter(|t| wants(t)) {
            let linear = projection(attn, target);
            attach_linear(linear, &vs.root(), spec.rank, scale, switch)?;
            attached += 1;
        }
    }
    for resnet in unet_resnets(unet) {
        let convs = [
            ("conv1", Some(&mut resnet.conv1)),
            ("conv2", Some(&mut resnet.conv2)),
            ("conv_shortcut", resnet.conv_shortcut.as_mut()),
        ];
        for (name, conv) in convs {
            if let Some(conv) = conv.filter(|_| wants(name)) {
                attach_conv(conv, &vs.root(), spec.rank, scale, switch)?;
                attached += 1;
            }
        }
    }
    if attached == 0 {
        return Err(LoraError::NoTargets(spec.target_modules.join(", ")));
    }
    Ok(LoraSet {
        vs,
        switch: switch.0.clone(),
        spec: spec.clone(),
        set,
    })
}

/// The adapter's variables under the layer's own path (PEFT's names).
fn adapter_path<'a>(root: &nn::Path<'a>, layer_path: &str) -> nn::Path<'a> {
    let mut p = root.clone();
    for part in layer_path.split('.') {
        p = p.sub(part);
    }
    p
}

fn attach_linear(
    linear: &mut Linear,
    root: &nn::Path,
    rank: i64,
    scale: f64,
    switch: (&LoraSwitch, AdapterSetId),
) -> Result<(), LoraError> {
    let p = adapter_path(root, &linear.path);
    let (fan_in, fan_out) = (linear.in_features(), linear.out_features());
    check_rank(rank, &linear.path, fan_in, fan_out)?;
    let a = kaiming_uniform_a(&p, &[rank, fan_in], fan_in)?;
    let b = p
        .sub("lora_B")
        .f_var("weight", &[fan_out, rank], nn::Init::Const(0.0))?;
    linear.lora.push(LoraAdapter::linear(a, b, scale, switch));
    Ok(())
}

fn attach_conv(
    conv: &mut Conv2d,
    root: &nn::Path,
    rank: i64,
    scale: f64,
    switch: (&LoraSwitch, AdapterSetId),
) -> Result<(), LoraError> {
    let p = adapter_path(root, &conv.path);
    let (c_in, c_out, k) = (conv.in_channels(), conv.out_channels(), conv.kernel_size());
    check_rank(rank, &conv.path, c_in * k * k, c_out)?;
    let a = kaiming_uniform_a(&p, &[rank, c_in, k, k], c_in * k * k)?;
    let b = p
        .sub("lora_B")
        .f_var("weight", &[c_out, rank, 1, 1], nn::Init::Const(0.0))?;
    conv.lora.push(LoraAdapter::conv(
        a,
        b,
        scale,
        (conv.stride(), conv.padding()),
        switch,
    ));
    Ok(())
}

/// B·A has rank at most min(inputs, outputs): a larger rank is only cost
/// (rank 100000 on the tiny fixture took 6.5 GB and 21 s a step).
fn check_rank(rank: i64, layer: &str, inputs: i64, outputs: i64) -> Result<(), LoraError> {
    let limit = inputs.min(outputs);
    if rank > limit {
        return Err(LoraError::RankAboveLayer {
            rank,
            layer: layer.to_owned(),
            inputs,
            outputs,
            limit,
        });
    }
    Ok(())
}

/// PEFT: kaiming_uniform_(a = sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
/// Drawn on the CPU from the seeded generator and copied to the store's
/// device, so the adapters start the same whatever the device (CUDA's
/// Philox lays its draws out by the GPU's SM count); on the CPU this is the
/// draw `nn::Init::Uniform` made, bit for bit.
fn kaiming_uniform_a(p: &nn::Path, shape: &[i64], fan_in: i64) -> Result<Tensor, LoraError> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let drawn = tch::no_grad(|| {
        Tensor::f_zeros(shape, (p.kind(), Device::Cpu))?.f_uniform_(-bound, bound)
    })?;
    Ok(p.sub("lora_A").f_var_copy("weight", &drawn)?)
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

/// Every ResNet block of the UNet, in module order.
fn unet_resnets(unet: &mut UNet2DConditionModel) -> Vec<&mut ResnetBlock2D> {
    let mut out = Vec::new();
    for block in unet.down_blocks.iter_mut() {
        match block {
            UNetDownBlock::CrossAttn(b) => out.extend(b.resnets.iter_mut()),
            UNetDownBlock::Plain(b) => out.extend(b.resnets.iter_mut()),
        }
    }
    match unet.mid_block.as_mut() {
        Some(UNetMidBlock::CrossAttn(m)) => out.extend(m.resnets.iter_mut()),
        Some(UNetMidBlock::Plain(m)) => out.extend(m.resnets.iter_mut()),
        None => {}
    }
    for block in unet.up_blocks.iter_mut() {
        match block {
            UNetUpBlock::CrossAttn(b) => out.extend(b.resnets.iter_mut()),
            UNetUpBlock::Plain(b) => out.extend(b.resnets.iter_mut()),
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
