//! Data parallelism is exact: two ranks with the TCP ring and global batch G
//! average the same gradients as one rank with G computes, and end with the
//! same student (and as each other), with either fake score (LoRA adapters,
//! or DMD2's full UNet copy, whose every weight's gradient is all-reduced).
//! Gradient accumulation is exact too: one rank running its batch in
//! micro-batches steps from the same gradients, and so does one running
//! the teacher and the LoRA teacher as one pass. The student's learning rate
//! here moves it far beyond rounding, so a wrong average cannot hide.

mod common;

use std::sync::{Arc, Mutex};

use common::tiny_run;
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{FakeScore, ScorePasses};
use swiftbrush_worker::trainer::gradient_sync::{GradientSync, SingleProcess, SyncError};
use tch::Tensor;

/// A learning rate that moves the student far beyond float rounding in a
/// few steps (the default 1e-6 moves a weight by ~1e-6 a step, which any
/// two finite runs match to 1e-5).
const STUDENT_LR: f64 = 1e-3;

fn config(run_dir: &str, fake: FakeScore) -> JobConfig {
    // A further fake-score update per step, so the extra updates' draws
    // and all-reduce are held to the same equivalence.
    let mut cfg = tiny_run::fake_score_config(run_dir, 3, fake, 2);
    cfg.checkpoint.every_steps = 100;
    cfg.method.student.lr = STUDENT_LR;
    cfg
}

const CAPTIONS: [&str; 4] = ["a red circle", "a photo of a cat", "a blue square", "a dog"];

/// A gradient sync that keeps a copy of every gradient list it averaged,
/// after the all-reduce and before clipping: what the optimizers step from.
struct Recording<S> {
    inner: S,
    seen: Arc<Mutex<Vec<Vec<Tensor>>>>,
}

impl<S: GradientSync> GradientSync for Recording<S> {
    fn rank(&self) -> u64 {
        self.inner.rank()
    }
    fn world_size(&self) -> u64 {
        self.inner.world_size()
    }
    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<(), SyncError> {
        self.inner.all_reduce_mean(grads)?;
        let copies = grads.iter().map(Tensor::copy).collect();
        self.seen.lock().unwrap().push(copies);
        Ok(())
    }
    fn all_sum(&mut self, values: &mut [f32]) -> Result<(), SyncError> {
        self.inner.all_sum(values)
    }
}

/// A run's end: the student's weights, and the averaged gradients of each
/// all-reduce (per step: the student's, the fake score's, the fake score's
/// further update).
struct Run {
    student: Vec<(String, Tensor)>,
    grads: Vec<Vec<Tensor>>,
}

fn train_cfg<S: GradientSync + 'static>(cfg: JobConfig, sync: S) -> Run {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sync = Recording {
        inner: sync,
        seen: seen.clone(),
    };
    let mut trainer = tiny_run::trainer_with(cfg, &CAPTIONS, sync);
    trainer.run().unwrap();
    let grads = std::mem::take(&mut *seen.lock().unwrap());
    Run {
        student: tiny_run::student(&trainer),
        grads,
    }
}

fn train<S: GradientSync + 'static>(run_dir: &str, fake: FakeScore, sync: S) -> Run {
    train_cfg(config(run_dir, fake), sync)
}

/// The student before training: the teacher's weights.
fn initial_student() -> Vec<(String, Tensor)> {
    let folder =
        swiftbrush_worker::pipeline::DiffusersFolder::open(&common::pipeline("sd1")).unwrap();
    let teacher = swiftbrush_worker::pipeline::UNet::load(&folder, tch::Device::Cpu).unwrap();
    tiny_run::snapshot(teacher.named_parameters())
}

/// max |a - b| over the tensors of one all-reduce, relative to max |b|
/// (None when the reference is all zero).
fn relative_grad_diff(a: &[Tensor], b: &[Tensor]) -> Option<f64> {
    assert_eq!(a.len(), b.len(), "gradient count");
    let scale = common::nan_max(b.iter().map(|t| t.abs().max().double_value(&[])));
    let worst = common::nan_max(a.iter().zip(b).map(|(x, y)| common::max_abs_diff(x, y)));
    if scale == 0.0 {
        // An all-zero reference (step 1's student gradient under LoRA: B
        // starts at zero, so the fake score equals the teacher) must be
        // matched exactly.
        assert_eq!(
            worst, 0.0,
            "the reference gradient is zero, this one is not"
        );
        return None;
    }
    Some(worst / scale)
}

