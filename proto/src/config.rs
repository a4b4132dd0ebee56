//! The job configuration: one YAML schema that the CLI, the coordinator and
//! every worker parse. Defaults are SwiftBrush's (shared/SPEC.md: the paper's
//! run as in the authors' released script). Parsing is strict
//! (`deny_unknown_fields`) and every error names the key path.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;

use crate::config_error::{ConfigError, Problem};

/// A whole job: what to distill, how, from which captions, where to write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// A name for logs and the dashboard.
    #[serde(default = "default_name")]
    pub name: String,
    pub model: ModelConfig,
    #[serde(default)]
    pub method: MethodConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub world: WorldConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub precision: PrecisionConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
}

fn default_name() -> String {
    "swiftbrush".to_owned()
}

/// The teacher and the image size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A diffusers pipeline folder (model_index.json, unet/, text_encoder/,
    /// tokenizer/, scheduler/, vae/). Required; `--teacher DIR` sets it too.
    #[serde(default)]
    pub teacher: Option<String>,
    /// Image side in pixels. Latents are resolution/8 with a VAE, or the
    /// pixels themselves for a pixel-space teacher (no vae/ folder).
    #[serde(default = "default_resolution")]
    pub resolution: u32,
    /// A diffusers UNet folder (config.json and safetensors weights; a
    /// pipeline folder's `unet/` is taken) whose weights start the student
    /// instead of a copy of the teacher's. Its config must describe the
    /// teacher UNet's architecture (a differing key is refused by name);
    /// the teacher and the fake score stay the teacher's. Unset (the
    /// default): the student starts as the teacher. Absent from the
    /// serialized config when unset, so fingerprints of configs without it
    /// are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_init: Option<String>,
}

fn default_resolution() -> u32 {
    512
}

/// The SwiftBrush method: SPEC.md "One training iteration".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodConfig {
    /// Timestep fed to the student for its one pass (SPEC step 1).
    pub student_timestep: u32,
    /// The constant A in x0_hat = (z - sqrt(1-A) eps) / sqrt(A). The released
    /// weights use 0.0047; the schedule's true abar_999 is 0.004660.
    pub student_alpha_bar: f64,
    /// Use the schedule's alphas_cumprod[student_timestep] instead of
    /// `student_alpha_bar`.
    pub student_alpha_bar_from_schedule: bool,
    /// A few-step student's descending timesteps (shared/SPEC.md "Few-step
    /// students", DMD2's backward simulation), e.g. [999, 749, 499, 249];
    /// the first is `student_timestep`. Unset: [student_timestep], the
    /// one-step student (SwiftBrush), on its own code path.
    pub student_timesteps: Option<Vec<u32>>,
    /// Smallest timestep drawn for the VSD noise (0.02 T).
    pub min_timestep: u32,
    /// Largest timestep drawn for the VSD noise (0.98 T).
    pub max_timestep: u32,
    /// Anneals the largest VSD timestep linearly from `max_timestep` at
    /// step 0 to this at `train.max_steps` (threestudio's schedule; SPEC:
    /// known to over-saturate). Unset: constant.
    pub max_timestep_final: Option<u32>,
    /// Classifier-free guidance for both teachers in the VSD gradient.
    pub guidance_scale: f64,
    /// Draws the guidance scale uniformly from [lo, hi] once per iteration,
    /// for both teachers (SNOOPI), instead of `guidance_scale`.
    pub guidance_scale_range: Option<[f64; 2]>,
    /// How the VSD gradient is weighted per sample (SPEC step 4).
    pub vsd_weighting: VsdWeighting,
    /// The fake score eps_psi (SPEC's LoRA teacher): what it is and how it
    /// trains.
    pub fake_score: FakeScoreConfig,
    /// Probability that a fake-score update uses the null condition for the
    /// whole batch (text dropout, SPEC step 6; LoRA only).
    pub null_condition_prob: f64,
    /// The student: its optimizer, and what it is (a full copy of the
    /// teacher, or LoRA adapters on the teacher's base).
    pub student: StudentConfig,
    /// The LoRA teacher's adapters (`fake_score.kind: lora`).
    pub lora: LoraConfig,
    pub ema: EmaConfig,
}

