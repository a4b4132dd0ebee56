//! Training the toy teacher (`swiftbrush toy teacher`): a small pixel-space
//! UNet2DConditionModel learns the standard epsilon-prediction loss on
//! freshly drawn shapes32 images, conditioned on a frozen toy CLIP encoder,
//! with 10% of captions replaced by the empty prompt so classifier-free
//! guidance works. Every draw of step s comes from a stream seeded by
//! (seed, s), and a checkpoint holds the weights, Adam's moments and the
//! EMA, so a resumed run continues bit for bit.
//!
//! The output folder is the diffusers pipeline ([`super::export`]); its
//! `checkpoints/` is a run store, and `unet/` is rewritten (EMA weights) at
//! every checkpoint so a run in progress can be evaluated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use swiftbrush_proto::run_store::{CheckpointMeta, ResumeFrom, RunStore, RunStoreError};
use tch::{Device, Kind, Tensor, nn};

use super::ToyError;
use super::export::{model_index_json, put_json, scheduler_json, toy_scheduler_config, write_unet};
use super::init::init_varstore;
use super::progress::{Progress, ProgressMode};
use super::rng::ToyRng;
use super::shapes::{Caption, NUM_CAPTIONS, ShapeBatch};
use super::text_encoder::{HIDDEN_SIZE, build_text_encoder, save_text_encoder, toy_text_config};
use super::vocab::ToyVocab;
use crate::diffusion::NoiseSchedule;
use crate::ema::Ema;
use crate::models::layers::without_init;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet_2d_condition::{OneOrMany, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::weights::load_tensors_strict;
use crate::optim::{Adam, AdamConfig, clip_grad_norm};
use crate::trainer::checkpoint::tensor_bytes;

/// Row of the empty prompt in the embedding table (after the 54 captions).
const NULL_ROW: i64 = NUM_CAPTIONS as i64;
/// Streams of one step's draws (see [`ToyRng::stream`]).
const STREAM_TRAIN: u64 = 1;
/// Seed offsets of the initial weights, so they differ from the data draws.
const SEED_UNET_INIT: u64 = 0x0_0E7;
const SEED_TEXT_INIT: u64 = 0x7E7;
const CHECKPOINT_UNET: &str = "unet.safetensors";
const CHECKPOINT_ADAM: &str = "adam.safetensors";
const CHECKPOINT_EMA: &str = "ema.safetensors";

/// The toy teacher's UNet: 3 pixel channels in and out at 32x32, four
/// levels (32, 16, 8, 4 px) of one ResNet each, attention only at 8x8, 4x4
/// and the middle, where it is cheap on a CPU (1.8M parameters).
pub fn toy_unet_config() -> UNet2DConditionConfig {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    UNet2DConditionConfig {
        sample_size: Some(OneOrMany::One(32)),
        in_channels: 3,
        out_channels: 3,
        down_block_types: strings(&[
            "DownBlock2D",
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ]),
        mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
        up_block_types: strings(&[
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
        ]),
        block_out_channels: vec![32, 32, 64, 64],
        layers_per_block: OneOrMany::One(1),
        norm_num_groups: Some(8),
        cross_attention_dim: OneOrMany::One(HIDDEN_SIZE),
        attention_head_dim: OneOrMany::One(4),
        ..UNet2DConditionConfig::default()
    }
}

/// Everything that decides what a toy teacher run computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherSettings {
    /// Total optimizer steps of the run (a resume may raise it).
    pub steps: u64,
    pub batch_size: usize,
    pub seed: u64,
    pub lr: f64,
    /// Linear warm-up of the learning rate over these first steps.
    pub warmup_steps: u64,
    /// Probability that a sample is trained on the empty prompt.
    pub caption_dropout: f64,
    /// Offset noise (Guttenberg 2023): each sample's noise gets a constant
    /// per channel drawn from N(0, noise_offset^2). Without it the mean of
    /// x_999 still carries the image's mean color (sqrt(abar_999) = 0.068),
    /// the model learns to read the background from it instead of from the
    /// caption, and sampling from zero-mean noise then gives tinted gray
    /// backgrounds (white and black ones judged as gray).
    #[serde(default)]
    pub noise_offset: f64,
    /// A closing phase that trains more often near the top of the
    /// schedule; see [`TopTimesteps`]. None: t uniform throughout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_timesteps: Option<TopTimesteps>,
    /// EMA of the weights with this maximum decay (exported instead of the
    /// raw weights); None for no EMA.
    pub ema_decay: Option<f64>,
    pub grad_clip: f64,
    /// A checkpoint (and a refreshed unet/) every this many steps, and at the end.
    pub checkpoint_every: u64,
    /// Checkpoints kept in OUT/checkpoints.
    pub keep_checkpoints: usize,
    pub unet: UNet2DConditionConfig,
}

