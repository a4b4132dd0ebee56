//! The SwiftBrush step against the pinned diffusers + peft reference
//! (tests/reference/golden_vsd.py, golden_autocast.py): same weights, same
//! draws, same losses and gradients, in float32 and with bf16 autocast
//! teacher passes; and the LoRA teacher's properties. The comparisons run
//! on `SWIFTBRUSH_TEST_DEVICE` when set (scripts/gpu-check: on the GPU).

mod common;

use std::collections::HashMap;

use common::golden_vsd::{
    assert_gradients_match, fresh_roles, full_fake_roles, inputs, lora_spec, roles, schedule,
    vsd_config,
};

use swiftbrush_worker::diffusion::PredictionType;
use swiftbrush_worker::lora::LoraSpec;
use swiftbrush_worker::pipeline::UNet;
use swiftbrush_worker::torch::precision::{AutocastPlan, HalfDtype, autocast_kind};
use swiftbrush_worker::vsd::{Draws, ScorePair, Scores, VsdConfig, VsdStep, VsdWeighting};
use tch::{Device, Kind, Tensor};

fn spec() -> LoraSpec {
    lora_spec(&["to_q", "to_v"])
}

/// As golden_vsd.py's CONV_TARGETS: attention and ResNet convolutions.
fn conv_spec() -> LoraSpec {
    lora_spec(&["to_q", "to_v", "conv1", "conv2", "conv_shortcut"])
}

fn check(case: &str, kind: &str, prediction: PredictionType) {
    check_with(case, kind, prediction, &spec(), VsdWeighting::Paper);
}

fn check_with(
    case: &str,
    kind: &str,
    prediction: PredictionType,
    spec: &LoraSpec,
    weighting: VsdWeighting,
) {
    let g = common::golden(&format!("golden/vsd/{case}.safetensors"));
    // The teacher and the LoRA teacher in two passes and in one
    // (train.score_passes): each against the reference.
    for one_pass in [false, true] {
        let (student, teacher) = roles(kind, spec, &g);
        check_step(
            &format!("{case}{}", if one_pass { " (one score pass)" } else { "" }),
            &g,
            &student,
            &ScorePair::Lora(Box::new(teacher)),
            prediction,
            weighting,
            |s| s.cfg.one_score_pass = one_pass,
        );
    }
}

/// What a case may change before its step: the draws, the step's
/// constants, the micro-batch size.
struct StepInputs {
    draws: Draws,
    cfg: VsdConfig,
    micro: Option<u32>,
}

/// One step of `student` and `teachers` on the golden file's draws, after
/// `edit` (most cases none): both losses and every trainable gradient as
/// the reference's.
fn check_step(
    case: &str,
    g: &HashMap<String, Tensor>,
    student: &UNet,
    teachers: &ScorePair,
    prediction: PredictionType,
    weighting: VsdWeighting,
    edit: impl FnOnce(&mut StepInputs),
) {
    tch::set_num_threads(1);
    let (draws, text) = inputs(g);
    let mut inputs = StepInputs {
        draws,
        cfg: vsd_config(weighting, None),
        micro: None,
    };
    edit(&mut inputs);
    let StepInputs { draws, cfg, micro } = inputs;
    let step = VsdStep {
        student,
        scores: teachers,
        schedule: &schedule(prediction),
        config: &cfg,
        loss_scales: None,
    };
    let losses = step.run(&text, &draws, micro).unwrap().losses;

    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let want_vsd = g["loss_vsd"].double_value(&[0]);
    let want_lora = g["loss_lora"].double_value(&[0]);
    common::report(
        &format!("{case} vsd loss, relative"),
        rel(losses.vsd, want_vsd),
        1e-4,
    );
    common::report(
        &format!("{case} fake-score loss, relative"),
        rel(losses.fake_score, want_lora),
        1e-4,
    );
    assert!(
        rel(losses.vsd, want_vsd) < 1e-4,
        "{case} vsd loss {} vs {want_vsd}",
        losses.vsd
    );
    assert!(
        rel(losses.fake_score, want_lora) < 1e-4,
        "{case} lora loss {} vs {want_lora}",
        losses.fake_score
    );

    // Gradients: max abs diff <= 1e-4 of the gradient's largest entry.
    assert_gradients_match(case, "student_grad.", student.named_parameters(), g);
    let (prefix, frozen) = match teachers {
        ScorePair::Lora(t) => ("lora_grad.", &t.unet),
        ScorePair::Unet(t) => ("fake_grad.", &t.teacher),
    };
    assert_gradients_match(case, prefix, teachers.fake_parameters(), g);

    // The frozen teacher gets no gradient.
    for (name, p) in frozen.vs.variables() {
        assert!(!p.requires_grad(), "teacher weight {name} is trainable");
    }
}

