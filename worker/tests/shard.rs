//! `world.shard_state` (ZeRO-1 `optimizer`, ZeRO-2
//! `optimizer_and_gradients`): ranks that keep Adam's moments, the EMA
//! (and, stage 2, the reduced gradients) only for their slice end with the
//! student one unsharded rank ends with, by the data-parallel test's
//! measure (ddp.rs: relative to the weights' move at a learning rate that
//! moves them far beyond rounding), and as each other bit for bit; a run
//! checkpointed sharded at W=2 resumes at W=3 sharded and at W=1 unsharded
//! where an uninterrupted run ends; each rank's resident state falls by
//! about W.

mod common;

use common::tiny_run;
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{Autocast, FakeScore, ShardState};
use swiftbrush_worker::trainer::gradient_sync::{GradientSync, SingleProcess, SyncError};
use tch::Tensor;

const STUDENT_LR: f64 = 1e-3;
const CAPTIONS: [&str; 6] = [
    "a red circle",
    "a photo of a cat",
    "a blue square",
    "a dog",
    "a green field",
    "a bird",
];

/// ddp.rs's config at a global batch of 6 (2 and 3 ranks divide it), with
/// DMD2's full fake score (sharded too) and a further fake-score update.
fn config(run_dir: &str, steps: u64, shard: ShardState) -> JobConfig {
    let mut cfg = tiny_run::fake_score_config(run_dir, steps, FakeScore::Unet, 2);
    cfg.train.global_batch = 6;
    cfg.checkpoint.every_steps = 100;
    cfg.method.student.lr = STUDENT_LR;
    cfg.world.shard_state = shard;
    cfg
}

fn train<S: GradientSync + 'static>(cfg: JobConfig, sync: S) -> Vec<(String, Tensor)> {
    let mut trainer = tiny_run::trainer_with(cfg, &CAPTIONS, sync);
    trainer.run().unwrap();
    tiny_run::student(&trainer)
}

fn initial_student() -> Vec<(String, Tensor)> {
    let folder =
        swiftbrush_worker::pipeline::DiffusersFolder::open(&common::pipeline("sd1")).unwrap();
    let teacher = swiftbrush_worker::pipeline::UNet::load(&folder, tch::Device::Cpu).unwrap();
    tiny_run::snapshot(teacher.named_parameters())
}

/// ddp.rs's bound: 2e-2 of the move (rounding of near-zero gradients,
/// amplified by Adam); a rank whose slice is not stepped or not gathered
/// is off by O(1) of it.
fn assert_same_student(what: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]) {
    let r = common::tensors::relative_to_move(got, want, &initial_student());
    eprintln!("{what}: students differ by {r:e} of the move");
    assert!(r <= 2e-2, "{what}: students differ by {r:e} of the move");
}

fn sharded_run(tag: &str, w: usize, steps: u64, shard: ShardState) -> Vec<Vec<(String, Tensor)>> {
    let tag = tag.to_owned();
    tiny_run::on_ranks(w, move |r, ring| {
        train(
            config(&format!("memory://shard-{tag}-w{w}-rank{r}"), steps, shard),
            ring,
        )
    })
}

#[test]
fn sharded_ranks_end_with_the_one_rank_student() {
    tch::set_num_threads(1);
    let single = train(
        config("memory://shard-single", 3, ShardState::None),
        SingleProcess,
    );
    for (shard, tag) in [
        (ShardState::Optimizer, "zero1"),
        (ShardState::OptimizerAndGradients, "zero2"),
    ] {
        for w in [2, 3] {
            let ranks = sharded_run(tag, w, 3, shard);
            assert_same_student(&format!("{tag}, {w} ranks vs 1"), &ranks[0], &single);
            for (r, student) in ranks.iter().enumerate().skip(1) {
                assert_eq!(
                    common::max_abs_diff_named(student, &ranks[0]),
                    0.0,
                    "{tag}: rank {r}'s student differs from rank 0's"
                );
            }
        }
    }
}