impl MethodConfig {
    /// The student's timesteps, t_0 > t_1 > ...: `student_timesteps`, or
    /// [student_timestep] when unset (one step).
    pub fn student_steps(&self) -> Vec<u32> {
        self.student_timesteps
            .clone()
            .unwrap_or_else(|| vec![self.student_timestep])
    }
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self {
            student_timestep: 999,
            student_alpha_bar: 0.0047,
            student_alpha_bar_from_schedule: false,
            student_timesteps: None,
            min_timestep: 20,
            max_timestep: 980,
            max_timestep_final: None,
            guidance_scale: 4.5,
            guidance_scale_range: None,
            vsd_weighting: VsdWeighting::Paper,
            fake_score: FakeScoreConfig::default(),
            null_condition_prob: 0.1,
            student: StudentConfig::default(),
            lora: LoraConfig::default(),
            ema: EmaConfig::default(),
        }
    }
}

/// The per-sample weighting of the VSD gradient g (SPEC step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VsdWeighting {
    /// SwiftBrush's w(t) = 1 - abar_t on the eps difference.
    Paper,
    /// DMD's: the difference of the two teachers' x0 predictions divided by
    /// the sample's mean |x0_hat - x0_teacher|. It weighs every timestep by
    /// how far the teacher would move the draw, so the small-t passes that
    /// see pixel-level detail count as much as the large-t ones that see
    /// layout (the paper's weight, sqrt(abar (1 - abar)) on the x0
    /// difference, gives t = 20 under a third of t = 500's: 0.135 and 0.447).
    Dmd,
}

/// The network that learns the student's distribution (SPEC's LoRA
/// teacher eps_psi).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FakeScore {
    /// LoRA adapters over the teacher's own weights: one copy of the base.
    Lora,
    /// A full copy of the teacher UNet, every weight trainable (DMD2's
    /// variant): one more UNet and its optimizer state in memory. Trained,
    /// as DMD2 trains it, with the unweighted eps-MSE and no text dropout
    /// (`null_condition_prob` is then unused), and scored on the caption
    /// alone (no guidance) in the VSD gradient.
    Unet,
}

/// The fake score and its training (either form): `method.fake_score`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeScoreConfig {
    /// LoRA adapters on the teacher (SwiftBrush; rank, alpha and targets
    /// in `method.lora`) or a full trainable copy of it (DMD2).
    pub kind: FakeScore,
    pub optimizer: OptimizerConfig,
    /// Fake-score updates per student update. 1 is SwiftBrush (SPEC step
    /// 6 once); more is DMD2's critic/generator ratio (SPEC, known
    /// variants): the extra updates reuse the iteration's student draws
    /// with fresh t', eps' and null flag, so the fake score keeps up with
    /// the student (a lagging one lets the student collapse).
    pub updates_per_step: u32,
}

impl Default for FakeScoreConfig {
    fn default() -> Self {
        Self {
            kind: FakeScore::Lora,
            optimizer: OptimizerConfig::with_lr(1e-3),
            updates_per_step: 1,
        }
    }
}

/// What the student is (`method.student.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StudentKind {
    /// A full trainable float32 copy of the teacher UNet (SwiftBrush).
    #[default]
    Full,
    /// LoRA adapters (`method.student.lora`) on the teacher's own frozen
    /// base weights: no second UNet; with a LoRA fake score, one copy of
    /// the base serves teacher, student and fake score.
    Lora,
}

impl StudentKind {
    pub fn is_full(&self) -> bool {
        *self == StudentKind::Full
    }
}

/// `method.student`: the student's Adam (the keys of [`OptimizerConfig`],
/// written out: serde's flatten does not combine with deny_unknown_fields)
/// and its kind. `kind` and `lora` are left out of the serialized config
/// while unset, so the fingerprints of full-student configs do not move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_adam_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Max global L2 norm of the gradient before the step.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    #[serde(default, skip_serializing_if = "StudentKind::is_full")]
    pub kind: StudentKind,
    /// The LoRA student's adapters (`kind: lora`; unset: [`LoraConfig`]'s
    /// defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

