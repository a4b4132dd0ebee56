//! `train.gradient_checkpointing` (worker/src/vsd/recompute.rs) against the
//! plain step, which worker/tests/vsd.rs holds to the diffusers + peft
//! reference: with one chunk covering the batch the same losses, draw and
//! gradients bit for bit; in chunks of fewer rows the same to float
//! rounding; for the LoRA teacher and DMD2's full fake score, with and
//! without `train.micro_batch`; and for a four-step student (backward
//! simulation, vsd/few_step.rs), whose recomputed chunks must see each
//! row's own chain input and step. A probe counts the rows each network
//! runs with gradients at once: that count, not the batch, sets the
//! activation memory.

mod common;

use std::cell::RefCell;
use std::collections::HashMap;

use common::golden_vsd::{full_fake_roles, inputs, lora_spec, roles, schedule, vsd_config};

use swiftbrush_worker::diffusion::{Denoiser, PredictionType, StudentChain};
use swiftbrush_worker::pipeline::UNet;
use swiftbrush_worker::torch::precision::{AutocastPlan, HalfDtype};
use swiftbrush_worker::vsd::{
    ChainDraws, Conditions, Draws, FakeScore, FakeScoreDraws, ScorePair, Scores, VsdConfig,
    VsdStep, VsdWeighting,
};
use tch::{Kind, TchError, Tensor};

/// The two fake-score forms, each with its golden case (the LoRA teacher's
/// with text dropout on, so the null condition's path is chunked too).
#[derive(Debug, Clone, Copy)]
enum Form {
    Lora,
    Unet,
}

const FORMS: [Form; 2] = [Form::Lora, Form::Unet];

fn golden(form: Form) -> HashMap<String, Tensor> {
    common::golden(match form {
        Form::Lora => "golden/vsd/sd1_null1.safetensors",
        Form::Unet => "golden/vsd/sd1_fullfake_null1.safetensors",
    })
}

/// Fresh networks (no gradients yet) of `form` with the golden weights.
fn networks(form: Form, g: &HashMap<String, Tensor>) -> (UNet, ScorePair) {
    match form {
        Form::Lora => {
            let (student, teacher) = roles("sd1", &lora_spec(&["to_q", "to_v"]), g);
            (student, ScorePair::Lora(Box::new(teacher)))
        }
        Form::Unet => {
            let (student, fake) = full_fake_roles("sd1", g);
            (student, ScorePair::Unet(Box::new(fake)))
        }
    }
}

/// The golden draws (2 rows), or 4 rows: the golden's and their mirror
/// images (other noise, timesteps and captions), so that chunks can be
/// uneven and micro-batches hold several chunks.
fn draws(g: &HashMap<String, Tensor>, rows: i64) -> (Draws, Conditions) {
    let (d, text) = inputs(g);
    if rows == 2 {
        return (d, text);
    }
    assert_eq!(rows, 4);
    let twice = |t: &Tensor, sign: f64| Tensor::cat(&[t, &(t.flip([0]) * sign)], 0);
    let draws = Draws {
        z: twice(&d.z, -1.0),
        t: twice(&d.t, 1.0),
        eps: twice(&d.eps, -1.0),
        fake: FakeScoreDraws {
            t: twice(&d.fake.t, 1.0),
            eps: twice(&d.fake.eps, -1.0),
            null_condition: d.fake.null_condition,
        },
        guidance_scale: None,
        chain: None,
    };
    let text = Conditions {
        cond: twice(&text.cond, 1.0),
        uncond: text.uncond,
    };
    (draws, text)
}

/// A four-step student's timesteps (DMD2's).
const FOUR_STEPS: [i64; 4] = [999, 749, 499, 249];