#[test]
fn vsd_step_matches_reference_sd1() {
    check("sd1_null0", "sd1", PredictionType::Epsilon);
}

/// `method.guidance_scale_range`: the iteration's drawn scale (here the
/// reference's 4.5) guides both teachers, not the configured one.
#[test]
fn vsd_step_guides_both_teachers_with_the_drawn_scale() {
    let g = common::golden("golden/vsd/sd1_null0.safetensors");
    let (student, teacher) = roles("sd1", &spec(), &g);
    check_step(
        "sd1_null0 with a drawn scale",
        &g,
        &student,
        &ScorePair::Lora(Box::new(teacher)),
        PredictionType::Epsilon,
        VsdWeighting::Paper,
        |s| {
            s.cfg.guidance_scale = 1.0;
            s.draws.guidance_scale = Some(4.5);
        },
    );
}

/// `train.micro_batch`: the batch of 2 run one sample at a time leaves the
/// whole batch's gradients and losses, for both fake-score forms (the
/// LoRA teacher with the null condition, DMD2's full copy).
#[test]
fn micro_batches_accumulate_the_whole_batch_step() {
    let g = common::golden("golden/vsd/sd1_null1.safetensors");
    let (student, teacher) = roles("sd1", &spec(), &g);
    check_step(
        "sd1_null1 in micro-batches of 1",
        &g,
        &student,
        &ScorePair::Lora(Box::new(teacher)),
        PredictionType::Epsilon,
        VsdWeighting::Paper,
        |s| s.micro = Some(1),
    );
    let g = common::golden("golden/vsd/sd1_fullfake_null1.safetensors");
    let (student, teachers) = full_fake_roles("sd1", &g);
    check_step(
        "sd1_fullfake_null1 in micro-batches of 1",
        &g,
        &student,
        &ScorePair::Unet(Box::new(teachers)),
        PredictionType::Epsilon,
        VsdWeighting::Paper,
        |s| s.micro = Some(1),
    );
}

#[test]
fn vsd_step_matches_reference_sd1_null_condition() {
    check("sd1_null1", "sd1", PredictionType::Epsilon);
}

#[test]
fn vsd_step_matches_reference_v_prediction() {
    check("sd2v_null0", "sd2v", PredictionType::VPrediction);
}

#[test]
fn vsd_step_matches_reference_with_conv_adapters() {
    check_with(
        "sd1_conv_null0",
        "sd1",
        PredictionType::Epsilon,
        &conv_spec(),
        VsdWeighting::Paper,
    );
}

/// `method.fake_score: unet` (DMD2's full copy of the teacher, perturbed
/// in the reference so that the VSD gradient is not zero): the copy's
/// weights get the reference's gradients, the teacher none. The draws ask
/// for the null condition, which DMD2's fake score ignores (no text
/// dropout); its loss is the unweighted eps-MSE and it is scored on the
/// caption alone.
#[test]
fn vsd_step_matches_reference_with_a_full_unet_fake_score() {
    let g = common::golden("golden/vsd/sd1_fullfake_null1.safetensors");
    let (student, teachers) = full_fake_roles("sd1", &g);
    check_step(
        "sd1_fullfake_null1",
        &g,
        &student,
        &ScorePair::Unet(Box::new(teachers)),
        PredictionType::Epsilon,
        VsdWeighting::Paper,
        |_| {},
    );
}

