//! Building a trainer: the teacher folder loaded once, the fake score
//! overlaid on it (LoRA adapters) or copied from it (DMD2's full copy), the
//! student copied from it (or from `model.student_init`), the schedule, optimizers and EMA, and the run
//! directory opened; the state is the initial one.

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{Dtype, FakeScore};
use swiftbrush_proto::run_store::RunStore;
use tch::Device;

use super::checkpoint::{Checkpointer, TrainState};
use super::optimizers::Optimizers;
use super::run::{Networks, Trainer};
use super::samples::TrainingSamples;
use super::{TextConditioner, TrainError};
use crate::diffusion::{NoiseSchedule, PredictionType, SchedulerConfig, StudentChain};
use crate::ema::Ema;
use crate::lora::LoraSpec;
use crate::models::vae::AutoencoderKLConfig;
use crate::optim::{Adam, AdamConfig};
use crate::pipeline::{DiffusersFolder, UNet, teacher_fingerprint};
use crate::torch::precision::kind_of;
use crate::vsd::{FullFakeScore, ScorePair, Student, TeacherUNet, VsdConfig, with_generator};

impl Trainer {
    /// Loads the teacher, builds the fake score and the student, and opens
    /// the run directory; the state is the initial one.
    pub fn load(cfg: JobConfig, device: Device) -> Result<Self, TrainError> {
        // TF32 and cuDNN benchmark mode as the config says, before any
        // CUDA work of this trainer (on the CPU nothing changes).
        crate::torch::math_mode::apply(&cfg.precision, device).map_err(TrainError::Invalid)?;
        let teacher_dir = cfg
            .model
            .teacher
            .clone()
            .ok_or_else(|| TrainError::Invalid("model.teacher is not set".to_owned()))?;
        let folder = DiffusersFolder::open(std::path::Path::new(&teacher_dir))?;
        let fingerprint = teacher_fingerprint(folder.root())?;
        let networks = load_networks(&cfg, &folder, &teacher_dir, device)?;
        let samples =
            TrainingSamples::load(&cfg, &folder, &networks.text, networks.sample_shape, device)?;

        let m = &cfg.method;
        let mut optimizers = Optimizers::new(
            Adam::new(
                networks.student.named_parameters(),
                AdamConfig::from(&m.student.optimizer()),
            ),
            Adam::new(
                networks.scores.fake_parameters(),
                AdamConfig::from(&m.fake_score.optimizer),
            ),
            m.student.grad_clip,
            m.fake_score.optimizer.grad_clip,
        );
        if crate::torch::precision::loss_scaling(&cfg.precision) {
            optimizers = optimizers.with_loss_scaling();
        }
        let ema = m
            .ema
            .enabled
            .then(|| Ema::new(networks.student.named_parameters(), m.ema.max_decay));

        let store = RunStore::open(&cfg.checkpoint.run_dir)?;
        let checkpointer = Checkpointer::new(store, cfg.checkpoint.every_steps);
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
            loss_scalers: optimizers.loss_scalers(),
        };
        Ok(Self {
            cfg,
            device,
            networks,
            optimizers,
            ema,
            checkpointer,
            state,
            initial: true,
            last_losses: None,
            samples,
            final_gathered: None,
        })
    }
}

/// The networks, the schedule and the step's constants.
fn load_networks(
    cfg: &JobConfig,
    folder: &DiffusersFolder,
    teacher_dir: &str,
    device: Device,
) -> Result<Networks, TrainError> {
    let teacher_err = |source| TrainError::Teacher {
        teacher: teacher_dir.to_owned(),
        source,
    };
    // Building draws from libtorch's process-wide generator (initial
    // weights, then the adapters from the run's seed): under the draw
    // lock, so that another trainer of this process (local mode) can
    // neither move the generator between the seed and the adapters' draw
    // nor see its own draws moved.
    let (scores, student, text) = with_generator(|| {
        let teacher = UNet::load(folder, device).map_err(|e| teacher_err(e.into()))?;
        let (scores, mut student) = score_networks(cfg, teacher, teacher_dir)?;
        if let Some(dir) = &cfg.model.student_init {
            let Student::Full(unet) = &mut student else {
                return Err(TrainError::Invalid(
                    "model.student_init gives a full student its weights; a LoRA student \
                     (method.student.kind: lora) starts as the teacher"
                        .to_owned(),
                ));
            };
            super::student_init::init_student(unet, dir)?;
        }
        let text = TextConditioner::load(
            folder,
            device,
            i64::from(cfg.model.resolution),
            kind_of(cfg.precision.text_encoder_dtype),
        )?;
        Ok::<_, TrainError>((scores, student, text))
    })?;

    let sched_cfg = SchedulerConfig::from_file(
        &folder
            .component("scheduler")?
            .dir
            .join("scheduler_config.json"),
    )?;
    let schedule = NoiseSchedule::new(&sched_cfg, device)?;
    if schedule.prediction_type() == PredictionType::Sample {
        return Err(TrainError::Invalid(format!(
            "{teacher_dir}: prediction_type \"sample\" teachers are not supported by VSD \
             (epsilon and v_prediction are)"
        )));
    }
    let vsd = vsd_config(cfg, &schedule, device)?;
    let sample_shape = sample_shape(cfg, folder, scores.base().config.in_channels)?;
    Ok(Networks {
        text,
        scores,
        student,
        schedule,
        vsd,
        sample_shape,
    })
}

