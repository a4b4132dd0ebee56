//! The SwiftBrush step on the tiny SDXL fixture against the pinned
//! diffusers + peft reference (tests/reference/golden_vsd_xl.py, which runs
//! golden_vsd.py's iteration with SDXL's added conditions): the student,
//! the teacher and the fake score (LoRA, and DMD2's full copy) all take the
//! pooled embedding and the time ids; the null condition is zeros with the
//! same time ids. Same losses and gradients as the reference.

mod common;

use std::collections::HashMap;

use common::golden_vsd::{full_fake_roles, inputs, lora_spec, roles, schedule, vsd_config};
use swiftbrush_worker::diffusion::PredictionType;
use swiftbrush_worker::pipeline::UNet;
use swiftbrush_worker::vsd::{ScorePair, VsdStep, VsdWeighting};
use tch::Tensor;

fn check(case: &str, student: &UNet, scores: &ScorePair, one_pass: bool) {
    tch::set_num_threads(1);
    let g = common::golden(&format!("golden/vsd/{case}.safetensors"));
    let (draws, text) = inputs(&g);
    let cfg = swiftbrush_worker::vsd::VsdConfig {
        one_score_pass: one_pass,
        ..vsd_config(VsdWeighting::Paper, None)
    };
    let step = VsdStep {
        student,
        scores,
        schedule: &schedule(PredictionType::Epsilon),
        config: &cfg,
        loss_scales: None,
    };
    let losses = step.run(&text, &draws, None).unwrap().losses;
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let (want_vsd, want_fake) = (
        g["loss_vsd"].double_value(&[0]),
        g["loss_lora"].double_value(&[0]),
    );
    eprintln!(
        "{case}: vsd {:e}, fake {:e} relative",
        rel(losses.vsd, want_vsd),
        rel(losses.fake_score, want_fake)
    );
    assert!(
        rel(losses.vsd, want_vsd) < 1e-4,
        "{case}: vsd {} vs {want_vsd}",
        losses.vsd
    );
    assert!(
        rel(losses.fake_score, want_fake) < 1e-4,
        "{case}: fake-score loss {} vs {want_fake}",
        losses.fake_score
    );
    let prefix = match scores {
        ScorePair::Lora(_) => "lora_grad.",
        ScorePair::Unet(_) => "fake_grad.",
    };
    for (prefix, params) in [
        ("student_grad.", student.named_parameters()),
        (prefix, scores.fake_parameters()),
    ] {
        assert_eq!(
            params.len(),
            g.keys().filter(|k| k.starts_with(prefix)).count(),
            "{case}: {prefix} tensor count"
        );
        let scale = common::nan_max(
            params
                .iter()
                .map(|(n, _)| g[&format!("{prefix}{n}")].abs().max().double_value(&[])),
        );
        assert!(
            scale > 0.0,
            "{case}: reference {prefix} gradient is all zero"
        );
        let worst = common::nan_max(
            params
                .iter()
                .map(|(name, p)| common::max_abs_diff(&p.grad(), &g[&format!("{prefix}{name}")])),
        );
        eprintln!("{case} {prefix}: {:e} of the largest entry", worst / scale);
        assert!(
            worst <= 1e-4 * scale,
            "{case} {prefix}: max diff {worst:e}, scale {scale:e}"
        );
    }
    // The added embedding trains in the student (its gradient is compared
    // above by name): make sure it is among them.
    assert!(
        student
            .named_parameters()
            .iter()
            .any(|(n, _)| n.starts_with("add_embedding."))
    );
}

fn lora_case(case: &str, one_pass: bool) {
    let g: HashMap<String, Tensor> = common::golden(&format!("golden/vsd/{case}.safetensors"));
    let (student, teacher) = roles("sdxl", &lora_spec(&["to_q", "to_v"]), &g);
    check(
        case,
        &student,
        &ScorePair::Lora(Box::new(teacher)),
        one_pass,
    );
}

#[test]
fn sdxl_vsd_step_matches_reference_with_lora() {
    lora_case("sdxl_null0", false);
    lora_case("sdxl_null0", true);
}

#[test]
fn sdxl_vsd_step_matches_reference_with_lora_null_condition() {
    lora_case("sdxl_null1", false);
}

#[test]
fn sdxl_vsd_step_matches_reference_with_a_full_unet_fake_score() {
    let case = "sdxl_fullfake_null1";
    let g = common::golden(&format!("golden/vsd/{case}.safetensors"));
    let (student, scores) = full_fake_roles("sdxl", &g);
    check(case, &student, &ScorePair::Unet(Box::new(scores)), false);
}
