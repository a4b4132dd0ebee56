//! diffusers' EulerDiscreteScheduler (SDXL's default sampler) as its
//! pipelines run it: no churn (s_churn = 0, so sigma_hat = sigma), sigmas
//! sqrt((1 - abar_t) / abar_t) at the inference timesteps (float32, as
//! diffusers computes them from its float32 alphas_cumprod) with a final
//! zero, the model input divided by sqrt(sigma^2 + 1), and one Euler step
//! of the probability-flow ODE per timestep. The timesteps are DDIM's for
//! the same spacing (`ddim_timesteps`), which diffusers computes alike.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::ddim::ddim_timesteps;
use super::schedule::{
    NoiseSchedule, PredictionType, ScheduleError, SchedulerConfig, TimestepSpacing,
};

/// The keys of an EulerDiscreteScheduler config beyond [`SchedulerConfig`]'s,
/// with diffusers' defaults; every one that changes the sigmas is checked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EulerOptions {
    pub interpolation_type: String,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub timestep_type: String,
    pub final_sigmas_type: String,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

impl Default for EulerOptions {
    fn default() -> Self {
        Self {
            interpolation_type: "linear".into(),
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            timestep_type: "discrete".into(),
            final_sigmas_type: "zero".into(),
            sigma_min: None,
            sigma_max: None,
        }
    }
}

impl EulerOptions {
    /// Reads the Euler keys of a scheduler_config.json and refuses the
    /// variants this sampler does not implement, naming the key.
    pub fn from_file(path: &Path) -> Result<Self, ScheduleError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScheduleError::Io {
            path: path.to_owned(),
            source,
        })?;
        let options: Self = serde_json::from_str(&text).map_err(|e| ScheduleError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let refuse = |key: &'static str, value: String, supported: &'static str| {
            Err(ScheduleError::Unsupported {
                path: Some(path.to_owned()),
                key,
                value,
                supported,
            })
        };
        if options.interpolation_type != "linear" {
            return refuse(
                "interpolation_type",
                format!("{:?}", options.interpolation_type),
                "\"linear\"",
            );
        }
        for (key, on) in [
            ("use_karras_sigmas", options.use_karras_sigmas),
            ("use_exponential_sigmas", options.use_exponential_sigmas),
            ("use_beta_sigmas", options.use_beta_sigmas),
        ] {
            if on == Some(true) {
                return refuse(key, "true".into(), "false");
            }
        }
        if options.timestep_type != "discrete" {
            return refuse(
                "timestep_type",
                format!("{:?}", options.timestep_type),
                "\"discrete\"",
            );
        }
        if options.final_sigmas_type != "zero" {
            return refuse(
                "final_sigmas_type",
                format!("{:?}", options.final_sigmas_type),
                "\"zero\"",
            );
        }
        Ok(options)
    }
}

pub struct EulerDiscreteScheduler {
    timesteps: Vec<i64>,
    /// One per timestep, then 0.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
}

impl EulerDiscreteScheduler {
    /// `cfg` as read from the folder (see [`EulerOptions::from_file`] for
    /// the Euler keys). Linspace spacing, whose timesteps are fractional,
    /// is refused.
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: i64) -> Result<Self, ScheduleError> {
        let spacing = cfg.spacing()?;
        if spacing == TimestepSpacing::Linspace {
            return Err(ScheduleError::Unsupported {
                path: None,
                key: "timestep_spacing",
                value: "\"linspace\"".into(),
                supported: "\"leading\", \"trailing\" (EulerDiscreteScheduler)",
            });
        }
        let timesteps = ddim_timesteps(
            spacing,
            cfg.num_train_timesteps,
            num_inference_steps,
            cfg.steps_offset,
        )?;
        let schedule = NoiseSchedule::new(cfg, Device::Cpu)?;
        let abar = schedule.alphas_cumprod();
        // diffusers: ((1 - abar) / abar) ** 0.5 in float32; np.interp at
        // integer timesteps returns these values exactly.
        let all = abar
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_div(abar)?
            .f_pow_tensor_scalar(0.5)?
            .f_to_kind(Kind::Float)?;
        let all = Vec::<f32>::try_from(&all).map_err(ScheduleError::from)?;
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| all[t as usize]).collect();
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            prediction: cfg.prediction()?,
            spacing,
        })
    }

    /// First (noisiest) to last.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// diffusers' `init_noise_sigma`: the largest sigma, or
    /// sqrt(sigma_max^2 + 1) with leading spacing.
    pub fn init_noise_sigma(&self) -> f32 {
        let max = self.sigmas.iter().copied().fold(0.0f32, f32::max);
        match self.spacing {
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
            _ => max,
        }
    }

    /// The UNet's input at step `index`: sample / sqrt(sigma^2 + 1).
    pub fn scale_model_input(
        &self,
        sample: &Tensor,
        index: usize,
    ) -> Result<Tensor, tch::TchError> {
        let sigma = self.sigmas[index];
        sample.f_div_scalar(f64::from((sigma * sigma + 1.0).sqrt()))
    }

    /// One Euler step at step `index` (float32, as diffusers upcasts),
    /// returned in `model_output`'s dtype.
    pub fn step(
        &self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
    ) -> Result<Tensor, ScheduleError> {
        if index + 1 >= self.sigmas.len() {
            return Err(ScheduleError::Invalid(format!(
                "Euler step {index} of {} steps",
                self.timesteps.len()
            )));
        }
        let sample = sample.f_to_kind(Kind::Float)?;
        let sigma = self.sigmas[index];
        let pred_original_sample = match self.prediction {
            PredictionType::Epsilon => {
                sample.f_sub(&model_output.f_mul_scalar(f64::from(sigma))?)?
            }
            PredictionType::VPrediction => {
                let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                model_output
                    .f_mul_scalar(f64::from(c_out))?
                    .f_add(&sample.f_div_scalar(f64::from(sigma * sigma + 1.0))?)?
            }
            PredictionType::Sample => model_output.shallow_clone(),
        };
        let derivative = sample
            .f_sub(&pred_original_sample)?
            .f_div_scalar(f64::from(sigma))?;
        let dt = self.sigmas[index + 1] - sigma;
        let prev = sample.f_add(&derivative.f_mul_scalar(f64::from(dt))?)?;
        Ok(prev.f_to_kind(model_output.kind())?)
    }
}