/// Checkpointed sharded at W=2 after 2 of 4 steps, resumed sharded at W=3
/// and unsharded at W=1: both end where an uninterrupted unsharded run
/// ends (the checkpoint holds the full state, resharded exactly).
#[test]
fn a_sharded_checkpoint_resumes_at_another_world_size() {
    tch::set_num_threads(1);
    let whole = train(
        config("memory://shard-resume-whole", 4, ShardState::None),
        SingleProcess,
    );
    // Both ranks share the run directory: rank 0 writes it.
    let first = |dir: &'static str| {
        tiny_run::on_ranks(2, move |_, ring| {
            let mut cfg = config(dir, 2, ShardState::Optimizer);
            cfg.checkpoint.every_steps = 2;
            train(cfg, ring)
        })
    };
    first("memory://shard-resume-a");
    let at_three = tiny_run::on_ranks(3, |_, ring| {
        train(
            config(
                "memory://shard-resume-a",
                4,
                ShardState::OptimizerAndGradients,
            ),
            ring,
        )
    });
    assert_same_student("W=2 sharded, resumed at W=3 sharded", &at_three[0], &whole);
    first("memory://shard-resume-b");
    let at_one = train(
        config("memory://shard-resume-b", 4, ShardState::None),
        SingleProcess,
    );
    assert_same_student("W=2 sharded, resumed at W=1 unsharded", &at_one, &whole);
}

/// The bytes of the moments, EMA and gradients each rank keeps between
/// steps fall by about W. Per parameter, the student (with its EMA) keeps
/// 16 replicated, 4 + 12/W with ZeRO-1 (the gradients stay whole), 12/W
/// with ZeRO-2 (SPEC's 16/W counts the reduced gradient's slice too,
/// which lives only during the optimizer step); DMD2's fake score (a copy
/// of the teacher: as many parameters, no EMA) 12, 4 + 8/W and 8/W.
#[test]
fn resident_state_per_rank_falls_by_about_the_world_size() {
    tch::set_num_threads(1);
    let bytes = |shard: ShardState, w: usize| -> Vec<usize> {
        tiny_run::on_ranks(w, move |r, ring| {
            let cfg = config(&format!("memory://shard-bytes-{shard:?}-{w}-{r}"), 1, shard);
            let mut trainer = tiny_run::trainer_with(cfg, &CAPTIONS, ring);
            trainer.run().unwrap();
            trainer.resident_state_bytes()
        })
    };
    let replicated = bytes(ShardState::None, 1)[0] as f64;
    for w in [2usize, 3] {
        let wf = w as f64;
        for (shard, per_param) in [
            (ShardState::Optimizer, 4.0 + 12.0 / wf + 4.0 + 8.0 / wf),
            (ShardState::OptimizerAndGradients, 12.0 / wf + 8.0 / wf),
        ] {
            for (r, b) in bytes(shard, w).into_iter().enumerate() {
                let ratio = b as f64 / replicated;
                let want = per_param / 28.0;
                eprintln!(
                    "{shard:?} W={w} rank {r}: {b} bytes, {ratio:.4} of replicated (SPEC {want:.4})"
                );
                assert!(
                    (ratio - want).abs() < 1e-3,
                    "{shard:?} W={w} rank {r}: {ratio:.4} of the replicated state, SPEC {want:.4}"
                );
            }
        }
    }
}

/// Sharded, a step still reads the device once (losses and the slices'
/// squared norms together; the global norm is summed in the vote's round)
/// and each further fake-score update once more: no new host syncs.
#[test]
fn a_sharded_step_reads_the_device_once_and_each_further_update_once_more() {
    use swiftbrush_worker::torch::host_read;
    tch::set_num_threads(1);
    let reads = tiny_run::on_ranks(2, |r, ring| {
        let cfg = config(
            &format!("memory://shard-reads-{r}"),
            3,
            ShardState::OptimizerAndGradients,
        );
        let mut t = tiny_run::trainer_with(cfg, &CAPTIONS, ring);
        t.train_step(0).unwrap();
        let before = host_read::count();
        t.train_step(1).unwrap();
        host_read::count() - before
    });
    assert_eq!(reads, vec![2, 2], "one read a step, one a further update");
}

/// Fills this rank's reduced slice with inf at its `poison`-th
/// reduce-scatter (the student's come first in a step), or, unsharded, the
/// first gradient at its `poison`-th all-reduce (loss_scaling.rs's
/// injection); every collective is the inner one's.
struct Overflow<S> {
    inner: S,
    calls: usize,
    poison: Option<usize>,
    /// Unsharded: the all-reduces count, not the reduce-scatters.
    unsharded: bool,
}