/// Step 1's averaged gradients agree to rounding (relative 1e-5: only the
/// summation order differs); step 2's to 1e-3 (they are taken at weights
/// that step 1's rounding, amplified by Adam, already moved apart); the
/// students after three steps to 2e-2 of their move (measured: 3e-3 and
/// less; Adam turns the rounding of near-zero gradients into lr-sized
/// moves of single weights). A wrong average, a
/// lost rank or a dropped micro-batch share is off by O(1).
fn assert_equivalent(what: &str, got: &Run, want: &Run) {
    assert_eq!(got.grads.len(), 9, "{what}: three all-reduces a step");
    let mut checked = 0;
    for i in 0..6 {
        let bound = if i < 3 { 1e-5 } else { 1e-3 };
        if let Some(d) = relative_grad_diff(&got.grads[i], &want.grads[i]) {
            eprintln!("{what}: all-reduce {i}: gradients differ by {d:e} of their max");
            assert!(
                d <= bound,
                "{what}: all-reduce {i}: gradients differ by {d:e} of their max"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "{what}: only {checked} gradients were not zero"
    );
    let r = common::tensors::relative_to_move(&got.student, &want.student, &initial_student());
    eprintln!("{what}: students differ by {r:e} of the move");
    assert!(r <= 2e-2, "{what}: students differ by {r:e} of the move");
}

#[test]
fn micro_batches_of_one_equal_the_whole_batch_at_once() {
    tch::set_num_threads(1);
    let whole = train("memory://micro-whole", FakeScore::Lora, SingleProcess);
    let mut cfg = config("memory://micro-one", FakeScore::Lora);
    cfg.train.micro_batch = Some(1);
    let micro = train_cfg(cfg, SingleProcess);
    assert_equivalent("micro-batches of one vs the whole batch", &micro, &whole);
}

/// `train.gradient_checkpointing` (chunks of one row, both fake-score
/// forms) trains the student the plain step trains, to rounding: the key
/// reaches the step (worker/tests/gradient_checkpointing.rs holds the step
/// itself to the plain one).
#[test]
fn gradient_checkpointing_trains_the_plain_student() {
    tch::set_num_threads(1);
    for (fake, tag) in [(FakeScore::Lora, "lora"), (FakeScore::Unet, "unet")] {
        let plain = train(&format!("memory://ckpt-plain-{tag}"), fake, SingleProcess);
        let mut cfg = config(&format!("memory://ckpt-rows-{tag}"), fake);
        cfg.train.gradient_checkpointing = true;
        cfg.train.recompute_rows = 1;
        let recomputed = train_cfg(cfg, SingleProcess);
        assert_equivalent(
            &format!("{tag}: recomputed in rows of one vs the plain step"),
            &recomputed,
            &plain,
        );
        // Chunks of one row round differently from the batch of two.
        assert!(
            !tiny_run::equal(&recomputed.student, &plain.student),
            "{tag}: train.gradient_checkpointing changed nothing"
        );
    }
}

/// `train.score_passes: one` (the teacher and the LoRA teacher as one
/// pass of twice the rows) trains the student `two` trains, to rounding.
#[test]
fn one_score_pass_trains_as_two_passes() {
    tch::set_num_threads(1);
    let run = |passes: ScorePasses, dir: &str| {
        let mut cfg = config(dir, FakeScore::Lora);
        cfg.train.score_passes = passes;
        train_cfg(cfg, SingleProcess)
    };
    let two = run(ScorePasses::Two, "memory://passes-two");
    let one = run(ScorePasses::One, "memory://passes-one");
    assert_equivalent("one score pass vs two", &one, &two);
    // The key reaches the step: one pass rounds differently (the kernels
    // run at another batch size), so the students are not bit for bit
    // the same.
    assert!(
        !tiny_run::equal(&one.student, &two.student),
        "train.score_passes changed nothing"
    );
}

#[test]
fn two_ranks_equal_one_rank_with_the_same_global_batch() {
    two_ranks_equal_one_rank(FakeScore::Lora, "lora");
}

#[test]
fn two_ranks_equal_one_rank_with_a_full_unet_fake_score() {
    two_ranks_equal_one_rank(FakeScore::Unet, "unet");
}

fn two_ranks_equal_one_rank(fake: FakeScore, tag: &'static str) {
    tch::set_num_threads(1);
    let single = train(&format!("memory://ddp-{tag}-single"), fake, SingleProcess);

    let ranks: Vec<Run> = tiny_run::on_two_ranks(move |r, ring| {
        train(&format!("memory://ddp-{tag}-rank{r}"), fake, ring)
    });

    // Rank 0 equals one rank with the whole batch: the same averaged
    // gradients, the same student, to rounding.
    assert_equivalent(&format!("2 ranks vs 1 ({tag})"), &ranks[0], &single);
    // And the replicas are identical, bit for bit.
    assert_eq!(
        common::max_abs_diff_named(&ranks[0].student, &ranks[1].student),
        0.0
    );
}

/// The comparisons above would pass on a NaN if their maximum dropped it
/// (`fold(0.0, f64::max)` does).
#[test]
fn the_max_difference_keeps_a_nan() {
    assert!(common::nan_max([0.5, f64::NAN, 0.1]).is_nan());
    assert!(common::nan_max([f64::NAN, 0.5]).is_nan());
    assert_eq!(common::nan_max([0.5, 2.0]), 2.0);
    let a = vec![("w".to_owned(), Tensor::from_slice(&[1.0f32, f32::NAN]))];
    let b = vec![("w".to_owned(), Tensor::from_slice(&[1.0f32, 2.0]))];
    assert!(common::max_abs_diff_named(&a, &b).is_nan());
    assert!(
        common::max_abs_diff_named(&a, &a).is_nan(),
        "NaN is not equal to NaN"
    );
}
