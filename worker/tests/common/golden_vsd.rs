//! What tests/reference/golden_vsd.py (and golden_autocast.py, which runs
//! the same iteration) fix for the Rust side: the roles built from a
//! fixture pipeline with the reference's adapters, the draws, the text
//! conditions and the schedule.

use std::collections::HashMap;

use swiftbrush_worker::diffusion::{NoiseSchedule, PredictionType, SchedulerConfig};
use swiftbrush_worker::lora::LoraSpec;
use swiftbrush_worker::models::weights;
use swiftbrush_worker::pipeline::{DiffusersFolder, UNet};
use swiftbrush_worker::torch::precision::AutocastPlan;
use swiftbrush_worker::vsd::{
    Conditions, Draws, FakeScoreDraws, FullFakeScore, TeacherUNet, VsdConfig, VsdWeighting,
};
use tch::Tensor;

/// The reference's LoRA: rank 4, alpha 8 on `targets`.
pub fn lora_spec(targets: &[&str]) -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
    }
}

/// Stable Diffusion's scaled_linear schedule (SPEC) for a model whose
/// output means `prediction`.
pub fn schedule(prediction: PredictionType) -> NoiseSchedule {
    let prediction_type = match prediction {
        PredictionType::Epsilon => "epsilon",
        PredictionType::VPrediction => "v_prediction",
        PredictionType::Sample => "sample",
    };
    let cfg = SchedulerConfig {
        prediction_type: prediction_type.into(),
        ..SchedulerConfig::stable_diffusion()
    };
    NoiseSchedule::new(&cfg, super::device()).unwrap()
}

/// The reference step's constants: the student at t = 999 with A = 0.0047,
/// guidance 4.5, the scores in two passes (a case sets `one_score_pass`),
/// no recomputation.
pub fn vsd_config(weighting: VsdWeighting, teacher_autocast: Option<AutocastPlan>) -> VsdConfig {
    VsdConfig {
        student_timestep: 999,
        student_alpha_bar: 0.0047,
        guidance_scale: 4.5,
        weighting,
        teacher_autocast,
        student_autocast: None,
        one_score_pass: false,
        recompute_rows: None,
        few_step: None,
    }
}

/// The student and the LoRA teacher of fixture pipeline `kind`, freshly
/// built (B = 0).
pub fn fresh_roles(kind: &str, spec: &LoraSpec) -> (UNet, TeacherUNet) {
    let folder = DiffusersFolder::open(&super::pipeline(kind)).unwrap();
    let teacher = UNet::load(&folder, super::device()).unwrap();
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
    let teacher = UNet::load(&folder, super::device()).unwrap();
    let student = teacher.duplicate().unwrap();
    let mut fake = teacher.duplicate().unwrap();
    let weights: HashMap<String, Tensor> = g
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("fake.").map(|n| (n.to_owned(), v.copy())))
        .collect();
    weights::load_tensors_strict(&mut fake.vs, weights, &[]).unwrap();
    (student, FullFakeScore::new(teacher, fake))
}

/// The golden file's draws and text conditions, on the test device.
pub fn inputs(g: &HashMap<String, Tensor>) -> (Draws, Conditions) {
    let on = |name: &str| g[name].to_device(super::device()).copy();
    let draws = Draws {
        z: on("z"),
        t: on("t"),
        eps: on("eps"),
        fake: FakeScoreDraws {
            t: on("t_lora"),
            eps: on("eps_lora"),
            null_condition: g["null_condition"].int64_value(&[0]) == 1,
        },
        guidance_scale: None,
        chain: None,
    };
    let text = Conditions {
        cond: on("cond"),
        uncond: on("uncond"),
    };
    (draws, text)
}

/// The trainable tensors' gradients `params` against the golden's under
/// `prefix` (`student_grad.`, `lora_grad.`, `fake_grad.`): the same
/// tensors, and max abs diff <= 1e-4 of the reference gradient's largest
/// entry. Reported for scripts/gpu-check as "{case} {prefix} / max".
pub fn assert_gradients_match(
    case: &str,
    prefix: &str,
    params: Vec<(String, Tensor)>,
    g: &HashMap<String, Tensor>,
) {
    assert_eq!(
        params.len(),
        g.keys().filter(|k| k.starts_with(prefix)).count(),
        "{case}: {prefix} tensor count"
    );
    let scale = super::nan_max(
        params
            .iter()
            .map(|(n, _)| g[&format!("{prefix}{n}")].abs().max().double_value(&[])),
    );
    assert!(
        scale > 0.0,
        "{case}: reference {prefix} gradient is all zero"
    );
    let worst = super::nan_max(params.iter().map(|(name, p)| {
        let got = p.grad();
        assert!(got.defined(), "{case}: no gradient for {name}");
        super::max_abs_diff(&got, &g[&format!("{prefix}{name}")])
    }));
    super::report(&format!("{case} {prefix} / max"), worst / scale, 1e-4);
    assert!(
        worst <= 1e-4 * scale,
        "{case} {prefix}: max diff {worst:e}, scale {scale:e}"
    );
}
