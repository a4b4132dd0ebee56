//! The SwiftBrush step (shared/SPEC.md, "One training iteration", steps
//! 1-6) as a function of its random draws, so it can be checked against a
//! reference fed the same draws. It computes both losses and leaves their
//! gradients in the student's and the adapters' `.grad`; all-reduce,
//! clipping, optimizer steps and EMA belong to the trainer.
//!
//! Precision: the teacher passes (frozen and LoRA) run under the configured
//! autocast (`VsdConfig::teacher_autocast`, see precision.rs) and each of
//! their outputs is cast to float32 before it leaves the autocast region;
//! the student pass, the schedule, guidance, the VSD gradient and both
//! losses are float32.

use tch::{Kind, Tensor};

use crate::precision::AutocastPlan;
use swiftbrush_proto::config::MethodConfig;
pub use swiftbrush_proto::config::{FakeScore, VsdWeighting};

/// A noise-prediction network (a UNet in any role).
pub trait Denoiser {
    /// The raw model output for latents `x` [B,C,h,w], one timestep per
    /// sample `t` [B], text condition `cond` [B,77,D].
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Tensor;
}

/// The teacher with switchable LoRA adapters: off it is the frozen teacher
/// eps_phi, on it is the LoRA teacher eps_psi (one copy of the base weights).
pub trait LoraTeacher: Denoiser {
    fn set_adapters_enabled(&self, enabled: bool);
    /// Which fake score "adapters on" is, and so how the step scores and
    /// trains it: SwiftBrush's LoRA teacher (guided in step 3; step 6
    /// weighted by sqrt(abar_t') with text dropout) or DMD2's full copy
    /// (SPEC "known variants": unweighted eps-MSE, no text dropout, and so
    /// scored on the caption alone in step 3, DMD2's fake guidance 1: its
    /// null branch never trains, so guiding it would mix a tracking score
    /// with the frozen teacher's).
    fn fake_score(&self) -> FakeScore;
}

/// What the model output means (scheduler_config.json `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

impl Prediction {
    /// The output as epsilon: v-prediction teachers must be converted
    /// before any VSD formula (SPEC, known failure modes).
    pub fn to_eps(self, output: &Tensor, x: &Tensor, alpha_bar: &Tensor) -> Tensor {
        match self {
            Prediction::Epsilon => output.shallow_clone(),
            Prediction::VPrediction => alpha_bar.sqrt() * output + (1f64 - alpha_bar).sqrt() * x,
        }
    }
}

/// The method's constants for one step.
#[derive(Debug, Clone, Copy)]
pub struct VsdConfig {
    pub student_timestep: i64,
    /// A in x0_hat = (z - sqrt(1 - A) eps) / sqrt(A).
    pub student_alpha_bar: f64,
    pub guidance_scale: f64,
    pub weighting: VsdWeighting,
    pub prediction: Prediction,
    /// Autocast for the teacher passes (None: as stored, inputs cast to the
    /// teacher's dtype). Build it with `precision::teacher_autocast`.
    pub teacher_autocast: Option<AutocastPlan>,
}

/// Every random draw of one step (per rank).
#[derive(Debug)]
pub struct Draws {
    /// Student input noise [B,C,h,w].
    pub z: Tensor,
    /// VSD timesteps [B], int64 in [min_timestep, max_timestep].
    pub t: Tensor,
    /// VSD noise [B,C,h,w].
    pub eps: Tensor,
    /// LoRA-loss timesteps [B], int64 in [0, 999].
    pub t_lora: Tensor,
    /// LoRA-loss noise [B,C,h,w].
    pub eps_lora: Tensor,
    /// The LoRA loss uses the null condition for the whole batch.
    pub null_condition: bool,
    /// This iteration's guidance scale for both teachers, drawn when
    /// `method.guidance_scale_range` is set (else `VsdConfig`'s).
    pub guidance_scale: Option<f64>,
}

/// What one step's draws are drawn from, besides their key and shape: the
/// method's ranges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawSpec {
    /// VSD timesteps, both ends included.
    pub timesteps: (i64, i64),
    pub null_condition_prob: f64,
    /// SNOOPI's per-iteration guidance scale, uniform in [lo, hi].
    pub guidance_range: Option<(f64, f64)>,
}

