//! One SwiftBrush iteration's passes, shared/SPEC.md "One training
//! iteration" steps 1-6, as a function of its draws: it computes both
//! losses and leaves their gradients in the student's and the fake score's
//! `.grad`. All-reduce, clipping, optimizer steps and EMA belong to the
//! trainer. The formulas themselves (noising, epsilon from a model output,
//! x0, guidance, the one-step draw) live in `diffusion/`.

use tch::{Kind, Tensor};

use super::draws::{Draws, FakeScoreDraws};
use super::micro_batch::{MicroBatch, each_micro_batch};
use super::scores::{FakeScore, Scores};
use super::{Conditions, LossScales, VsdConfig, VsdError, VsdLosses};
use crate::diffusion::{
    Denoiser, NoiseSchedule, PredictionType, add_noise_at, guide_batched, one_minus,
    one_step_output, one_step_x0, to_epsilon, to_x0, x0_of_output,
};
use swiftbrush_proto::config::VsdWeighting;

/// The networks and constants of a step; [`VsdStep::run`] is one iteration.
pub struct VsdStep<'a, S, F> {
    /// The student's network (a `&UNet`, or [`super::StudentNet`]).
    pub student: S,
    pub scores: &'a F,
    pub schedule: &'a NoiseSchedule,
    pub config: &'a VsdConfig,
    /// Each loss's multiplier before its backward (fp16 loss scaling,
    /// trainer/grad_scaler.rs); None: the plain backward.
    pub loss_scales: Option<LossScales>,
}

/// What a step leaves besides the gradients.
#[derive(Debug)]
pub struct StepOutput {
    /// Both losses of the rank's batch.
    pub losses: VsdLosses,
    /// The student's draw x0_hat, detached: further fake-score updates of
    /// the iteration train on it.
    pub x0: Tensor,
}

/// Both losses of a rank's batch, still on the device (0-dim float64):
/// the trainer reads them with the gradient norms in one transfer.
#[derive(Debug)]
pub struct DeviceLosses {
    pub vsd: Tensor,
    pub fake_score: Tensor,
}

/// [`StepOutput`] before any read from the device.
#[derive(Debug)]
pub struct DeviceStepOutput {
    pub losses: DeviceLosses,
    pub x0: Tensor,
}

/// `total + share * loss` in float64 on the loss's device (`share * loss`
/// alone for the first micro-batch: the host's 0.0 + x, exactly).
pub(super) fn accumulate(
    total: Option<Tensor>,
    loss: &Tensor,
    share: f64,
) -> Result<Tensor, VsdError> {
    let part = loss.f_to_kind(Kind::Double)?.f_mul_scalar(share)?;
    Ok(match total {
        None => part,
        Some(t) => t.f_add(&part)?,
    })
}

/// Which of the two scores a pass runs.
#[derive(Debug, Clone, Copy)]
enum Score {
    Real,
    Fake,
}