/// `method.vsd_weighting: dmd` against DMD2's own x0-space formulation.
#[test]
fn vsd_step_matches_reference_with_dmd_weighting() {
    check_with(
        "sd1_dmd_null0",
        "sd1",
        PredictionType::Epsilon,
        &spec(),
        VsdWeighting::Dmd,
    );
}

#[test]
fn lora_teacher_equals_teacher_at_init_and_differs_after_a_step() {
    tch::set_num_threads(1);
    let (_, teacher) = fresh_roles("sd1", &conv_spec());
    tch::manual_seed(0);
    let x = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[500i64]);
    let c = Tensor::randn([1, 77, 32], (Kind::Float, Device::Cpu));
    let off = tch::no_grad(|| teacher.real(&x, &t, &c)).unwrap();
    let on = teacher.fake(&x, &t, &c).unwrap();
    assert_eq!(
        common::max_abs_diff(&on, &off),
        0.0,
        "B = 0: LoRA teacher == teacher"
    );

    // One gradient step on the adapters changes the LoRA teacher only.
    let loss = on.square().mean(Kind::Float);
    loss.backward();
    let params = teacher.lora.named_parameters();
    let mut opt = swiftbrush_worker::optim::Adam::new(
        params,
        swiftbrush_worker::optim::AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    );
    opt.step();
    let after = tch::no_grad(|| teacher.fake(&x, &t, &c)).unwrap();
    assert!(
        common::max_abs_diff(&after, &off) > 1e-6,
        "LoRA step changed nothing"
    );
    let teacher_after = tch::no_grad(|| teacher.real(&x, &t, &c)).unwrap();
    assert_eq!(common::max_abs_diff(&teacher_after, &off), 0.0);
    // The real score's pass leaves the adapters on: the fake score is
    // still the LoRA teacher.
    let again = tch::no_grad(|| teacher.fake(&x, &t, &c)).unwrap();
    assert_eq!(common::max_abs_diff(&again, &after), 0.0);
}

/// Issue 30, item 6: the adapters' initial values do not depend on the
/// device the teacher is on. A is drawn on the CPU from the seeded
/// generator and copied to the device (on CUDA, Philox's layout follows
/// the GPU's SM count), so every rank of a mixed world starts from the same
/// adapters. On the CPU both sides are the CPU; scripts/gpu-check runs it
/// on the GPU (SWIFTBRUSH_TEST_DEVICE), comparing CUDA with the CPU.
#[test]
fn lora_init_is_the_same_on_every_device() {
    use swiftbrush_worker::pipeline::DiffusersFolder;
    use swiftbrush_worker::vsd::TeacherUNet;
    let folder = DiffusersFolder::open(&common::pipeline("sd1")).unwrap();
    let init = |device: Device| {
        let unet = UNet::load(&folder, device).unwrap();
        tch::manual_seed(1234);
        let t = TeacherUNet::new(unet, &conv_spec()).unwrap();
        t.lora
            .named_parameters()
            .into_iter()
            .map(|(n, v)| (n, v.to(Device::Cpu)))
            .collect::<Vec<_>>()
    };
    let (on_device, on_cpu) = (init(common::device()), init(Device::Cpu));
    assert_eq!(on_device.len(), on_cpu.len());
    let mut worst = 0f64;
    for ((na, a), (nb, b)) in on_device.iter().zip(&on_cpu) {
        assert_eq!(na, nb);
        assert_eq!(a.size(), b.size(), "{na}");
        worst = worst.max(common::max_abs_diff(a, b));
        if na.contains("lora_A") {
            assert!(a.abs().max().double_value(&[]) > 0.0, "{na} not drawn");
        }
    }
    common::report("LoRA init on the device vs the CPU", worst, 0.0);
    assert_eq!(
        worst,
        0.0,
        "adapters differ between {:?} and the CPU",
        common::device()
    );
}