/// Backward simulation's draws for a step of `draws.z`'s rows: every row
/// at another step k (4 rows: 3, 1, 2, 0, so no two neighbours share a
/// step or a chain input), and seeded re-noising noise.
fn with_chain(draws: Draws) -> Draws {
    let rows = draws.z.size()[0];
    let k: &[i64] = if rows == 4 { &[3, 1, 2, 0] } else { &[3, 1] };
    tch::manual_seed(26);
    let eps = (1..FOUR_STEPS.len())
        .map(|_| Tensor::randn(draws.z.size(), (Kind::Float, draws.z.device())))
        .collect();
    Draws {
        chain: Some(ChainDraws {
            k: Tensor::from_slice(k).to_device(draws.z.device()),
            eps,
        }),
        ..draws
    }
}

/// What a step leaves: both losses, the draw, every trainable gradient,
/// and the student's passes (rows, with gradients) in order.
struct Outcome {
    losses: (f64, f64),
    x0: Tensor,
    student: Vec<(String, Tensor)>,
    fake: Vec<(String, Tensor)>,
    student_calls: Vec<(i64, bool)>,
}

/// How a step runs: the micro-batch and the recomputation's chunk (None:
/// the plain step).
#[derive(Debug, Clone, Copy)]
struct Plan {
    micro: Option<u32>,
    recompute_rows: Option<u32>,
}

fn config(recompute_rows: Option<u32>) -> VsdConfig {
    VsdConfig {
        recompute_rows,
        ..vsd_config(VsdWeighting::Paper, None)
    }
}

/// One step of fresh networks of `form` on `rows` rows under `plan`.
fn step(form: Form, rows: i64, plan: Plan) -> Outcome {
    step_with(form, rows, plan, config(plan.recompute_rows))
}

/// [`step`] with the step's constants `cfg` (`plan.recompute_rows` is
/// taken from `cfg`); a few-step `cfg` gets [`with_chain`]'s draws.
fn step_with(form: Form, rows: i64, plan: Plan, cfg: VsdConfig) -> Outcome {
    tch::set_num_threads(1);
    let g = golden(form);
    let (student, scores) = networks(form, &g);
    let (draws, text) = draws(&g, rows);
    let draws = if cfg.few_step.is_some() {
        with_chain(draws)
    } else {
        draws
    };
    let probe = StudentProbe {
        unet: &student,
        calls: Calls::default(),
    };
    let out = VsdStep {
        student: &probe,
        scores: &scores,
        schedule: &schedule(PredictionType::Epsilon),
        config: &cfg,
        loss_scales: None,
    }
    .run(&text, &draws, plan.micro)
    .unwrap();
    let grads = |params: Vec<(String, Tensor)>| {
        params
            .into_iter()
            .map(|(n, p)| {
                let grad = p.grad();
                assert!(grad.defined(), "{form:?} {plan:?}: no gradient for {n}");
                (n, grad)
            })
            .collect()
    };
    Outcome {
        losses: (out.losses.vsd, out.losses.fake_score),
        x0: out.x0,
        student: grads(student.named_parameters()),
        fake: grads(scores.fake_parameters()),
        student_calls: probe.calls.take(),
    }
}

fn assert_bitwise(what: &str, got: &Outcome, want: &Outcome) {
    assert_eq!(got.losses, want.losses, "{what}: losses");
    assert!(got.x0.equal(&want.x0), "{what}: the draw x0_hat");
    for (part, g, w) in [
        ("student", &got.student, &want.student),
        ("fake score", &got.fake, &want.fake),
    ] {
        assert_eq!(g.len(), w.len(), "{what}: {part} tensor count");
        for ((name, a), (_, b)) in g.iter().zip(w) {
            assert!(
                a.equal(b),
                "{what}: {part} gradient {name} differs by {:e}",
                common::max_abs_diff(a, b)
            );
        }
    }
}

/// Largest gradient difference relative to the largest entry of `want`'s.
fn relative_gap(got: &[(String, Tensor)], want: &[(String, Tensor)]) -> f64 {
    let scale = common::nan_max(want.iter().map(|(_, w)| w.abs().max().double_value(&[])));
    assert!(scale > 0.0, "the plain step's gradient is all zero");
    common::max_abs_diff_named(got, want) / scale
}

/// Float rounding only: chunks run the same kernels on fewer rows and sum
/// the gradients in another order. Measured worst 6.1e-7 (the student's,
/// DMD2's form); a chunk's gradient lost or counted twice moves these by
/// 1e-1 and more.
const ROUNDING: f64 = 1e-5;

