//! The SwiftBrush training loop, one rank's view. Named steps, in order:
//! build (`load.rs`) -> per world: restore (`save_restore.rs`), join -> for
//! each step: boundary (the world's control), batch, vsd step, optimizer
//! steps (with the step vote), fake-score updates, EMA, log, checkpoint
//! (`save_restore.rs`), sample -> after `train.max_steps`, close and the
//! wait for the job's end (or, preempted, the preemption checkpoint).
//! What differs between a single process and a distributed rank is only
//! the [`World`] passed in: its caption feed, gradient sync, checkpoint
//! sink and control. The models stay loaded from one world to
//! the next; each world restores the state of its resume step.
//!
//! The trainer's components: [`Networks`] (what the step runs),
//! [`Optimizers`](super::optimizers::Optimizers), the EMA, the
//! [`Checkpointer`](super::checkpoint::Checkpointer), and per world its
//! [`Metrics`](super::metrics::Metrics).

use sha2::Digest;
use std::time::Instant;

use swiftbrush_proto::JobConfig;
use tch::{Device, Tensor};

use super::TrainError;
use super::caption_audit::AuditEntry;
use super::checkpoint::{CheckpointError, Checkpointer, TrainState, tensor_bytes};
use super::gradient_sync::StepVote;
use super::metrics::StepReport;
use super::optimizers::{Applied, Optimizers};
use super::samples::TrainingSamples;
use super::text::TextConditioner;
use super::world::{Directive, Phase, World, WorldEnd, WorldParts};
use crate::diffusion::NoiseSchedule;
use crate::ema::Ema;
use crate::vsd::{
    Conditions, DeviceStepOutput, DrawKey, DrawSpec, Draws, FakeScoreDraws, LossScales, ScorePair,
    Student, StudentNet, VsdConfig, VsdLosses, VsdStep,
};

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub last_losses: Option<VsdLosses>,
    pub num_nonfinite_steps: u64,
    pub num_truncated_captions: u64,
    pub last_checkpoint: Option<u64>,
    pub seconds: f64,
}

/// What a step runs: the networks, the schedule and the method's constants
/// (built once, kept across worlds).
pub struct Networks {
    pub text: TextConditioner,
    pub scores: ScorePair,
    /// A full copy of the teacher, or LoRA adapters on `scores`' base.
    pub student: Student,
    pub schedule: NoiseSchedule,
    pub vsd: VsdConfig,
    /// Latent shape of one sample: [C, h, w].
    pub sample_shape: [i64; 3],
}

impl Networks {
    /// The SwiftBrush step over these networks, each loss multiplied by
    /// its `loss_scales` before its backward (None: unscaled).
    pub fn step(&self, loss_scales: Option<LossScales>) -> VsdStep<'_, StudentNet<'_>, ScorePair> {
        VsdStep {
            student: self.student.net(&self.scores),
            scores: &self.scores,
            schedule: &self.schedule,
            config: &self.vsd,
            loss_scales,
        }
    }
}

pub struct Trainer {
    pub(super) cfg: JobConfig,
    pub(super) device: Device,
    pub(super) networks: Networks,
    pub(super) optimizers: Optimizers,
    /// None with `method.ema.enabled: false`: no copy of the student is
    /// kept, and the EMA weights (exports, samples) are the student's own.
    pub(super) ema: Option<Ema>,
    pub(super) checkpointer: Checkpointer,
    pub(super) state: TrainState,
    /// The models and optimizers still hold the state of a fresh build.
    pub(super) initial: bool,
    pub(super) last_losses: Option<VsdLosses>,
    /// The sample step's prompts, noise and VAE (`train.sample_every_steps`).
    pub(super) samples: Option<TrainingSamples>,
    /// `world.shard_state`: rank 0's copy of the full state gathered at
    /// `train.max_steps`, for a checkpoint asked for after the last step
    /// (no step's vote is left to gather every rank for it).
    pub(super) final_gathered: Option<(u64, crate::shard::Gathered)>,
}

/// One step's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepDone {
    pub losses: VsdLosses,
    /// The combined vote of every rank.
    pub vote: StepVote,
    /// `world.shard_state`: a rank asked for a checkpoint at this step's
    /// boundary; every rank gathers for it after the step.
    pub checkpoint: bool,
}