/// A step's draws reach a CUDA device through pinned memory and a
/// non-blocking copy (vsd/draws.rs, issue 30 item 9): the values there must
/// be the CPU's, bit for bit, for every draw and every rank's slice, also
/// when the host has moved on (the pinned sources are gone) before the
/// copies ran. The CPU path is a plain copy (draws.rs's unit tests); this
/// one needs the GPU: scripts/gpu-check runs it with
/// SWIFTBRUSH_TEST_DEVICE=cuda:0.
#[test]
#[ignore = "needs a CUDA device: SWIFTBRUSH_TEST_DEVICE=cuda:0 cargo test -p swiftbrush-worker \
            --test vsd draws_reach -- --ignored (scripts/gpu-check runs it)"]
fn draws_reach_the_device_bit_for_bit() {
    use swiftbrush_worker::vsd::{DrawKey, DrawSpec, RankSlice};
    let device = common::device();
    assert!(
        device.is_cuda(),
        "this test checks the CUDA copy path; SWIFTBRUSH_TEST_DEVICE is {device:?}"
    );
    let spec = DrawSpec {
        timesteps: (20, 980),
        null_condition_prob: 0.1,
        guidance_range: Some((2.0, 6.0)),
        student_steps: 1,
    };
    let mut worst = 0f64;
    for step in 0..8u64 {
        for rank in 0..2u64 {
            let key = DrawKey { seed: 7, step };
            let slice = RankSlice {
                rank,
                world_size: 2,
            };
            // Large enough that the copies are still running when the next
            // draw's host work starts.
            let shape = [4, 4, 64, 64];
            let on_device = Draws::sample(key, &shape, slice, &spec, device).unwrap();
            let on_cpu = Draws::sample(key, &shape, slice, &spec, Device::Cpu).unwrap();
            let pairs = [
                (&on_device.z, &on_cpu.z),
                (&on_device.t, &on_cpu.t),
                (&on_device.eps, &on_cpu.eps),
                (&on_device.fake.t, &on_cpu.fake.t),
                (&on_device.fake.eps, &on_cpu.fake.eps),
            ];
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                assert_eq!(a.device(), device, "draw {i}");
                let a = a.to(Device::Cpu);
                assert!(a.equal(b), "step {step} rank {rank} draw {i} differs");
                worst = worst.max(common::max_abs_diff(
                    &a.to_kind(Kind::Double),
                    &b.to_kind(Kind::Double),
                ));
            }
            assert_eq!(on_device.fake.null_condition, on_cpu.fake.null_condition);
            assert_eq!(on_device.guidance_scale, on_cpu.guidance_scale);
        }
    }
    common::report("draws on the device vs the CPU", worst, 0.0);
}

/// The step runs the teacher and the LoRA teacher as one pass of twice the
/// batch (`Scores::both`, adapters on the second half only): it must give
/// what the two passes give, with the golden adapters (B != 0) on the
/// attention projections and on the convolutions. Not bit for bit: the
/// kernels round differently at twice the batch (the teacher's half,
/// where no adapter acts, moves as much as the LoRA teacher's: 1.5e-6 and
/// 1.8e-6 on the CPU), four orders below what the adapters change
/// (9e-2).
#[test]
fn one_pass_of_both_scores_equals_their_two_passes() {
    tch::set_num_threads(1);
    for (spec, case) in [(spec(), "sd1_null0"), (conv_spec(), "sd1_conv_null0")] {
        let g = common::golden(&format!("golden/vsd/{case}.safetensors"));
        let (_, teacher) = roles("sd1", &spec, &g);
        tch::manual_seed(1);
        let dev = common::device();
        let x = Tensor::randn([3, 4, 8, 8], (Kind::Float, dev));
        let t = Tensor::from_slice(&[20i64, 500, 980]).to_device(dev);
        let c = Tensor::randn([3, 77, 32], (Kind::Float, dev));
        let (real, fake) = tch::no_grad(|| {
            (
                teacher.real(&x, &t, &c).unwrap(),
                teacher.fake(&x, &t, &c).unwrap(),
            )
        });
        let (both_real, both_fake) = tch::no_grad(|| teacher.both(&x, &t, &c)).unwrap();
        let apart = common::max_abs_diff(&real, &fake);
        assert!(
            apart > 1e-3,
            "{case}: the adapters change nothing ({apart})"
        );
        let d_real = common::max_abs_diff(&both_real, &real);
        let d_fake = common::max_abs_diff(&both_fake, &fake);
        eprintln!("{case}: real {d_real:e}, fake {d_fake:e}, apart {apart:e}");
        common::report(
            &format!("both_scores_one_pass_{case}"),
            d_real.max(d_fake),
            1e-5,
        );
        assert!(
            d_real <= 1e-5 && d_fake <= 1e-5,
            "{case}: one pass differs from two: real {d_real:e}, fake {d_fake:e} (the scores differ by {apart:e})"
        );
        // The adapters apply to every row again afterwards.
        let again = tch::no_grad(|| teacher.fake(&x, &t, &c)).unwrap();
        assert_eq!(common::max_abs_diff(&again, &fake), 0.0, "{case}");
    }
}

