//! The SwiftBrush training loop, one rank's view. Named steps, in order:
//! build -> (per world: enter, load checkpoint) -> for each step: boundary
//! (the world's control), batch, vsd step, optimizer steps (with the step
//! vote), EMA, log, checkpoint, sample -> close. What differs between a single
//! process and a distributed rank is only the `WorldParts`: the caption
//! feed, the gradient sync, the checkpoint sink and the control. The models
//! stay loaded from one world to the next; each world restores the state
//! of its resume step. Building a trainer is in `load.rs`, restoring and
//! writing checkpoints in `persist.rs`.

use sha2::Digest;
use std::time::Instant;

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::run_store::RunStore;
use tch::{Device, Tensor};

use super::TrainError;
use super::caption_audit::AuditEntry;
use super::checkpoint::{CheckpointError, TrainState, Uploader};
use super::events::EventFile;
use super::gradient_sync::{GradientSync, StepVote, all_finite, gradients};
use super::progress::Progress;
use super::samples::TrainingSamples;
use super::text::TextConditioner;
use super::world::{Directive, Phase, StepReport, WorldEnd, WorldParts};
use crate::diffusion::NoiseSchedule;
use crate::ema::Ema;
use crate::optim::{Adam, clip_grad_norm};
use crate::roles::{Teachers, UNet};
use crate::vsd::{
    Conditions, DrawKey, DrawSpec, Draws, LoraDraws, RankSlice, VsdConfig, VsdLosses,
    lora_loss_backward, vsd_step_in_micro_batches,
};

/// Where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The newest valid checkpoint if the run directory has one, else fresh.
    Auto,
    /// Exactly this step's checkpoint (an error if it is not valid); step 0
    /// is the initial state.
    Step(u64),
}

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

pub struct Trainer {
    pub(super) cfg: JobConfig,
    pub(super) device: Device,
    pub(super) text: TextConditioner,
    pub(super) teacher: Teachers,
    pub(super) student: UNet,
    pub(super) schedule: NoiseSchedule,
    pub(super) vsd: VsdConfig,
    /// Latent shape of one sample: [C, h, w].
    pub(super) sample_shape: [i64; 3],
    pub(super) opt_student: Adam,
    pub(super) opt_lora: Adam,
    pub(super) ema: Ema,
    pub(super) store: RunStore,
    pub(super) uploader: Uploader,
    pub(super) state: TrainState,
    /// The models and optimizers still hold the state of a fresh build.
    pub(super) initial: bool,
    pub(super) last_checkpoint: Option<u64>,
    /// The step of the snapshot handed to the uploader last (each step is
    /// written once unless its upload did not land).
    pub(super) last_submitted: Option<u64>,
    pub(super) last_losses: Option<VsdLosses>,
    /// How long the newest checkpoint step held the training thread.
    pub(super) last_stall_ms: f64,
    pub(super) world: Option<ActiveWorld>,
    /// The sample step's prompts, noise and VAE (`train.sample_every_steps`).
    pub(super) samples: Option<TrainingSamples>,
}

/// The world the loop runs in now.
pub(super) struct ActiveWorld {
    pub(super) parts: WorldParts,
    /// [per-rank batch, C, h, w].
    pub(super) latent_shape: [i64; 4],
    pub(super) rank: u64,
    pub(super) world_size: u64,
    /// Rank 0 shows progress; the others stay quiet.
    pub(super) progress: Option<Progress>,
    /// Rank 0's TensorBoard file for this world (`logging.tensorboard`).
    pub(super) events: Option<EventFile>,
}

/// One step's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepDone {
    pub losses: VsdLosses,
    /// The combined vote of every rank.
    pub vote: StepVote,
}

impl Trainer {
    /// Whether the models still hold the state of a fresh build.
    pub fn is_initial(&self) -> bool {
        self.initial
    }