impl<S> Overflow<S> {
    fn poisoned(&mut self) -> bool {
        let hit = Some(self.calls) == self.poison;
        self.calls += 1;
        hit
    }
}

impl<S: GradientSync> GradientSync for Overflow<S> {
    fn rank(&self) -> u64 {
        self.inner.rank()
    }
    fn world_size(&self) -> u64 {
        self.inner.world_size()
    }
    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<(), SyncError> {
        self.inner.all_reduce_mean(grads)?;
        // Sharded, only the replicated adapters are all-reduced: not these.
        if self.unsharded && self.poisoned() {
            let _ = grads[0].shallow_clone().fill_(f64::INFINITY);
        }
        Ok(())
    }
    fn all_sum(&mut self, values: &mut [f32]) -> Result<(), SyncError> {
        self.inner.all_sum(values)
    }
    fn shard_range(&self, numel: usize, rank: u64) -> std::ops::Range<usize> {
        self.inner.shard_range(numel, rank)
    }
    fn reduce_scatter_mean(&mut self, flat: &Tensor) -> Result<Tensor, SyncError> {
        let mine = self.inner.reduce_scatter_mean(flat)?;
        if self.poisoned() {
            let _ = mine.shallow_clone().fill_(f64::INFINITY);
        }
        Ok(mine)
    }
    fn all_gather(&mut self, flat: &Tensor) -> Result<(), SyncError> {
        self.inner.all_gather(flat)
    }
}

/// configs/tiny.yaml with the student and the teacher passes under fp16
/// autocast (loss scaling on), ddp.rs's learning rate.
fn fp16_config(run_dir: &str, steps: u64, shard: ShardState) -> JobConfig {
    let mut cfg = tiny_run::config(run_dir, steps);
    cfg.precision.autocast = Autocast::Fp16;
    cfg.precision.student_autocast = true;
    cfg.checkpoint.every_steps = 100;
    cfg.method.student.lr = STUDENT_LR;
    cfg.world.shard_state = shard;
    cfg
}

/// fp16 loss scaling, sharded: an overflow in one rank's slice alone
/// skips the student's step on every rank and halves its scale there,
/// while the (replicated) adapters step; two sharded ranks with a skipped
/// step end with two unsharded ranks' student under the same skip (the
/// same world: fp16 rounds a batch of one row and of two differently, and
/// Adam turns that into lr-sized moves of near-zero gradients, so one
/// rank against two is ~0.9 of the move apart here, sharded or not).
#[test]
fn fp16_loss_scaling_skips_a_sharded_overflow_on_every_rank() {
    tch::set_num_threads(1);
    let captions = ["a red circle", "a photo of a cat"];
    let run = |shard: ShardState| {
        tiny_run::on_ranks(2, move |r, ring| {
            let sync = Overflow {
                inner: ring,
                calls: 0,
                poison: (r == 1).then_some(0),
                unsharded: shard.is_none(),
            };
            let dir = format!("memory://shard-fp16-{shard:?}-{r}");
            let cfg = fp16_config(&dir, 3, shard);
            let mut t = tiny_run::trainer_with(cfg, &captions, sync);
            let before = tiny_run::student(&t);
            let done = t.train_step(0).unwrap();
            let skipped =
                done.vote.student_nonfinite && tiny_run::equal(&tiny_run::student(&t), &before);
            let scalers = t.state().loss_scalers.unwrap();
            t.run().unwrap();
            (skipped, scalers, tiny_run::student(&t))
        })
    };
    let replicated = run(ShardState::None);
    let ranks = run(ShardState::OptimizerAndGradients);
    for (r, (skipped, scalers, _)) in ranks.iter().chain(&replicated).enumerate() {
        assert!(skipped, "rank {r}: the student stepped over an overflow");
        assert_eq!(scalers.student.scale, 32768.0, "rank {r}: the scale halved");
        assert_eq!(
            scalers.fake_score.growth_tracker, 1,
            "rank {r}: the adapters stepped"
        );
    }
    assert_same_student(
        "fp16, 2 sharded ranks vs 2 unsharded",
        &ranks[0].2,
        &replicated[0].2,
    );
    assert_eq!(common::max_abs_diff_named(&ranks[1].2, &ranks[0].2), 0.0);
}