/// From `from_step` on, each sample's t comes with probability `fraction`
/// from [min_t, 999] instead of [0, 999]. Why: the one-step student starts
/// as this teacher's prediction at t = 999, x0 = (z - sqrt(1 - A) eps) /
/// sqrt(A), which multiplies any error in eps by 1 / sqrt(A) = 14.6; in
/// pixel space (no VAE to hide it) that is visible noise, and uniform-t
/// training spends only 0.1 % of its samples there (docs/TOYWORLD.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TopTimesteps {
    pub from_step: u64,
    pub fraction: f64,
    pub min_t: u64,
}

/// The default closing phase: the last 1000 of 7000 steps, half of each
/// batch at t >= 900 (what assets/toy-teacher was trained with).
pub const DEFAULT_TOP_TIMESTEPS: TopTimesteps = TopTimesteps {
    from_step: 6000,
    fraction: 0.5,
    min_t: 900,
};

impl Default for TeacherSettings {
    fn default() -> Self {
        Self {
            steps: 7000,
            batch_size: 32,
            seed: 0,
            lr: 5e-4,
            warmup_steps: 100,
            caption_dropout: 0.1,
            noise_offset: 0.1,
            top_timesteps: Some(DEFAULT_TOP_TIMESTEPS),
            ema_decay: Some(0.999),
            grad_clip: 1.0,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            unet: toy_unet_config(),
        }
    }
}

impl TeacherSettings {
    pub fn validate(&self) -> Result<(), ToyError> {
        let bad = |m: String| Err(ToyError::Settings(m));
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("learning rate must be positive, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.caption_dropout) {
            return bad(format!(
                "caption dropout must lie in [0, 1), got {}",
                self.caption_dropout
            ));
        }
        if let Some(d) = self.ema_decay
            && !(0.0..1.0).contains(&d)
        {
            return bad(format!("EMA decay must lie in [0, 1), got {d}"));
        }
        if !(0.0..=1.0).contains(&self.noise_offset) {
            return bad(format!(
                "noise offset must lie in [0, 1], got {}",
                self.noise_offset
            ));
        }
        if let Some(top) = &self.top_timesteps
            && !((0.0..=1.0).contains(&top.fraction) && top.min_t < 1000)
        {
            return bad(format!(
                "top timesteps: fraction must lie in [0, 1] and min_t in 0..1000, got {} and {}",
                top.fraction, top.min_t
            ));
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every must be at least 1".into());
        }
        if self.keep_checkpoints == 0 {
            return bad("keep_checkpoints must be at least 1".into());
        }
        let u = &self.unet;
        if u.in_channels != 3 || u.out_channels != 3 {
            return bad("the toy UNet works on RGB pixels: in/out channels must be 3".into());
        }
        if u.cross_attention_dim != OneOrMany::One(HIDDEN_SIZE) {
            return bad(format!(
                "cross_attention_dim must be the text encoder's width {HIDDEN_SIZE}"
            ));
        }
        Ok(())
    }

    /// What must not change across a resume: all but the step count and
    /// the checkpoint cadence.
    fn identity(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            for key in ["steps", "checkpoint_every", "keep_checkpoints"] {
                obj.remove(key);
            }
        }
        v
    }

    /// Whether a run checkpointed at `step` with the `saved` settings may
    /// continue with these: the same identity, or one that differs only by
    /// a top-timestep phase that starts at or after `step` (the steps
    /// already trained are what these settings would have trained too).
    fn may_resume(&self, saved: &TeacherSettings, step: u64) -> bool {
        if saved.identity() == self.identity() {
            return true;
        }
        match (&saved.top_timesteps, &self.top_timesteps) {
            (None, Some(top)) if top.from_step >= step => {
                let mut later = self.clone();
                later.top_timesteps = None;
                later.identity() == saved.identity()
            }
            _ => false,
        }
    }

    /// The timestep of one training sample at `step`.
    fn draw_t(&self, step: u64, num_t: u64, rng: &mut ToyRng) -> i64 {
        match &self.top_timesteps {
            Some(top) if step >= top.from_step && rng.uniform() < top.fraction => {
                (top.min_t + rng.below(num_t.saturating_sub(top.min_t).max(1))) as i64
            }
            _ => rng.below(num_t) as i64,
        }
    }

    fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps == 0 {
            return self.lr;
        }
        self.lr * ((step + 1) as f64 / self.warmup_steps as f64).min(1.0)
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub folder: PathBuf,
    /// The step the run started from (0, or a checkpoint's).
    pub start_step: u64,
    pub steps: u64,
    /// Mean loss over the last (up to) 100 steps run in this process.
    pub recent_loss: Option<f64>,
    /// Wall time per step in this process.
    pub secs_per_step: Option<f64>,
}