#[test]
fn adapter_names_are_peft_names() {
    for (spec, case) in [(spec(), "sd1_null0"), (conv_spec(), "sd1_conv_null0")] {
        adapter_names_match(&spec, case);
    }
}

fn adapter_names_match(spec: &LoraSpec, case: &str) {
    let (_, teacher) = fresh_roles("sd1", spec);
    let g = common::golden(&format!("golden/vsd/{case}.safetensors"));
    let mut ours: Vec<String> = teacher
        .lora
        .named_parameters()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut peft: Vec<String> = g
        .keys()
        .filter_map(|k| k.strip_prefix("adapter.").map(str::to_owned))
        .collect();
    ours.sort();
    peft.sort();
    assert_eq!(ours, peft);
    assert!(ours[0].ends_with(".lora_A.weight"), "{}", ours[0]);
}

/// One step on the reference's weights and draws; returns the losses and
/// the student's and adapters' gradients by name.
fn step(
    g: &HashMap<String, Tensor>,
    autocast: Option<AutocastPlan>,
    one_score_pass: bool,
) -> ((f64, f64), HashMap<String, Tensor>) {
    let (losses, grads, _) = step_with_student(g, autocast, None, one_score_pass);
    (losses, grads)
}

/// [`step`] with the student's pass under `student_autocast`; also returns
/// the student's draw x0_hat.
fn step_with_student(
    g: &HashMap<String, Tensor>,
    autocast: Option<AutocastPlan>,
    student_autocast: Option<AutocastPlan>,
    one_score_pass: bool,
) -> ((f64, f64), HashMap<String, Tensor>, Tensor) {
    let (student, teacher) = roles("sd1", &lora_spec(&["to_q", "to_v"]), g);
    let scores = ScorePair::Lora(Box::new(teacher));
    let (draws, text) = inputs(g);
    let step = VsdStep {
        student: &student,
        scores: &scores,
        schedule: &schedule(PredictionType::Epsilon),
        config: &VsdConfig {
            one_score_pass,
            student_autocast,
            ..vsd_config(VsdWeighting::Paper, autocast)
        },
        loss_scales: None,
    };
    let out = step.run(&text, &draws, None).unwrap();
    let (losses, x0) = (out.losses, out.x0);
    assert_eq!(
        autocast_kind(common::device()),
        None,
        "vsd_step left autocast on"
    );
    let mut grads = HashMap::new();
    for (name, p) in student.vs.variables() {
        assert_eq!(p.grad().kind(), Kind::Float, "student grad {name}");
        grads.insert(format!("student_grad.{name}"), p.grad());
    }
    for (name, p) in scores.fake_parameters() {
        assert_eq!(p.grad().kind(), Kind::Float, "adapter grad {name}");
        grads.insert(format!("lora_grad.{name}"), p.grad());
    }
    ((losses.vsd, losses.fake_score), grads, x0)
}

