//! A real trainer on configs/tiny.yaml and the sd1 fixture pipeline, for
//! the tests that train a few steps in-process (lora_updates.rs,
//! fake_score.rs, ddp.rs), and how they compare weights.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::FakeScore;
use swiftbrush_worker::collective::TcpRing;
use swiftbrush_worker::trainer::caption_feed::LocalCaptionFeed;
use swiftbrush_worker::trainer::gradient_sync::{GradientSync, SingleProcess};
use swiftbrush_worker::trainer::{Resume, SoloTrainer, TrainError};
use tch::{Device, Tensor};

/// `f(rank, ring)` on each of two ranks joined by a TCP ring on loopback,
/// each in its own thread with one libtorch thread; their results in rank
/// order.
pub fn on_two_ranks<T: Send + 'static>(
    f: impl Fn(usize, TcpRing) -> T + Send + Clone + 'static,
) -> Vec<T> {
    on_ranks(2, f)
}

/// [`on_two_ranks`] for `n` ranks.
pub fn on_ranks<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize, TcpRing) -> T + Send + Clone + 'static,
) -> Vec<T> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let (addrs, f) = (addrs.clone(), f.clone());
            std::thread::spawn(move || {
                tch::set_num_threads(1);
                let ring =
                    TcpRing::connect(r as u64, &addrs, l, 0, Duration::from_secs(30)).unwrap();
                f(r, ring)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// configs/tiny.yaml on the sd1 fixture: global batch 2, `max_steps`,
/// a checkpoint every step into `run_dir`.
pub fn config(run_dir: &str, max_steps: u64) -> JobConfig {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tiny.yaml");
    let mut cfg = JobConfig::from_yaml_file(std::path::Path::new(path)).unwrap();
    cfg.model.teacher = Some(super::pipeline("sd1").display().to_string());
    cfg.train.max_steps = max_steps;
    cfg.train.global_batch = 2;
    cfg.checkpoint.run_dir = run_dir.to_owned();
    cfg.checkpoint.every_steps = 1;
    cfg
}

/// [`config`] with the fake score `kind` and `updates` fake-score updates
/// per step.
pub fn fake_score_config(
    run_dir: &str,
    max_steps: u64,
    kind: FakeScore,
    updates: u32,
) -> JobConfig {
    let mut cfg = config(run_dir, max_steps);
    cfg.method.fake_score.kind = kind;
    cfg.method.fake_score.updates_per_step = updates;
    cfg
}

/// A single-process trainer on two captions, resuming if `cfg`'s run
/// directory holds a checkpoint.
pub fn trainer(cfg: JobConfig) -> SoloTrainer {
    trainer_with(cfg, &["a red circle", "a photo of a cat"], SingleProcess)
}

/// A trainer on `captions`, sharded by `sync`'s rank and world size.
pub fn trainer_with<S: GradientSync + 'static>(
    cfg: JobConfig,
    captions: &[&str],
    sync: S,
) -> SoloTrainer {
    try_trainer_with(cfg, captions, sync).unwrap()
}

/// [`trainer_with`], returning the build's error (a refused resume).
pub fn try_trainer_with<S: GradientSync + 'static>(
    cfg: JobConfig,
    captions: &[&str],
    sync: S,
) -> Result<SoloTrainer, TrainError> {
    let captions = captions.iter().map(|s| s.to_string()).collect();
    let plan = (u64::from(cfg.train.global_batch), 0, true);
    let feed =
        LocalCaptionFeed::from_captions(captions, plan, sync.rank(), sync.world_size()).unwrap();
    SoloTrainer::build(cfg, Device::Cpu, feed, sync, Resume::Auto)
}

/// Copies of `tensors`, sorted by name (the trainer updates its own in place).
pub fn snapshot(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = tensors.into_iter().map(|(n, t)| (n, t.copy())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The student's weights now, sorted by name.
pub fn student(t: &SoloTrainer) -> Vec<(String, Tensor)> {
    snapshot(t.student().variables())
}

/// Same names, bit-identical tensors.
pub fn equal(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
}
