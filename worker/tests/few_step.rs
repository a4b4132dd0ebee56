//! A few-step student (issue 26; shared/SPEC.md "Few-step students"):
//! its chain (`diffusion::few_step`) and its training by backward
//! simulation (`vsd/few_step.rs`), on the golden VSD case's networks and
//! draws (worker/tests/vsd.rs holds the one-step step to the reference).
//! The chain against diffusers' stock LCMScheduler is tests/cli_export.rs.

mod common;

use std::collections::HashMap;

use common::golden_vsd::{inputs, lora_spec, roles, schedule, vsd_config};

use swiftbrush_worker::diffusion::{
    NoiseSchedule, OneStepDraw, PredictionType, StudentChain, one_step_x0,
};
use swiftbrush_worker::vsd::{
    ChainDraws, Conditions, Draws, ScorePair, VsdConfig, VsdStep, VsdWeighting,
};
use tch::{Kind, Tensor};

const STEPS: [i64; 4] = [999, 749, 499, 249];

fn golden() -> HashMap<String, Tensor> {
    common::golden("golden/vsd/sd1_null1.safetensors")
}

fn chain(schedule: &NoiseSchedule) -> StudentChain {
    StudentChain::new(&STEPS, 0.0047, schedule).unwrap()
}

/// Seeded chain noise like the golden z: K - 1 draws.
fn chain_noise(z: &Tensor) -> Vec<Tensor> {
    tch::manual_seed(26);
    (1..STEPS.len())
        .map(|_| Tensor::randn(z.size(), (Kind::Float, z.device())))
        .collect()
}

/// What a step leaves: both losses, its x0_hat and the student's gradients.
struct Outcome {
    losses: (f64, f64),
    x0: Tensor,
    grads: Vec<Tensor>,
}

fn run_step(
    cfg: &VsdConfig,
    draws: &Draws,
    text: &Conditions,
    g: &HashMap<String, Tensor>,
) -> Outcome {
    run_step_in(cfg, draws, text, g, None)
}

/// [`run_step`] `micro` rows at a time (`train.micro_batch`).
fn run_step_in(
    cfg: &VsdConfig,
    draws: &Draws,
    text: &Conditions,
    g: &HashMap<String, Tensor>,
    micro: Option<u32>,
) -> Outcome {
    tch::set_num_threads(1);
    let (student, teacher) = roles("sd1", &lora_spec(&["to_q", "to_v"]), g);
    let scores = ScorePair::Lora(Box::new(teacher));
    let out = VsdStep {
        student: &student,
        scores: &scores,
        schedule: &schedule(PredictionType::Epsilon),
        config: cfg,
        loss_scales: None,
    }
    .run(text, draws, micro)
    .unwrap();
    assert!(
        scores
            .fake_parameters()
            .iter()
            .all(|(_, p)| p.grad().defined())
    );
    Outcome {
        losses: (out.losses.vsd, out.losses.fake_score),
        x0: out.x0,
        grads: student
            .named_parameters()
            .into_iter()
            .map(|(_, p)| p.grad())
            .collect(),
    }
}

fn with_chain(draws: Draws, k: &[i64], noises: Vec<Tensor>) -> Draws {
    Draws {
        chain: Some(ChainDraws {
            k: Tensor::from_slice(k).to_device(draws.z.device()),
            eps: noises,
        }),
        ..draws
    }
}

/// Step 0 of the chain is the one-step draw, bit for bit (the same
/// formula with a per-sample abar); a draw of one step is that x0.
#[test]
fn the_chains_first_step_is_the_one_step_draw() {
    tch::set_num_threads(1);
    let g = golden();
    let (student, _) = roles("sd1", &lora_spec(&["to_q", "to_v"]), &g);
    let (draws, text) = inputs(&g);
    let schedule = schedule(PredictionType::Epsilon);
    let chain = chain(&schedule);
    let one = OneStepDraw {
        timestep: 999,
        alpha_bar: 0.0047,
        prediction: PredictionType::Epsilon,
    };
    tch::no_grad(|| {
        let want = one_step_x0(&student, &draws.z, &text.cond, &one).unwrap();
        let zeros = Tensor::zeros([2], (Kind::Int64, draws.z.device()));
        let got = chain.x0(&student, &draws.z, &zeros, &text.cond).unwrap();
        assert!(got.equal(&want), "{:e}", common::max_abs_diff(&got, &want));
        let noises = chain_noise(&draws.z);
        let drawn = chain
            .draw(&student, &draws.z, &text.cond, &noises, 1, &schedule)
            .unwrap();
        assert!(drawn.equal(&want));
        // Four steps move the picture (the chain is not a no-op).
        let four = chain
            .draw(&student, &draws.z, &text.cond, &noises, 4, &schedule)
            .unwrap();
        assert!(common::max_abs_diff(&four, &want) > 0.1);
    });
}