/// One rank's captions of a step, encoded once for all passes.
struct Batch {
    text: Conditions,
    caption_ids: Vec<u64>,
    num_truncated: u64,
}

impl Trainer {
    /// Whether the models still hold the state of a fresh build.
    pub fn is_initial(&self) -> bool {
        self.initial
    }

    /// A world to train in with these parts; training continues from the
    /// current state (see [`Trainer::restore`]).
    pub fn join(&mut self, parts: WorldParts) -> Result<World, TrainError> {
        // A step that broke half-way may have left gradients behind.
        self.optimizers.zero_grad();
        self.checkpointer.enter_world();
        let world = World::new(
            parts,
            &self.cfg,
            self.networks.sample_shape,
            self.checkpointer.store(),
        )?;
        self.enter_sharding(&world)?;
        Ok(world)
    }

    /// `world.shard_state`: this rank keeps the optimizer state (and EMA)
    /// of its slice only, for this world (crate::shard); `none`: nothing.
    fn enter_sharding(&mut self, world: &World) -> Result<(), TrainError> {
        let stage = self.cfg.world.shard_state;
        if stage.is_none() {
            return Ok(());
        }
        if self.optimizers.is_sharded() {
            // Still sharded for another world without a restore between:
            // only the initial state can be rebuilt here.
            self.leave_sharding()?;
        }
        let fake = match &self.networks.scores {
            crate::vsd::ScorePair::Unet(_) => Some(self.networks.scores.fake_parameters()),
            crate::vsd::ScorePair::Lora(_) => None,
        };
        let ema = self.ema.take().map(|e| (e, self.cfg.method.ema.max_decay));
        self.optimizers.enter_sharding(
            stage,
            world.parts.sync.as_ref(),
            self.networks.student.named_parameters(),
            ema,
            fake,
        )
    }

    /// Back from sharding to the full shapes: zero moments and an EMA of
    /// the student as it is (the initial state; a checkpoint loaded next
    /// overwrites them).
    pub(super) fn leave_sharding(&mut self) -> Result<(), TrainError> {
        self.final_gathered = None;
        if let Some(had_ema) = self.optimizers.leave_sharding() {
            if !self.initial {
                tracing::debug!("sharded state left; the checkpoint restored next replaces it");
            }
            self.ema = had_ema.then(|| {
                Ema::new(
                    self.networks.student.named_parameters(),
                    self.cfg.method.ema.max_decay,
                )
            });
        }
        Ok(())
    }

    /// Bytes of optimizer state, EMA and gradients this rank keeps beside
    /// the weights (sharded: its slices).
    pub fn resident_state_bytes(&self) -> usize {
        self.optimizers.resident_state_bytes(self.ema.as_ref())
    }

    /// What the run did since `start_step`.
    pub fn summary(&self, start_step: u64, seconds: f64) -> TrainSummary {
        TrainSummary {
            start_step,
            end_step: self.state.step,
            last_losses: self.last_losses,
            num_nonfinite_steps: self.state.num_nonfinite_steps,
            num_truncated_captions: self.state.num_truncated_captions,
            last_checkpoint: self.checkpointer.committed(),
            seconds,
        }
    }