impl Default for StudentConfig {
    fn default() -> Self {
        let o = OptimizerConfig::with_lr(1e-6);
        Self {
            lr: o.lr,
            betas: o.betas,
            eps: o.eps,
            weight_decay: o.weight_decay,
            grad_clip: o.grad_clip,
            kind: StudentKind::Full,
            lora: None,
        }
    }
}

impl StudentConfig {
    /// The student's Adam and clip.
    pub fn optimizer(&self) -> OptimizerConfig {
        OptimizerConfig {
            lr: self.lr,
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
        }
    }

    /// The LoRA student's adapters; None for a full student.
    pub fn lora_adapters(&self) -> Option<LoraConfig> {
        match self.kind {
            StudentKind::Full => None,
            StudentKind::Lora => Some(self.lora.clone().unwrap_or_default()),
        }
    }
}

/// Adam with gradient-norm clipping (SPEC steps 5 and 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_adam_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Max global L2 norm of the gradient before the step.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
}

impl OptimizerConfig {
    pub fn with_lr(lr: f64) -> Self {
        Self {
            lr,
            betas: default_betas(),
            eps: default_adam_eps(),
            weight_decay: 0.0,
            grad_clip: default_grad_clip(),
        }
    }
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_adam_eps() -> f64 {
    1e-8
}
fn default_grad_clip() -> f64 {
    1.0
}

/// The LoRA teacher's adapters (PEFT naming); they train with
/// `method.fake_score.optimizer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub rank: u32,
    pub alpha: f64,
    /// Layers that get adapters: attention projections (`to_q`, `to_k`,
    /// `to_v`, `to_out.0`, in every self- and cross-attention) and ResNet
    /// convolutions (`conv1`, `conv2`, `conv_shortcut`).
    pub target_modules: Vec<String>,
}

/// Layers a LoRA adapter can target (PEFT suffix names): the projections
/// of every attention (diffusers' Attention names), and the convolutions of
/// every ResNet block.
pub const LORA_TARGETS: [&str; 7] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "conv1",
    "conv2",
    "conv_shortcut",
];

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 64,
            alpha: 108.0,
            target_modules: vec!["to_q".to_owned(), "to_v".to_owned()],
        }
    }
}

impl LoraConfig {
    /// alpha / rank: the factor on B·A.
    pub fn scale(&self) -> f64 {
        self.alpha / f64::from(self.rank)
    }
}

/// Exponential moving average of the student (diffusers EMAModel):
/// decay_k = min((1 + k) / (10 + k), max_decay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmaConfig {
    pub enabled: bool,
    pub max_decay: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_decay: 0.9999,
        }
    }
}

/// Where captions come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Paths or object-store URLs: `.txt` (one caption a line), `.jsonl`,
    /// `.parquet` (one text column) or WebDataset `.tar` shards (each
    /// sample's `.txt` member, else its `.json`).
    pub captions: Vec<String>,
    /// The JSONL field holding the caption (also in a WebDataset sample's
    /// `.json`); when unset, `caption` then `prompt` are tried.
    pub jsonl_field: Option<String>,
    /// The Parquet column holding the caption; when unset, `caption`,
    /// `prompt` then `text` are tried. Left out of the serialized config
    /// when unset, so configs without Parquet keep their fingerprint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_column: Option<String>,
    /// Shuffle captions per epoch (a permutation seeded by train.seed and the
    /// epoch).
    pub shuffle: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            captions: Vec::new(),
            jsonl_field: None,
            text_column: None,
            shuffle: true,
        }
    }
}