    /// Plugs in a world's parts; training continues from the current state
    /// (see [`Trainer::restore`]).
    pub fn enter(&mut self, parts: WorldParts) -> Result<(), TrainError> {
        let rank = parts.sync.rank();
        let world_size = parts.sync.world_size();
        let latent_shape = per_rank_shape(&self.cfg, self.sample_shape, world_size)?;
        // A step that broke half-way may have left gradients behind.
        self.opt_student.zero_grad();
        self.opt_lora.zero_grad();
        self.last_submitted = None;
        let progress = (rank == 0)
            .then(|| Progress::new(self.cfg.train.max_steps, self.cfg.logging.every_steps));
        let events = (rank == 0 && self.cfg.logging.tensorboard).then(|| {
            let tag = format!("{}.g{}", std::process::id(), parts.generation);
            EventFile::new(&crate::device::host_name(), &tag)
        });
        self.world = Some(ActiveWorld {
            parts,
            latent_shape,
            rank,
            world_size,
            progress,
            events,
        });
        Ok(())
    }

    /// Leaves the current world (its collective and feed are dropped).
    pub fn leave(&mut self) -> Option<WorldParts> {
        self.world.take().map(|w| w.parts)
    }

    /// A single process: runs its world to `train.max_steps`.
    pub fn run(&mut self) -> Result<TrainSummary, TrainError> {
        let started = Instant::now();
        let start_step = self.state.step;
        match self.run_world()? {
            WorldEnd::Completed => Ok(self.summary(start_step, started.elapsed().as_secs_f64())),
            other => Err(TrainError::Invalid(format!(
                "the run ended early: {other:?}"
            ))),
        }
    }

    /// What the run did since `start_step`.
    pub fn summary(&self, start_step: u64, seconds: f64) -> TrainSummary {
        TrainSummary {
            start_step,
            end_step: self.state.step,
            last_losses: self.last_losses,
            num_nonfinite_steps: self.state.num_nonfinite_steps,
            num_truncated_captions: self.state.num_truncated_captions,
            last_checkpoint: self.last_checkpoint,
            seconds,
        }
    }