/// Max abs difference over all gradients, relative to the largest entry of
/// the reference's.
fn grad_diff(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, prefix: &str) -> f64 {
    let pairs: Vec<(&Tensor, &Tensor)> = got
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(name, g)| {
            let w = want
                .get(name)
                .unwrap_or_else(|| panic!("reference has no {name}"));
            (g, w)
        })
        .collect();
    let scale = common::nan_max(pairs.iter().map(|(_, w)| w.abs().max().double_value(&[])));
    let worst = common::nan_max(pairs.iter().map(|(g, w)| common::max_abs_diff(g, w)));
    assert!(scale > 0.0, "reference {prefix} gradient is all zero");
    worst / scale
}

/// The step with its teacher passes under bf16 autocast against the
/// reference under torch.autocast (golden_autocast.py; scripts/gpu-check
/// rebuilds that golden under CUDA autocast and runs this on the GPU).
#[test]
fn vsd_step_with_bf16_autocast_teacher_matches_reference() {
    tch::set_num_threads(1);
    let g = common::golden("golden/autocast/vsd_sd1_bf16.safetensors");
    // In two score passes and in one (train.score_passes).
    for one_pass in [false, true] {
        check_bf16(&g, one_pass);
    }
}

fn check_bf16(g: &HashMap<String, Tensor>, one_pass: bool) {
    let plan = AutocastPlan::new(common::device(), HalfDtype::Bf16).unwrap();
    let ((vsd, lora), grads) = step(g, Some(plan), one_pass);
    let ((vsd32, lora32), grads32) = step(g, None, one_pass);
    let pass = if one_pass { " (one score pass)" } else { "" };

    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let want_vsd = g["loss_vsd"].double_value(&[0]);
    let want_lora = g["loss_lora"].double_value(&[0]);
    // The VSD loss is the squared teacher difference e_T - e_L: bf16 noise in
    // both passes moves it a lot, so it tells autocast from float32 clearly.
    assert!(
        rel(vsd32, want_vsd) > 0.1,
        "autocast did not change the VSD loss: {vsd32} vs {want_vsd}"
    );
    common::report(
        &format!("bf16 vsd loss{pass}, relative"),
        rel(vsd, want_vsd),
        0.02,
    );
    common::report(
        &format!("bf16 fake-score loss{pass}, relative"),
        rel(lora, want_lora),
        1e-3,
    );
    assert!(
        rel(vsd, want_vsd) < 0.02,
        "vsd loss {vsd} vs reference {want_vsd} (fp32 {vsd32})"
    );
    assert!(
        rel(lora, want_lora) < 1e-3,
        "lora loss {lora} vs reference {want_lora} (fp32 {lora32})"
    );
    eprintln!(
        "losses: vsd {vsd} / fp32 {vsd32} / ref {want_vsd}; lora {lora} / {lora32} / {want_lora}"
    );
    for prefix in ["student_grad.", "lora_grad."] {
        let d = grad_diff(&grads, g, prefix);
        let d32 = grad_diff(&grads32, g, prefix);
        eprintln!("{prefix}: autocast {d:e}, fp32 {d32:e} (relative to the reference's scale)");
        // The bound: five times closer to the autocast reference than the
        // float32 step is, i.e. autocast's effect dominates the residue.
        common::report(&format!("bf16 {prefix}{pass} / scale"), d, d32 / 5.0);
        assert!(
            d * 5.0 <= d32,
            "{prefix}: autocast step differs from the reference by {d:e} of its scale, \
             the float32 step by {d32:e}"
        );
    }
}

