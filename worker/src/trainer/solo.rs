//! One process alone: a trainer and its only world (tests, `bench`), with
//! captions from a local feed, its own gradient sync, checkpoints it
//! commits itself and a control that runs to the end.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use swiftbrush_proto::JobConfig;
use tch::Device;

use super::TrainError;
use super::caption_feed::CaptionFeed;
use super::checkpoint::{CommitToStore, Resume};
use super::gradient_sync::GradientSync;
use super::run::{StepDone, TrainSummary, Trainer};
use super::world::{RunToEnd, World, WorldEnd, WorldParts};

pub struct SoloTrainer {
    trainer: Trainer,
    world: World,
}

impl SoloTrainer {
    /// Loads everything, restores `resume`, joins the only world (captions
    /// from `feed`, gradients through `sync`, checkpoints committed by this
    /// process) and, on rank 0, writes the resolved config into the run
    /// directory.
    pub fn build(
        cfg: JobConfig,
        device: Device,
        feed: impl CaptionFeed + 'static,
        sync: impl GradientSync + 'static,
        resume: Resume,
    ) -> Result<Self, TrainError> {
        let keep_last = cfg.checkpoint.keep_last as usize;
        let rank = sync.rank();
        let mut trainer = Trainer::load(cfg, device)?;
        trainer.restore(resume)?;
        let world = trainer.join(WorldParts {
            generation: 0,
            feed: Box::new(feed),
            sync: Box::new(sync),
            sink: Arc::new(CommitToStore {
                keep_last,
                generation: 0,
            }),
            control: Box::new(RunToEnd),
            audit: None,
        })?;
        if rank == 0 {
            let yaml = bytes::Bytes::from(trainer.config().to_yaml());
            trainer
                .checkpointer
                .store()
                .put_run_file("config.yaml", yaml)?;
        }
        Ok(Self { trainer, world })
    }

    /// Runs to `train.max_steps`.
    pub fn run(&mut self) -> Result<TrainSummary, TrainError> {
        let started = Instant::now();
        let start_step = self.trainer.state().step;
        match self.trainer.run_world(&mut self.world)? {
            WorldEnd::Completed => Ok(self
                .trainer
                .summary(start_step, started.elapsed().as_secs_f64())),
            other => Err(TrainError::Invalid(format!(
                "the run ended early: {other:?}"
            ))),
        }
    }

    /// One iteration (see [`Trainer::train_step`]).
    pub fn train_step(&mut self, step: u64) -> Result<StepDone, TrainError> {
        self.trainer.train_step(&mut self.world, step)
    }

    /// Images per step over all ranks.
    pub fn images_per_step(&self) -> u64 {
        self.world.images_per_step()
    }
}

impl Deref for SoloTrainer {
    type Target = Trainer;

    fn deref(&self) -> &Trainer {
        &self.trainer
    }
}

impl DerefMut for SoloTrainer {
    fn deref_mut(&mut self) -> &mut Trainer {
        &mut self.trainer
    }
}
