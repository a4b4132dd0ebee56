//! `swiftbrush train` on one process: captions from files or object-store
//! URLs, no gradient averaging. The distributed runtime runs this same
//! trainer with other feeds and syncs.

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::run_store::RunStore;

use super::caption_feed::{FeedError, LocalCaptionFeed, read_local};
use super::gradient_sync::SingleProcess;
use super::run::{Resume, TrainError, TrainSummary, Trainer, device_of};

/// Trains as configured, resuming from the run directory's newest
/// checkpoint (or `resume`'s step).
pub fn train(cfg: JobConfig, resume: Resume) -> Result<TrainSummary, TrainError> {
    let device = device_of(&cfg)?;
    let feed = LocalCaptionFeed::open(
        &cfg.data.captions,
        cfg.data.jsonl_field.as_deref(),
        (
            u64::from(cfg.train.global_batch),
            cfg.train.seed,
            cfg.data.shuffle,
        ),
        0,
        1,
        &read_source,
    )?;
    let skipped = feed.skipped.clone();
    tracing::info!(
        num_captions = feed.plan().num_captions(),
        skipped_lines = skipped.total(),
        "captions loaded"
    );
    if skipped.total() > 0 {
        tracing::warn!("caption lines skipped: {}", skipped.describe());
    }
    let mut trainer = Trainer::build(cfg, device, feed, SingleProcess, resume)?;
    trainer.run()
}

/// A caption file from a local path, file:// or an object-store URL.
pub fn read_source(source: &str) -> Result<Vec<u8>, FeedError> {
    let is_url = source.contains("://") && !source.starts_with("file://");
    if !is_url {
        return read_local(source);
    }
    let err = |reason: String| FeedError::Read {
        path: source.to_owned(),
        reason,
    };
    let (dir, name) = source
        .rsplit_once('/')
        .ok_or_else(|| err("expected a URL ending in a file name".to_owned()))?;
    let store = RunStore::open(dir).map_err(|e| err(e.to_string()))?;
    store
        .get_run_file(name)
        .map_err(|e| err(e.to_string()))?
        .map(|b| b.to_vec())
        .ok_or_else(|| err("no such object".to_owned()))
}
