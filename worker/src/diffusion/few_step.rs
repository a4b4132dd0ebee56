//! A K-step student's chain (shared/SPEC.md "Few-step students", DMD2's
//! backward simulation): descending timesteps t_0 > ... > t_{K-1}; from
//! pure noise x = z, step j predicts x0_j at (x, t_j) and, unless it is
//! the last, re-noises it to t_{j+1} with fresh noise:
//! x = add_noise(x0_j, eps_j, t_{j+1}). The picture is x0_{K-1}.
//!
//! Step 0 reads the output with the run's constant A (SPEC step 1, as the
//! one-step draw does); later steps with the schedule's abar_{t_j}. This is
//! the chain diffusers' LCMScheduler draws (README, "Few-step students";
//! `export_scheduler.rs` sets its boundary scaling and first abar).
//!
//! The one-step student (K = 1) never comes here: it keeps `one_step.rs`,
//! so its arithmetic is today's. Step 0 of a chain computes the same
//! numbers bit for bit (worker/tests/few_step.rs), through a per-sample
//! abar tensor.

use tch::{Kind, TchError, Tensor};

use super::one_step::Denoiser;
use super::schedule::{
    NoiseSchedule, PredictionType, ScheduleError, add_noise_at, to_epsilon, to_x0,
};

/// The student's timesteps and the abar each step reads its output with.
#[derive(Debug, Clone, PartialEq)]
pub struct StudentChain {
    /// t_0 > t_1 > ... > t_{K-1}.
    timesteps: Vec<i64>,
    /// [A, abar_{t_1}, ..., abar_{t_{K-1}}].
    alpha_bars: Vec<f64>,
    prediction: PredictionType,
}

impl StudentChain {
    /// The chain of `timesteps` (descending, in the schedule) whose first
    /// step reads its output with `first_alpha_bar` (the run's A).
    pub fn new(
        timesteps: &[i64],
        first_alpha_bar: f64,
        schedule: &NoiseSchedule,
    ) -> Result<Self, ScheduleError> {
        if timesteps.is_empty() || timesteps.windows(2).any(|w| w[0] <= w[1]) {
            return Err(ScheduleError::Invalid(format!(
                "a student's timesteps must be a non-empty descending list, got {timesteps:?}"
            )));
        }
        let mut alpha_bars = vec![first_alpha_bar];
        for &t in &timesteps[1..] {
            alpha_bars.push(schedule.alpha_bar(t)?);
        }
        schedule.alpha_bar(timesteps[0])?;
        Ok(Self {
            timesteps: timesteps.to_vec(),
            alpha_bars,
            prediction: schedule.prediction_type(),
        })
    }

    /// K, the number of student passes of a full draw.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// The student's raw output (float32) on `x` at per-sample step
    /// indices `steps` [B] (int64, 0..K): the pass alone, so a caller may
    /// run it under autocast and the formula outside.
    pub fn output(
        &self,
        student: &impl Denoiser,
        x: &Tensor,
        steps: &Tensor,
        cond: &Tensor,
    ) -> Result<Tensor, TchError> {
        let table = Tensor::f_from_slice(&self.timesteps)?.f_to_device(x.device())?;
        let t = table.f_index_select(0, &steps.f_to_device(x.device())?)?;
        student.predict(x, &t, cond)?.f_to_kind(Kind::Float)
    }

    /// x0 from the student's float32 output `out` on `x` at per-sample step
    /// indices `steps`: the same formula as the one-step draw
    /// (`one_step::x0_of_output`), with each sample's step's abar.
    pub fn x0_of_output(
        &self,
        out: &Tensor,
        x: &Tensor,
        steps: &Tensor,
    ) -> Result<Tensor, TchError> {
        let a = self.alpha_bar_of(steps, x)?;
        let eps = to_epsilon(self.prediction, out, x, &a)?;
        to_x0(PredictionType::Epsilon, &eps, x, &a)
    }