/// Backward simulation: a sample with step index k is trained on the
/// student's x0 at (x_k, t_k), where x_k is its own chain from z: the
/// step's x0_hat equals the chain's draw of k + 1 steps (to the rounding
/// of another batch size: the simulation runs only the rows that go past
/// each step). Measured 0 on the CPU; a chain that re-noised to the wrong
/// timestep, or skipped a step, moves it by more than 0.1.
#[test]
fn backward_simulation_trains_on_the_chains_own_input() {
    let g = golden();
    let (draws, text) = inputs(&g);
    let schedule = schedule(PredictionType::Epsilon);
    let noises = chain_noise(&draws.z);
    let cfg = VsdConfig {
        few_step: Some(chain(&schedule)),
        ..vsd_config(VsdWeighting::Paper, None)
    };
    for k in [[3i64, 1], [2, 0]] {
        let step = with_chain(
            inputs(&g).0,
            &k,
            noises.iter().map(Tensor::shallow_clone).collect(),
        );
        let out = run_step(&cfg, &step, &text, &g);
        let (student, _) = roles("sd1", &lora_spec(&["to_q", "to_v"]), &g);
        for (row, &k_row) in k.iter().enumerate() {
            let r = row as i64;
            let want = tch::no_grad(|| {
                let rows: Vec<Tensor> = noises.iter().map(|e| e.narrow(0, r, 1)).collect();
                chain(&schedule)
                    .draw(
                        &student,
                        &draws.z.narrow(0, r, 1),
                        &text.cond.narrow(0, r, 1),
                        &rows,
                        k_row as usize + 1,
                        &schedule,
                    )
                    .unwrap()
            });
            let scale = want.abs().max().double_value(&[]);
            let diff = common::max_abs_diff(&out.x0.narrow(0, r, 1), &want) / scale;
            eprintln!("k = {k_row}: x0_hat vs the chain's draw {diff:e} of {scale}");
            assert!(diff <= 1e-5, "k = {k_row}: {diff:e}");
        }
    }
}

/// With every sample at step 0 the few-step iteration is the one-step
/// student's: the same losses, draw and student gradients, bit for bit.
/// (Samples at later steps change them: checked beside it.)
#[test]
fn samples_at_step_zero_train_as_the_one_step_student() {
    let g = golden();
    let (draws, text) = inputs(&g);
    let schedule = schedule(PredictionType::Epsilon);
    let plain = run_step(&vsd_config(VsdWeighting::Paper, None), &draws, &text, &g);
    let cfg = VsdConfig {
        few_step: Some(chain(&schedule)),
        ..vsd_config(VsdWeighting::Paper, None)
    };
    let noises = chain_noise(&draws.z);
    let at_zero = with_chain(
        inputs(&g).0,
        &[0, 0],
        noises.iter().map(Tensor::shallow_clone).collect(),
    );
    let few = run_step(&cfg, &at_zero, &text, &g);
    assert_eq!(few.losses, plain.losses);
    assert!(few.x0.equal(&plain.x0));
    for (a, b) in few.grads.iter().zip(&plain.grads) {
        assert!(a.equal(b), "{:e}", common::max_abs_diff(a, b));
    }
    let later = run_step(&cfg, &with_chain(inputs(&g).0, &[0, 2], noises), &text, &g);
    assert!(!later.x0.equal(&plain.x0));
    assert!(later.x0.narrow(0, 0, 1).equal(&plain.x0.narrow(0, 0, 1)));
}

/// A few-step student's step without its backward-simulation draws is a
/// clear error, not a wrong step. (With gradient checkpointing it runs:
/// worker/tests/gradient_checkpointing.rs.)
#[test]
fn a_few_step_step_without_chain_draws_is_refused() {
    let g = golden();
    let (draws, text) = inputs(&g);
    let schedule = schedule(PredictionType::Epsilon);
    let cfg = VsdConfig {
        few_step: Some(chain(&schedule)),
        ..vsd_config(VsdWeighting::Paper, None)
    };
    let (student, teacher) = roles("sd1", &lora_spec(&["to_q", "to_v"]), &g);
    let scores = ScorePair::Lora(Box::new(teacher));
    let step = |cfg: &VsdConfig, draws: &Draws| {
        VsdStep {
            student: &student,
            scores: &scores,
            schedule: &schedule,
            config: cfg,
            loss_scales: None,
        }
        .run(&text, draws, None)
        .unwrap_err()
        .to_string()
    };
    let e = step(&cfg, &draws);
    assert!(
        e.contains("4-step student") && e.contains("no backward-simulation draws"),
        "{e}"
    );
}

/// `train.micro_batch` cuts the chain's draws with the rest: one row at a
/// time trains what the whole batch trains, to float rounding (measured
/// below 1e-6 relative; a micro-batch that took another row's step index
/// or noise moves the draw by 9e-2 of its largest value).
#[test]
fn micro_batches_cut_the_backward_simulation_with_their_rows() {
    let g = golden();
    let (draws, text) = inputs(&g);
    let schedule = schedule(PredictionType::Epsilon);
    let cfg = VsdConfig {
        few_step: Some(chain(&schedule)),
        ..vsd_config(VsdWeighting::Paper, None)
    };
    let noises = chain_noise(&draws.z);
    let step = || {
        with_chain(
            inputs(&g).0,
            &[3, 1],
            noises.iter().map(Tensor::shallow_clone).collect(),
        )
    };
    let whole = run_step_in(&cfg, &step(), &text, &g, None);
    let rows = run_step_in(&cfg, &step(), &text, &g, Some(1));
    let scale = whole.x0.abs().max().double_value(&[]);
    let x0 = common::max_abs_diff(&rows.x0, &whole.x0) / scale;
    let grad_scale = common::nan_max(whole.grads.iter().map(|t| t.abs().max().double_value(&[])));
    let grads = common::nan_max(
        rows.grads
            .iter()
            .zip(&whole.grads)
            .map(|(a, b)| common::max_abs_diff(a, b)),
    ) / grad_scale;
    eprintln!("micro-batch 1 vs whole: x0 {x0:e}, student gradients {grads:e}");
    assert!(
        x0 <= 1e-5 && grads <= 1e-4,
        "x0 {x0:e}, gradients {grads:e}"
    );
    let rel = (rows.losses.0 - whole.losses.0).abs() / whole.losses.0.abs();
    assert!(rel <= 1e-4, "VSD loss {rel:e}");
}
