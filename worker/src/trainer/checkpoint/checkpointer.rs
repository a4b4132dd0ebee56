//! The trainer's checkpointing component: where to start ([`Resume`]),
//! when a checkpoint is due, the uploader thread, and what this trainer
//! knows of its checkpoints (the step handed to the uploader last, the
//! newest committed one, how long the newest held the training thread).
//! What a checkpoint holds is `format.rs`, how its files are written
//! `upload.rs`; which tensors go in is the trainer's
//! (`trainer/save_restore.rs`).

use std::sync::Arc;

use swiftbrush_proto::run_store::{Manifest, ResumeFrom, RunStore};

use super::format::{self, Restored, Snapshot};
use super::upload::{CheckpointSink, Landing, Uploader};
use crate::trainer::TrainError;

/// Where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The newest valid checkpoint if the run directory has one, else fresh.
    Auto,
    /// Exactly this step's checkpoint (an error if it is not valid); step 0
    /// is the initial state.
    Step(u64),
}

/// Whether a step done every `every` steps and after the last is due once
/// `done` of `max_steps` steps are complete (checkpoints, samples).
pub fn every_and_last(done: u64, every: u64, max_steps: u64) -> bool {
    done.is_multiple_of(every) || done == max_steps
}

pub struct Checkpointer {
    store: RunStore,
    uploader: Uploader,
    /// `checkpoint.every_steps`.
    every: u64,
    /// The step of the snapshot handed to the uploader last (each step is
    /// written once unless its upload did not land).
    last_written: Option<u64>,
    /// The newest checkpoint this trainer knows to be committed.
    last_committed: Option<u64>,
    /// How long the newest checkpoint held the training thread.
    stall_ms: f64,
}

impl Checkpointer {
    pub fn new(store: RunStore, every: u64) -> Self {
        Self {
            uploader: Uploader::new(store.clone()),
            store,
            every: every.max(1),
            last_written: None,
            last_committed: None,
            stall_ms: 0.0,
        }
    }

    pub fn store(&self) -> &RunStore {
        &self.store
    }

    /// Whether the loop checkpoints after completing step `done` of
    /// `max_steps`: every `checkpoint.every_steps`, and at the end.
    pub fn due(&self, done: u64, max_steps: u64) -> bool {
        every_and_last(done, self.every, max_steps)
    }

    /// A new world writes its boundaries again (a step whose upload the
    /// last world handed over may not have landed).
    pub fn enter_world(&mut self) {
        self.last_written = None;
    }

    /// Whether the state at `step` still needs writing.
    pub fn wants(&self, step: u64) -> bool {
        self.last_written != Some(step) && self.last_committed.is_none_or(|c| c < step)
    }

    /// Hands `snap` to the uploader (after the previous upload finished).
    pub fn submit(
        &mut self,
        snap: Snapshot,
        sink: Arc<dyn CheckpointSink>,
    ) -> Result<(), TrainError> {
        let step = snap.step;
        let previous = self.uploader.submit(snap, sink)?;
        self.last_written = Some(step);
        if let Some(landing) = previous {
            self.landed(landing);
        }
        Ok(())
    }

    /// Notes the upload in flight if it has ended, without blocking.
    pub fn poll(&mut self) -> Result<(), TrainError> {
        if let Some(landing) = self.uploader.poll()? {
            self.landed(landing);
        }
        Ok(())
    }

    /// Waits for the upload in flight.
    pub fn finish(&mut self) -> Result<(), TrainError> {
        if let Some(landing) = self.uploader.wait()? {
            self.landed(landing);
        }
        Ok(())
    }

    /// Before a new world restores: the previous world's last upload lands
    /// (or is reported lost; the new world resumes from the store anyway).
    pub fn finish_previous_world(&mut self) {
        match self.uploader.wait() {
            Ok(Some(landing)) => self.landed(landing),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the previous world's last checkpoint did not land")
            }
        }
    }

    /// The committed checkpoint to restore for `resume` (None: the
    /// initial state).
    pub fn resolve(&self, resume: Resume) -> Result<Option<Manifest>, TrainError> {
        Ok(match resume {
            Resume::Step(0) => None,
            Resume::Step(s) => Some(self.store.resolve(ResumeFrom::Step(s))?),
            Resume::Auto => self.store.latest_valid()?,
        })
    }

    /// Every file of a committed checkpoint, checked.
    pub fn read(&self, manifest: &Manifest) -> Result<Restored, TrainError> {
        Ok(format::read_checkpoint(&self.store, manifest)?)
    }

    /// The trainer holds the state of committed checkpoint `step`.
    pub fn restored(&mut self, step: u64) {
        self.last_committed = Some(step);
    }

    pub fn committed(&self) -> Option<u64> {
        self.last_committed
    }

    pub fn stall_ms(&self) -> f64 {
        self.stall_ms
    }

    /// Reported with every step from now on (`swiftbrush status`,
    /// /metrics): the training thread's cost of checkpointing.
    pub fn set_stall_ms(&mut self, ms: f64) {
        self.stall_ms = ms;
    }

    fn landed(&mut self, landing: Landing) {
        match landing {
            Landing::Committed { step } => {
                self.last_committed = Some(self.last_committed.map_or(step, |c| c.max(step)));
            }
            Landing::Refused { step, reason } => {
                tracing::warn!(step, %reason, "checkpoint not committed");
                if self.last_written == Some(step) {
                    self.last_written = None;
                }
            }
        }
    }
}