/// The step with the student's pass under bf16 autocast too
/// (`precision.student_autocast`) against the reference with torch.autocast
/// around the student's forward as well (golden_autocast.py). The distance
/// it must beat is the one that matters: the same step with only the
/// teacher passes under autocast (a float32 student), whose x0 and student
/// gradient differ by the student's bf16 rounding times 1/sqrt(A) = 14.6.
#[test]
fn vsd_step_with_bf16_autocast_student_matches_reference() {
    tch::set_num_threads(1);
    let g = common::golden("golden/autocast/vsd_sd1_bf16_student.safetensors");
    let plan = AutocastPlan::new(common::device(), HalfDtype::Bf16).unwrap();
    let ((vsd, lora), grads, x0) = step_with_student(&g, Some(plan), Some(plan), false);
    let ((vsd_t, lora_t), grads_t, x0_t) = step_with_student(&g, Some(plan), None, false);
    assert_eq!(autocast_kind(common::device()), None, "left autocast on");

    // x0_hat relative to its own spread: the student's rounding, amplified.
    let want_x0 = &g["x0_hat"];
    let spread = want_x0.std(true).double_value(&[]);
    let x0 = x0.to_device(tch::Device::Cpu);
    let x0_t = x0_t.to_device(tch::Device::Cpu);
    let d_x0 = common::max_abs_diff(&x0, want_x0) / spread;
    let d_x0_t = common::max_abs_diff(&x0_t, want_x0) / spread;
    eprintln!("x0_hat / std: student autocast {d_x0:e}, fp32 student {d_x0_t:e}");
    common::report("bf16 student x0_hat / std", d_x0, d_x0_t / 10.0);
    assert!(
        d_x0 * 10.0 <= d_x0_t,
        "x0_hat: {d_x0:e} of its std from the reference, the fp32 student {d_x0_t:e}"
    );

    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let want_vsd = g["loss_vsd"].double_value(&[0]);
    let want_lora = g["loss_lora"].double_value(&[0]);
    eprintln!(
        "losses: vsd {vsd} / teacher-only {vsd_t} / ref {want_vsd}; \
         lora {lora} / {lora_t} / {want_lora}"
    );
    for (what, got, other, want) in [
        ("vsd", vsd, vsd_t, want_vsd),
        ("fake-score", lora, lora_t, want_lora),
    ] {
        let (d, d_t) = (rel(got, want), rel(other, want));
        eprintln!("{what} loss, relative: student autocast {d:e}, fp32 student {d_t:e}");
        common::report(
            &format!("bf16 student {what} loss, relative"),
            d,
            d_t / 10.0,
        );
        assert!(
            d * 10.0 <= d_t,
            "{what} loss {got} vs reference {want} (fp32 student {other})"
        );
    }
    for prefix in ["student_grad.", "lora_grad."] {
        let d = grad_diff(&grads, &g, prefix);
        let d_t = grad_diff(&grads_t, &g, prefix);
        eprintln!("{prefix}: student autocast {d:e}, fp32 student {d_t:e} (of the scale)");
        common::report(&format!("bf16 student {prefix} / scale"), d, d_t / 10.0);
        assert!(
            d * 10.0 <= d_t,
            "{prefix}: {d:e} of the reference's scale, the fp32 student {d_t:e}"
        );
    }
}

// SDXL (tests/reference/golden_vsd_xl.py: golden_vsd.py's iteration on the
// tiny SDXL fixture): the student, the teacher and the fake score take the
// pooled embedding and the time ids, carried packed in the condition
// (pipeline/xl_condition.rs); the null condition is zeros with the same
// time ids. scripts/gpu-check runs the first on the GPU.

#[test]
fn vsd_step_matches_reference_sdxl() {
    check("sdxl_null0", "sdxl", PredictionType::Epsilon);
    // The added embedding is among the student's weights compared above.
    let (student, _) = fresh_roles("sdxl", &spec());
    assert!(
        student
            .named_parameters()
            .iter()
            .any(|(n, _)| n.starts_with("add_embedding."))
    );
}

#[test]
fn vsd_step_matches_reference_sdxl_null_condition() {
    check("sdxl_null1", "sdxl", PredictionType::Epsilon);
}

#[test]
fn vsd_step_matches_reference_sdxl_with_a_full_unet_fake_score() {
    let case = "sdxl_fullfake_null1";
    let g = common::golden(&format!("golden/vsd/{case}.safetensors"));
    let (student, scores) = full_fake_roles("sdxl", &g);
    check_step(
        case,
        &g,
        &student,
        &ScorePair::Unet(Box::new(scores)),
        PredictionType::Epsilon,
        VsdWeighting::Paper,
        |_| {},
    );
}