impl<S: Denoiser, F: Scores> VsdStep<'_, S, F> {
    /// SPEC steps 1-6 on the rank's batch, `micro` rows at a time
    /// (gradient accumulation; None: all at once). The gradients left
    /// behind and the losses returned are the whole batch's (to float
    /// rounding; with one micro-batch, bit for bit).
    pub fn run(
        &self,
        text: &Conditions,
        draws: &Draws,
        micro: Option<u32>,
    ) -> Result<StepOutput, VsdError> {
        let out = self.run_on_device(text, draws, micro)?;
        let host = crate::torch::host_read::read(&[&out.losses.vsd, &out.losses.fake_score])?;
        Ok(StepOutput {
            losses: VsdLosses {
                vsd: host[0],
                fake_score: host[1],
            },
            x0: out.x0,
        })
    }

    /// [`Self::run`] without reading the losses back: they stay on the
    /// device, summed over the micro-batches by their shares in float64
    /// (the arithmetic the host did, so the values are the same).
    pub fn run_on_device(
        &self,
        text: &Conditions,
        draws: &Draws,
        micro: Option<u32>,
    ) -> Result<DeviceStepOutput, VsdError> {
        let parts = each_micro_batch(draws.z.size()[0], micro, |m| {
            self.iteration(&text.rows(m.start, m.len), &draws.rows(m.start, m.len), m)
        })?;
        let mut vsd: Option<Tensor> = None;
        let mut fake_score: Option<Tensor> = None;
        let mut x0 = Vec::with_capacity(parts.len());
        for (share, ((part_vsd, part_fake), part_x0)) in parts {
            vsd = Some(accumulate(vsd, &part_vsd, share)?);
            fake_score = Some(accumulate(fake_score, &part_fake, share)?);
            x0.push(part_x0);
        }
        let (Some(vsd), Some(fake_score)) = (vsd, fake_score) else {
            return Err(VsdError::EmptyBatch);
        };
        Ok(DeviceStepOutput {
            losses: DeviceLosses { vsd, fake_score },
            x0: Tensor::f_cat(&x0, 0)?,
        })
    }

    /// SPEC step 6 alone: a further update of the fake score on the
    /// student's detached draw `x0` with its own draws, `micro` rows at a
    /// time as [`Self::run`]. Returns the loss, on the device (0-dim
    /// float64).
    pub fn update_fake_score(
        &self,
        text: &Conditions,
        x0: &Tensor,
        draws: &FakeScoreDraws,
        micro: Option<u32>,
    ) -> Result<Tensor, VsdError> {
        let parts = each_micro_batch(x0.size()[0], micro, |m| {
            let (text, x0, draws) = (
                &text.rows(m.start, m.len),
                &x0.narrow(0, m.start, m.len),
                &draws.rows(m.start, m.len),
            );
            match self.config.recompute_rows {
                Some(rows) => self.fake_score_loss_in_chunks(text, x0, draws, m, rows),
                None => self.fake_score_loss(text, x0, draws, m),
            }
        })?;
        let mut total: Option<Tensor> = None;
        for (share, loss) in parts {
            total = Some(accumulate(total, &loss, share)?);
        }
        total.ok_or(VsdError::EmptyBatch)
    }

    /// SPEC step 1: the student's draw x0_hat of the noise `z` under
    /// `cond`, float32, with gradients when called with them. The one
    /// place the student's forward runs in training (a recomputation must
    /// call it too): under `precision.student_autocast` the pass runs
    /// under the autocast and its output leaves the region as float32,
    /// before the x0 formula's 1/sqrt(A) amplification.
    pub fn student_x0(&self, z: &Tensor, cond: &Tensor) -> Result<Tensor, VsdError> {
        let one_step = self.config.one_step(self.schedule.prediction_type());
        let Some(plan) = self.config.student_autocast.as_ref() else {
            return Ok(one_step_x0(&self.student, z, cond, &one_step)?);
        };
        let out = {
            let _autocast = plan.enter();
            one_step_output(&self.student, z, cond, &one_step)?
        };
        Ok(x0_of_output(&out, z, &one_step)?)
    }

    /// Steps 1-6 on one micro-batch; both backwards run on its share of
    /// the losses, and the losses returned are the micro-batch's own.
    fn iteration(
        &self,
        text: &Conditions,
        draws: &Draws,
        part: MicroBatch,
    ) -> Result<((Tensor, Tensor), Tensor), VsdError> {
        // A few-step student: backward simulation first (few_step.rs),
        // recomputed there too under checkpointing.
        // train.gradient_checkpointing: the same steps, activations
        // recomputed a few rows at a time (recompute.rs).
        if let Some(chain) = &self.config.few_step {
            return self.iteration_few_step(chain, text, draws, part);
        }
        if let Some(rows) = self.config.recompute_rows {
            return self.iteration_recomputed(text, draws, part, rows);
        }
        // 1. Student draw: one pass at t = 999 from pure noise.
        let x0_hat = self.student_x0(&draws.z, &text.cond)?;

        // 2-5. The surrogate loss, backward into the student.
        let loss_vsd = self.vsd_loss(&x0_hat, text, draws)?;
        part.backward_scaled(&loss_vsd, self.loss_scales.map(|s| s.student))?;

        // 6. The fake score learns to denoise the student's (detached) draws.
        let x0 = x0_hat.f_detach()?;
        let fake_score = self.fake_score_loss(text, &x0, &draws.fake, part)?;

        Ok(((loss_vsd.f_detach()?, fake_score), x0))
    }

    /// Steps 2-5 up to the surrogate loss of the student's draw `x0_hat`,
    /// whose gradient wrt `x0_hat` is g / numel.
    pub(super) fn vsd_loss(
        &self,
        x0_hat: &Tensor,
        text: &Conditions,
        draws: &Draws,
    ) -> Result<Tensor, VsdError> {
        // 2. Noise it; x_t keeps its link to the student. abar_t is looked
        // up once for every formula of the step.
        let abar_t = self.schedule.alpha_bar_at(&draws.t, draws.z.dim())?;
        let x_t = add_noise_at(x0_hat, &draws.eps, &abar_t)?;

        // 3. Both scores with guidance, without gradients.
        let scale = draws.guidance_scale.unwrap_or(self.config.guidance_scale);
        let (e_real, e_fake) = tch::no_grad(|| -> Result<_, VsdError> {
            let x = x_t.f_detach()?;
            let at = (&draws.t, &abar_t);
            // Every guided pass of the step takes the same batch.
            let batch = GuidanceBatch::new(&x, at, text)?;
            match self.scores.form() {
                // Both guided, in one pass (Scores::both) or two.
                FakeScore::Lora if self.config.one_score_pass => self.guided_both(&batch, scale),
                FakeScore::Lora => Ok((
                    self.guided(Score::Real, &batch, scale)?,
                    self.guided(Score::Fake, &batch, scale)?,
                )),
                FakeScore::Unet => Ok((
                    self.guided(Score::Real, &batch, scale)?,
                    self.epsilon(Score::Fake, &x, at, &text.cond)?,
                )),
            }
        })?;

        // 4-5. The VSD gradient, applied through a surrogate whose gradient
        // wrt x0_hat is g / numel.
        let g = vsd_gradient(
            self.config.weighting,
            &x0_hat.f_detach()?,
            &x_t.f_detach()?,
            &abar_t,
            &e_real,
            &e_fake,
        )?
        .f_nan_to_num(0.0, None, None)?;
        let target = x0_hat.f_sub(&g)?.f_detach()?;
        let loss_vsd = x0_hat
            .f_to_kind(Kind::Float)?
            .f_sub(&target.f_to_kind(Kind::Float)?)?
            .f_square()?
            .f_mean(Kind::Float)?
            .f_mul_scalar(0.5)?;
        Ok(loss_vsd)
    }

    /// SPEC step 6 on one micro-batch: the fake score's denoising loss on
    /// `x0`, backward into its weights' `.grad`; returns the loss. The
    /// LoRA teacher's is weighted by sqrt(abar_t') with text dropout;
    /// DMD2's full copy trains on the caption always (the draws' null flag
    /// is ignored, so the random stream is the same for both forms) with
    /// the unweighted eps-MSE.
    pub(super) fn fake_score_loss(
        &self,
        text: &Conditions,
        x0: &Tensor,
        draws: &FakeScoreDraws,
        part: MicroBatch,
    ) -> Result<Tensor, VsdError> {
        let form = self.scores.form();
        let abar = self.schedule.alpha_bar_at(&draws.t, x0.dim())?;
        let x = add_noise_at(x0, &draws.eps, &abar)?;
        let cond = if draws.null_condition && form == FakeScore::Lora {
            text.uncond.f_expand([x0.size()[0], -1, -1], false)?
        } else {
            text.cond.shallow_clone()
        };
        // Under autocast with gradients: the backward below runs each op in
        // the dtype its forward ran in, outside the region (as
        // torch.autocast asks).
        let residual = self
            .epsilon(Score::Fake, &x, (&draws.t, &abar), &cond)?
            .f_sub(&draws.eps)?;
        let loss = match form {
            FakeScore::Lora => abar
                .f_sqrt()?
                .f_mul(&residual)?
                .f_square()?
                .f_mean(Kind::Float)?,
            FakeScore::Unet => residual.f_square()?.f_mean(Kind::Float)?,
        };
        part.backward_scaled(&loss, self.loss_scales.map(|s| s.fake_score))?;
        Ok(loss.f_detach()?)
    }

    /// Classifier-free guidance at `scale`, as epsilon: the null condition
    /// and the caption run as one batch.
    fn guided(&self, score: Score, b: &GuidanceBatch, scale: f64) -> Result<Tensor, VsdError> {
        let eps = self.epsilon(score, &b.x, (&b.t, &b.abar), &b.c)?;
        Ok(guide_batched(&eps, scale)?)
    }

    /// [`Self::guided`] of the real and the fake score in one pass
    /// (`Scores::both`).
    fn guided_both(&self, b: &GuidanceBatch, scale: f64) -> Result<(Tensor, Tensor), VsdError> {
        let (real, fake) = {
            let _autocast = self.config.teacher_autocast.as_ref().map(|a| a.enter());
            let (real, fake) = self.scores.both(&b.x, &b.t, &b.c)?;
            (real.f_to_kind(Kind::Float)?, fake.f_to_kind(Kind::Float)?)
        };
        let prediction = self.schedule.prediction_type();
        Ok((
            guide_batched(&to_epsilon(prediction, &real, &b.x, &b.abar)?, scale)?,
            guide_batched(&to_epsilon(prediction, &fake, &b.x, &b.abar)?, scale)?,
        ))
    }

    /// One pass of a score at timesteps `t` (whose abar is `abar`) as
    /// epsilon. The pass runs under the configured autocast and leaves it
    /// as float32, so what follows is float32 arithmetic.
    fn epsilon(
        &self,
        score: Score,
        x: &Tensor,
        (t, abar): (&Tensor, &Tensor),
        c: &Tensor,
    ) -> Result<Tensor, VsdError> {
        let out = {
            let _autocast = self.config.teacher_autocast.as_ref().map(|a| a.enter());
            match score {
                Score::Real => self.scores.real(x, t, c)?,
                Score::Fake => self.scores.fake(x, t, c)?,
            }
            .f_to_kind(Kind::Float)?
        };
        Ok(to_epsilon(self.schedule.prediction_type(), &out, x, abar)?)
    }
}