    /// Runs the current world's loop until its control or its parts end it.
    /// Errors that only mean the world is gone end it as
    /// [`WorldEnd::Broken`]; other errors are the run's.
    pub fn run_world(&mut self) -> Result<WorldEnd, TrainError> {
        let max_steps = self.cfg.train.max_steps;
        let every = self.cfg.checkpoint.every_steps.max(1);
        let first = self.state.step;
        if let Some(p) = self.active()?.progress.as_ref() {
            p.start(first);
        }
        self.set_phase(Phase::Training);
        loop {
            let step = self.state.step;
            if let Some(landing) = self.uploader.poll()? {
                self.landed(landing);
            }
            let directive = if step < max_steps {
                self.active()?.parts.control.boundary(step)
            } else {
                // The final checkpoint lands before the wait for the end.
                self.close()?;
                self.set_phase(Phase::Idle);
                self.active()?.parts.control.after_last_step(step)
            };
            match directive {
                Directive::Continue => {}
                Directive::Checkpoint => self.checkpoint()?,
                Directive::Stop(reason) => {
                    self.close()?;
                    if let Some(p) = self.active()?.progress.as_ref() {
                        p.finish();
                    }
                    return Ok(if step >= max_steps {
                        WorldEnd::Completed
                    } else {
                        WorldEnd::Stopped { reason }
                    });
                }
                Directive::Abort(reason) => return Ok(WorldEnd::Broken { reason }),
            }
            if step >= max_steps {
                continue;
            }
            let done = match self.train_step(step) {
                Ok(done) => done,
                Err(e) if e.breaks_world() => {
                    return Ok(WorldEnd::Broken {
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            };
            if done.vote.preempt {
                return self.preempted();
            }
            if (step + 1).is_multiple_of(every) || step + 1 == max_steps {
                self.checkpoint()?;
                self.write_events(true);
            }
            self.sample(step + 1);
        }
    }

    /// Writes rank 0's TensorBoard file when it changed and a minute has
    /// passed, or now with `force`. A file that cannot be written is
    /// reported and training goes on.
    pub(super) fn write_events(&mut self, force: bool) {
        let Some(w) = self.world.as_mut() else {
            return;
        };
        let Some(events) = w.events.as_mut() else {
            return;
        };
        let name = events.name().to_owned();
        if let Some(bytes) = events.take_due(force)
            && let Err(e) = self
                .store
                .put_run_file(&name, bytes::Bytes::copy_from_slice(bytes))
        {
            tracing::warn!(file = %name, "TensorBoard events not written: {e}");
        }
    }

    /// sample: rank 0's pictures of the student (EMA weights) after step
    /// `done`, when `train.sample_every_steps` asks for them. A picture
    /// that cannot be written is reported and the run goes on: it is worth
    /// less than the training.
    fn sample(&mut self, done: u64) {
        let Some(samples) = self.samples.as_ref() else {
            return;
        };
        let rank = self.world.as_ref().map_or(0, |w| w.rank);
        if rank != 0 || !samples.due(done, self.cfg.train.max_steps) {
            return;
        }
        let t0 = Instant::now();
        match samples.write(done, &self.student, &mut self.ema, &self.vsd, &self.store) {
            Ok(name) => tracing::info!(
                step = done,
                file = %name,
                seconds = format!("{:.2}", t0.elapsed().as_secs_f64()),
                "samples written"
            ),
            Err(e) => tracing::warn!(step = done, "samples not written: {e}"),
        }
    }

    /// One iteration: batch, vsd step, optimizer steps with the step vote,
    /// further LoRA updates, EMA; advances the state to `step + 1`.
    pub fn train_step(&mut self, step: u64) -> Result<StepDone, TrainError> {
        let t0 = Instant::now();
        let (text, caption_ids, num_truncated) = self.batch(step)?;
        let (losses, x0) = self.vsd_step(step, &text)?;
        let preempt = self.active()?.parts.control.preempt_requested();
        let (vote, mut allreduce_s) = self.optimizer_steps(
            &losses,
            StepVote {
                finite: true,
                preempt,
                num_truncated,
            },
        )?;
        self.initial = false;
        if vote.finite {
            allreduce_s += self.lora_updates(step, &text, &x0)?;
            self.ema_update();
        } else {
            self.state.num_nonfinite_steps += 1;
            tracing::warn!(
                step,
                vsd = losses.vsd,
                lora = losses.lora,
                "non-finite loss or gradient: step skipped"
            );
        }
        self.state.num_truncated_captions += vote.num_truncated;
        self.state.step = step + 1;
        (self.state.epoch, self.state.caption_index) = self.feed_position(step + 1)?;
        self.last_losses = Some(losses);
        self.audit(step, caption_ids)?;
        let seconds = t0.elapsed().as_secs_f64();
        let checkpoint_stall_ms = self.last_stall_ms;
        let w = self.active()?;
        let images = (w.latent_shape[0] as u64 * w.world_size) as f64;
        let report = StepReport {
            step: step + 1,
            losses,
            step_ms: seconds * 1e3,
            allreduce_ms: allreduce_s * 1e3,
            samples_per_s: images / seconds.max(1e-9),
            checkpoint_stall_ms,
        };
        w.parts.control.step_done(&report);
        if let Some(p) = w.progress.as_ref() {
            p.step(step + 1, &losses, report.samples_per_s);
        }
        if let Some(events) = w.events.as_mut() {
            events.scalars(
                step + 1,
                &[
                    ("loss/vsd", losses.vsd),
                    ("loss/lora", losses.lora),
                    ("perf/images_per_s", report.samples_per_s),
                    ("perf/step_ms", report.step_ms),
                    ("perf/allreduce_ms", report.allreduce_ms),
                ],
            );
        }
        self.write_events(false);
        Ok(StepDone { losses, vote })
    }

    /// Images per step over all ranks.
    pub fn images_per_step(&self) -> u64 {
        self.world
            .as_ref()
            .map_or(0, |w| w.latent_shape[0] as u64 * w.world_size)
    }

    pub(super) fn active(&mut self) -> Result<&mut ActiveWorld, TrainError> {
        self.world.as_mut().ok_or(TrainError::NoWorld)
    }

    pub(super) fn set_phase(&mut self, phase: Phase) {
        if let Some(w) = self.world.as_mut() {
            w.parts.control.phase(phase);
        }
    }

    /// batch: this rank's captions for `step`, encoded once for all passes;
    /// also their ids and how many were truncated.
    fn batch(&mut self, step: u64) -> Result<(Conditions, Vec<u64>, u64), TrainError> {
        let w = self.world.as_mut().ok_or(TrainError::NoWorld)?;
        let batch = w.parts.feed.captions(step)?;
        let per_rank = w.latent_shape[0] as usize;
        if batch.step != step || batch.captions.len() != per_rank {
            return Err(TrainError::Invalid(format!(
                "the caption feed gave {} captions of step {} for step {step}, \
                 a per-rank batch of {per_rank}",
                batch.captions.len(),
                batch.step
            )));
        }
        let encoded = self.text.encode(&batch.captions)?;
        if encoded.num_truncated > 0 {
            tracing::debug!(
                step,
                num = encoded.num_truncated,
                "captions truncated to 77 tokens"
            );
        }
        Ok((
            Conditions {
                cond: encoded.cond,
                uncond: self.text.uncond().shallow_clone(),
            },
            batch.caption_ids,
            encoded.num_truncated as u64,
        ))
    }

    /// The caption audit's line for a completed step: the captions, and a
    /// digest of the weights that train (student and adapters) after it,
    /// equal on every rank: replicas are bitwise identical.
    fn audit(&mut self, step: u64, caption_ids: Vec<u64>) -> Result<(), TrainError> {
        let Some(w) = self.world.as_mut() else {
            return Ok(());
        };
        let Some(audit) = w.parts.audit.as_mut() else {
            return Ok(());
        };
        let mut hasher = sha2::Sha256::new();
        for named in [
            self.student.named_parameters(),
            self.teacher.fake_parameters(),
        ] {
            let bytes = super::tensor_bytes::to_bytes(&named).map_err(CheckpointError::from)?;
            hasher.update(&bytes);
        }
        audit.record(&AuditEntry {
            generation: w.parts.generation,
            rank: w.rank,
            world_size: w.world_size,
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

    /// vsd step: draws from (seed, step, rank), both losses, both backwards.
    /// Also returns the student's detached draw, for `lora_updates`.
    fn vsd_step(
        &mut self,
        step: u64,
        text: &Conditions,
    ) -> Result<(VsdLosses, Tensor), TrainError> {
        let w = self.world.as_ref().ok_or(TrainError::NoWorld)?;
        let m = &self.cfg.method;
        let draws = Draws::sample(
            DrawKey {
                seed: self.cfg.train.seed,
                step,
            },
            &w.latent_shape,
            RankSlice {
                rank: w.rank,
                world_size: w.world_size,
            },
            &DrawSpec::at_step(m, step, self.cfg.train.max_steps),
            self.device,
        );
        Ok(vsd_step_in_micro_batches(
            &self.student,
            &self.teacher,
            self.schedule.alphas_cumprod(),
            &self.vsd,
            text,
            &draws,
            self.cfg.train.micro_batch,
        ))
    }

    /// lora updates: the LoRA teacher's further updates of this iteration
    /// (`method.lora.updates_per_step` - 1; none by default) on the
    /// student's draw `x0`, each with its own (t', eps', null) from
    /// (seed, step, update), averaged over ranks, voted finite, clipped and
    /// stepped like the first. A non-finite one is skipped everywhere.
    /// Returns the seconds spent in collectives.
    fn lora_updates(
        &mut self,
        step: u64,
        text: &Conditions,
        x0: &Tensor,
    ) -> Result<f64, TrainError> {
        let updates = self.cfg.method.lora.updates_per_step;
        let clip = self.cfg.method.lora.optimizer.grad_clip;
        let null_prob = self.cfg.method.null_condition_prob;
        let seed = self.cfg.train.seed;
        let w = self.world.as_mut().ok_or(TrainError::NoWorld)?;
        let mut collective_s = 0.0;
        for update in 1..updates {
            let draws = LoraDraws::sample_extra(
                DrawKey { seed, step },
                update,
                &w.latent_shape,
                RankSlice {
                    rank: w.rank,
                    world_size: w.world_size,
                },
                null_prob,
                self.device,
            );
            let loss = lora_loss_backward(
                &self.teacher,
                self.schedule.alphas_cumprod(),
                &self.vsd,
                text,
                x0,
                &draws,
                self.cfg.train.micro_batch,
            );
            let t0 = Instant::now();
            let grads = gradients(self.opt_lora.params());
            w.parts.sync.all_reduce_mean(&grads)?;
            let vote = w.parts.sync.vote(StepVote {
                finite: loss.is_finite() && all_finite(&grads),
                preempt: false,
                num_truncated: 0,
            })?;
            collective_s += t0.elapsed().as_secs_f64();
            if vote.finite {
                clip_grad_norm(self.opt_lora.params(), clip);
                self.opt_lora.step();
            } else {
                tracing::warn!(
                    step,
                    update,
                    loss,
                    "non-finite LoRA loss or gradient: update skipped"
                );
            }
            self.opt_lora.zero_grad();
        }
        Ok(collective_s)
    }

    /// optimizer steps: average gradients over ranks, vote (all finite?
    /// anyone leaving? captions truncated), clip, Adam for the student and
    /// for the adapters. Returns the combined vote and the seconds spent in
    /// collectives.
    fn optimizer_steps(
        &mut self,
        losses: &VsdLosses,
        mine: StepVote,
    ) -> Result<(StepVote, f64), TrainError> {
        let clips = (
            self.cfg.method.student.grad_clip,
            self.cfg.method.lora.optimizer.grad_clip,
        );
        let w = self.world.as_mut().ok_or(TrainError::NoWorld)?;
        let t0 = Instant::now();
        let vote = apply_updates(
            &mut self.opt_student,
            &mut self.opt_lora,
            w.parts.sync.as_mut(),
            losses,
            clips,
            mine,
        )?;
        Ok((vote, t0.elapsed().as_secs_f64()))
    }

    /// EMA of the student.
    fn ema_update(&mut self) {
        if self.cfg.method.ema.enabled {
            self.ema.update(&self.student.vs.variables());
        } else {
            // Exports read the EMA weights: without averaging they are the
            // student's own.
            self.ema = Ema::new(self.student.named_parameters(), 0.0);
        }
        self.state.ema_updates = self.ema.num_updates();
    }

    fn feed_position(&self, step: u64) -> Result<(u64, u64), TrainError> {
        let w = self.world.as_ref().ok_or(TrainError::NoWorld)?;
        let n = w.parts.feed.num_captions().max(1);
        let pos = step * u64::from(self.cfg.train.global_batch);
        Ok((pos / n, pos % n))
    }

    /// The newest checkpoint this trainer knows to be committed.
    pub fn last_checkpoint(&self) -> Option<u64> {
        self.last_checkpoint
    }

    pub fn config(&self) -> &JobConfig {
        &self.cfg
    }

    pub fn state(&self) -> &TrainState {
        &self.state
    }

    pub fn student(&self) -> &UNet {
        &self.student
    }

    /// The fake score's trainable tensors, sorted: the LoRA adapters by
    /// PEFT name, or the full copy's weights (`method.fake_score: unet`).
    pub fn adapters(&self) -> Vec<(String, Tensor)> {
        self.teacher.fake_parameters()
    }
}

/// Averages both networks' gradients over the ranks, then votes (`mine`,
/// with `finite` set from this rank's losses and averaged gradients); only
/// if every rank's are finite, clips and steps both optimizers. Gradients
/// are zeroed either way. Returns the combined vote: a NaN anywhere skips
/// the step everywhere, so replicas stay identical.
pub fn apply_updates(
    opt_student: &mut Adam,
    opt_lora: &mut Adam,
    sync: &mut dyn GradientSync,
    losses: &VsdLosses,
    (student_clip, lora_clip): (f64, f64),
    mut mine: StepVote,
) -> Result<StepVote, TrainError> {
    let student_grads = gradients(opt_student.params());
    let lora_grads = gradients(opt_lora.params());
    sync.all_reduce_mean(&student_grads)?;
    sync.all_reduce_mean(&lora_grads)?;
    mine.finite = losses.all_finite() && all_finite(&student_grads) && all_finite(&lora_grads);
    let vote = sync.vote(mine)?;
    if vote.finite {
        clip_grad_norm(opt_student.params(), student_clip);
        opt_student.step();
        clip_grad_norm(opt_lora.params(), lora_clip);
        opt_lora.step();
    }
    opt_student.zero_grad();
    opt_lora.zero_grad();
    Ok(vote)
}

/// [per-rank batch, C, h, w].
fn per_rank_shape(
    cfg: &JobConfig,
    [c, h, w]: [i64; 3],
    world_size: u64,
) -> Result<[i64; 4], TrainError> {
    let global = u64::from(cfg.train.global_batch);
    if world_size == 0 || global % world_size != 0 {
        return Err(TrainError::Invalid(format!(
            "train.global_batch = {global} is not divisible by the world size {world_size}"
        )));
    }
    Ok([(global / world_size) as i64, c, h, w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamConfig;
    use crate::trainer::gradient_sync::SingleProcess;
    use tch::Kind;

    fn adam(p: &Tensor) -> Adam {
        Adam::new(
            [("w".to_owned(), p.shallow_clone())],
            AdamConfig {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )
    }

    #[test]
    fn non_finite_losses_or_gradients_skip_both_updates() {
        let s = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let l = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let (mut os, mut ol) = (adam(&s), adam(&l));
        let losses = |vsd: f64| VsdLosses { vsd, lora: 0.5 };
        let vote = StepVote {
            finite: true,
            preempt: false,
            num_truncated: 2,
        };

        // A NaN loss: nothing moves, gradients are cleared.
        (&s * 2.0).sum(Kind::Float).backward();
        (&l * 2.0).sum(Kind::Float).backward();
        let applied = apply_updates(
            &mut os,
            &mut ol,
            &mut SingleProcess,
            &losses(f64::NAN),
            (1.0, 1.0),
            vote,
        )
        .unwrap();
        assert!(!applied.finite);
        assert_eq!(applied.num_truncated, 2, "the counts travel with the vote");
        assert_eq!(Vec::<f32>::try_from(s.detach()).unwrap(), vec![1.0, 2.0]);
        assert_eq!(os.num_steps(), 0);
        assert_eq!(s.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);

        // A finite loss but an infinite gradient: skipped too.
        (&s * f64::INFINITY).sum(Kind::Float).backward();
        let applied = apply_updates(
            &mut os,
            &mut ol,
            &mut SingleProcess,
            &losses(0.1),
            (1.0, 1.0),
            vote,
        )
        .unwrap();
        assert!(!applied.finite);
        assert_eq!(Vec::<f32>::try_from(l.detach()).unwrap(), vec![3.0]);

        // All finite: both networks step.
        (&s * 2.0).sum(Kind::Float).backward();
        (&l * 2.0).sum(Kind::Float).backward();
        let applied = apply_updates(
            &mut os,
            &mut ol,
            &mut SingleProcess,
            &losses(0.1),
            (1.0, 1.0),
            vote,
        )
        .unwrap();
        assert!(applied.finite);
        assert_eq!(os.num_steps(), 1);
        assert_eq!(ol.num_steps(), 1);
        assert!(Vec::<f32>::try_from(l.detach()).unwrap()[0] < 3.0);
    }
}
