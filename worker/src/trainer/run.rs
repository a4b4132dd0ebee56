//! The SwiftBrush training loop, one process's view. Named steps, in order:
//! build -> load checkpoint -> for each step: batch, vsd step, optimizer
//! steps, EMA, log, checkpoint -> close. Captions and gradient averaging come
//! through traits (`CaptionFeed`, `GradientSync`), so the distributed
//! runtime swaps only those.

use std::collections::HashMap;
use std::time::Instant;

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{Dtype, EmaConfig};
use swiftbrush_proto::run_store::{ResumeFrom, RunStore, RunStoreError};
use tch::{Device, Tensor};

use super::caption_feed::{CaptionFeed, FeedError};
use super::checkpoint::{
    self, CheckpointError, EMA, LORA, OPTIM_LORA, OPTIM_STUDENT, STUDENT, Snapshot, TrainState,
    Uploader,
};
use super::gradient_sync::{GradientSync, SyncError, all_finite, gradients};
use super::progress::Progress;
use super::text::{TextConditioner, TextError};
use crate::diffusion::{NoiseSchedule, PredictionType, ScheduleError, SchedulerConfig};
use crate::ema::{Ema, EmaError};
use crate::lora::LoraSpec;
use crate::models::vae::AutoencoderKLConfig;
use crate::models::weights;
use crate::optim::{Adam, AdamConfig, OptimError, clip_grad_norm};
use crate::pipeline::{DiffusersFolder, teacher_fingerprint};
use crate::roles::{RoleError, TeacherUNet, UNet};
use crate::vsd::{
    Conditions, DrawKey, Draws, Prediction, RankSlice, VsdConfig, VsdLosses, vsd_step,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("teacher {teacher}: {source}")]
    Teacher {
        teacher: String,
        #[source]
        source: RoleError,
    },
    #[error(transparent)]
    Folder(#[from] crate::pipeline::FolderError),
    #[error(transparent)]
    Fingerprint(#[from] crate::pipeline::FingerprintError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Store(#[from] RunStoreError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Ema(#[from] EmaError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(
        "checkpoint step {step} in {run_dir} was distilled from another teacher \
         (fingerprint {found}, this teacher is {expected}); use a new run directory \
         or the teacher it was trained from"
    )]
    TeacherMismatch {
        step: u64,
        run_dir: String,
        found: String,
        expected: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// Where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The newest valid checkpoint if the run directory has one, else fresh.
    Auto,
    /// Exactly this step's checkpoint (an error if it is not valid).
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

pub struct Trainer<F: CaptionFeed, S: GradientSync> {
    cfg: JobConfig,
    device: Device,
    text: TextConditioner,
    teacher: TeacherUNet,
    student: UNet,
    schedule: NoiseSchedule,
    vsd: VsdConfig,
    /// Latent shape of one rank's batch.
    latent_shape: [i64; 4],
    opt_student: Adam,
    opt_lora: Adam,
    ema: Ema,
    feed: F,
    sync: S,
    store: RunStore,
    uploader: Uploader,
    state: TrainState,
    progress: Progress,
    last_checkpoint: Option<u64>,
}

impl<F: CaptionFeed, S: GradientSync> Trainer<F, S> {
    /// Loads the teacher, builds the LoRA teacher and the student, opens the
    /// run directory and resumes from a checkpoint if there is one.
    pub fn build(
        cfg: JobConfig,
        device: Device,
        feed: F,
        sync: S,
        resume: Resume,
    ) -> Result<Self, TrainError> {
        let teacher_dir = cfg
            .model
            .teacher
            .clone()
            .ok_or_else(|| TrainError::Invalid("model.teacher is not set".to_owned()))?;
        let folder = DiffusersFolder::open(std::path::Path::new(&teacher_dir))?;
        let fingerprint = teacher_fingerprint(folder.root())?;
        let teacher_err = |source| TrainError::Teacher {
            teacher: teacher_dir.clone(),
            source,
        };

        let mut teacher_unet = UNet::load(&folder, device).map_err(teacher_err)?;
        let student = teacher_unet.duplicate().map_err(teacher_err)?;
        // set_kind, not bfloat16()/half(): those convert the weights but leave
        // the store's kind at float32, and UNet::predict casts its inputs to
        // the store's kind (a bf16 teacher without autocast then fails with
        // "mat1 and mat2 must have the same dtype").
        match cfg.precision.teacher_dtype {
            Dtype::Fp32 => {}
            Dtype::Bf16 => teacher_unet.vs.set_kind(tch::Kind::BFloat16),
            Dtype::Fp16 => teacher_unet.vs.set_kind(tch::Kind::Half),
        }
        // Adapters are initialised from the run's seed: a fresh run is
        // reproducible, a resumed one loads them.
        tch::manual_seed(cfg.train.seed as i64);
        let teacher = TeacherUNet::new(teacher_unet, &LoraSpec::from(&cfg.method.lora))
            .map_err(teacher_err)?;
        let text = TextConditioner::load(&folder, device)?;

        let sched_cfg = SchedulerConfig::from_file(
            &folder
                .component("scheduler")?
                .dir
                .join("scheduler_config.json"),
        )?;
        let schedule = NoiseSchedule::new(&sched_cfg, device)?;
        let prediction = match schedule.prediction_type() {
            PredictionType::Epsilon => Prediction::Epsilon,
            PredictionType::VPrediction => Prediction::VPrediction,
            PredictionType::Sample => {
                return Err(TrainError::Invalid(format!(
                    "{}: prediction_type \"sample\" teachers are not supported by VSD \
                     (epsilon and v_prediction are)",
                    teacher_dir
                )));
            }
        };
        let m = &cfg.method;
        let student_alpha_bar = if m.student_alpha_bar_from_schedule {
            schedule.alpha_bar(i64::from(m.student_timestep))?
        } else {
            m.student_alpha_bar
        };
        let vsd = VsdConfig {
            student_timestep: i64::from(m.student_timestep),
            student_alpha_bar,
            guidance_scale: m.guidance_scale,
            prediction,
            teacher_autocast: crate::precision::teacher_autocast(&cfg.precision, device)
                .map_err(|e| TrainError::Invalid(e.to_string()))?,
        };

        let latent_shape = latent_shape(&cfg, &folder, &student, sync.world_size())?;
        let student_params: Vec<(String, Tensor)> = sorted(student.vs.variables());
        let opt_student = Adam::new(
            student_params
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone())),
            AdamConfig::from(&m.student),
        );
        let opt_lora = Adam::new(
            teacher.lora.named_parameters(),
            AdamConfig::from(&m.lora.optimizer),
        );
        let ema = Ema::new(student_params, ema_decay(&m.ema));

        let store = RunStore::open(&cfg.checkpoint.run_dir)?;
        let uploader = Uploader::new(store.clone(), cfg.checkpoint.keep_last as usize);
        let state = TrainState {
            step: 0,
            epoch: 0,
            caption_index: 0,
            num_nonfinite_steps: 0,
            num_truncated_captions: 0,
            ema_updates: 0,
            seed: cfg.train.seed,
            config_fingerprint: cfg.fingerprint(),
            teacher_fingerprint: fingerprint,
            teacher: teacher_dir,
        };
        let progress = Progress::new(cfg.train.max_steps, cfg.logging.every_steps);
        let mut trainer = Self {
            cfg,
            device,
            text,
            teacher,
            student,
            schedule,
            vsd,
            latent_shape,
            opt_student,
            opt_lora,
            ema,
            feed,
            sync,
            store,
            uploader,
            state,
            progress,
            last_checkpoint: None,
        };
        trainer.load_checkpoint(resume)?;
        if trainer.sync.rank() == 0 {
            trainer
                .store
                .put_run_file("config.yaml", bytes::Bytes::from(trainer.cfg.to_yaml()))?;
        }
        Ok(trainer)
    }

    /// Restores every piece of state from the chosen checkpoint.
    fn load_checkpoint(&mut self, resume: Resume) -> Result<(), TrainError> {
        let manifest = match resume {
            Resume::Step(s) => self.store.resolve(ResumeFrom::Step(s))?,
            Resume::Auto => match self.store.latest_valid()? {
                Some(m) => m,
                None => return Ok(()),
            },
        };
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
        self.teacher.lora.load(&take(&mut restored, LORA))?;
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
        self.last_checkpoint = Some(manifest.step);
        tracing::info!(step = manifest.step, run_dir = %self.cfg.checkpoint.run_dir, "resumed from checkpoint");
        Ok(())
    }

    /// Runs from the current step to `train.max_steps`.
    pub fn run(&mut self) -> Result<TrainSummary, TrainError> {
        let started = Instant::now();
        let start_step = self.state.step;
        let max_steps = self.cfg.train.max_steps;
        let every = self.cfg.checkpoint.every_steps;
        self.progress.start(start_step);
        let mut last_losses = None;
        for step in start_step..max_steps {
            let t0 = Instant::now();
            let losses = self.train_step(step)?;
            last_losses = Some(losses);
            let images = self.latent_shape[0] as f64 * self.sync.world_size() as f64;
            self.progress
                .step(step + 1, &losses, images / t0.elapsed().as_secs_f64());
            if (step + 1) % every == 0 || step + 1 == max_steps {
                self.checkpoint()?;
            }
        }
        self.close()?;
        self.progress.finish();
        Ok(TrainSummary {
            start_step,
            end_step: self.state.step,
            last_losses,
            num_nonfinite_steps: self.state.num_nonfinite_steps,
            num_truncated_captions: self.state.num_truncated_captions,
            last_checkpoint: self.last_checkpoint,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One iteration: batch, vsd step, optimizer steps, EMA; advances the
    /// state to `step + 1`.
    pub fn train_step(&mut self, step: u64) -> Result<VsdLosses, TrainError> {
        let text = self.batch(step)?;
        let losses = self.vsd_step(step, &text);
        if self.optimizer_steps(&losses)? {
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
        self.state.step = step + 1;
        (self.state.epoch, self.state.caption_index) = self.feed_position(step + 1);
        Ok(losses)
    }

    /// Images per step over all ranks.
    pub fn images_per_step(&self) -> u64 {
        self.latent_shape[0] as u64 * self.sync.world_size()
    }

    /// batch: this rank's captions for `step`, encoded once for all passes.
    fn batch(&mut self, step: u64) -> Result<Conditions, TrainError> {
        let captions = self.feed.captions(step)?;
        let encoded = self.text.encode(&captions)?;
        if encoded.num_truncated > 0 {
            self.state.num_truncated_captions += encoded.num_truncated as u64;
            tracing::debug!(
                step,
                num = encoded.num_truncated,
                "captions truncated to 77 tokens"
            );
        }
        Ok(Conditions {
            cond: encoded.cond,
            uncond: self.text.uncond().shallow_clone(),
        })
    }

    /// vsd step: draws from (seed, step, rank), both losses, both backwards.
    fn vsd_step(&mut self, step: u64, text: &Conditions) -> VsdLosses {
        let m = &self.cfg.method;
        let draws = Draws::sample(
            DrawKey {
                seed: self.cfg.train.seed,
                step,
            },
            &self.latent_shape,
            RankSlice {
                rank: self.sync.rank(),
                world_size: self.sync.world_size(),
            },
            (i64::from(m.min_timestep), i64::from(m.max_timestep)),
            m.null_condition_prob,
            self.device,
        );
        vsd_step(
            &self.student,
            &self.teacher,
            self.schedule.alphas_cumprod(),
            &self.vsd,
            text,
            &draws,
        )
    }

    /// optimizer steps: average gradients over ranks, agree that all is
    /// finite, clip, Adam for the student and for the adapters. Returns
    /// whether the updates were applied.
    fn optimizer_steps(&mut self, losses: &VsdLosses) -> Result<bool, TrainError> {
        let clips = (
            self.cfg.method.student.grad_clip,
            self.cfg.method.lora.optimizer.grad_clip,
        );
        apply_updates(
            &mut self.opt_student,
            &mut self.opt_lora,
            &mut self.sync,
            losses,
            clips,
        )
    }

    /// EMA of the student.
    fn ema_update(&mut self) {
        if self.cfg.method.ema.enabled {
            self.ema.update(&self.student.vs.variables());
        } else {
            // Exports read the EMA weights: without averaging they are the
            // student's own.
            self.ema = Ema::new(sorted(self.student.vs.variables()), 0.0);
        }
        self.state.ema_updates = self.ema.num_updates();
    }

    /// checkpoint: rank 0 snapshots and hands the upload to its thread.
    fn checkpoint(&mut self) -> Result<(), TrainError> {
        if self.sync.rank() != 0 {
            return Ok(());
        }
        let snap = Snapshot::new(
            &self.state,
            [
                (STUDENT, sorted(self.student.vs.variables())),
                (EMA, self.ema.tensors()),
                (LORA, self.teacher.lora.named_parameters()),
                (OPTIM_STUDENT, self.opt_student.state_tensors()),
                (OPTIM_LORA, self.opt_lora.state_tensors()),
            ],
        )?;
        if let Some(done) = self.uploader.submit(snap)? {
            self.last_checkpoint = Some(done.step);
        }
        Ok(())
    }

    /// close: wait for the last upload.
    fn close(&mut self) -> Result<(), TrainError> {
        if let Some(done) = self.uploader.wait()? {
            self.last_checkpoint = Some(done.step);
        }
        Ok(())
    }

    fn feed_position(&self, step: u64) -> (u64, u64) {
        let n = self.feed.num_captions().max(1);
        let pos = step * u64::from(self.cfg.train.global_batch);
        (pos / n, pos % n)
    }

    pub fn state(&self) -> &TrainState {
        &self.state
    }

    pub fn student(&self) -> &UNet {
        &self.student
    }
}

/// Averages both networks' gradients over the ranks, then, only if every
/// rank's losses and gradients are finite, clips and steps both optimizers.
/// Gradients are zeroed either way. Returns whether the updates were applied:
/// a NaN anywhere skips the step everywhere, never applied, so replicas stay
/// identical.
pub fn apply_updates(
    opt_student: &mut Adam,
    opt_lora: &mut Adam,
    sync: &mut impl GradientSync,
    losses: &VsdLosses,
    (student_clip, lora_clip): (f64, f64),
) -> Result<bool, TrainError> {
    let student_grads = gradients(opt_student.params());
    let lora_grads = gradients(opt_lora.params());
    sync.all_reduce_mean(&student_grads)?;
    sync.all_reduce_mean(&lora_grads)?;
    let finite = losses.all_finite() && all_finite(&student_grads) && all_finite(&lora_grads);
    let ok = sync.all_ok(finite)?;
    if ok {
        clip_grad_norm(opt_student.params(), student_clip);
        opt_student.step();
        clip_grad_norm(opt_lora.params(), lora_clip);
        opt_lora.step();
    }
    opt_student.zero_grad();
    opt_lora.zero_grad();
    Ok(ok)
}

fn ema_decay(cfg: &EmaConfig) -> f64 {
    if cfg.enabled { cfg.max_decay } else { 0.0 }
}

fn sorted(map: HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// [per-rank batch, C, h, w]: latents are resolution / 8 with SD's VAE (the
/// VAE's scale factor in general), the pixels themselves without a VAE.
fn latent_shape(
    cfg: &JobConfig,
    folder: &DiffusersFolder,
    student: &UNet,
    world_size: u64,
) -> Result<[i64; 4], TrainError> {
    let scale = if folder.has("vae") {
        let vae = AutoencoderKLConfig::from_file(&folder.component("vae")?.config_path()?)?;
        1i64 << (vae.block_out_channels.len().saturating_sub(1))
    } else {
        1
    };
    let res = i64::from(cfg.model.resolution);
    if res % scale != 0 {
        return Err(TrainError::Invalid(format!(
            "model.resolution = {res} is not a multiple of the VAE's scale factor {scale}"
        )));
    }
    let global = u64::from(cfg.train.global_batch);
    if world_size == 0 || global % world_size != 0 {
        return Err(TrainError::Invalid(format!(
            "train.global_batch = {global} is not divisible by the world size {world_size}"
        )));
    }
    let per_rank = (global / world_size) as i64;
    Ok([
        per_rank,
        student.config.in_channels,
        res / scale,
        res / scale,
    ])
}

/// The device a config asks for.
pub fn device_of(cfg: &JobConfig) -> Result<Device, TrainError> {
    crate::device::parse_device(&cfg.train.device).map_err(|e| TrainError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
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

        // A NaN loss: nothing moves, gradients are cleared.
        (&s * 2.0).sum(Kind::Float).backward();
        (&l * 2.0).sum(Kind::Float).backward();
        let applied = apply_updates(
            &mut os,
            &mut ol,
            &mut SingleProcess,
            &losses(f64::NAN),
            (1.0, 1.0),
        )
        .unwrap();
        assert!(!applied);
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
        )
        .unwrap();
        assert!(!applied);
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
        )
        .unwrap();
        assert!(applied);
        assert_eq!(os.num_steps(), 1);
        assert_eq!(ol.num_steps(), 1);
        assert!(Vec::<f32>::try_from(l.detach()).unwrap()[0] < 3.0);
    }
}
