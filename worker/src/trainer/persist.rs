//! The trainer's state across processes and worlds: restoring a committed
//! checkpoint, snapshotting one at a step boundary for the upload thread,
//! the preemption checkpoint, and what a landed (or refused) upload means.

use swiftbrush_proto::run_store::{Manifest, ResumeFrom};

use super::TrainError;
use super::checkpoint::{self, EMA, LORA, Landing, OPTIM_LORA, OPTIM_STUDENT, STUDENT, Snapshot};
use super::run::{Resume, Trainer};
use super::world::{Phase, WorldEnd};
use crate::models::weights;

impl Trainer {
    /// Restores the state at `resume` (the initial state needs a trainer
    /// that has not trained: [`TrainError::InitialStateGone`] otherwise).
    /// An upload still in flight from the previous world lands first.
    pub fn restore(&mut self, resume: Resume) -> Result<(), TrainError> {
        self.leave();
        match self.uploader.wait() {
            Ok(Some(landing)) => self.landed(landing),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the previous world's last checkpoint did not land")
            }
        }
        let manifest = match resume {
            Resume::Step(0) => None,
            Resume::Step(s) => Some(self.store.resolve(ResumeFrom::Step(s))?),
            Resume::Auto => self.store.latest_valid()?,
        };
        match manifest {
            Some(m) => self.load_checkpoint(m),
            None if self.initial => Ok(()),
            None => Err(TrainError::InitialStateGone),
        }
    }

    /// Restores every piece of state from a committed checkpoint.
    pub(super) fn load_checkpoint(&mut self, manifest: Manifest) -> Result<(), TrainError> {
        if manifest.meta.teacher_fingerprint != self.state.teacher_fingerprint {
            return Err(TrainError::TeacherMismatch {
                step: manifest.step,
                run_dir: self.cfg.checkpoint.run_dir.clone(),
                found: manifest.meta.teacher_fingerprint.clone(),
                expected: self.state.teacher_fingerprint.clone(),
            });
        }
        let mut restored = checkpoint::read_checkpoint(&self.store, &manifest)?;
        let take =
            |r: &mut checkpoint::Restored, name: &str| r.tensors.remove(name).unwrap_or_default();
        weights::load_tensors_strict(
            &mut self.student.vs,
            take(&mut restored, STUDENT),
            &[format!("checkpoint step {} {STUDENT}", manifest.step).into()],
        )
        .map_err(crate::models::ModelError::from)?;
        self.teacher.load_fake(
            take(&mut restored, LORA),
            &format!("checkpoint step {} {LORA}", manifest.step),
        )?;
        self.opt_student
            .load_state(take(&mut restored, OPTIM_STUDENT))?;
        self.opt_lora.load_state(take(&mut restored, OPTIM_LORA))?;
        self.ema
            .load(&take(&mut restored, EMA), restored.state.ema_updates)?;
        if restored.state.config_fingerprint != self.state.config_fingerprint {
            tracing::warn!(
                step = manifest.step,
                "the job config changed since this checkpoint was written; continuing with the new one"
            );
        }
        let fingerprint = self.state.config_fingerprint.clone();
        let teacher = self.state.teacher.clone();
        self.state = restored.state;
        self.state.config_fingerprint = fingerprint;
        self.state.teacher = teacher;
        self.initial = false;
        self.last_checkpoint = Some(manifest.step);
        tracing::info!(step = manifest.step, run_dir = %self.cfg.checkpoint.run_dir, "resumed from checkpoint");
        Ok(())
    }

    /// checkpoint: rank 0 snapshots the state at this boundary and hands
    /// the upload to its thread (once per step).
    pub(super) fn checkpoint(&mut self) -> Result<(), TrainError> {
        let step = self.state.step;
        let w = self.world.as_ref().ok_or(TrainError::NoWorld)?;
        if w.rank != 0
            || self.last_submitted == Some(step)
            || self.last_checkpoint.is_some_and(|c| c >= step)
        {
            return Ok(());
        }
        let sink = w.parts.sink.clone();
        let started = std::time::Instant::now();
        self.set_phase(Phase::Checkpointing);
        let snap = Snapshot::new(
            &self.state,
            [
                (STUDENT, self.student.named_parameters()),
                (EMA, self.ema.tensors()),
                (LORA, self.teacher.fake_parameters()),
                (OPTIM_STUDENT, self.opt_student.state_tensors()),
                (OPTIM_LORA, self.opt_lora.state_tensors()),
            ],
        )?;
        let previous = self.uploader.submit(snap, sink)?;
        self.last_submitted = Some(step);
        if let Some(landing) = previous {
            self.landed(landing);
        }
        // Reported with every step from now on (`swiftbrush status`,
        // /metrics): the training thread's cost of checkpointing.
        self.last_stall_ms = started.elapsed().as_secs_f64() * 1e3;
        self.set_phase(Phase::Training);
        Ok(())
    }

    /// Some rank must stop and every rank knows it at this same boundary:
    /// rank 0 writes a checkpoint here and waits for it to land, then every
    /// rank learns whether it did (the leaving rank must not leave before
    /// the commit: its departure breaks the world, and a broken world's
    /// report is refused).
    pub(super) fn preempted(&mut self) -> Result<WorldEnd, TrainError> {
        let step = self.state.step;
        let rank = self.active()?.rank;
        if rank == 0 {
            self.checkpoint()?;
            self.close()?;
        }
        let landed_here = rank != 0 || self.last_checkpoint == Some(step);
        let w = self.active()?;
        let this_rank = w.parts.control.preempt_requested();
        match w.parts.sync.all_ok(landed_here) {
            Ok(committed) => Ok(WorldEnd::Preempted {
                step,
                committed,
                this_rank,
            }),
            Err(e) => Ok(WorldEnd::Broken {
                reason: e.to_string(),
            }),
        }
    }

    /// close: wait for the upload in flight.
    pub(super) fn close(&mut self) -> Result<(), TrainError> {
        self.write_events(true);
        if let Some(landing) = self.uploader.wait()? {
            self.landed(landing);
        }
        Ok(())
    }

    pub(super) fn landed(&mut self, landing: Landing) {
        match landing {
            Landing::Committed { step } => {
                self.last_checkpoint = Some(self.last_checkpoint.map_or(step, |c| c.max(step)));
            }
            Landing::Refused { step, reason } => {
                tracing::warn!(step, %reason, "checkpoint not committed");
                if self.last_submitted == Some(step) {
                    self.last_submitted = None;
                }
            }
        }
    }
}