/// Classifier-free guidance's batch: every input twice, the null condition
/// on the first half and the caption on the second.
struct GuidanceBatch {
    x: Tensor,
    t: Tensor,
    abar: Tensor,
    c: Tensor,
}

impl GuidanceBatch {
    fn new(x: &Tensor, (t, abar): (&Tensor, &Tensor), text: &Conditions) -> Result<Self, VsdError> {
        let b = x.size()[0];
        let uncond = text.uncond.f_expand([b, -1, -1], false)?;
        Ok(Self {
            x: Tensor::f_cat(&[x, x], 0)?,
            t: Tensor::f_cat(&[t, t], 0)?,
            abar: Tensor::f_cat(&[abar, abar], 0)?,
            c: Tensor::f_cat(&[&uncond, &text.cond], 0)?,
        })
    }
}

/// SPEC step 4 without the nan_to_num: the direction in which the draw
/// `x0_hat` moves away from (so minus the step toward) the teacher's
/// distribution, from both scores' guided eps on `x_t`.
fn vsd_gradient(
    weighting: VsdWeighting,
    x0_hat: &Tensor,
    x_t: &Tensor,
    abar_t: &Tensor,
    e_real: &Tensor,
    e_fake: &Tensor,
) -> Result<Tensor, VsdError> {
    let difference = e_real.f_sub(e_fake)?;
    Ok(match weighting {
        VsdWeighting::Paper => one_minus(abar_t)?.f_mul(&difference)?,
        VsdWeighting::Dmd => {
            // x0_fake - x0_real = sqrt((1 - abar) / abar) (e_real - e_fake):
            // the fake minus the real x0 prediction, DMD's gradient before
            // its norm.
            let ratio = one_minus(abar_t)?.f_div(abar_t)?.f_sqrt()?;
            let x0_real = to_x0(PredictionType::Epsilon, e_real, x_t, abar_t)?;
            let norm = x0_hat.f_sub(&x0_real)?.f_abs()?.f_mean_dim(
                [1i64, 2, 3].as_slice(),
                true,
                Kind::Float,
            )?;
            ratio.f_mul(&difference)?.f_div(&norm)?
        }
    })
}
