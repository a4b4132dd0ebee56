//! Building a trainer: the teacher folder loaded once, the LoRA teacher
//! overlaid on it, the student copied from it, the schedule, optimizers and
//! EMA, and the run directory opened; the state is the initial one.

use std::sync::Arc;

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{Dtype, EmaConfig, FakeScore};
use swiftbrush_proto::run_store::RunStore;
use tch::{Device, Tensor};

use super::caption_feed::CaptionFeed;
use super::checkpoint::{CommitToStore, TrainState, Uploader};
use super::gradient_sync::GradientSync;
use super::run::{Resume, Trainer};
use super::samples::TrainingSamples;
use super::world::{RunToEnd, WorldParts};
use super::{TextConditioner, TrainError};
use crate::diffusion::{NoiseSchedule, PredictionType, SchedulerConfig};
use crate::ema::Ema;
use crate::lora::LoraSpec;
use crate::models::vae::AutoencoderKLConfig;
use crate::optim::{Adam, AdamConfig};
use crate::pipeline::{DiffusersFolder, teacher_fingerprint};
use crate::roles::{FullFakeScore, TeacherUNet, Teachers, UNet};
use crate::vsd::{Prediction, VsdConfig};

impl Trainer {
    /// A single process: loads everything, enters its only world (captions
    /// from `feed`, gradients through `sync`, checkpoints committed by this
    /// process) at `resume`, and writes the resolved config into the run
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
        let mut trainer = Self::load(cfg, device)?;
        trainer.restore(resume)?;
        trainer.enter(WorldParts {
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
            trainer
                .store
                .put_run_file("config.yaml", bytes::Bytes::from(trainer.cfg.to_yaml()))?;
        }
        Ok(trainer)
    }

    /// Loads the teacher, builds the LoRA teacher and the student, and opens
    /// the run directory; the state is the initial one.
    pub fn load(cfg: JobConfig, device: Device) -> Result<Self, TrainError> {
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

        // Building draws from libtorch's process-wide generator (initial
        // weights, then the adapters from the run's seed): under the draw
        // lock, so that another trainer of this process (local mode) can
        // neither move the generator between the seed and the adapters' draw
        // nor see its own draws moved.
        let (teacher, student, text) = crate::vsd::with_generator(|| {
            let mut teacher_unet = UNet::load(&folder, device).map_err(teacher_err)?;
            let student = teacher_unet.duplicate().map_err(teacher_err)?;
            // DMD2's fake score: a float32 copy, made before the teacher
            // takes its storage dtype.
            let fake = match cfg.method.fake_score {
                FakeScore::Lora => None,
                FakeScore::Unet => Some(teacher_unet.duplicate().map_err(teacher_err)?),
            };
            // set_kind, not bfloat16()/half(): those convert the weights but
            // leave the store's kind at float32, and UNet::predict casts its
            // inputs to the store's kind (a bf16 teacher without autocast
            // then fails with "mat1 and mat2 must have the same dtype").
            match cfg.precision.teacher_dtype {
                Dtype::Fp32 => {}
                Dtype::Bf16 => teacher_unet.vs.set_kind(tch::Kind::BFloat16),
                Dtype::Fp16 => teacher_unet.vs.set_kind(tch::Kind::Half),
            }
            // Adapters are initialised from the run's seed: a fresh run is
            // reproducible, a resumed one loads them.
            tch::manual_seed(cfg.train.seed as i64);
            let teacher = match fake {
                None => Teachers::Lora(Box::new(
                    TeacherUNet::new(teacher_unet, &LoraSpec::from(&cfg.method.lora))
                        .map_err(teacher_err)?,
                )),
                Some(fake) => Teachers::Unet(Box::new(FullFakeScore::new(teacher_unet, fake))),
            };
            let text = TextConditioner::load(&folder, device)?;
            Ok::<_, TrainError>((teacher, student, text))
        })?;

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
            weighting: m.vsd_weighting,
            prediction,
            teacher_autocast: crate::precision::teacher_autocast(&cfg.precision, device)
                .map_err(|e| TrainError::Invalid(e.to_string()))?,
        };

        let sample_shape = sample_shape(&cfg, &folder, &student)?;
        let samples = TrainingSamples::load(&cfg, &folder, &text, sample_shape, device)?;
        let student_params: Vec<(String, Tensor)> = student.named_parameters();
        let opt_student = Adam::new(
            student_params
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone())),
            AdamConfig::from(&m.student),
        );
        let opt_lora = Adam::new(
            teacher.fake_parameters(),
            AdamConfig::from(&m.lora.optimizer),
        );
        let ema = Ema::new(student_params, ema_decay(&m.ema));

        let store = RunStore::open(&cfg.checkpoint.run_dir)?;
        let uploader = Uploader::new(store.clone());
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
        Ok(Self {
            cfg,
            device,
            text,
            teacher,
            student,
            schedule,
            vsd,
            sample_shape,
            opt_student,
            opt_lora,
            ema,
            store,
            uploader,
            state,
            initial: true,
            last_checkpoint: None,
            last_submitted: None,
            last_losses: None,
            last_stall_ms: 0.0,
            world: None,
            samples,
        })
    }
}

fn ema_decay(cfg: &EmaConfig) -> f64 {
    if cfg.enabled { cfg.max_decay } else { 0.0 }
}

/// [C, h, w] of one sample: latents are resolution / 8 with SD's VAE (the
/// VAE's scale factor in general), the pixels themselves without a VAE.
fn sample_shape(
    cfg: &JobConfig,
    folder: &DiffusersFolder,
    student: &UNet,
) -> Result<[i64; 3], TrainError> {
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
    Ok([student.config.in_channels, res / scale, res / scale])
}

/// The device a config asks for.
pub fn device_of(cfg: &JobConfig) -> Result<Device, TrainError> {
    crate::device::parse_device(&cfg.train.device).map_err(|e| TrainError::Invalid(e.to_string()))
}
