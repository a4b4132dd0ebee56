//! Data parallelism is exact: two ranks with the TCP ring and global batch G
//! end with the same student as one rank with G (and as each other), with
//! either fake score (LoRA adapters, or DMD2's full UNet copy, whose every
//! weight's gradient is all-reduced). Gradient accumulation is exact too:
//! one rank running its batch in micro-batches ends with the same student.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::tiny_run;
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::FakeScore;
use swiftbrush_worker::collective::TcpRing;
use swiftbrush_worker::trainer::gradient_sync::{GradientSync, SingleProcess};
use tch::Tensor;

fn config(run_dir: &str, fake: FakeScore) -> JobConfig {
    // A further fake-score update per step, so the extra updates' draws
    // and all-reduce are held to the same equivalence.
    let mut cfg = tiny_run::fake_score_config(run_dir, 3, fake, 2);
    cfg.checkpoint.every_steps = 100;
    cfg
}

const CAPTIONS: [&str; 4] = ["a red circle", "a photo of a cat", "a blue square", "a dog"];

fn train<S: GradientSync + 'static>(
    run_dir: &str,
    fake: FakeScore,
    sync: S,
) -> Vec<(String, Tensor)> {
    let mut trainer = tiny_run::trainer_with(config(run_dir, fake), &CAPTIONS, sync);
    trainer.run().unwrap();
    tiny_run::student(&trainer)
}

#[test]
fn micro_batches_of_one_equal_the_whole_batch_at_once() {
    tch::set_num_threads(1);
    let whole = train("memory://micro-whole", FakeScore::Lora, SingleProcess);
    let mut cfg = config("memory://micro-one", FakeScore::Lora);
    cfg.train.micro_batch = Some(1);
    let mut trainer = tiny_run::trainer_with(cfg, &CAPTIONS, SingleProcess);
    trainer.run().unwrap();
    let micro = tiny_run::student(&trainer);
    let d = common::max_abs_diff_named(&micro, &whole);
    assert!(
        d <= 1e-5,
        "micro-batches vs the whole batch: max weight diff {d:e}"
    );
    let folder =
        swiftbrush_worker::pipeline::DiffusersFolder::open(&common::pipeline("sd1")).unwrap();
    let teacher = swiftbrush_worker::roles::UNet::load(&folder, tch::Device::Cpu).unwrap();
    assert!(common::max_abs_diff_named(&whole, &teacher.named_parameters()) > 1e-7);
}

#[test]
fn two_ranks_equal_one_rank_with_the_same_global_batch() {
    two_ranks_equal_one_rank(FakeScore::Lora, "lora");
}

#[test]
fn two_ranks_equal_one_rank_with_a_full_unet_fake_score() {
    two_ranks_equal_one_rank(FakeScore::Unet, "unet");
}

fn two_ranks_equal_one_rank(fake: FakeScore, tag: &str) {
    tch::set_num_threads(1);
    let single = train(&format!("memory://ddp-{tag}-single"), fake, SingleProcess);

    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let addrs = addrs.clone();
            let run_dir = format!("memory://ddp-{tag}-rank{r}");
            std::thread::spawn(move || {
                tch::set_num_threads(1);
                let ring =
                    TcpRing::connect(r as u64, &addrs, l, 0, Duration::from_secs(30)).unwrap();
                train(&run_dir, fake, ring)
            })
        })
        .collect();
    let ranks: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    // Replicas are identical, bit for bit.
    assert_eq!(common::max_abs_diff_named(&ranks[0], &ranks[1]), 0.0);
    // And equal to one rank with the whole batch, to float rounding.
    let d = common::max_abs_diff_named(&ranks[0], &single);
    assert!(d <= 1e-5, "2 ranks vs 1: max weight diff {d:e}");
    // The student moved (the comparison is not vacuous).
    let folder =
        swiftbrush_worker::pipeline::DiffusersFolder::open(&common::pipeline("sd1")).unwrap();
    let teacher = swiftbrush_worker::roles::UNet::load(&folder, tch::Device::Cpu).unwrap();
    assert!(common::max_abs_diff_named(&single, &teacher.named_parameters()) > 1e-7);
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