/// The score networks and the student from the teacher's UNet as loaded
/// (float32): a full student a copy, DMD2's fake score a float32 copy made
/// before the teacher takes its storage dtype, the LoRA adapters drawn from
/// the run's seed (a LoRA student's after the fake score's, on the same
/// base). Call it under [`with_generator`]. `swiftbrush plan`'s
/// probe builds its networks here too, so it measures the trainer's.
pub(crate) fn score_networks(
    cfg: &JobConfig,
    mut teacher: UNet,
    teacher_dir: &str,
) -> Result<(ScorePair, Student), TrainError> {
    let teacher_err = |source| TrainError::Teacher {
        teacher: teacher_dir.to_owned(),
        source,
    };
    let student_lora = cfg.method.student.lora_adapters();
    // A LoRA student has no UNet of its own: its adapters go on the
    // teacher's base below.
    let full_student = match student_lora {
        None => Some(teacher.duplicate().map_err(|e| teacher_err(e.into()))?),
        Some(_) => None,
    };
    // DMD2's fake score: a float32 copy, made before the teacher takes
    // its storage dtype.
    let fake = match cfg.method.fake_score.kind {
        FakeScore::Lora => None,
        FakeScore::Unet => Some(teacher.duplicate().map_err(|e| teacher_err(e.into()))?),
    };
    // set_kind, not bfloat16()/half(): those convert the weights but
    // leave the store's kind at float32, and UNet::predict casts its
    // inputs to the store's kind (a bf16 teacher without autocast then
    // fails with "mat1 and mat2 must have the same dtype").
    match cfg.precision.teacher_dtype {
        Dtype::Fp32 => {}
        Dtype::Bf16 => teacher.vs.set_kind(tch::Kind::BFloat16),
        Dtype::Fp16 => teacher.vs.set_kind(tch::Kind::Half),
    }
    // Adapters are initialised from the run's seed: a fresh run is
    // reproducible, a resumed one loads them.
    tch::manual_seed(cfg.train.seed as i64);
    let mut scores = match fake {
        None => ScorePair::Lora(Box::new(
            TeacherUNet::new(teacher, &LoraSpec::from(&cfg.method.lora)).map_err(teacher_err)?,
        )),
        Some(fake) => ScorePair::Unet(Box::new(FullFakeScore::new(teacher, fake))),
    };
    let student = match full_student {
        Some(unet) => Student::Full(Box::new(unet)),
        None => Student::Lora(
            scores
                .attach_student(&LoraSpec::from(&student_lora.unwrap_or_default()))
                .map_err(teacher_err)?,
        ),
    };
    Ok((scores, student))
}

/// The step's constants from the config, the teacher's schedule and the
/// device (the trainer's and `swiftbrush plan`'s probe's).
pub(crate) fn vsd_config(
    cfg: &JobConfig,
    schedule: &NoiseSchedule,
    device: Device,
) -> Result<VsdConfig, TrainError> {
    let m = &cfg.method;
    let student_alpha_bar = if m.student_alpha_bar_from_schedule {
        schedule.alpha_bar(i64::from(m.student_timestep))?
    } else {
        m.student_alpha_bar
    };
    // A few-step student's chain (one step keeps the plain path).
    let steps: Vec<i64> = m.student_steps().into_iter().map(i64::from).collect();
    let few_step = if steps.len() > 1 {
        Some(StudentChain::new(&steps, student_alpha_bar, schedule)?)
    } else {
        None
    };
    let teacher_autocast = crate::torch::precision::teacher_autocast(&cfg.precision, device)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    Ok(VsdConfig {
        student_timestep: i64::from(m.student_timestep),
        student_alpha_bar,
        guidance_scale: m.guidance_scale,
        weighting: m.vsd_weighting,
        teacher_autocast,
        student_autocast: crate::torch::precision::student_autocast(
            &cfg.precision,
            teacher_autocast,
        ),
        one_score_pass: cfg.train.score_passes.one_pass(device.is_cuda()),
        recompute_rows: cfg
            .train
            .gradient_checkpointing
            .then_some(cfg.train.recompute_rows),
        few_step,
    })
}

/// [C, h, w] of one sample: latents are resolution / 8 with SD's VAE (the
/// VAE's scale factor in general), the pixels themselves without a VAE.
pub(crate) fn sample_shape(
    cfg: &JobConfig,
    folder: &DiffusersFolder,
    in_channels: i64,
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
    Ok([in_channels, res / scale, res / scale])
}

/// The device a config asks for.
pub fn device_of(cfg: &JobConfig) -> Result<Device, TrainError> {
    crate::torch::device::parse_device(&cfg.train.device)
        .map_err(|e| TrainError::Invalid(e.to_string()))
}
