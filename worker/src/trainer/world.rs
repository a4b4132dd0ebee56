//! What one world plugs into the training loop, and how the loop learns
//! what to do at a step boundary. A world is one run of the loop between
//! formations: its caption feed, its collective, where its checkpoints go,
//! and its control (commands from the coordinator's heartbeats, preemption).
//! The single process has one world that runs to the end
//! ([`RunToEnd`]); a distributed worker has one per generation.

use std::sync::Arc;

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::run_store::RunStore;

use super::TrainError;
use super::caption_audit::CaptionAudit;
use super::caption_feed::CaptionFeed;
use super::checkpoint::CheckpointSink;
use super::gradient_sync::GradientSync;
use super::metrics::{Metrics, StepReport};
use crate::vsd::RankSlice;

/// The parts of one world.
pub struct WorldParts {
    /// Numbers the world (0 for a single process); written into the
    /// caption audit and the checkpoints' manifests.
    pub generation: u64,
    pub feed: Box<dyn CaptionFeed>,
    pub sync: Box<dyn GradientSync>,
    pub sink: Arc<dyn CheckpointSink>,
    pub control: Box<dyn StepControl>,
    pub audit: Option<CaptionAudit>,
}

/// The world the loop runs in now, passed to each of its steps: the parts,
/// this rank's place in it and its reporting. [`Trainer::join`] makes one;
/// dropping it leaves the world (its collective and feed go with it).
///
/// [`Trainer::join`]: super::Trainer::join
pub struct World {
    pub(super) parts: WorldParts,
    /// [per-rank batch, C, h, w].
    pub(super) latent_shape: [i64; 4],
    pub(super) metrics: Metrics,
}

impl World {
    /// `parts`' world for samples of shape `[C, h, w]`: the global batch
    /// must divide evenly among its ranks.
    pub(super) fn new(
        parts: WorldParts,
        cfg: &JobConfig,
        [c, h, w]: [i64; 3],
        store: &RunStore,
    ) -> Result<Self, TrainError> {
        let rank = parts.sync.rank();
        let world_size = parts.sync.world_size();
        let global = u64::from(cfg.train.global_batch);
        if world_size == 0 || global % world_size != 0 {
            return Err(TrainError::Invalid(format!(
                "train.global_batch = {global} is not divisible by the world size {world_size}"
            )));
        }
        let metrics = Metrics::for_rank(rank, parts.generation, cfg, store);
        Ok(Self {
            parts,
            latent_shape: [(global / world_size) as i64, c, h, w],
            metrics,
        })
    }

    /// This rank's place in the world (its gradient sync's).
    pub(super) fn rank(&self) -> u64 {
        self.parts.sync.rank()
    }

    pub(super) fn world_size(&self) -> u64 {
        self.parts.sync.world_size()
    }

    /// Images per step over all ranks.
    pub fn images_per_step(&self) -> u64 {
        self.latent_shape[0] as u64 * self.world_size()
    }

    /// Which rows of the global batch this rank draws.
    pub(super) fn slice(&self) -> RankSlice {
        RankSlice {
            rank: self.rank(),
            world_size: self.world_size(),
        }
    }
}

/// What the loop does at a step boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    Continue,
    /// Rank 0 writes a checkpoint of the state at this boundary (once per
    /// step; other ranks carry on).
    Checkpoint,
    /// The job ended: finish the upload in flight, leave the loop.
    Stop(String),
    /// The world is gone: leave the loop at once.
    Abort(String),
}

/// The loop's phase, for heartbeats and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Training,
    Checkpointing,
    /// Between worlds, or done training and waiting for the job to end.
    Idle,
}

/// How the loop learns what to do; called on the training thread, so
/// every method must be quick (a channel read, an atomic store).
pub trait StepControl {
    /// At a boundary before step `step` (that many steps completed).
    fn boundary(&mut self, step: u64) -> Directive;
    /// Once `train.max_steps` steps are done: wait a little for what comes
    /// next (the job's end, a checkpoint request, a broken world) and say
    /// it; `Continue` means ask again.
    fn after_last_step(&mut self, step: u64) -> Directive;
    /// Whether this rank must stop soon (SIGTERM); goes into every step's
    /// vote, so all ranks checkpoint at the same boundary.
    fn preempt_requested(&self) -> bool;
    fn phase(&mut self, phase: Phase);
    fn step_done(&mut self, report: &StepReport);
}

/// One process alone: train to the end, then stop.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunToEnd;

impl StepControl for RunToEnd {
    fn boundary(&mut self, _step: u64) -> Directive {
        Directive::Continue
    }
    fn after_last_step(&mut self, _step: u64) -> Directive {
        Directive::Stop("train.max_steps reached".to_owned())
    }
    fn preempt_requested(&self) -> bool {
        false
    }
    fn phase(&mut self, _phase: Phase) {}
    fn step_done(&mut self, _report: &StepReport) {}
}

/// How one world's run of the loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorldEnd {
    /// `train.max_steps` are trained, the final checkpoint has landed and
    /// the job is over.
    Completed,
    /// The job ended before `train.max_steps` (cancelled, failed).
    Stopped { reason: String },
    /// The world is gone (the coordinator said so, or a collective or a
    /// caption fetch failed): join the next one.
    Broken { reason: String },
    /// Some rank asked to stop; every rank agreed at `step`, where rank 0
    /// wrote a checkpoint (`committed` says whether it landed).
    /// `this_rank`: this rank is the one (or one of those) leaving.
    Preempted {
        step: u64,
        committed: bool,
        this_rank: bool,
    },
}