fn assert_close(what: &str, got: &Outcome, want: &Outcome) {
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    // The VSD loss comes from the whole micro-batch's draw, as the plain
    // step's: the same number.
    assert_eq!(got.losses.0, want.losses.0, "{what}: the VSD loss");
    let fake = rel(got.losses.1, want.losses.1);
    assert!(
        fake < ROUNDING,
        "{what}: fake-score loss, relative {fake:e}"
    );
    assert!(got.x0.equal(&want.x0), "{what}: the draw x0_hat");
    let student = relative_gap(&got.student, &want.student);
    let fake = relative_gap(&got.fake, &want.fake);
    eprintln!("{what}: student {student:e}, fake score {fake:e}");
    assert!(student < ROUNDING, "{what}: student gradient, {student:e}");
    assert!(fake < ROUNDING, "{what}: fake-score gradient, {fake:e}");
}

/// The recomputed pass is the plain step's student pass, autocast
/// included (`precision.student_autocast`): under bf16 CPU autocast one
/// chunk equals the plain autocast step bit for bit, and both differ from
/// the float32 student's step, so a recomputation that bypassed the
/// autocast could not pass.
#[test]
fn recomputation_runs_the_student_under_its_autocast() {
    let autocast = AutocastPlan::new(tch::Device::Cpu, HalfDtype::Bf16).unwrap();
    let with = |rows: Option<u32>, student_autocast: Option<AutocastPlan>| VsdConfig {
        recompute_rows: rows,
        student_autocast,
        ..vsd_config(VsdWeighting::Paper, None)
    };
    let plan = |rows| Plan {
        micro: None,
        recompute_rows: rows,
    };
    let plain = step_with(Form::Lora, 2, plan(None), with(None, Some(autocast)));
    let recomputed = step_with(Form::Lora, 2, plan(Some(2)), with(Some(2), Some(autocast)));
    assert_bitwise("bf16 student, one chunk", &recomputed, &plain);
    let fp32 = step_with(Form::Lora, 2, plan(Some(2)), with(Some(2), None));
    let gap = relative_gap(&fp32.student, &plain.student);
    assert!(
        gap > 1e-3,
        "the bf16 student's gradient is only {gap:e} from the fp32 student's"
    );
}

/// One chunk covering each micro-batch (more rows than it holds clamp to
/// it) is the plain step's arithmetic: losses, draw and gradients equal bit
/// for bit, with and without micro-batches.
#[test]
fn one_chunk_is_the_plain_step_bit_for_bit() {
    for form in FORMS {
        for micro in [None, Some(1)] {
            let plain = step(
                form,
                2,
                Plan {
                    micro,
                    recompute_rows: None,
                },
            );
            let recomputed = step(
                form,
                2,
                Plan {
                    micro,
                    recompute_rows: Some(64),
                },
            );
            assert_bitwise(
                &format!("{form:?}, micro-batch {micro:?}, one chunk"),
                &recomputed,
                &plain,
            );
        }
    }
}

/// Chunks of fewer rows than the micro-batch (even, uneven, several per
/// micro-batch) leave the plain step's gradients and losses (with the same
/// micro-batches) to float rounding.
#[test]
fn chunks_accumulate_the_plain_step() {
    for form in FORMS {
        for micro in [None, Some(2)] {
            let plain = step(
                form,
                4,
                Plan {
                    micro,
                    recompute_rows: None,
                },
            );
            let chunks: &[u32] = if micro.is_some() { &[1] } else { &[1, 3] };
            for &rows in chunks {
                let recomputed = step(
                    form,
                    4,
                    Plan {
                        micro,
                        recompute_rows: Some(rows),
                    },
                );
                let what = format!("{form:?}, micro-batch {micro:?}, chunks of {rows}");
                assert_close(&what, &recomputed, &plain);
            }
        }
    }
}