/// The loop's length and its randomness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Captions per step over all ranks. Fixed when the world size changes,
    /// so a resumed run sees the same captions in the same steps.
    pub global_batch: u32,
    pub max_steps: u64,
    /// Seeds the caption order and every draw of noise and timesteps (with
    /// the step and the rank).
    pub seed: u64,
    /// `auto` (first CUDA device, else CPU), `cpu` or `cuda:N`.
    pub device: String,
    /// The most samples a rank puts through the networks at once: its
    /// share of the global batch runs in chunks of this size whose
    /// gradients add up before one optimizer step (gradient accumulation;
    /// null: all at once). Only memory and speed depend on it, not the
    /// result (to float rounding).
    pub micro_batch: Option<u32>,
    /// Recompute the student's and the training fake score's activations
    /// instead of keeping them for the whole (micro-)batch (diffusers'
    /// name): the student draws without gradients, the scores run, then
    /// the student's pass is run again with gradients `recompute_rows`
    /// rows at a time to take the VSD gradient back, and the fake score's
    /// loss runs and backpropagates as many rows at a time. One more
    /// student forward per step; activation memory set by
    /// `recompute_rows`, not by the batch. A few-step student's pass at
    /// its chain's input is recomputed the same way (the chain itself runs
    /// once, without gradients). Only memory and speed depend on it, not
    /// the result (to float rounding).
    pub gradient_checkpointing: bool,
    /// Rows per recomputed chunk under `gradient_checkpointing` (ignored
    /// without it; more than a micro-batch holds is one chunk per
    /// micro-batch). Fewer rows: less memory, smaller kernels. The default
    /// 4 kept 88 % of 1 row's memory saving at the SD layout for a cost
    /// within this CPU's noise, where 1 row cost 40-70 % more CPU time a
    /// step (README, "Performance", memory).
    pub recompute_rows: u32,
    /// How step 3 runs the teacher and SwiftBrush's LoRA teacher: `one`
    /// pass of twice the rows (the adapters on the LoRA teacher's half
    /// only: fewer, bigger kernels), `two` passes, or `auto`: one on CUDA,
    /// two on the CPU, where one pass measured no faster and needs more
    /// memory (README, "Performance"). DMD2's full fake copy has its own
    /// weights and always runs its own pass. Only speed and memory depend
    /// on it, not the result (to float rounding).
    pub score_passes: ScorePasses,
    /// Every N steps (0: never) rank 0 draws `sample_prompts` with the
    /// student's EMA weights in one step and writes
    /// RUN/samples/step-XXXXXXXX.png.
    pub sample_every_steps: u64,
    /// The prompts of those pictures, one image each (a grid); their noise
    /// is drawn from `seed` once, so every picture of a run shows the same
    /// draws.
    pub sample_prompts: Vec<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            global_batch: 16,
            max_steps: 250_000,
            seed: 0,
            device: "auto".to_owned(),
            micro_batch: None,
            gradient_checkpointing: false,
            recompute_rows: 4,
            score_passes: ScorePasses::Auto,
            sample_every_steps: 0,
            sample_prompts: Vec::new(),
        }
    }
}

/// `train.score_passes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScorePasses {
    /// One on CUDA, two on the CPU.
    #[default]
    Auto,
    One,
    Two,
}

impl ScorePasses {
    /// Whether the teacher and the LoRA teacher share one pass on a device
    /// (`cuda`: whether it is a CUDA device).
    pub fn one_pass(self, cuda: bool) -> bool {
        match self {
            ScorePasses::Auto => cuda,
            ScorePasses::One => true,
            ScorePasses::Two => false,
        }
    }
}

/// Data-parallel world and failure handling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorldConfig {
    pub min_size: u32,
    pub max_size: u32,
    pub backend: CollectiveBackend,
    pub heartbeat_interval_ms: u64,
    /// A worker silent this long is declared dead.
    pub heartbeat_timeout_ms: u64,
    /// A worker whose step does not advance this long is declared dead.
    pub progress_timeout_ms: u64,
    pub max_restarts: u32,
    /// ZeRO sharding of the training state over the data-parallel ranks
    /// (SPEC "Sharded optimizer state"); memory only: left out of the
    /// fingerprint, and not written when `none` (so today's configs
    /// serialize as before).
    #[serde(skip_serializing_if = "ShardState::is_none")]
    pub shard_state: ShardState,
}

/// `world.shard_state`: which training state each rank keeps only for its
/// 1/W slice of the flattened parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    /// Every rank holds everything (replicated).
    #[default]
    None,
    /// ZeRO-1: Adam's moments and the EMA only for the rank's slice.
    Optimizer,
    /// ZeRO-2: also only the rank's slice of the reduced gradients.
    OptimizerAndGradients,
}

impl ShardState {
    pub fn is_none(&self) -> bool {
        *self == ShardState::None
    }

