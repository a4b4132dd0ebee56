//! A LoRA student (`method.student.kind: lora`): adapters on the teacher's
//! own base. One step against diffusers + peft with two named adapters on
//! one UNet (tests/reference/golden_vsd_lora_student.py); its first draw is
//! the teacher's; the trainer holds one copy of the base weights; data
//! parallel averages its adapters' gradients as one rank computes them;
//! a resumed run continues bit for bit, EMA included.

mod common;

use std::collections::HashMap;

use common::golden_vsd::{assert_gradients_match, inputs, lora_spec, schedule, vsd_config};
use common::tiny_run::{self, equal, snapshot, student, trainer};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{FakeScore, LoraConfig, StudentKind};
use swiftbrush_worker::diffusion::{OneStepDraw, PredictionType, one_step_x0};
use swiftbrush_worker::lora::LoraSpec;
use swiftbrush_worker::models::weights;
use swiftbrush_worker::pipeline::{DiffusersFolder, UNet};
use swiftbrush_worker::vsd::{
    FullFakeScore, ScorePair, Student, TeacherUNet, VsdStep, VsdWeighting,
};
use tch::Tensor;

/// golden_vsd_lora_student.py's adapters: the student's on attention keys
/// and outputs and two ResNet convolutions, the fake score's on to_q, to_v.
fn student_spec() -> LoraSpec {
    LoraSpec {
        rank: 2,
        alpha: 6.0,
        target_modules: ["to_k", "to_out.0", "conv1", "conv2"]
            .iter()
            .map(|t| t.to_string())
            .collect(),
    }
}

fn named(g: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    g.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_owned(), v.copy())))
        .collect()
}

/// The teacher's base with the fake score (`fake`: adapters on the base,
/// or DMD2's copy) and the student's adapters, from the golden file.
fn roles(fake: FakeScore, g: &HashMap<String, Tensor>) -> (ScorePair, Student) {
    let folder = DiffusersFolder::open(&common::pipeline("sd1")).unwrap();
    let teacher = UNet::load(&folder, common::device()).unwrap();
    let mut scores = match fake {
        FakeScore::Lora => {
            let mut t = TeacherUNet::new(teacher, &lora_spec(&["to_q", "to_v"])).unwrap();
            t.lora.load(&named(g, "adapter.")).unwrap();
            ScorePair::Lora(Box::new(t))
        }
        FakeScore::Unet => {
            let mut copy = teacher.duplicate().unwrap();
            weights::load_tensors_strict(&mut copy.vs, named(g, "fake."), &[]).unwrap();
            ScorePair::Unet(Box::new(FullFakeScore::new(teacher, copy)))
        }
    };
    let mut adapters = scores.attach_student(&student_spec()).unwrap();
    adapters.load(&named(g, "student_adapter.")).unwrap();
    (scores, Student::Lora(adapters))
}

/// Losses to 1e-4 relative, every trainable gradient to 1e-4 of its
/// largest entry; the base gets no gradient.
fn check(case: &str, fake: FakeScore, one_pass: bool) {
    tch::set_num_threads(1);
    let g = common::golden(&format!("golden/vsd/{case}.safetensors"));
    let (scores, student) = roles(fake, &g);
    let (draws, text) = inputs(&g);
    let mut cfg = vsd_config(VsdWeighting::Paper, None);
    cfg.one_score_pass = one_pass;
    let step = VsdStep {
        student: student.net(&scores),
        scores: &scores,
        schedule: &schedule(PredictionType::Epsilon),
        config: &cfg,
        loss_scales: None,
    };
    let out = step.run(&text, &draws, None).unwrap();
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    for (what, got, want) in [
        ("vsd", out.losses.vsd, g["loss_vsd"].double_value(&[0])),
        (
            "fake",
            out.losses.fake_score,
            g["loss_lora"].double_value(&[0]),
        ),
    ] {
        common::report(
            &format!("{case} {what} loss, relative"),
            rel(got, want),
            1e-4,
        );
        assert!(rel(got, want) < 1e-4, "{case} {what} loss {got} vs {want}");
    }
    let draw = common::max_abs_diff(&out.x0, &g["x0_hat"]);
    assert!(
        draw < 1e-3,
        "{case}: the student's draw differs by {draw:e}"
    );
    assert_gradients_match(case, "student_grad.", student.named_parameters(), &g);
    let prefix = match fake {
        FakeScore::Lora => "lora_grad.",
        FakeScore::Unet => "fake_grad.",
    };
    assert_gradients_match(case, prefix, scores.fake_parameters(), &g);
    for (name, p) in scores.base().vs.variables() {
        assert!(!p.requires_grad(), "base weight {name} is trainable");
    }
}

