//! The captions a rank trains on at each step: caption files are read once,
//! and the coordinator's caption ledger says which ids each (step, rank)
//! takes. Single-process runs use the same ledger as distributed ones
//! (whose feed streams from the coordinator: `distributed::captions`), so a
//! run's captions never depend on how it was launched.

use swiftbrush_proto::caption_ledger::{CaptionPlan, PlanError};
use swiftbrush_proto::caption_source::{CaptionError, CaptionFormat, SkipStats, parse_captions};

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("no caption sources: set data.captions in the config or pass --captions FILE")]
    NoSources,
    #[error("cannot read caption file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error(transparent)]
    Caption(#[from] CaptionError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The world this feed served is gone (the coordinator moved to another
    /// generation, or cannot be reached): not a failure of the run, the
    /// worker joins the next world.
    #[error("captions for step {step}: {reason}")]
    WorldGone { step: u64, reason: String },
    #[error("captions for step {step}: {reason}")]
    Coordinator { step: u64, reason: String },
}

/// One rank's captions of one step, with their ids (for the caption audit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepBatch {
    pub step: u64,
    pub caption_ids: Vec<u64>,
    pub captions: Vec<String>,
}

/// Where a rank's captions come from.
pub trait CaptionFeed {
    /// The captions of `step` for this rank.
    fn captions(&mut self, step: u64) -> Result<StepBatch, FeedError>;
    fn num_captions(&self) -> u64;
}

/// All captions in memory (they are small: ~100 bytes each).
pub struct LocalCaptionFeed {
    captions: Vec<String>,
    plan: CaptionPlan,
    rank: u64,
    world_size: u64,
    pub skipped: SkipStats,
}

impl LocalCaptionFeed {
    /// Reads every source in order. `fetch` returns a source's bytes (local
    /// files, or an object store for URLs).
    pub fn open(
        sources: &[String],
        jsonl_field: Option<&str>,
        plan: (u64, u64, bool),
        rank: u64,
        world_size: u64,
        fetch: &dyn Fn(&str) -> Result<Vec<u8>, FeedError>,
    ) -> Result<Self, FeedError> {
        if sources.is_empty() {
            return Err(FeedError::NoSources);
        }
        let mut captions = Vec::new();
        let mut skipped = SkipStats::default();
        for src in sources {
            let format = CaptionFormat::from_name(src)?;
            let bytes = fetch(src)?;
            let parsed = parse_captions(src, &bytes, format, jsonl_field)?;
            captions.extend(parsed.captions);
            skipped.add(&parsed.skipped);
        }
        let mut feed = Self::from_captions(captions, plan, rank, world_size)?;
        feed.skipped = skipped;
        Ok(feed)
    }

    /// A feed over captions already in memory; `plan` is (global batch,
    /// seed, shuffle).
    pub fn from_captions(
        captions: Vec<String>,
        plan: (u64, u64, bool),
        rank: u64,
        world_size: u64,
    ) -> Result<Self, FeedError> {
        let (global_batch, seed, shuffle) = plan;
        let plan = CaptionPlan::new(captions.len() as u64, global_batch, seed, shuffle)?;
        plan.per_rank(world_size)?;
        Ok(Self {
            captions,
            plan,
            rank,
            world_size,
            skipped: SkipStats::default(),
        })
    }

    pub fn plan(&self) -> &CaptionPlan {
        &self.plan
    }
}

impl CaptionFeed for LocalCaptionFeed {
    fn captions(&mut self, step: u64) -> Result<StepBatch, FeedError> {
        let ids = self.plan.rank_batch_ids(step, self.rank, self.world_size)?;
        Ok(StepBatch {
            step,
            captions: ids
                .iter()
                .map(|&i| self.captions[i as usize].clone())
                .collect(),
            caption_ids: ids,
        })
    }

    fn num_captions(&self) -> u64 {
        self.plan.num_captions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_local(source: &str) -> Result<Vec<u8>, FeedError> {
        std::fs::read(std::path::Path::new(source)).map_err(|e| FeedError::Read {
            path: source.to_owned(),
            reason: e.to_string(),
        })
    }

    #[test]
    fn reads_sources_in_order_and_slices_by_rank() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.jsonl");
        std::fs::write(&a, "one\n\ntwo\n").unwrap();
        std::fs::write(
            &b,
            "{\"caption\": \"three\"}\n{\"prompt\": \"four\"}\nbad\n",
        )
        .unwrap();
        let srcs = vec![a.display().to_string(), b.display().to_string()];
        let mut r0 = LocalCaptionFeed::open(&srcs, None, (2, 0, false), 0, 2, &read_local).unwrap();
        let mut r1 = LocalCaptionFeed::open(&srcs, None, (2, 0, false), 1, 2, &read_local).unwrap();
        assert_eq!(r0.num_captions(), 4);
        assert_eq!(r0.skipped.blank, 1);
        assert_eq!(r0.skipped.bad_json, 1);
        assert_eq!(r0.captions(0).unwrap().captions, vec!["one"]);
        assert_eq!(r1.captions(0).unwrap().captions, vec!["two"]);
        let b = r1.captions(1).unwrap();
        assert_eq!(
            (b.step, b.caption_ids, b.captions),
            (1, vec![3], vec!["four".to_owned()])
        );
    }

    #[test]
    fn clear_errors() {
        let e = LocalCaptionFeed::open(&[], None, (2, 0, true), 0, 1, &read_local)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--captions"), "{e}");
        let e = LocalCaptionFeed::open(
            &["/no/such.txt".into()],
            None,
            (2, 0, true),
            0,
            1,
            &read_local,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("/no/such.txt"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let blank = dir.path().join("blank.txt");
        std::fs::write(&blank, "\n  \n").unwrap();
        let e = LocalCaptionFeed::open(
            &[blank.display().to_string()],
            None,
            (2, 0, true),
            0,
            1,
            &read_local,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("blank.txt: no captions"), "{e}");
    }
}