    /// The student's x0 on `x` at per-sample step indices `steps`.
    pub fn x0(
        &self,
        student: &impl Denoiser,
        x: &Tensor,
        steps: &Tensor,
        cond: &Tensor,
    ) -> Result<Tensor, TchError> {
        let out = self.output(student, x, steps, cond)?;
        self.x0_of_output(&out, x, steps)
    }

    /// x0 re-noised to step `next`'s timestep with `eps`:
    /// add_noise(x0, eps, t_next), the schedule's abar.
    pub fn renoise(
        &self,
        x0: &Tensor,
        eps: &Tensor,
        next: usize,
        schedule: &NoiseSchedule,
    ) -> Result<Tensor, ScheduleError> {
        let t = Tensor::f_full(
            [x0.size()[0]],
            self.timesteps[next],
            (Kind::Int64, tch::Device::Cpu),
        )?;
        let abar = schedule.alpha_bar_at(&t, x0.dim())?;
        Ok(add_noise_at(x0, &eps.f_to_device(x0.device())?, &abar)?)
    }

    /// Every sample's step j's abar as [B,1,...] float32 on `x`'s device.
    fn alpha_bar_of(&self, steps: &Tensor, x: &Tensor) -> Result<Tensor, TchError> {
        let table = Tensor::f_from_slice(&self.alpha_bars)?
            .f_to_kind(Kind::Float)?
            .f_to_device(x.device())?;
        let mut shape = vec![-1i64];
        shape.resize(x.dim(), 1);
        table
            .f_index_select(0, &steps.f_to_device(x.device())?)?
            .f_view(shape.as_slice())
    }

    /// The whole chain from the noise `z` under `cond`, its first `steps`
    /// steps (1..=K; a student may be drawn with fewer steps than it was
    /// trained for), with `noises[j]` re-noising step j; no gradients
    /// are asked for here (callers draw under `no_grad`). Returns the last
    /// step's x0.
    pub fn draw(
        &self,
        student: &impl Denoiser,
        z: &Tensor,
        cond: &Tensor,
        noises: &[Tensor],
        steps: usize,
        schedule: &NoiseSchedule,
    ) -> Result<Tensor, ScheduleError> {
        if steps == 0 || steps > self.len() || noises.len() + 1 < steps {
            return Err(ScheduleError::Invalid(format!(
                "a draw of {steps} step(s) from a {}-step student with {} noise(s)",
                self.len(),
                noises.len()
            )));
        }
        let b = z.size()[0];
        let mut x = z.shallow_clone();
        let mut j = 0;
        loop {
            let at = Tensor::f_full([b], j as i64, (Kind::Int64, z.device()))?;
            let x0 = self.x0(student, &x, &at, cond)?;
            if j + 1 == steps {
                return Ok(x0);
            }
            x = self.renoise(&x0, &noises[j], j + 1, schedule)?;
            j += 1;
        }
    }
}

/// The seeded noise of a K-step draw: `z` then the K-1 re-noising draws,
/// each of `shape`, in that order from a CPU generator seeded by `seed`:
/// the numbers diffusers' pipeline draws with
/// `generator=torch.Generator("cpu").manual_seed(seed)` (its latents, then
/// LCMScheduler.step's noise at every step but the last).
pub fn draw_chain_noise(
    seed: u64,
    shape: &[i64],
    steps: usize,
) -> Result<(Tensor, Vec<Tensor>), TchError> {
    let z = super::latents::draw_latents(seed, shape)?;
    let noises = (1..steps)
        .map(|_| Tensor::f_randn(shape, (Kind::Float, tch::Device::Cpu)))
        .collect::<Result<_, _>>()?;
    Ok((z, noises))
}

/// The re-noising draws alone (given initial latents): seeded by `seed`,
/// as diffusers draws them when `latents=` is passed beside the generator.
pub fn draw_renoise(seed: u64, shape: &[i64], steps: usize) -> Result<Vec<Tensor>, TchError> {
    tch::manual_seed(seed as i64);
    (1..steps)
        .map(|_| Tensor::f_randn(shape, (Kind::Float, tch::Device::Cpu)))
        .collect()
}
