//! What tests/reference/golden_vsd.py (and golden_autocast.py, which runs
//! the same iteration) fix for the Rust side: the roles built from a
//! fixture pipeline with the reference's adapters, the draws, the text
//! conditions and the schedule.

use std::collections::HashMap;

use swiftbrush_worker::lora::LoraSpec;
use swiftbrush_worker::models::weights;
use swiftbrush_worker::pipeline::DiffusersFolder;
use swiftbrush_worker::roles::{FullFakeScore, TeacherUNet, UNet};
use swiftbrush_worker::vsd::{Conditions, Draws};
use tch::{Device, Kind, Tensor};

/// The reference's LoRA: rank 4, alpha 8 on `targets`.
pub fn lora_spec(targets: &[&str]) -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
    }
}

/// diffusers' scaled_linear schedule in float32 (SPEC).
pub fn alphas_cumprod() -> Tensor {
    let betas = Tensor::linspace(
        0.00085f64.sqrt(),
        0.012f64.sqrt(),
        1000,
        (Kind::Float, Device::Cpu),
    )
    .square();
    (1.0f64 - betas).cumprod(0, Kind::Float)
}

/// The student and the LoRA teacher of fixture pipeline `kind`, freshly
/// built (B = 0).
pub fn fresh_roles(kind: &str, spec: &LoraSpec) -> (UNet, TeacherUNet) {
    let folder = DiffusersFolder::open(&super::pipeline(kind)).unwrap();
    let teacher = UNet::load(&folder, Device::Cpu).unwrap();
    let student = teacher.duplicate().unwrap();
    (student, TeacherUNet::new(teacher, spec).unwrap())
}

/// [`fresh_roles`] with the adapters set to the golden file's.
pub fn roles(kind: &str, spec: &LoraSpec, g: &HashMap<String, Tensor>) -> (UNet, TeacherUNet) {
    let (student, mut teacher) = fresh_roles(kind, spec);
    let adapters: HashMap<String, Tensor> = g
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("adapter.").map(|n| (n.to_owned(), v.copy())))
        .collect();
    teacher.lora.load(&adapters).unwrap();
    (student, teacher)
}

/// The student and DMD2's fake score (the teacher beside a full copy with
/// the golden file's perturbed weights) of fixture pipeline `kind`.
pub fn full_fake_roles(kind: &str, g: &HashMap<String, Tensor>) -> (UNet, FullFakeScore) {
    let folder = DiffusersFolder::open(&super::pipeline(kind)).unwrap();
    let teacher = UNet::load(&folder, Device::Cpu).unwrap();
    let student = teacher.duplicate().unwrap();
    let mut fake = teacher.duplicate().unwrap();
    let weights: HashMap<String, Tensor> = g
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("fake.").map(|n| (n.to_owned(), v.copy())))
        .collect();
    weights::load_tensors_strict(&mut fake.vs, weights, &[]).unwrap();
    (student, FullFakeScore::new(teacher, fake))
}

/// The golden file's draws and text conditions.
pub fn inputs(g: &HashMap<String, Tensor>) -> (Draws, Conditions) {
    let draws = Draws {
        z: g["z"].copy(),
        t: g["t"].copy(),
        eps: g["eps"].copy(),
        t_lora: g["t_lora"].copy(),
        eps_lora: g["eps_lora"].copy(),
        null_condition: g["null_condition"].int64_value(&[0]) == 1,
        guidance_scale: None,
    };
    let text = Conditions {
        cond: g["cond"].copy(),
        uncond: g["uncond"].copy(),
    };
    (draws, text)
}