impl DrawSpec {
    /// The spec of step `step` of a run of `max_steps`: the VSD timesteps'
    /// upper bound anneals linearly from `max_timestep` to
    /// `max_timestep_final` when that is set (rounded to the nearest step;
    /// a function of the step, so a resumed run draws the same).
    pub fn at_step(m: &MethodConfig, step: u64, max_steps: u64) -> Self {
        let (lo, hi) = (i64::from(m.min_timestep), i64::from(m.max_timestep));
        let hi = match m.max_timestep_final {
            Some(last) if max_steps > 0 => {
                let done = (step.min(max_steps) as f64) / (max_steps as f64);
                (hi as f64 + (f64::from(last) - hi as f64) * done).round() as i64
            }
            _ => hi,
        };
        Self {
            timesteps: (lo, hi.max(lo)),
            null_condition_prob: m.null_condition_prob,
            guidance_range: m.guidance_scale_range.map(|[a, b]| (a, b)),
        }
    }
}

/// Draws happen under one lock: libtorch's generator is process-global, and
/// two trainers in one process (tests) must not interleave seed and draw.
static DRAW_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` with libtorch's global generator seeded to `seed`, holding the
/// draw lock: for initialisations that must be identical on every rank
/// (the LoRA adapters' A matrices).
pub fn with_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    with_generator(|| {
        tch::manual_seed(seed as i64);
        f()
    })
}

/// Runs `f` holding the draw lock, for code that draws from libtorch's
/// global generator unseeded (a model's initial weights, overwritten by a
/// load) while another trainer of this process may be seeding it. Inside,
/// seed with `tch::manual_seed` directly (the lock is not reentrant).
pub fn with_generator<T>(f: impl FnOnce() -> T) -> T {
    let _guard = DRAW_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    f()
}

impl Draws {
    /// Draws the whole global batch from a generator seeded by (seed, step)
    /// on the CPU, then keeps this rank's rows. So the noise of every sample
    /// is a function of (seed, step, sample index): independent of the device
    /// and of the world size (a resumed run with another world size, or one
    /// rank with the global batch, sees exactly the same draws), and needs no
    /// RNG state to resume. The null-condition flag and the guidance scale
    /// are one draw per iteration, shared by all ranks; the guidance scale
    /// is drawn last and only when asked for, so the other draws do not
    /// depend on whether it is.
    pub fn sample(
        key: DrawKey,
        latent_shape: &[i64],
        slice: RankSlice,
        spec: &DrawSpec,
        device: tch::Device,
    ) -> Self {
        let _guard = DRAW_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(key.seed_value());
        let (shape, mine) = slice.rows(latent_shape, device);
        let global = shape[0];
        let opts = (Kind::Float, tch::Device::Cpu);
        let ints = (Kind::Int64, tch::Device::Cpu);
        let z = Tensor::randn(&shape, opts);
        let t = Tensor::randint_low(spec.timesteps.0, spec.timesteps.1 + 1, [global], ints);
        let eps = Tensor::randn(&shape, opts);
        let t_lora = Tensor::randint_low(0, 1000, [global], ints);
        let eps_lora = Tensor::randn(&shape, opts);
        let null_condition = Tensor::rand([1], opts).double_value(&[0]) < spec.null_condition_prob;
        let guidance_scale = spec
            .guidance_range
            .map(|(lo, hi)| lo + (hi - lo) * Tensor::rand([1], opts).double_value(&[0]));
        Self {
            z: mine(z),
            t: mine(t),
            eps: mine(eps),
            t_lora: mine(t_lora),
            eps_lora: mine(eps_lora),
            null_condition,
            guidance_scale,
        }
    }
}

impl Draws {
    /// Rows `start..start + len` of every per-sample draw (one micro-batch);
    /// the per-iteration draws are shared.
    pub fn rows(&self, start: i64, len: i64) -> Draws {
        Draws {
            z: self.z.narrow(0, start, len),
            t: self.t.narrow(0, start, len),
            eps: self.eps.narrow(0, start, len),
            t_lora: self.t_lora.narrow(0, start, len),
            eps_lora: self.eps_lora.narrow(0, start, len),
            null_condition: self.null_condition,
            guidance_scale: self.guidance_scale,
        }
    }
}

/// The micro-batches of a batch of `b` rows taken at most `micro` at a time
/// (`train.micro_batch`; None: all at once), as (start, len); the last may
/// be shorter.
pub fn micro_batches(b: i64, micro: Option<u32>) -> Vec<(i64, i64)> {
    let size = micro.map_or(b, |m| i64::from(m).clamp(1, b.max(1)));
    (0..b)
        .step_by(size.max(1) as usize)
        .map(|start| (start, size.min(b - start)))
        .collect()
}

/// Which rows of the global batch this rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankSlice {
    pub rank: u64,
    pub world_size: u64,
}

impl RankSlice {
    pub const SINGLE: RankSlice = RankSlice {
        rank: 0,
        world_size: 1,
    };

    /// For draws made for the whole global batch: the global shape (this
    /// rank's `latent_shape` with the batch times the world size), and the
    /// cut that keeps this rank's rows, moved to `device`.
    fn rows(
        self,
        latent_shape: &[i64],
        device: tch::Device,
    ) -> (Vec<i64>, impl Fn(Tensor) -> Tensor) {
        let per_rank = latent_shape[0];
        let mut shape = latent_shape.to_vec();
        shape[0] = per_rank * self.world_size as i64;
        let start = self.rank as i64 * per_rank;
        let mine = move |x: Tensor| x.narrow(0, start, per_rank).contiguous().to_device(device);
        (shape, mine)
    }
}

/// What seeds one step's draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrawKey {
    pub seed: u64,
    pub step: u64,
}

impl DrawKey {
    /// A well-mixed 63-bit seed (libtorch takes an i64).
    fn seed_value(self) -> i64 {
        let mut x = self.seed ^ 0xA076_1D64_78BD_642F;
        x = (x ^ self.step).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 32;
        (x >> 1) as i64
    }

    /// The seed of LoRA update `update` >= 1 of this step: a stream apart
    /// from every step's main draws.
    fn extra_seed_value(self, update: u32) -> i64 {
        let salted = DrawKey {
            seed: self.seed ^ (u64::from(update)).wrapping_mul(0xD6E8_FEB8_6659_FD93),
            step: self.step,
        };
        salted.seed_value()
    }
}

/// Text conditions of one batch, computed once and shared by all passes.
pub struct Conditions {
    /// [B,77,D]
    pub cond: Tensor,
    /// The empty prompt's encoding [1,77,D] (not zeros).
    pub uncond: Tensor,
}

impl Conditions {
    /// Rows `start..start + len` of the captions' encodings (one
    /// micro-batch); the null condition is shared.
    pub fn rows(&self, start: i64, len: i64) -> Conditions {
        Conditions {
            cond: self.cond.narrow(0, start, len),
            uncond: self.uncond.shallow_clone(),
        }
    }
}

/// Both losses of a step (float32 scalars on the host).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VsdLosses {
    pub vsd: f64,
    pub lora: f64,
}

impl VsdLosses {
    pub fn all_finite(&self) -> bool {
        self.vsd.is_finite() && self.lora.is_finite()
    }
}

/// One SwiftBrush iteration's forward and backward passes (SPEC 1-6).
/// After it, the student's parameters hold the VSD gradient and the
/// adapters hold the LoRA loss gradient. `alphas_cumprod` is the float32
/// schedule [1000] on the latents' device.
pub fn vsd_step(
    student: &impl Denoiser,
    teacher: &impl LoraTeacher,
    alphas_cumprod: &Tensor,
    cfg: &VsdConfig,
    text: &Conditions,
    draws: &Draws,
) -> VsdLosses {
    vsd_step_in_micro_batches(student, teacher, alphas_cumprod, cfg, text, draws, None).0
}

/// `vsd_step` with the batch run `micro` rows at a time (gradient
/// accumulation; None: all at once), also returning the student's draw
/// x0_hat (detached), on which further LoRA teacher updates of the
/// iteration train. Each micro-batch's losses are scaled by its
/// share of the batch before their backward, so the gradients left behind
/// and the losses returned are the whole batch's (to float rounding; with
/// one micro-batch, bit for bit). Activations live for one micro-batch.
pub fn vsd_step_in_micro_batches(
    student: &impl Denoiser,
    teacher: &impl LoraTeacher,
    alphas_cumprod: &Tensor,
    cfg: &VsdConfig,
    text: &Conditions,
    draws: &Draws,
    micro: Option<u32>,
) -> (VsdLosses, Tensor) {
    let b = draws.z.size()[0];
    let parts = each_micro_batch(b, micro, |start, len, share| {
        vsd_part(
            student,
            teacher,
            alphas_cumprod,
            cfg,
            &text.rows(start, len),
            &draws.rows(start, len),
            share,
        )
    });
    let mut losses = VsdLosses {
        vsd: 0.0,
        lora: 0.0,
    };
    let mut x0 = Vec::with_capacity(parts.len());
    for (share, (part, part_x0)) in parts {
        losses.vsd += share * part.vsd;
        losses.lora += share * part.lora;
        x0.push(part_x0);
    }
    (losses, Tensor::cat(&x0, 0))
}

/// Runs `part(start, len, share)` on each micro-batch of a batch of `b`
/// rows (see [`micro_batches`]), `share` being its fraction of the rows:
/// exactly 1 when one micro-batch is the whole batch, whose views of the
/// batch's tensors then are those tensors, so the step is the unsplit one
/// bit for bit.
fn each_micro_batch<T>(
    b: i64,
    micro: Option<u32>,
    mut part: impl FnMut(i64, i64, f64) -> T,
) -> Vec<(f64, T)> {
    micro_batches(b, micro)
        .into_iter()
        .map(|(start, len)| {
            let share = if len == b { 1.0 } else { len as f64 / b as f64 };
            (share, part(start, len, share))
        })
        .collect()
}

/// SPEC steps 1-6 on one micro-batch whose losses are `share` of the
/// batch's: both backwards run on `share` times the losses (skipped at 1,
/// so the one-micro-batch step is exactly the unsplit one); the losses
/// returned are the micro-batch's own.
fn vsd_part(
    student: &impl Denoiser,
    teacher: &impl LoraTeacher,
    alphas_cumprod: &Tensor,
    cfg: &VsdConfig,
    text: &Conditions,
    draws: &Draws,
    share: f64,
) -> (VsdLosses, Tensor) {
    let per_sample = |t: &Tensor| alphas_cumprod.index_select(0, t).view([-1, 1, 1, 1]);

    // 1. Student draw: one pass at t = 999 from pure noise.
    let x0_hat = one_step_x0(student, &draws.z, &text.cond, &cfg.one_step());

    // 2. Noise it; x_t keeps its link to the student.
    let abar_t = per_sample(&draws.t);
    let x_t = abar_t.sqrt() * &x0_hat + (1f64 - &abar_t).sqrt() * &draws.eps;

    // 3. Both teachers with guidance, without gradients.
    let (e_teacher, e_lora) = tch::no_grad(|| {
        let x = x_t.detach();
        let scale = draws.guidance_scale.unwrap_or(cfg.guidance_scale);
        teacher.set_adapters_enabled(false);
        let e_t = guided(teacher, &x, &draws.t, &abar_t, text, scale, cfg);
        teacher.set_adapters_enabled(true);
        let e_l = match teacher.fake_score() {
            FakeScore::Lora => guided(teacher, &x, &draws.t, &abar_t, text, scale, cfg),
            FakeScore::Unet => {
                let out = teacher_pass(teacher, &x, &draws.t, &text.cond, cfg);
                cfg.prediction.to_eps(&out, &x, &abar_t)
            }
        };
        (e_t, e_l)
    });

    // 4-5. VSD gradient, applied through a surrogate whose gradient wrt
    // x0_hat is g / numel.
    let g = vsd_gradient(
        cfg.weighting,
        &x0_hat.detach(),
        &x_t.detach(),
        &abar_t,
        &e_teacher,
        &e_lora,
    )
    .nan_to_num(0.0, None, None);
    let target = (&x0_hat - g).detach();
    let loss_vsd = (x0_hat.to_kind(Kind::Float) - target.to_kind(Kind::Float))
        .square()
        .mean(Kind::Float)
        * 0.5;
    backward_share(&loss_vsd, share);

    // 6. The LoRA teacher learns to denoise the student's (detached) draws.
    let x0 = x0_hat.detach();
    let lora = lora_part(
        teacher,
        alphas_cumprod,
        cfg,
        text,
        &x0,
        &LoraDraws {
            t_lora: draws.t_lora.shallow_clone(),
            eps_lora: draws.eps_lora.shallow_clone(),
            null_condition: draws.null_condition,
        },
        share,
    );

    (
        VsdLosses {
            vsd: loss_vsd.double_value(&[]),
            lora,
        },
        x0,
    )
}

/// The student's one-step draw (SPEC step 1 and "Inference"): one pass at
/// `cfg`'s student timestep on the noise `z` [B,C,h,w] under `cond`
/// [B,77,D], the output as epsilon, x0_hat = (z - sqrt(1 - A) eps) /
/// sqrt(A), in float32. With gradients when called with them. Training,
/// its sample step and `sample --student` all draw through it.
pub fn one_step_x0(
    student: &impl Denoiser,
    z: &Tensor,
    cond: &Tensor,
    cfg: &OneStepDraw,
) -> Tensor {
    let (b, device) = (z.size()[0], z.device());
    let t_student = Tensor::full([b], cfg.timestep, (Kind::Int64, device));
    let a = Tensor::full([1, 1, 1, 1], cfg.alpha_bar, (Kind::Float, device));
    let out = student.predict(z, &t_student, cond);
    let eps_s = cfg.prediction.to_eps(&out.to_kind(Kind::Float), z, &a);
    (z - (1f64 - &a).sqrt() * eps_s) / a.sqrt()
}

/// What the student's one-step draw needs: its timestep, the constant A,
/// and what the UNet's output means.
#[derive(Debug, Clone, Copy)]
pub struct OneStepDraw {
    pub timestep: i64,
    pub alpha_bar: f64,
    pub prediction: Prediction,
}

impl VsdConfig {
    pub fn one_step(&self) -> OneStepDraw {
        OneStepDraw {
            timestep: self.student_timestep,
            alpha_bar: self.student_alpha_bar,
            prediction: self.prediction,
        }
    }
}

/// SPEC step 4 without the nan_to_num: the direction in which the draw
/// `x0_hat` moves away from (so minus the step toward) the teacher's
/// distribution, from both teachers' guided eps on `x_t`.
fn vsd_gradient(
    weighting: VsdWeighting,
    x0_hat: &Tensor,
    x_t: &Tensor,
    abar_t: &Tensor,
    e_teacher: &Tensor,
    e_lora: &Tensor,
) -> Tensor {
    match weighting {
        VsdWeighting::Paper => (1f64 - abar_t) * (e_teacher - e_lora),
        VsdWeighting::Dmd => {
            // x0_L - x0_T = sqrt((1 - abar) / abar) (e_T - e_L): the fake
            // minus the real x0 prediction, DMD's gradient before its norm.
            let ratio = ((1f64 - abar_t) / abar_t).sqrt();
            let x0_teacher = (x_t - (1f64 - abar_t).sqrt() * e_teacher) / abar_t.sqrt();
            let norm =
                (x0_hat - x0_teacher)
                    .abs()
                    .mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float);
            ratio * (e_teacher - e_lora) / norm
        }
    }
}

/// The backward of `share` times `loss` (the plain backward at 1).
fn backward_share(loss: &Tensor, share: f64) {
    if share == 1.0 {
        loss.backward();
    } else {
        (loss * share).backward();
    }
}

/// SPEC step 6 on the student's detached draw `x0`: the LoRA teacher's
/// denoising loss, backward into the adapters' `.grad`, run `micro` rows at
/// a time as `vsd_step_in_micro_batches` does. Returns the loss.
/// DMD2's full fake score (`FakeScore::Unet`) trains on the caption always
/// (the draws' null flag is ignored, so the random stream is the same for
/// both forms) with the unweighted eps-MSE.
pub fn lora_loss_backward(
    teacher: &impl LoraTeacher,
    alphas_cumprod: &Tensor,
    cfg: &VsdConfig,
    text: &Conditions,
    x0: &Tensor,
    draws: &LoraDraws,
    micro: Option<u32>,
) -> f64 {
    let parts = each_micro_batch(x0.size()[0], micro, |start, len, share| {
        let text = text.rows(start, len);
        let x0 = x0.narrow(0, start, len);
        let part = draws.rows(start, len);
        lora_part(teacher, alphas_cumprod, cfg, &text, &x0, &part, share)
    });
    parts.into_iter().map(|(share, loss)| share * loss).sum()
}

/// `lora_loss_backward` on one micro-batch that is `share` of the batch.
fn lora_part(
    teacher: &impl LoraTeacher,
    alphas_cumprod: &Tensor,
    cfg: &VsdConfig,
    text: &Conditions,
    x0: &Tensor,
    draws: &LoraDraws,
    share: f64,
) -> f64 {
    let b = x0.size()[0];
    teacher.set_adapters_enabled(true);
    let abar_l = alphas_cumprod
        .index_select(0, &draws.t_lora)
        .view([-1, 1, 1, 1]);
    let x_l = abar_l.sqrt() * x0 + (1f64 - &abar_l).sqrt() * &draws.eps_lora;
    let fake_score = teacher.fake_score();
    let cond = if draws.null_condition && fake_score == FakeScore::Lora {
        text.uncond.expand([b, -1, -1], false)
    } else {
        text.cond.shallow_clone()
    };
    // Under autocast with gradients: the backward below runs each op in the
    // dtype its forward ran in, outside the region (as torch.autocast asks).
    let pred = teacher_pass(teacher, &x_l, &draws.t_lora, &cond, cfg);
    let pred = cfg.prediction.to_eps(&pred, &x_l, &abar_l);
    let residual = pred - &draws.eps_lora;
    let loss_lora = match fake_score {
        FakeScore::Lora => (abar_l.sqrt() * residual).square().mean(Kind::Float),
        FakeScore::Unet => residual.square().mean(Kind::Float),
    };
    backward_share(&loss_lora, share);
    loss_lora.double_value(&[])
}

/// The draws of one LoRA teacher update (SPEC step 6): the first of an
/// iteration takes them from `Draws`; each further one
/// (`method.lora.updates_per_step` > 1) draws its own from
/// (seed, step, update), on the same terms as `Draws::sample`.
#[derive(Debug)]
pub struct LoraDraws {
    /// Timesteps [B], int64 in [0, 999].
    pub t_lora: Tensor,
    /// Noise [B,C,h,w].
    pub eps_lora: Tensor,
    /// The null condition for the whole batch.
    pub null_condition: bool,
}

impl LoraDraws {
    /// Rows `start..start + len` (one micro-batch); the null flag is shared.
    pub fn rows(&self, start: i64, len: i64) -> LoraDraws {
        LoraDraws {
            t_lora: self.t_lora.narrow(0, start, len),
            eps_lora: self.eps_lora.narrow(0, start, len),
            null_condition: self.null_condition,
        }
    }

    /// The draws of LoRA update `update` >= 1 of an iteration: the whole
    /// global batch from a generator seeded by (seed, step, update), then
    /// this rank's rows (independent of the device and the world size).
    pub fn sample_extra(
        key: DrawKey,
        update: u32,
        latent_shape: &[i64],
        slice: RankSlice,
        null_condition_prob: f64,
        device: tch::Device,
    ) -> Self {
        let _guard = DRAW_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(key.extra_seed_value(update));
        let (shape, mine) = slice.rows(latent_shape, device);
        let global = shape[0];
        let t_lora = Tensor::randint_low(0, 1000, [global], (Kind::Int64, tch::Device::Cpu));
        let eps_lora = Tensor::randn(&shape, (Kind::Float, tch::Device::Cpu));
        let null_condition = Tensor::rand([1], (Kind::Float, tch::Device::Cpu)).double_value(&[0])
            < null_condition_prob;
        Self {
            t_lora: mine(t_lora),
            eps_lora: mine(eps_lora),
            null_condition,
        }
    }
}

/// Classifier-free guidance at `scale`, as epsilon: cond and null run as
/// one batch.
fn guided(
    model: &impl Denoiser,
    x: &Tensor,
    t: &Tensor,
    abar_t: &Tensor,
    text: &Conditions,
    scale: f64,
    cfg: &VsdConfig,
) -> Tensor {
    let b = x.size()[0];
    let xx = Tensor::cat(&[x, x], 0);
    let tt = Tensor::cat(&[t, t], 0);
    let cc = Tensor::cat(&[&text.uncond.expand([b, -1, -1], false), &text.cond], 0);
    let abar = Tensor::cat(&[abar_t, abar_t], 0);
    let out = teacher_pass(model, &xx, &tt, &cc, cfg);
    let eps = cfg.prediction.to_eps(&out, &xx, &abar);
    let parts = eps.chunk(2, 0);
    &parts[0] + (&parts[1] - &parts[0]) * scale
}

/// One teacher pass under the configured autocast; the output leaves the
/// region as float32, so what follows is float32 arithmetic.
fn teacher_pass(
    model: &impl Denoiser,
    x: &Tensor,
    t: &Tensor,
    cond: &Tensor,
    cfg: &VsdConfig,
) -> Tensor {
    let _autocast = cfg.teacher_autocast.as_ref().map(AutocastPlan::enter);
    model.predict(x, t, cond).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: DrawSpec = DrawSpec {
        timesteps: (20, 980),
        null_condition_prob: 0.1,
        guidance_range: None,
    };

    fn draw(seed: u64, step: u64, shape: &[i64], slice: RankSlice) -> Draws {
        draw_with(seed, step, shape, slice, &SPEC)
    }

    fn draw_with(seed: u64, step: u64, shape: &[i64], slice: RankSlice, spec: &DrawSpec) -> Draws {
        Draws::sample(DrawKey { seed, step }, shape, slice, spec, tch::Device::Cpu)
    }

    #[test]
    fn a_guidance_range_draws_one_scale_per_iteration_for_every_rank() {
        let spec = DrawSpec {
            guidance_range: Some((2.0, 6.0)),
            ..SPEC
        };
        let shape = [2, 4, 8, 8];
        let plain = draw(1, 5, &shape, RankSlice::SINGLE);
        let ranged = draw_with(1, 5, &shape, RankSlice::SINGLE, &spec);
        assert_eq!(plain.guidance_scale, None);
        // Drawn last: every other draw is the same as without the range.
        assert!(plain.z.equal(&ranged.z) && plain.eps_lora.equal(&ranged.eps_lora));
        assert_eq!(plain.null_condition, ranged.null_condition);

        let half = |rank| RankSlice {
            rank,
            world_size: 2,
        };
        let r1 = draw_with(1, 5, &[1, 4, 8, 8], half(1), &spec);
        assert_eq!(r1.guidance_scale, ranged.guidance_scale, "shared by ranks");

        let scales: Vec<f64> = (0..200)
            .map(|s| draw_with(1, s, &[1, 1, 1, 1], RankSlice::SINGLE, &spec))
            .map(|d| d.guidance_scale.unwrap())
            .collect();
        assert!(scales.iter().all(|g| (2.0..=6.0).contains(g)), "{scales:?}");
        let mean = scales.iter().sum::<f64>() / scales.len() as f64;
        assert!((3.7..4.3).contains(&mean), "mean {mean}");
        assert!(scales.iter().any(|&g| g < 2.5) && scales.iter().any(|&g| g > 5.5));
    }

    #[test]
    fn the_upper_timestep_anneals_linearly_over_the_run() {
        let mut m = MethodConfig::default();
        assert_eq!(DrawSpec::at_step(&m, 500, 1000).timesteps, (20, 980));
        m.max_timestep_final = Some(500);
        let hi = |step| DrawSpec::at_step(&m, step, 1000).timesteps.1;
        assert_eq!((hi(0), hi(250), hi(500), hi(1000)), (980, 860, 740, 500));
        assert_eq!(hi(5000), 500, "past max_steps it stays at the end");
        for s in 0..20 {
            let spec = DrawSpec::at_step(&m, 1000, 1000);
            let d = draw_with(1, s, &[8, 1, 1, 1], RankSlice::SINGLE, &spec);
            assert!(d.t.max().int64_value(&[]) <= 500);
        }
    }

    #[test]
    fn draws_are_a_function_of_seed_step_and_sample_index() {
        let shape = [2, 4, 8, 8];
        let a = draw(1, 5, &shape, RankSlice::SINGLE);
        let b = draw(1, 5, &shape, RankSlice::SINGLE);
        assert!(a.z.equal(&b.z) && a.t.equal(&b.t) && a.eps_lora.equal(&b.eps_lora));
        assert_eq!(a.null_condition, b.null_condition);
        assert!(!a.z.equal(&draw(1, 6, &shape, RankSlice::SINGLE).z));
        assert!(!a.z.equal(&draw(2, 5, &shape, RankSlice::SINGLE).z));

        // Two ranks of one sample each hold exactly the rows of one rank
        // with both samples: the world size does not change any draw.
        let r0 = draw(
            1,
            5,
            &[1, 4, 8, 8],
            RankSlice {
                rank: 0,
                world_size: 2,
            },
        );
        let r1 = draw(
            1,
            5,
            &[1, 4, 8, 8],
            RankSlice {
                rank: 1,
                world_size: 2,
            },
        );
        assert!(Tensor::cat(&[&r0.z, &r1.z], 0).equal(&a.z));
        assert!(Tensor::cat(&[&r0.t_lora, &r1.t_lora], 0).equal(&a.t_lora));
        assert!(Tensor::cat(&[&r0.eps, &r1.eps], 0).equal(&a.eps));
        assert_eq!(r0.null_condition, a.null_condition);
        assert_eq!(r1.null_condition, a.null_condition);

        // Timesteps stay in their ranges.
        for s in 0..50 {
            let d = draw(1, s, &[8, 1, 1, 1], RankSlice::SINGLE);
            let (lo, hi) = (d.t.min().int64_value(&[]), d.t.max().int64_value(&[]));
            assert!((20..=980).contains(&lo) && (20..=980).contains(&hi));
            assert!(d.t_lora.max().int64_value(&[]) <= 999);
        }
    }

    #[test]
    fn micro_batches_cover_the_batch_in_order() {
        assert_eq!(micro_batches(6, None), vec![(0, 6)]);
        assert_eq!(micro_batches(6, Some(6)), vec![(0, 6)]);
        assert_eq!(micro_batches(6, Some(64)), vec![(0, 6)]);
        assert_eq!(micro_batches(6, Some(2)), vec![(0, 2), (2, 2), (4, 2)]);
        assert_eq!(micro_batches(7, Some(3)), vec![(0, 3), (3, 3), (6, 1)]);
        assert_eq!(micro_batches(1, Some(1)), vec![(0, 1)]);
    }

    #[test]
    fn null_condition_frequency_follows_probability() {
        let n = (0..400)
            .filter(|&s| draw(3, s, &[1, 1, 1, 1], RankSlice::SINGLE).null_condition)
            .count();
        assert!((20..=60).contains(&n), "{n} of 400");
    }

    #[test]
    fn v_prediction_converts_to_eps() {
        // x = sqrt(a) x0 + sqrt(1-a) eps, v = sqrt(a) eps - sqrt(1-a) x0.
        let x0 = Tensor::from_slice(&[0.3f32, -1.0]);
        let eps = Tensor::from_slice(&[1.5f32, 0.2]);
        let a = Tensor::from_slice(&[0.36f32]);
        let x = a.sqrt() * &x0 + (1f64 - &a).sqrt() * &eps;
        let v = a.sqrt() * &eps - (1f64 - &a).sqrt() * &x0;
        let got = Prediction::VPrediction.to_eps(&v, &x, &a);
        let d = (got - eps).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{d}");
    }
}