#[test]
fn a_lora_student_step_matches_peft_with_two_adapters_on_one_unet() {
    check("sd1_lora_student", FakeScore::Lora, false);
    check("sd1_lora_student", FakeScore::Lora, true);
}

#[test]
fn a_lora_student_step_beside_a_full_fake_score_matches_peft() {
    check("sd1_lora_student_fullfake", FakeScore::Unet, false);
}

/// B = 0: the student's first draw is the teacher's one-step draw, bit for
/// bit, whichever fake score shares the base.
#[test]
fn a_fresh_lora_students_draw_is_the_teachers() {
    tch::set_num_threads(1);
    let folder = DiffusersFolder::open(&common::pipeline("sd1")).unwrap();
    let teacher = UNet::load(&folder, tch::Device::Cpu).unwrap();
    let draw = OneStepDraw {
        timestep: 999,
        alpha_bar: 0.0047,
        prediction: PredictionType::Epsilon,
    };
    let z = Tensor::randn([2, 4, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
    let cond = Tensor::randn([2, 77, 32], (tch::Kind::Float, tch::Device::Cpu));
    let want = tch::no_grad(|| one_step_x0(&teacher, &z, &cond, &draw)).unwrap();
    let t = TeacherUNet::new(teacher, &lora_spec(&["to_q", "to_v"])).unwrap();
    // A fake score that differs from the teacher: its adapters must stay
    // out of the student's pass.
    tch::no_grad(|| {
        for (_, p) in t.lora.named_parameters() {
            let _ = p.shallow_clone().fill_(0.1);
        }
    });
    let mut scores = ScorePair::Lora(Box::new(t));
    let student = Student::Lora(scores.attach_student(&student_spec()).unwrap());
    let got = tch::no_grad(|| one_step_x0(&student.net(&scores), &z, &cond, &draw)).unwrap();
    assert!(
        got.equal(&want),
        "differs by {:e}",
        common::max_abs_diff(&got, &want)
    );
}

fn lora_config(run_dir: &str, max_steps: u64) -> JobConfig {
    let mut cfg = tiny_run::config(run_dir, max_steps);
    cfg.method.student.kind = StudentKind::Lora;
    cfg.method.student.lr = 1e-3;
    cfg.method.student.lora = Some(LoraConfig {
        rank: 4,
        alpha: 4.0,
        target_modules: vec!["to_q".into(), "to_v".into(), "conv1".into()],
    });
    cfg
}

/// Every distinct UNet weight the trainer holds, by storage, and its bytes.
fn base_bytes(tensors: impl IntoIterator<Item = Tensor>) -> (usize, u64) {
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    for t in tensors {
        if seen.insert(t.data_ptr() as usize) {
            bytes += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        }
    }
    (seen.len(), bytes)
}

/// A LoRA student and a LoRA fake score hold one copy of the base: the
/// trainer's weights are one UNet's plus two adapter sets. Trains a step,
/// resumes bitwise (student, EMA and fake adapters), and its checkpoint
/// holds the adapters under PEFT names.
#[test]
fn a_lora_student_shares_one_base_and_resumes_bit_for_bit() {
    tch::set_num_threads(1);
    let mut straight = trainer(lora_config("memory://lora-student-straight", 2));
    let folder = DiffusersFolder::open(&common::pipeline("sd1")).unwrap();
    let unet = UNet::load(&folder, tch::Device::Cpu).unwrap();
    let one_unet = base_bytes(unet.vs.variables().into_values());
    let held = base_bytes(straight.scores().base().vs.variables().into_values());
    assert_eq!(held, one_unet, "the base is one UNet");
    let Student::Lora(adapters) = straight.student() else {
        panic!("a full student was built");
    };
    let student_bytes = base_bytes(adapters.vs.variables().into_values()).1;
    let fake_bytes = base_bytes(straight.fake_score_parameters().into_iter().map(|(_, t)| t)).1;
    assert!(student_bytes > 0 && fake_bytes > 0);
    // No other weights: the student's are adapters only.
    let everything = base_bytes(
        straight
            .scores()
            .base()
            .vs
            .variables()
            .into_values()
            .chain(
                straight
                    .student()
                    .named_parameters()
                    .into_iter()
                    .map(|(_, t)| t),
            )
            .chain(straight.fake_score_parameters().into_iter().map(|(_, t)| t)),
    );
    assert_eq!(everything.1, one_unet.1 + student_bytes + fake_bytes);
    assert!(
        straight.student().named_parameters()[0]
            .0
            .starts_with("down_blocks.")
            && straight.student().named_parameters()[0]
                .0
                .contains(".lora_A.weight")
    );
    let initial = student(&straight);
    straight.run().unwrap();
    assert!(
        !equal(&student(&straight), &initial),
        "the adapters did not move"
    );

    let dir = "memory://lora-student-resumed";
    trainer(lora_config(dir, 1)).run().unwrap();
    let mut resumed = trainer(lora_config(dir, 2));
    assert_eq!(resumed.state().step, 1);
    resumed.run().unwrap();
    assert!(equal(&student(&straight), &student(&resumed)));
    assert!(equal(
        &snapshot(straight.ema().unwrap().tensors()),
        &snapshot(resumed.ema().unwrap().tensors())
    ));
    assert!(equal(
        &snapshot(straight.fake_score_parameters()),
        &snapshot(resumed.fake_score_parameters())
    ));
}

/// Two ranks of one caption each train the adapters one rank of two
/// captions trains (to rounding; a lost average is off by O(1)).
#[test]
fn data_parallel_lora_students_average_their_adapters_gradients() {
    tch::set_num_threads(1);
    const CAPTIONS: [&str; 2] = ["a red circle", "a photo of a cat"];
    let mut one = tiny_run::trainer_with(
        lora_config("memory://lora-student-dp1", 2),
        &CAPTIONS,
        swiftbrush_worker::trainer::gradient_sync::SingleProcess,
    );
    let initial = student(&one);
    one.run().unwrap();
    let two = tiny_run::on_two_ranks(|rank, ring| {
        let mut t = tiny_run::trainer_with(
            lora_config(&format!("memory://lora-student-dp2-{rank}"), 2),
            &CAPTIONS,
            ring,
        );
        t.run().unwrap();
        student(&t)
    });
    assert!(equal(&two[0], &two[1]), "the ranks' adapters differ");
    let r = common::tensors::relative_to_move(&two[0], &student(&one), &initial);
    eprintln!("two ranks vs one: adapters differ by {r:e} of their move");
    assert!(
        r <= 2e-2,
        "two ranks vs one: adapters differ by {r:e} of their move"
    );
}

/// `train.gradient_checkpointing` with a LoRA student: the recomputed
/// student pass selects the student's adapters as the first did, so one
/// chunk over the batch is the plain step bit for bit and chunks of one
/// row agree to rounding.
#[test]
fn gradient_checkpointing_recomputes_a_lora_students_pass() {
    tch::set_num_threads(1);
    let g = common::golden("golden/vsd/sd1_lora_student.safetensors");
    let run = |rows: Option<u32>| {
        let (scores, student) = roles(FakeScore::Lora, &g);
        let (draws, text) = inputs(&g);
        let mut cfg = vsd_config(VsdWeighting::Paper, None);
        cfg.recompute_rows = rows;
        let step = VsdStep {
            student: student.net(&scores),
            scores: &scores,
            schedule: &schedule(PredictionType::Epsilon),
            config: &cfg,
            loss_scales: None,
        };
        let losses = step.run(&text, &draws, None).unwrap().losses;
        let grads: Vec<(String, Tensor)> = student
            .named_parameters()
            .into_iter()
            .chain(scores.fake_parameters())
            .map(|(n, p)| (n, p.grad().copy()))
            .collect();
        (losses, grads)
    };
    let (plain, plain_grads) = run(None);
    let (whole, whole_grads) = run(Some(2));
    assert_eq!(plain, whole);
    assert!(
        equal(&plain_grads, &whole_grads),
        "one chunk is not the plain step"
    );
    let (_, rows_grads) = run(Some(1));
    let scale = common::nan_max(
        plain_grads
            .iter()
            .map(|(_, t)| t.abs().max().double_value(&[])),
    );
    let worst = common::nan_max(
        plain_grads
            .iter()
            .zip(&rows_grads)
            .map(|((_, a), (_, b))| common::max_abs_diff(a, b)),
    );
    assert!(
        worst <= 1e-5 * scale,
        "chunks of one row: {worst:e} of {scale:e}"
    );
}