/// The frozen text side: the table of the 54 captions' embeddings and the
/// empty prompt's, [55, 77, 64].
fn write_text_side(
    out: &Path,
    settings: &TeacherSettings,
    device: Device,
) -> Result<Tensor, ToyError> {
    let vocab = ToyVocab::toy();
    let tok_dir = out.join("tokenizer");
    vocab.write(&tok_dir).map_err(ToyError::io(&tok_dir))?;
    let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;
    let text_cfg = toy_text_config(vocab.len() as i64);
    let (text_vs, text_model) =
        build_text_encoder(&text_cfg, settings.seed ^ SEED_TEXT_INIT, device)?;
    save_text_encoder(
        &out.join("text_encoder"),
        &text_vs,
        &text_cfg,
        tokenizer.bos_id(),
        tokenizer.eos_id(),
    )?;
    let mut prompts: Vec<String> = Caption::all().iter().map(Caption::text).collect();
    prompts.push(String::new());
    let ids = tokenizer.encode_batch(&prompts, device)?;
    Ok(tch::no_grad(|| text_model.f_forward(&ids.input_ids))?)
}

/// Trains (or resumes) the toy teacher into `out`; see the module docs.
pub fn train_teacher(
    settings: &TeacherSettings,
    out: &Path,
    resume: bool,
    device: Device,
    progress: ProgressMode,
) -> Result<TrainOutcome, ToyError> {
    settings.validate()?;
    std::fs::create_dir_all(out).map_err(ToyError::io(out))?;
    let out_str = out
        .to_str()
        .ok_or_else(|| ToyError::Settings(format!("{} is not valid UTF-8", out.display())))?;
    let store = RunStore::open(out_str)?;
    let existing = store.valid_steps()?;
    if !resume && !existing.is_empty() {
        return Err(ToyError::Resume {
            dir: out.to_owned(),
            reason: format!(
                "it already holds checkpoints (steps {existing:?}); pass --resume to continue \
                 that run, or choose another --out"
            ),
        });
    }

    let embeddings = write_text_side(out, settings, device)?;
    let schedule_cfg = toy_scheduler_config();
    put_json(
        &out.join("scheduler").join("scheduler_config.json"),
        &scheduler_json(&schedule_cfg),
    )?;
    put_json(&out.join("model_index.json"), &model_index_json())?;
    let schedule = NoiseSchedule::new(&schedule_cfg, device)?;

    let mut vs = nn::VarStore::new(device);
    let unet = without_init(|| UNet2DConditionModel::new(vs.root(), &settings.unet))?;
    init_varstore(&vs, settings.seed ^ SEED_UNET_INIT, &HashMap::new())
        .map_err(ToyError::Settings)?;
    let params = vs.variables();
    let adam_cfg = AdamConfig {
        lr: settings.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut adam = Adam::new(
        params.iter().map(|(k, v)| (k.clone(), v.shallow_clone())),
        adam_cfg,
    );
    let mut ema = settings.ema_decay.map(|d| {
        Ema::new(
            params.iter().map(|(k, v)| (k.clone(), v.shallow_clone())),
            d,
        )
    });

    let mut start_step = 0;
    if resume {
        match store.resolve(ResumeFrom::Latest) {
            Ok(manifest) => {
                start_step = manifest.step;
                let recorded = manifest.meta.extra.get("settings").cloned();
                let saved: Option<TeacherSettings> =
                    recorded.and_then(|v| serde_json::from_value(v).ok());
                match saved {
                    Some(s) if settings.may_resume(&s, start_step) => {}
                    Some(s) => {
                        return Err(ToyError::Resume {
                            dir: out.to_owned(),
                            reason: format!(
                                "the checkpoint at step {start_step} was trained with other \
                                 settings (only --steps may change, or a top-timestep phase be \
                                 added that starts at or after this step): saved {}, now {}",
                                s.identity(),
                                settings.identity()
                            ),
                        });
                    }
                    None => {
                        return Err(ToyError::Resume {
                            dir: out.to_owned(),
                            reason: format!(
                                "the checkpoint at step {start_step} records no toy teacher settings"
                            ),
                        });
                    }
                }
                let read = |name: &str| -> Result<HashMap<String, Tensor>, ToyError> {
                    let bytes = store.read_manifest_file(&manifest, name)?;
                    Ok(tensor_bytes::from_bytes(&bytes, name)?)
                };
                let what = [out.join("checkpoints").join(CHECKPOINT_UNET)];
                load_tensors_strict(&mut vs, read(CHECKPOINT_UNET)?, &what)?;
                adam.load_state(read(CHECKPOINT_ADAM)?)?;
                if let Some(ema) = &mut ema {
                    let n = manifest
                        .meta
                        .extra
                        .get("ema_updates")
                        .and_then(|v| v.as_i64())
                        .unwrap_or(start_step as i64);
                    ema.load(&read(CHECKPOINT_EMA)?, n)?;
                }
            }
            Err(RunStoreError::NoCheckpoint { .. }) => {
                tracing::info!("no checkpoint in {}: starting from step 0", out.display());
            }
            Err(e) => return Err(e.into()),
        }
    }

    let progress = Progress::new(progress, start_step, settings.steps);
    let mut recent: Vec<f64> = Vec::new();
    let started = Instant::now();
    for step in start_step..settings.steps {
        adam.set_lr(settings.lr_at(step));
        let loss = train_step(
            settings,
            step,
            &unet,
            &schedule,
            &embeddings,
            &mut adam,
            device,
        )?;
        if !loss.is_finite() {
            return Err(ToyError::Diverged { step, loss });
        }
        if let Some(ema) = &mut ema {
            ema.update(&params);
        }
        recent.push(loss);
        if recent.len() > 100 {
            recent.remove(0);
        }
        let done = step + 1;
        progress.update(done, loss);
        if done.is_multiple_of(settings.checkpoint_every) || done == settings.steps {
            save_checkpoint(&store, settings, done, &vs, &adam, ema.as_ref(), loss)?;
            export_unet(out, settings, &vs, ema.as_ref())?;
            progress.println(&format!("step {done}: checkpoint saved, unet/ updated"));
        }
    }
    progress.finish();
    let ran = settings.steps.saturating_sub(start_step);
    if ran == 0 {
        // Nothing left to train (resumed at or past --steps): make sure the
        // folder holds the checkpoint's weights.
        export_unet(out, settings, &vs, ema.as_ref())?;
    }
    Ok(TrainOutcome {
        folder: out.to_owned(),
        start_step,
        steps: settings.steps.max(start_step),
        recent_loss: (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64),
        secs_per_step: (ran > 0).then(|| started.elapsed().as_secs_f64() / ran as f64),
    })
}

/// One optimizer step; returns the loss.
fn train_step(
    settings: &TeacherSettings,
    step: u64,
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    embeddings: &Tensor,
    adam: &mut Adam,
    device: Device,
) -> Result<f64, ToyError> {
    let b = settings.batch_size;
    let mut rng = ToyRng::stream(settings.seed, step, STREAM_TRAIN);
    let batch = ShapeBatch::sample(b, &mut rng);
    let num_t = schedule.num_train_timesteps() as u64;
    let t: Vec<i64> = (0..b)
        .map(|_| settings.draw_t(step, num_t, &mut rng))
        .collect();
    let rows: Vec<i64> = batch
        .captions
        .iter()
        .map(|c| {
            if rng.uniform() < settings.caption_dropout {
                NULL_ROW
            } else {
                c.id() as i64
            }
        })
        .collect();
    let side = super::shapes::SIZE as i64;
    let mut eps = Tensor::from_slice(&rng.normals_f32(b * super::shapes::CHANNELS * 1024))
        .view([b as i64, 3, side, side]);
    if settings.noise_offset > 0.0 {
        let offset = Tensor::from_slice(&rng.normals_f32(b * super::shapes::CHANNELS))
            .view([b as i64, 3, 1, 1]);
        eps += offset * settings.noise_offset;
    }
    let eps = eps.to_device(device);
    let x0 = batch.to_tensor(device);
    let t = Tensor::from_slice(&t).to_device(device);
    let cond = embeddings.f_index_select(0, &Tensor::from_slice(&rows).to_device(device))?;
    let x_t = schedule.add_noise(&x0, &eps, &t)?;
    let pred = unet.f_forward(&x_t, &t, &cond)?;
    let loss = pred.f_sub(&eps)?.f_square()?.f_mean(Kind::Float)?;
    loss.f_backward()?;
    clip_grad_norm(adam.params(), settings.grad_clip);
    adam.step();
    adam.zero_grad();
    Ok(loss.f_double_value(&[])?)
}

fn save_checkpoint(
    store: &RunStore,
    settings: &TeacherSettings,
    step: u64,
    vs: &nn::VarStore,
    adam: &Adam,
    ema: Option<&Ema>,
    loss: f64,
) -> Result<(), ToyError> {
    let weights: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    let mut writer = store.begin_checkpoint(step);
    writer.put_file(CHECKPOINT_UNET, tensor_bytes::to_bytes(&weights)?)?;
    writer.put_file(
        CHECKPOINT_ADAM,
        tensor_bytes::to_bytes(&adam.state_tensors())?,
    )?;
    if let Some(ema) = ema {
        writer.put_file(CHECKPOINT_EMA, tensor_bytes::to_bytes(&ema.tensors())?)?;
    }
    let meta = CheckpointMeta {
        config_fingerprint: "toy-teacher".into(),
        extra: serde_json::json!({
            "settings": settings,
            "ema_updates": ema.map(Ema::num_updates),
            "loss": loss,
        }),
        ..CheckpointMeta::default()
    };
    writer.commit(meta)?;
    store.apply_retention(settings.keep_checkpoints)?;
    Ok(())
}

/// unet/ of the folder: the EMA weights when there is an EMA.
fn export_unet(
    out: &Path,
    settings: &TeacherSettings,
    vs: &nn::VarStore,
    ema: Option<&Ema>,
) -> Result<(), ToyError> {
    let weights: Vec<(String, Tensor)> = match ema {
        Some(e) => e.tensors(),
        None => vs.variables().into_iter().collect(),
    };
    write_unet(out, &settings.unet, &weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> TeacherSettings {
        TeacherSettings {
            top_timesteps: None,
            ..TeacherSettings::default()
        }
    }

    fn draws(s: &TeacherSettings, step: u64) -> Vec<i64> {
        let mut rng = ToyRng::stream(0, step, STREAM_TRAIN);
        (0..256).map(|_| s.draw_t(step, 1000, &mut rng)).collect()
    }

    #[test]
    fn the_top_timestep_phase_changes_nothing_before_it_starts() {
        let with = TeacherSettings::default();
        let from = DEFAULT_TOP_TIMESTEPS.from_step;
        assert_eq!(draws(&with, from - 1), draws(&plain(), from - 1));
        let late = draws(&with, from);
        let top = late.iter().filter(|&&t| t >= 900).count();
        // Half of them on purpose, plus uniform's own 10 % of the rest.
        assert!((120..=170).contains(&top), "{top} of 256 at t >= 900");
        assert!(late.iter().all(|&t| (0..1000).contains(&t)));
        let all_top = TeacherSettings {
            top_timesteps: Some(TopTimesteps {
                fraction: 1.0,
                ..DEFAULT_TOP_TIMESTEPS
            }),
            ..plain()
        };
        assert!(draws(&all_top, from).iter().all(|&t| t >= 900));
    }

    #[test]
    fn a_run_may_take_up_the_phase_only_before_it_starts() {
        let with = TeacherSettings::default();
        let from = DEFAULT_TOP_TIMESTEPS.from_step;
        assert!(with.may_resume(&with, from + 10));
        assert!(with.may_resume(&plain(), from), "added at its first step");
        assert!(
            !with.may_resume(&plain(), from + 1),
            "steps already trained without it"
        );
        assert!(!plain().may_resume(&with, 10), "nor dropped");
        let other = TeacherSettings {
            lr: 1e-4,
            ..plain()
        };
        assert!(
            !with.may_resume(&other, 10),
            "anything else is still refused"
        );
    }
}
