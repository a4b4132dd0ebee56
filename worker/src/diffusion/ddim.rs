//! diffusers' DDIMScheduler with eta = 0: inference timesteps for each
//! `timestep_spacing`, and one deterministic denoising step.

use tch::{Device, Tensor};

use super::schedule::{
    NoiseSchedule, PredictionType, ScheduleError, SchedulerConfig, TimestepSpacing, to_epsilon,
    to_x0,
};

/// The inference timesteps, first (noisiest) to last, exactly as diffusers'
/// `DDIMScheduler.set_timesteps` computes them with numpy (float64
/// linspace/arange, rounding half to even).
pub fn ddim_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: i64,
    num_inference_steps: i64,
    steps_offset: i64,
) -> Result<Vec<i64>, ScheduleError> {
    let (t_max, n) = (num_train_timesteps, num_inference_steps);
    if n < 1 || n > t_max {
        return Err(ScheduleError::Invalid(format!(
            "num_inference_steps must lie in [1, {t_max}] (num_train_timesteps), got {n}"
        )));
    }
    let timesteps: Vec<i64> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = t_max / n;
            (0..n).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Linspace => {
            // np.linspace(0, T - 1, n): i * step, the last value set to stop.
            let stop = (t_max - 1) as f64;
            let mut v: Vec<f64> = if n == 1 {
                vec![0.0]
            } else {
                let step = stop / (n - 1) as f64;
                (0..n).map(|i| i as f64 * step).collect()
            };
            if n > 1 {
                v[(n - 1) as usize] = stop;
            }
            v.iter().rev().map(|x| x.round_ties_even() as i64).collect()
        }
        TimestepSpacing::Trailing => {
            // np.arange(T, 0, -T/n): numpy fills start + i * (second - start).
            let ratio = t_max as f64 / n as f64;
            let start = t_max as f64;
            let len = ((0.0 - start) / -ratio).ceil() as i64;
            let second = start - ratio;
            let delta = second - start;
            (0..len)
                .map(|i| match i {
                    0 => start,
                    1 => second,
                    _ => start + i as f64 * delta,
                })
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect()
        }
    };
    if let Some(bad) = timesteps.iter().find(|t| !(0..t_max).contains(*t)) {
        return Err(ScheduleError::Invalid(format!(
            "{n} inference steps with {spacing:?} spacing and steps_offset {steps_offset} \
             give timestep {bad}, outside [0, {t_max})"
        )));
    }
    Ok(timesteps)
}

/// What one DDIM step returns (diffusers' DDIMSchedulerOutput).
#[derive(Debug)]
pub struct DDIMStepOutput {
    pub prev_sample: Tensor,
    pub pred_original_sample: Tensor,
}

/// diffusers' DDIMScheduler after `set_timesteps(num_inference_steps)`.
#[derive(Debug)]
pub struct DDIMScheduler {
    schedule: NoiseSchedule,
    timesteps: Vec<i64>,
    num_inference_steps: i64,
    /// abar before the first training step: 1.0 or abar_0 (`set_alpha_to_one`).
    final_alpha_cumprod: Tensor,
    /// x0 is clamped to [-r, r] when `clip_sample` is set.
    clip_sample_range: Option<f64>,
}

impl DDIMScheduler {
    pub fn new(
        cfg: &SchedulerConfig,
        num_inference_steps: i64,
        device: Device,
    ) -> Result<Self, ScheduleError> {
        let schedule = NoiseSchedule::new(cfg, device)?;
        let timesteps = ddim_timesteps(
            cfg.spacing()?,
            cfg.num_train_timesteps,
            num_inference_steps,
            cfg.steps_offset,
        )?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            Tensor::f_from_slice(&[1.0f32])?
                .f_reshape([] as [i64; 0])?
                .f_to_device(device)?
        } else {
            schedule.alphas_cumprod().f_get(0)?
        };
        Ok(Self {
            schedule,
            timesteps,
            num_inference_steps,
            final_alpha_cumprod,
            clip_sample_range: cfg.clip_sample.then_some(cfg.clip_sample_range),
        })
    }

    /// First (noisiest) to last.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.schedule.prediction_type()
    }

    /// Scale of the initial noise (diffusers' `init_noise_sigma`).
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// diffusers' DDIM sampling loop from `latents` (on the model's device
    /// and dtype): times init_noise_sigma, then per timestep the model's
    /// output `predict(x, t)` (guided or not, as the pipeline makes it) and
    /// one step. The SD and SDXL pipelines' teacher sampling.
    pub fn sample<E: From<ScheduleError> + From<tch::TchError>>(
        &self,
        latents: &Tensor,
        mut predict: impl FnMut(&Tensor, &Tensor) -> Result<Tensor, E>,
    ) -> Result<Tensor, E> {
        let device = latents.device();
        let mut x = latents.f_mul_scalar(self.init_noise_sigma())?;
        for &t in self.timesteps() {
            let output = predict(&x, &Tensor::from(t).f_to_device(device)?)?;
            x = self.step(&output, t, &x)?.prev_sample;
        }
        Ok(x)
    }

    /// One DDIM step (eta = 0) from `sample` at `timestep` to the previous
    /// timestep, which diffusers takes as timestep - T / n whatever the
    /// spacing.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<DDIMStepOutput, ScheduleError> {
        let n_train = self.schedule.num_train_timesteps();
        if !(0..n_train).contains(&timestep) {
            return Err(ScheduleError::Invalid(format!(
                "timestep {timestep} is outside [0, {n_train})"
            )));
        }
        let prev_timestep = timestep - n_train / self.num_inference_steps;
        let abar = self.schedule.alphas_cumprod();
        let alpha_prod_t = abar.f_get(timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            abar.f_get(prev_timestep)?
        } else {
            self.final_alpha_cumprod.shallow_clone()
        };
        let prediction = self.schedule.prediction_type();
        let mut pred_original_sample = to_x0(prediction, model_output, sample, &alpha_prod_t)?;
        // diffusers takes epsilon before clipping x0 (use_clipped_model_output
        // is off in its pipelines).
        let pred_epsilon = to_epsilon(prediction, model_output, sample, &alpha_prod_t)?;
        if let Some(r) = self.clip_sample_range {
            pred_original_sample = pred_original_sample.f_clamp(-r, r)?;
        }
        let direction = alpha_prod_t_prev
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_pow_tensor_scalar(0.5)?
            .f_mul(&pred_epsilon)?;
        let prev_sample = alpha_prod_t_prev
            .f_pow_tensor_scalar(0.5)?
            .f_mul(&pred_original_sample)?
            .f_add(&direction)?;
        Ok(DDIMStepOutput {
            prev_sample,
            pred_original_sample,
        })
    }
}