    /// Runs `world`'s loop until its control or its parts end it: its
    /// steps up to `train.max_steps`, then the wait for the job's end.
    /// Errors that only mean the world is gone end it as
    /// [`WorldEnd::Broken`]; other errors are the run's.
    pub fn run_world(&mut self, world: &mut World) -> Result<WorldEnd, TrainError> {
        let max_steps = self.cfg.train.max_steps;
        world.metrics.start(self.state.step);
        world.parts.control.phase(Phase::Training);
        while self.state.step < max_steps {
            let step = self.state.step;
            self.checkpointer.poll()?;
            match world.parts.control.boundary(step) {
                Directive::Continue => {}
                Directive::Checkpoint => match self.optimizers.shard_mut() {
                    // Sharded, every rank gathers: the order waits for this
                    // step's vote (the other ranks may see it later).
                    Some(shard) => {
                        if world.rank() == 0 && self.checkpointer.wants(step) {
                            shard.request_checkpoint();
                        }
                    }
                    None => self.checkpoint(world)?,
                },
                Directive::Stop(reason) => {
                    self.close(world)?;
                    world.metrics.finish();
                    return Ok(WorldEnd::Stopped { reason });
                }
                Directive::Abort(reason) => return Ok(WorldEnd::Broken { reason }),
            }
            let done = match self.train_step(world, step) {
                Ok(done) => done,
                Err(e) if e.breaks_world() => {
                    return Ok(WorldEnd::Broken {
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            };
            if done.vote.preempt {
                return self.preempted(world);
            }
            if self.checkpointer.due(step + 1, max_steps) || done.checkpoint {
                // Sharded, every rank gathers: a peer lost meanwhile ends
                // the world, as in the step, not this worker.
                if let Err(e) = self.checkpoint(world) {
                    return world_gone_or(e);
                }
                world.metrics.flush(true);
            }
            self.sample(world, step + 1);
        }
        self.await_job_end(world)
    }

    /// After the last step: the final checkpoint lands, then the world
    /// waits for the job's end (a process alone: at once; a distributed
    /// rank: until the coordinator says the job is over, which it does
    /// once the final checkpoint commits). A checkpoint asked for
    /// meanwhile is written and lands before the wait goes on.
    fn await_job_end(&mut self, world: &mut World) -> Result<WorldEnd, TrainError> {
        let step = self.state.step;
        self.idle(world)?;
        loop {
            match world.parts.control.after_last_step(step) {
                Directive::Continue => {}
                Directive::Checkpoint => {
                    if self.optimizers.is_sharded() {
                        if let Err(e) = self.checkpoint_final_gathered(world) {
                            return world_gone_or(e);
                        }
                    } else {
                        self.checkpoint(world)?;
                    }
                    self.idle(world)?;
                }
                Directive::Stop(_) => {
                    self.close(world)?;
                    world.metrics.finish();
                    return Ok(WorldEnd::Completed);
                }
                Directive::Abort(reason) => return Ok(WorldEnd::Broken { reason }),
            }
        }
    }

    /// The world is done training: the upload in flight lands (the final
    /// checkpoint lands before the wait for the end), and the control
    /// reports the phase as idle.
    fn idle(&mut self, world: &mut World) -> Result<(), TrainError> {
        self.checkpointer.poll()?;
        self.close(world)?;
        world.parts.control.phase(Phase::Idle);
        Ok(())
    }

    /// Some rank must stop and every rank knows it at this same boundary:
    /// rank 0 writes a checkpoint here and waits for it to land, then every
    /// rank learns whether it did (the leaving rank must not leave before
    /// the commit: its departure breaks the world, and a broken world's
    /// report is refused).
    fn preempted(&mut self, world: &mut World) -> Result<WorldEnd, TrainError> {
        let step = self.state.step;
        if self.optimizers.is_sharded() {
            // Every rank gathers; rank 0 writes.
            if let Err(e) = self.checkpoint(world) {
                return world_gone_or(e);
            }
            if world.rank() == 0 {
                self.close(world)?;
            }
        } else if world.rank() == 0 {
            self.checkpoint(world)?;
            self.close(world)?;
        }
        let landed_here = world.rank() != 0 || self.checkpointer.committed() == Some(step);
        let this_rank = world.parts.control.preempt_requested();
        match world.parts.sync.all_ok(landed_here) {
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

    /// close: the world's TensorBoard file written, the upload in flight
    /// waited for.
    fn close(&mut self, world: &mut World) -> Result<(), TrainError> {
        world.metrics.flush(true);
        self.checkpointer.finish()
    }

    /// One iteration: batch, vsd step, optimizer steps with the step vote,
    /// further fake-score updates, EMA, log; advances the state to
    /// `step + 1`.
    pub fn train_step(&mut self, world: &mut World, step: u64) -> Result<StepDone, TrainError> {
        let t0 = Instant::now();
        panic_fault(world.rank(), step);
        let batch = self.batch(world, step)?;
        self.optimizers.ready_grads();
        // The losses stay on the device until the vote reads them with the
        // gradient norms: one transfer a step.
        let DeviceStepOutput {
            losses: device_losses,
            x0,
        } = self.vsd_step(world, step, &batch.text)?;
        let mine = StepVote {
            finite: true,
            preempt: world.parts.control.preempt_requested(),
            num_truncated: batch.num_truncated,
            ..StepVote::default()
        };
        let t_sync = Instant::now();
        // `losses`: the global batch's, averaged in the vote; `rank_losses`:
        // this rank's share.
        let Applied {
            vote,
            rank_losses,
            losses,
            student_stepped,
            fake_score_stepped,
            checkpoint,
        } = self
            .optimizers
            .apply(world.parts.sync.as_mut(), &device_losses, mine)?;
        let mut allreduce_s = t_sync.elapsed().as_secs_f64();
        self.initial = false;
        if vote.finite {
            allreduce_s += self.fake_score_updates(world, step, &batch.text, &x0)?;
            self.ema_update();
        } else if let Some(scalers) = self.optimizers.loss_scalers() {
            // fp16 loss scaling: an optimizer whose (scaled) gradients
            // overflowed skipped its step and halved its scale; the other
            // may have stepped. The EMA follows the student's steps; the
            // further fake-score updates wait for an all-finite step.
            self.state.num_nonfinite_steps += 1;
            if student_stepped {
                self.ema_update();
            }
            tracing::warn!(
                step,
                student_stepped,
                fake_score_stepped,
                student_loss_scale = scalers.student.scale,
                fake_score_loss_scale = scalers.fake_score.scale,
                "fp16 loss scaling: inf/NaN gradient, that optimizer's step skipped and its \
                 loss scale halved"
            );
        } else {
            self.state.num_nonfinite_steps += 1;
            tracing::warn!(
                step,
                rank_vsd = rank_losses.vsd,
                rank_fake_score = rank_losses.fake_score,
                "non-finite loss or gradient: step skipped"
            );
        }
        self.state.num_truncated_captions += vote.num_truncated;
        self.state.loss_scalers = self.optimizers.loss_scalers();
        self.state.step = step + 1;
        (self.state.epoch, self.state.caption_index) = self.feed_position(world, step + 1);
        self.last_losses = Some(losses);
        self.audit(world, step, batch.caption_ids)?;
        let seconds = t0.elapsed().as_secs_f64();
        let report = StepReport {
            step: step + 1,
            losses,
            step_ms: seconds * 1e3,
            allreduce_ms: allreduce_s * 1e3,
            samples_per_s: world.images_per_step() as f64 / seconds.max(1e-9),
            checkpoint_stall_ms: self.checkpointer.stall_ms(),
        };
        world.parts.control.step_done(&report);
        world.metrics.step(&report);
        Ok(StepDone {
            losses,
            vote,
            checkpoint,
        })
    }

    /// batch: this rank's captions for `step`, encoded once for all passes.
    fn batch(&self, world: &mut World, step: u64) -> Result<Batch, TrainError> {
        let batch = world.parts.feed.captions(step)?;
        let per_rank = world.latent_shape[0] as usize;
        if batch.step != step || batch.captions.len() != per_rank {
            return Err(TrainError::Invalid(format!(
                "the caption feed gave {} captions of step {} for step {step}, \
                 a per-rank batch of {per_rank}",
                batch.captions.len(),
                batch.step
            )));
        }
        let text = &self.networks.text;
        let encoded = text.encode(&batch.captions)?;
        if encoded.num_truncated > 0 {
            tracing::debug!(
                step,
                num = encoded.num_truncated,
                "captions truncated to 77 tokens"
            );
        }
        Ok(Batch {
            text: Conditions {
                cond: encoded.cond,
                uncond: text.uncond().shallow_clone(),
            },
            caption_ids: batch.caption_ids,
            num_truncated: encoded.num_truncated as u64,
        })
    }

    /// vsd step: draws from (seed, step, rank), both losses, both backwards.
    fn vsd_step(
        &self,
        world: &World,
        step: u64,
        text: &Conditions,
    ) -> Result<DeviceStepOutput, TrainError> {
        let draws = Draws::sample(
            self.draw_key(step),
            &world.latent_shape,
            world.slice(),
            &DrawSpec::at_step(&self.cfg.method, step, self.cfg.train.max_steps),
            self.device,
        )?;
        Ok(self
            .networks
            .step(self.optimizers.loss_scales())
            .run_on_device(text, &draws, self.cfg.train.micro_batch)?)
    }

    /// fake-score updates: the fake score's further updates of this
    /// iteration (`method.fake_score.updates_per_step` - 1; none by
    /// default) on the student's draw `x0`, each with its own (t', eps',
    /// null) from (seed, step, update), averaged over ranks, voted finite,
    /// clipped and stepped like the first. A non-finite one is skipped
    /// everywhere. Returns the seconds spent in collectives.
    fn fake_score_updates(
        &mut self,
        world: &mut World,
        step: u64,
        text: &Conditions,
        x0: &Tensor,
    ) -> Result<f64, TrainError> {
        let mut collective_s = 0.0;
        for update in 1..self.cfg.method.fake_score.updates_per_step {
            let draws = FakeScoreDraws::sample_extra(
                self.draw_key(step),
                update,
                &world.latent_shape,
                world.slice(),
                self.cfg.method.null_condition_prob,
                self.device,
            )?;
            self.optimizers.ready_fake_score_grads();
            let loss = self
                .networks
                .step(self.optimizers.loss_scales())
                .update_fake_score(text, x0, &draws, self.cfg.train.micro_batch)?;
            let t0 = Instant::now();
            let applied = self
                .optimizers
                .apply_fake_score(world.parts.sync.as_mut(), &loss)?;
            collective_s += t0.elapsed().as_secs_f64();
            if !applied {
                tracing::warn!(
                    step,
                    update,
                    "non-finite fake-score loss or gradient: update skipped"
                );
            }
        }
        Ok(collective_s)
    }

    /// EMA of the student.
    fn ema_update(&mut self) {
        // Sharded, the EMA of the slice moved with the student's step.
        if let Some(shard) = self.optimizers.shard() {
            self.state.ema_updates = shard.student.num_ema_updates().unwrap_or(0);
            return;
        }
        if let Some(ema) = self.ema.as_mut() {
            ema.update(&self.networks.student.variables());
        }
        self.state.ema_updates = self.ema.as_ref().map_or(0, Ema::num_updates);
    }

    /// sample: rank 0's pictures of the student (EMA weights) after step
    /// `done`, when `train.sample_every_steps` asks for them. A picture
    /// that cannot be written is reported and the run goes on: it is worth
    /// less than the training.
    fn sample(&mut self, world: &mut World, done: u64) {
        let Some(samples) = self.samples.as_ref() else {
            return;
        };
        if !samples.due(done, self.cfg.train.max_steps) {
            return;
        }
        // Sharded, every rank gathers the EMA weights for rank 0's pictures
        // (only rank 0 keeps them, in host memory).
        let mut gathered_ema = None;
        if let Some(shard) = self.optimizers.shard() {
            let keep = world.rank() == 0;
            match shard.student.gather_ema(world.parts.sync.as_mut(), keep) {
                Ok(Some(named)) => {
                    gathered_ema = Some(Ema::new(named, self.cfg.method.ema.max_decay));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(step = done, "samples not written: {e}");
                    return;
                }
            }
        }
        if world.rank() != 0 {
            return;
        }
        let t0 = Instant::now();
        let draw = match &self.networks.vsd.few_step {
            Some(chain) => super::samples::StudentDraw::Chain(chain, &self.networks.schedule),
            None => super::samples::StudentDraw::OneStep(
                self.networks
                    .vsd
                    .one_step(self.networks.schedule.prediction_type()),
            ),
        };
        let written = samples.write(
            done,
            &self.networks.student,
            &self.networks.scores,
            gathered_ema.as_mut().or(self.ema.as_mut()),
            &draw,
            self.checkpointer.store(),
        );
        match written {
            Ok((name, png)) => {
                tracing::info!(
                    step = done,
                    file = %name,
                    seconds = format!("{:.2}", t0.elapsed().as_secs_f64()),
                    "samples written"
                );
                world.metrics.image(done, "samples", &png);
            }
            Err(e) => tracing::warn!(step = done, "samples not written: {e}"),
        }
    }

    /// The caption audit's line for a completed step: the captions, and a
    /// digest of the weights that train (student and fake score) after it,
    /// equal on every rank: replicas are bitwise identical.
    fn audit(&self, world: &mut World, step: u64, caption_ids: Vec<u64>) -> Result<(), TrainError> {
        let (rank, world_size) = (world.rank(), world.world_size());
        let Some(audit) = world.parts.audit.as_mut() else {
            return Ok(());
        };
        let mut hasher = sha2::Sha256::new();
        for named in [
            self.networks.student.named_parameters(),
            self.networks.scores.fake_parameters(),
        ] {
            let bytes = tensor_bytes::to_bytes(&named).map_err(CheckpointError::from)?;
            hasher.update(&bytes);
        }
        audit.record(&AuditEntry {
            generation: world.parts.generation,
            rank,
            world_size,
            step,
            caption_ids,
            weights_sha256: hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        })?;
        Ok(())
    }

    fn draw_key(&self, step: u64) -> DrawKey {
        DrawKey {
            seed: self.cfg.train.seed,
            step,
        }
    }

    /// The epoch and in-epoch caption index that step `step` starts at.
    fn feed_position(&self, world: &World, step: u64) -> (u64, u64) {
        let n = world.parts.feed.num_captions().max(1);
        let pos = step * u64::from(self.cfg.train.global_batch);
        (pos / n, pos % n)
    }

    pub fn config(&self) -> &JobConfig {
        &self.cfg
    }

    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// Both optimizers (their Adam states and, with fp16 loss scaling,
    /// their scalers).
    pub fn optimizers(&self) -> &Optimizers {
        &self.optimizers
    }

    /// The student: a full UNet, or LoRA adapters on the teacher's base.
    pub fn student(&self) -> &Student {
        &self.networks.student
    }

    /// The text encoder(s) the step's conditions come from.
    pub fn text(&self) -> &TextConditioner {
        &self.networks.text
    }

    /// The score networks (the teacher's base a LoRA student shares).
    pub fn scores(&self) -> &ScorePair {
        &self.networks.scores
    }

    /// The student's EMA; None with `method.ema.enabled: false`, and while
    /// `world.shard_state` shards it (each rank keeps its slice; the
    /// checkpoint and the sample step gather it: `ShardedNet::gather_ema`).
    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    /// The fake score's trainable tensors, sorted: the LoRA adapters by
    /// PEFT name, or the full copy's weights (`method.fake_score.kind: unet`).
    pub fn fake_score_parameters(&self) -> Vec<(String, Tensor)> {
        self.networks.scores.fake_parameters()
    }
}

/// `SWIFTBRUSH_FAULT_PANIC=RANK:STEP`: rank RANK panics at the start of step
/// STEP, as a bug or an allocation failure inside libtorch would. Only in
/// builds with the `fault-injection` feature (the tests' build).
#[cfg(feature = "fault-injection")]
fn panic_fault(rank: u64, step: u64) {
    let at = std::env::var("SWIFTBRUSH_FAULT_PANIC").ok();
    let at = at.as_deref().and_then(|v| v.split_once(':'));
    if at.and_then(|(r, s)| Some((r.parse::<u64>().ok()?, s.parse::<u64>().ok()?)))
        == Some((rank, step))
    {
        panic!("SWIFTBRUSH_FAULT_PANIC: rank {rank} panics at step {step}");
    }
}

#[cfg(not(feature = "fault-injection"))]
fn panic_fault(_rank: u64, _step: u64) {}

/// An error that only means the world is gone (a peer lost mid-collective)
/// ends the world as [`WorldEnd::Broken`]; any other is the run's.
fn world_gone_or(e: TrainError) -> Result<WorldEnd, TrainError> {
    if e.breaks_world() {
        Ok(WorldEnd::Broken {
            reason: e.to_string(),
        })
    } else {
        Err(e)
    }
}