    /// Whether the reduced gradients outside the rank's slice are freed.
    pub fn shards_gradients(self) -> bool {
        self == ShardState::OptimizerAndGradients
    }
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            min_size: 1,
            max_size: 1,
            backend: CollectiveBackend::Auto,
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 10_000,
            progress_timeout_ms: 600_000,
            max_restarts: 10,
            shard_state: ShardState::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveBackend {
    /// NCCL on CUDA devices, the TCP ring on CPU.
    Auto,
    Nccl,
    Tcp,
}

/// Checkpoint policy and where the run lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Run directory: a local path, file://, s3://, gs:// URL.
    pub run_dir: String,
    pub every_steps: u64,
    /// Keep the newest K committed checkpoints (the newest valid one is never
    /// deleted).
    pub keep_last: u32,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            run_dir: "runs/swiftbrush".to_owned(),
            every_steps: 1_000,
            keep_last: 3,
        }
    }
}

/// Number formats of the three networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrecisionConfig {
    /// Storage dtype of the frozen teacher (shared with the LoRA teacher).
    pub teacher_dtype: Dtype,
    /// Autocast for the teacher passes, on CUDA or CPU (`none` to run them
    /// in teacher_dtype as stored). Schedule and losses stay float32. Checked
    /// against the device and teacher_dtype when the trainer is built
    /// (worker/src/torch/precision.rs).
    pub autocast: Autocast,
    /// Also run the student's forward (and so its backward) under
    /// `autocast`'s dtype, over float32 master weights, as an accelerate
    /// script's mixed precision does; with fp16, both optimizers get
    /// dynamic loss scaling (torch.amp.GradScaler's). False: the student
    /// computes in float32. Needs `autocast` bf16 or fp16 (validated).
    pub student_autocast: bool,
    /// The student, its EMA and optimizer state: fp32 only (validated; the
    /// key exists because the paper's script has it).
    pub student_dtype: Dtype,
    /// The VAE decoder (SPEC: kept in fp32): fp32 only, training never
    /// decodes; `swiftbrush sample --dtype` is the sampling precision.
    pub vae_dtype: Dtype,
    /// Storage and compute dtype of the frozen text encoder(s) (SDXL: both).
    /// The diffusers training scripts cast them to the mixed-precision
    /// dtype; fp32 (the default) keeps today's conditions. Their output is
    /// cast to float32, so nothing after them changes form. Left out of the
    /// serialized config when fp32, so existing runs' fingerprints hold.
    #[serde(skip_serializing_if = "Dtype::is_fp32")]
    pub text_encoder_dtype: Dtype,
    /// Whether float32 matrix products and convolutions on CUDA may run in
    /// TF32 (a 10-bit mantissa): faster on Ampere and newer, and a change of
    /// the arithmetic (config_changes.rs counts it). Off: fp32 is IEEE fp32
    /// on a GPU too. Changes nothing on the CPU. Applied when the trainer
    /// is built (worker/src/torch/math_mode.rs).
    pub tf32: bool,
    /// cuDNN's benchmark mode: it times the convolution algorithms for each
    /// new shape and keeps the fastest. A speed choice (the same
    /// convolutions, as the GPU model is), so no training change; results
    /// may differ in rounding from a run without it. Changes nothing on the
    /// CPU.
    pub cudnn_benchmark: bool,
}

impl Default for PrecisionConfig {
    fn default() -> Self {
        Self {
            teacher_dtype: Dtype::Bf16,
            autocast: Autocast::Bf16,
            student_autocast: false,
            student_dtype: Dtype::Fp32,
            vae_dtype: Dtype::Fp32,
            text_encoder_dtype: Dtype::Fp32,
            tf32: false,
            cudnn_benchmark: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Bf16,
    Fp16,
}

impl Dtype {
    /// The config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
        }
    }

    pub fn is_fp32(&self) -> bool {
        *self == Dtype::Fp32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Autocast {
    None,
    Bf16,
    Fp16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Log losses and rates every N steps.
    pub every_steps: u64,
    pub format: LogFormat,
    /// Rank 0 writes every step's losses and rates as TensorBoard event
    /// files under RUN/tensorboard/ (`tensorboard --logdir RUN`).
    pub tensorboard: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            every_steps: 10,
            format: LogFormat::Human,
            tensorboard: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        })
    }
}