/// A four-step student (`method.student_timesteps: [999, 749, 499, 249]`)
/// with checkpointing: its chain runs once without gradients, and the
/// student's x0 at each row's (x_{t_k}, t_k) is drawn without gradients
/// and re-run with them a chunk at a time. One chunk is the plain
/// few-step step bit for bit; chunks of 1 and 3 (rows at steps 3, 1, 2, 0,
/// so a chunk fed another row's chain input or step gets another x0) and
/// chunks within micro-batches the plain step's to float rounding
/// (measured worst 9.6e-7 of the largest entry, the fake score's). The student runs with gradients on a chunk at a
/// time; its chain passes (3, 2, 1 rows) and the draw never do.
#[test]
fn a_few_step_student_is_recomputed_on_each_rows_chain_input() {
    let cfg = |recompute_rows: Option<u32>| VsdConfig {
        few_step: Some(
            StudentChain::new(&FOUR_STEPS, 0.0047, &schedule(PredictionType::Epsilon)).unwrap(),
        ),
        ..config(recompute_rows)
    };
    let run = |form: Form, micro: Option<u32>, recompute_rows: Option<u32>| {
        let plan = Plan {
            micro,
            recompute_rows,
        };
        step_with(form, 4, plan, cfg(recompute_rows))
    };
    let chain = [(3, false), (2, false), (1, false)];
    let plain = run(Form::Lora, None, None);
    assert_eq!(plain.student_calls, [&chain[..], &[(4, true)]].concat());
    let one = run(Form::Lora, None, Some(64));
    assert_bitwise("four steps, one chunk", &one, &plain);
    assert_eq!(
        one.student_calls,
        [&chain[..], &[(4, false), (4, true)]].concat()
    );
    let ones = run(Form::Lora, None, Some(1));
    assert_close("four steps, chunks of 1", &ones, &plain);
    assert_eq!(
        ones.student_calls,
        [&chain[..], &[(4, false)], &[(1, true); 4]].concat(),
        "the student with gradients a row at a time"
    );
    let threes = run(Form::Lora, None, Some(3));
    assert_close("four steps, chunks of 3", &threes, &plain);
    // DMD2's full fake score, in micro-batches of 2 rows.
    let plain = run(Form::Unet, Some(2), None);
    let ones = run(Form::Unet, Some(2), Some(1));
    assert_close(
        "four steps, DMD2, micro-batch 2, chunks of 1",
        &ones,
        &plain,
    );
}

/// The further fake-score updates of an iteration (`update_fake_score`)
/// run in chunks too, with the plain update's loss and gradients.
#[test]
fn further_fake_score_updates_run_in_chunks() {
    tch::set_num_threads(1);
    for form in FORMS {
        let g = golden(form);
        let (draws, text) = draws(&g, 4);
        let update = |recompute_rows: Option<u32>| {
            let (student, scores) = networks(form, &g);
            let cfg = config(recompute_rows);
            let loss = VsdStep {
                student: &student,
                scores: &scores,
                schedule: &schedule(PredictionType::Epsilon),
                config: &cfg,
                loss_scales: None,
            }
            .update_fake_score(&text, &draws.z, &draws.fake, None)
            .unwrap()
            .double_value(&[]);
            let grads: Vec<(String, Tensor)> = scores
                .fake_parameters()
                .into_iter()
                .map(|(n, p)| (n, p.grad()))
                .collect();
            (loss, grads)
        };
        let (plain_loss, plain) = update(None);
        let (loss, grads) = update(Some(1));
        let rel = (loss - plain_loss).abs() / plain_loss.abs();
        assert!(rel < ROUNDING, "{form:?}: update loss, relative {rel:e}");
        let gap = relative_gap(&grads, &plain);
        assert!(gap < ROUNDING, "{form:?}: update gradient, {gap:e}");
        let (one_loss, one) = update(Some(4));
        assert_eq!(one_loss, plain_loss, "{form:?}: one chunk's update loss");
        for ((n, a), (_, b)) in one.iter().zip(&plain) {
            assert!(a.equal(b), "{form:?}: one chunk's update gradient {n}");
        }
    }
}

