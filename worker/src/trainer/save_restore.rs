//! The trainer's side of its checkpoints, its state across processes and
//! worlds: which tensors a checkpoint holds and how each is restored (one
//! list, [`TensorGroup::ALL`]), restoring a committed checkpoint, and the
//! loop's checkpoint step (snapshotting the state at a step boundary for
//! the upload thread). What a checkpoint is and how it travels:
//! `checkpoint/`.

use std::collections::HashMap;

use swiftbrush_proto::run_store::Manifest;
use tch::Tensor;

use super::TrainError;
use super::checkpoint::{Resume, Snapshot, TensorGroup};
use super::run::Trainer;
use super::world::{Phase, World};
use crate::shard::Gathered;

/// Shallow handles on named tensors.
fn copies(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    named
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

impl Trainer {
    /// Restores the state at `resume` (the initial state needs a trainer
    /// that has not trained: [`TrainError::InitialStateGone`] otherwise).
    /// An upload still in flight from the previous world lands first.
    pub fn restore(&mut self, resume: Resume) -> Result<(), TrainError> {
        self.checkpointer.finish_previous_world();
        // A checkpoint holds the full state: back to its shapes (the next
        // world shards it for its own size).
        self.leave_sharding()?;
        match self.checkpointer.resolve(resume)? {
            Some(m) => self.load_checkpoint(m),
            None if self.initial => Ok(()),
            None => Err(TrainError::InitialStateGone),
        }
    }

    /// A group's tensors as a checkpoint saves them (`gathered`: the
    /// sharded state's, gathered from every rank).
    fn tensors_of(&self, group: TensorGroup, gathered: Option<&Gathered>) -> Vec<(String, Tensor)> {
        if let Some(g) = gathered {
            match group {
                TensorGroup::Ema => {
                    if let Some(ema) = &g.student.ema {
                        return copies(ema);
                    }
                }
                TensorGroup::StudentOptimizer => return copies(&g.student.adam),
                TensorGroup::FakeScoreOptimizer => {
                    if let Some(f) = &g.fake_score {
                        return copies(&f.adam);
                    }
                }
                TensorGroup::Student | TensorGroup::FakeScore => {}
            }
        }
        match group {
            TensorGroup::Student => self.networks.student.named_parameters(),
            // Without averaging the EMA weights are the student's own.
            TensorGroup::Ema => match &self.ema {
                Some(ema) => ema.tensors(),
                None => self.networks.student.named_parameters(),
            },
            TensorGroup::FakeScore => self.networks.scores.fake_parameters(),
            TensorGroup::StudentOptimizer => self.optimizers.student.state_tensors(),
            TensorGroup::FakeScoreOptimizer => self.optimizers.fake_score.state_tensors(),
        }
    }

    /// Copies a group's saved tensors in (strictly by name and shape;
    /// `origin` names them in errors).
    fn restore_group(
        &mut self,
        group: TensorGroup,
        tensors: HashMap<String, Tensor>,
        origin: &str,
        ema_updates: i64,
    ) -> Result<(), TrainError> {
        match group {
            TensorGroup::Student => self.networks.student.load_tensors(tensors, origin)?,
            TensorGroup::Ema => {
                if let Some(ema) = self.ema.as_mut() {
                    ema.load(&tensors, ema_updates)?;
                }
            }
            TensorGroup::FakeScore => self.networks.scores.load_fake(tensors, origin)?,
            TensorGroup::StudentOptimizer => self.optimizers.student.load_state(tensors)?,
            TensorGroup::FakeScoreOptimizer => self.optimizers.fake_score.load_state(tensors)?,
        }
        Ok(())
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
        let mut restored = self.checkpointer.read(&manifest)?;
        for group in TensorGroup::ALL {
            let origin = format!("checkpoint step {} {}", manifest.step, group.file());
            let tensors = restored.tensors.remove(group.file()).unwrap_or_default();
            self.restore_group(group, tensors, &origin, restored.state.ema_updates)?;
        }
        match &restored.config {
            // Only what changes the training math is news: a longer run
            // (train.max_steps), another cadence or log format is not.
            Some(old) => {
                let changes = self.cfg.training_changes_from(old);
                if !changes.is_empty() {
                    let list: Vec<String> = changes.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        step = manifest.step,
                        "the job config changed since this checkpoint was written, in what \
                         training computes: {}; continuing with the new one",
                        list.join("; ")
                    );
                }
            }
            None if restored.state.config_fingerprint != self.state.config_fingerprint => {
                tracing::warn!(
                    step = manifest.step,
                    "the job config changed since this checkpoint was written (it predates \
                     per-key records: any key, max_steps included, counts); continuing with \
                     the new one"
                );
            }
            None => {}
        }
        let fingerprint = self.state.config_fingerprint.clone();
        let teacher = self.state.teacher.clone();
        self.state = restored.state;
        self.state.config_fingerprint = fingerprint;
        self.state.teacher = teacher;
        self.optimizers
            .restore_loss_scalers(self.state.loss_scalers);
        self.state.loss_scalers = self.optimizers.loss_scalers();
        self.initial = false;
        self.checkpointer.restored(manifest.step);
        tracing::info!(step = manifest.step, run_dir = %self.cfg.checkpoint.run_dir, "resumed from checkpoint");
        Ok(())
    }

    /// checkpoint: rank 0 snapshots the state at this boundary and hands
    /// the upload to its thread (once per step). Sharded, every rank calls
    /// it at the same boundary and the slices are gathered first.
    pub(super) fn checkpoint(&mut self, world: &mut World) -> Result<(), TrainError> {
        let step = self.state.step;
        // Only rank 0 writes: the other ranks take part in the gather's
        // collectives and drop its pieces.
        let keep = world.rank() == 0 && self.checkpointer.wants(step);
        let gathered = match self.optimizers.shard() {
            Some(shard) => shard.gather(world.parts.sync.as_mut(), keep)?,
            None => None,
        };
        if world.rank() != 0 || !self.checkpointer.wants(step) {
            return Ok(());
        }
        self.write_checkpoint(world, gathered.as_ref())?;
        if let Some(g) = gathered
            && step >= self.cfg.train.max_steps
        {
            self.final_gathered = Some((step, g));
        }
        Ok(())
    }

    /// Sharded, after the last step: rank 0 writes the state it gathered
    /// at `train.max_steps` (the other ranks no longer vote).
    pub(super) fn checkpoint_final_gathered(
        &mut self,
        world: &mut World,
    ) -> Result<(), TrainError> {
        let step = self.state.step;
        if world.rank() != 0 || !self.checkpointer.wants(step) {
            return Ok(());
        }
        match self.final_gathered.take() {
            Some((at, g)) if at == step => {
                let written = self.write_checkpoint(world, Some(&g));
                self.final_gathered = Some((at, g));
                written
            }
            _ => {
                tracing::warn!(
                    step,
                    "a checkpoint was asked for after the last step, but the sharded state was                      not gathered here; none written"
                );
                Ok(())
            }
        }
    }

    fn write_checkpoint(
        &mut self,
        world: &mut World,
        gathered: Option<&Gathered>,
    ) -> Result<(), TrainError> {
        let started = std::time::Instant::now();
        world.parts.control.phase(Phase::Checkpointing);
        let snap = Snapshot::new(
            &self.state,
            TensorGroup::ALL.map(|g| (g, self.tensors_of(g, gathered))),
            &self.cfg,
        )?;
        self.checkpointer.submit(snap, world.parts.sink.clone())?;
        self.checkpointer
            .set_stall_ms(started.elapsed().as_secs_f64() * 1e3);
        world.parts.control.phase(Phase::Training);
        Ok(())
    }
}