impl JobConfig {
    /// Parses YAML text. `origin` names the source in errors (a file path).
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        if let Some(message) = crate::config_moved::moved_key(text) {
            return Err(ConfigError::Parse {
                origin: origin.to_owned(),
                message,
            });
        }
        let de = serde_norway::Deserializer::from_str(text);
        let first = match serde_path_to_error::deserialize(de) {
            Ok(config) => return Ok(config),
            Err(e) => crate::config_error::parse_problem(e.path().to_string(), e.into_inner()),
        };
        Err(ConfigError::from_parses(
            origin,
            every_parse_problem(text, first),
        ))
    }

    /// Reads and parses a YAML file (not yet validated: see [`Self::validate`]).
    pub fn from_yaml_file(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: origin.clone(),
            source,
        })?;
        Self::from_yaml_str(&text, &origin)
    }

    /// Checks every value against what the method and the runtime allow; all
    /// problems are reported together, each naming its key path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = crate::config_validate::problems(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The resolved config as YAML (every default written out).
    pub fn to_yaml(&self) -> String {
        // Serializing plain structs of numbers, strings and enums cannot fail.
        serde_norway::to_string(self).unwrap_or_default()
    }

    /// sha256 of the resolved config's canonical JSON: a resumed run checks
    /// it. `train.micro_batch`, `train.gradient_checkpointing`,
    /// `train.recompute_rows`, `train.score_passes` and
    /// `precision.cudnn_benchmark` (and `world.shard_state`) are left out: they are each device's
    /// memory and speed matter (a worker may override the micro-batch) and
    /// change no result.
    pub fn fingerprint(&self) -> String {
        let mut canonical = self.clone();
        canonical.train.micro_batch = None;
        canonical.train.gradient_checkpointing = false;
        canonical.train.recompute_rows = TrainConfig::default().recompute_rows;
        canonical.train.score_passes = ScorePasses::Auto;
        canonical.precision.cudnn_benchmark = false;
        canonical.world.shard_state = ShardState::None;
        let json = serde_json::to_vec(&canonical).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Every problem of a config that does not parse, not just the first
/// (serde stops there): the key at fault is removed from the document and
/// it is parsed again, until it parses or a problem cannot be removed
/// (a YAML syntax error, a missing section). Later problems come without a
/// line number: they are found in the parsed document, not the text.
fn every_parse_problem(text: &str, first: (String, String)) -> Vec<String> {
    const MAX_PROBLEMS: usize = 32;
    let (mut key, message) = first;
    let mut messages = vec![message];
    let Ok(mut document) = serde_norway::from_str::<serde_norway::Value>(text) else {
        return messages;
    };
    while messages.len() < MAX_PROBLEMS && remove_key(&mut document, &key) {
        match serde_path_to_error::deserialize::<_, JobConfig>(document.clone()) {
            Ok(_) => break,
            Err(e) => {
                let (next, message) =
                    crate::config_error::parse_problem(e.path().to_string(), e.into_inner());
                if messages.contains(&message) {
                    break;
                }
                messages.push(message);
                key = next;
            }
        }
    }
    messages
}

/// Removes the dotted `key` (a list element's key removes the whole list)
/// from a YAML document; false when there is no such key.
fn remove_key(document: &mut serde_norway::Value, key: &str) -> bool {
    let key = key.split('[').next().unwrap_or_default();
    if key.is_empty() {
        return false;
    }
    let mut parts: Vec<&str> = key.split('.').collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    let mut node = document;
    for part in parts {
        match node.get_mut(part) {
            Some(child) => node = child,
            None => return false,
        }
    }
    node.as_mapping_mut().and_then(|m| m.remove(last)).is_some()
}

/// Adds a problem when `ok` is false (used by validation).
pub(crate) fn check(
    problems: &mut Vec<Problem>,
    ok: bool,
    key: &str,
    value: String,
    allowed: &str,
) {
    if !ok {
        problems.push(Problem {
            key: key.to_owned(),
            value: Some(value),
            allowed: allowed.to_owned(),
        });
    }
}