/// Records each call's rows and whether it ran with gradients (its output
/// requires them), around the student or the fake score.
#[derive(Default)]
struct Calls(RefCell<Vec<(i64, bool)>>);

impl Calls {
    fn record(&self, x: &Tensor, out: &Tensor) {
        self.0.borrow_mut().push((x.size()[0], out.requires_grad()));
    }

    fn take(&self) -> Vec<(i64, bool)> {
        self.0.take()
    }
}

struct StudentProbe<'a> {
    unet: &'a UNet,
    calls: Calls,
}

impl Denoiser for StudentProbe<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        let out = self.unet.predict(x, t, c)?;
        self.calls.record(x, &out);
        Ok(out)
    }
}

struct FakeProbe<'a> {
    scores: &'a ScorePair,
    calls: Calls,
}

impl Scores for FakeProbe<'_> {
    fn real(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        self.scores.real(x, t, c)
    }

    fn fake(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError> {
        let out = self.scores.fake(x, t, c)?;
        self.calls.record(x, &out);
        Ok(out)
    }

    fn form(&self) -> FakeScore {
        self.scores.form()
    }

    fn both(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        self.scores.both(x, t, c)
    }
}

/// The rows the student and the fake score run with gradients at once:
/// the whole batch in the plain step, at most a chunk with recomputation
/// (the student's one extra pass: the whole batch without gradients).
#[test]
fn networks_run_with_gradients_a_chunk_at_a_time() {
    tch::set_num_threads(1);
    for form in FORMS {
        let g = golden(form);
        let (draws, text) = draws(&g, 4);
        let (student, scores) = networks(form, &g);
        let student = StudentProbe {
            unet: &student,
            calls: Calls::default(),
        };
        let scores = FakeProbe {
            scores: &scores,
            calls: Calls::default(),
        };
        let schedule = schedule(PredictionType::Epsilon);
        let run = |recompute_rows: Option<u32>, micro: Option<u32>| {
            let cfg = config(recompute_rows);
            VsdStep {
                student: &student,
                scores: &scores,
                schedule: &schedule,
                config: &cfg,
                loss_scales: None,
            }
            .run(&text, &draws, micro)
            .unwrap();
            let with_grad = |calls: Vec<(i64, bool)>| -> Vec<i64> {
                calls.into_iter().filter(|c| c.1).map(|c| c.0).collect()
            };
            let student_calls = student.calls.take();
            let fake_calls = scores.calls.take();
            (
                student_calls.clone(),
                with_grad(student_calls),
                with_grad(fake_calls),
            )
        };
        let (_, student_grad, fake_grad) = run(None, None);
        assert_eq!(
            (student_grad, fake_grad),
            (vec![4], vec![4]),
            "{form:?} plain"
        );
        let (calls, student_grad, fake_grad) = run(Some(1), None);
        assert_eq!(calls[0], (4, false), "{form:?}: the draw without gradients");
        assert_eq!(student_grad, vec![1, 1, 1, 1], "{form:?}: chunks of 1");
        assert_eq!(fake_grad, vec![1, 1, 1, 1], "{form:?}: chunks of 1");
        let (_, student_grad, fake_grad) = run(Some(3), None);
        assert_eq!(
            (student_grad, fake_grad),
            (vec![3, 1], vec![3, 1]),
            "{form:?}"
        );
        let (_, student_grad, fake_grad) = run(Some(3), Some(2));
        assert_eq!(
            (student_grad, fake_grad),
            (vec![2, 2], vec![2, 2]),
            "{form:?}"
        );
        // A further fake-score update: its loss a chunk at a time too.
        let cfg = config(Some(1));
        let _loss = VsdStep {
            student: &student,
            scores: &scores,
            schedule: &schedule,
            config: &cfg,
            loss_scales: None,
        }
        .update_fake_score(&text, &draws.z, &draws.fake, None)
        .unwrap();
        let fake_grad: Vec<i64> = scores.calls.take().into_iter().map(|c| c.0).collect();
        assert_eq!(fake_grad, vec![1, 1, 1, 1], "{form:?}: a further update");
    }
}
