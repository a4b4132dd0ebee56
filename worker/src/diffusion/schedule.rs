//! The DDPM noise schedule of diffusers (betas, alphas_cumprod), the forward
//! process `add_noise`, and conversions of a model output between
//! epsilon-, v- and sample-prediction, all with one timestep per sample.
//!
//! `alphas_cumprod` is computed like diffusers (float32 betas, float32
//! cumprod, on the CPU so the numbers are libtorch's CPU kernels' on every
//! device) and then kept as a float32 tensor on the model's device: VSD
//! gathers it per sample. It stays float32 whatever the model's dtype
//! (SPEC: an fp16 abar is a known failure mode).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// Errors reading a scheduler config or using a schedule.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{}{key} = {value} is not supported (supported: {supported})", in_file(.path))]
    Unsupported {
        path: Option<PathBuf>,
        key: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

/// What the denoiser predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    pub fn parse(value: &str) -> Result<Self, ScheduleError> {
        match value {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            other => Err(unsupported(
                "prediction_type",
                other,
                "epsilon, v_prediction, sample",
            )),
        }
    }
}

/// How DDIM picks its inference timesteps (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub fn parse(value: &str) -> Result<Self, ScheduleError> {
        match value {
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            "linspace" => Ok(Self::Linspace),
            other => Err(unsupported(
                "timestep_spacing",
                other,
                "leading, trailing, linspace",
            )),
        }
    }
}

/// How betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

impl BetaSchedule {
    pub fn parse(value: &str) -> Result<Self, ScheduleError> {
        match value {
            "linear" => Ok(Self::Linear),
            "scaled_linear" => Ok(Self::ScaledLinear),
            other => Err(unsupported("beta_schedule", other, "linear, scaled_linear")),
        }
    }
}

fn unsupported(key: &'static str, value: &str, supported: &'static str) -> ScheduleError {
    ScheduleError::Unsupported {
        path: None,
        key,
        value: format!("{value:?}"),
        supported,
    }
}

/// The fields of `scheduler/scheduler_config.json` that DDPM training and
/// DDIM sampling read, whatever the `_class_name` (SD 1.5 ships
/// PNDMScheduler's config, SD 2.1 DDIMScheduler's). Missing fields take
/// DDIMScheduler's defaults, except `clip_sample`: diffusers defaults it to
/// true, which suits pixel-space models only; every SD config sets it false
/// and clipping a latent x0 to [-1, 1] would damage it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: i64,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: String,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub timestep_spacing: String,
    pub thresholding: bool,
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            timestep_spacing: "leading".into(),
            thresholding: false,
            rescale_betas_zero_snr: false,
        }
    }
}

impl SchedulerConfig {
    /// Stable Diffusion's training schedule (1.x and 2.x alike).
    pub fn stable_diffusion() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            set_alpha_to_one: false,
            steps_offset: 1,
            ..Self::default()
        }
    }

    /// Reads and validates a scheduler_config.json; errors name the file
    /// and the offending key.
    pub fn from_file(path: &Path) -> Result<Self, ScheduleError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScheduleError::Io {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ScheduleError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|e| match e {
            ScheduleError::Unsupported {
                key,
                value,
                supported,
                ..
            } => ScheduleError::Unsupported {
                path: Some(path.to_owned()),
                key,
                value,
                supported,
            },
            ScheduleError::Invalid(message) => ScheduleError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Checks every value this crate would act on.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        if self.trained_betas.is_none() {
            BetaSchedule::parse(&self.beta_schedule)?;
        }
        self.prediction()?;
        self.spacing()?;
        if self.thresholding {
            return Err(unsupported(
                "thresholding",
                "true",
                "false (dynamic thresholding is for pixel-space models)",
            ));
        }
        if self.rescale_betas_zero_snr {
            return Err(unsupported("rescale_betas_zero_snr", "true", "false"));
        }
        if self.num_train_timesteps < 2 {
            return Err(ScheduleError::Invalid(format!(
                "num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            )));
        }
        if let Some(b) = &self.trained_betas
            && b.len() as i64 != self.num_train_timesteps
        {
            return Err(ScheduleError::Invalid(format!(
                "trained_betas has {} values, num_train_timesteps is {}",
                b.len(),
                self.num_train_timesteps
            )));
        }
        if self.steps_offset < 0 {
            return Err(ScheduleError::Invalid(format!(
                "steps_offset must not be negative, got {}",
                self.steps_offset
            )));
        }
        Ok(())
    }

    pub fn prediction(&self) -> Result<PredictionType, ScheduleError> {
        PredictionType::parse(&self.prediction_type)
    }

    pub fn spacing(&self) -> Result<TimestepSpacing, ScheduleError> {
        TimestepSpacing::parse(&self.timestep_spacing)
    }
}

/// The DDPM schedule on a device. Cheap to clone (tensors are shared).
#[derive(Debug)]
pub struct NoiseSchedule {
    betas: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: PredictionType,
    num_train_timesteps: i64,
}

impl Clone for NoiseSchedule {
    fn clone(&self) -> Self {
        Self {
            betas: self.betas.shallow_clone(),
            alphas_cumprod: self.alphas_cumprod.shallow_clone(),
            prediction_type: self.prediction_type,
            num_train_timesteps: self.num_train_timesteps,
        }
    }
}

impl NoiseSchedule {
    pub fn new(cfg: &SchedulerConfig, device: Device) -> Result<Self, ScheduleError> {
        cfg.validate()?;
        let n = cfg.num_train_timesteps;
        let cpu = (Kind::Float, Device::Cpu);
        let betas = match (&cfg.trained_betas, BetaSchedule::parse(&cfg.beta_schedule)) {
            (Some(b), _) => Tensor::f_from_slice(b)?.f_to_kind(Kind::Float)?,
            (None, Ok(BetaSchedule::Linear)) => {
                Tensor::f_linspace(cfg.beta_start, cfg.beta_end, n, cpu)?
            }
            (None, Ok(BetaSchedule::ScaledLinear)) => {
                Tensor::f_linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n, cpu)?
                    .f_pow_tensor_scalar(2)?
            }
            (None, Err(e)) => return Err(e),
        };
        let alphas = betas.f_neg()?.f_add_scalar(1.0)?;
        let alphas_cumprod = alphas.f_cumprod(0, Kind::Float)?;
        Ok(Self {
            betas: betas.f_to_device(device)?,
            alphas_cumprod: alphas_cumprod.f_to_device(device)?,
            prediction_type: cfg.prediction()?,
            num_train_timesteps: n,
        })
    }

    /// The same schedule on another device.
    pub fn to_device(&self, device: Device) -> Result<Self, ScheduleError> {
        Ok(Self {
            betas: self.betas.f_to_device(device)?,
            alphas_cumprod: self.alphas_cumprod.f_to_device(device)?,
            ..self.clone()
        })
    }

    pub fn device(&self) -> Device {
        self.alphas_cumprod.device()
    }

    pub fn num_train_timesteps(&self) -> i64 {
        self.num_train_timesteps
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// float32 [num_train_timesteps].
    pub fn betas(&self) -> &Tensor {
        &self.betas
    }

    /// float32 [num_train_timesteps]: abar_t.
    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// abar_t as a host number (for one scalar timestep).
    pub fn alpha_bar(&self, t: i64) -> Result<f64, ScheduleError> {
        self.check_timestep(t)?;
        Ok(self.alphas_cumprod.f_double_value(&[t])?)
    }

    fn check_timestep(&self, t: i64) -> Result<(), ScheduleError> {
        if (0..self.num_train_timesteps).contains(&t) {
            Ok(())
        } else {
            Err(ScheduleError::Invalid(format!(
                "timestep {t} is outside [0, {})",
                self.num_train_timesteps
            )))
        }
    }

    /// abar_t for a timestep per sample, shaped [B, 1, ...] to broadcast
    /// against a tensor of `ndim` dims. `t`: integer [B] (or 0-dim).
    ///
    /// Timesteps on the CPU are range-checked here. Timesteps already on an
    /// accelerator are not: reading them back would stall the stream every
    /// training step, and an out-of-range index there fails loudly anyway
    /// (a device-side assert in index_select).
    pub fn alpha_bar_at(&self, t: &Tensor, ndim: usize) -> Result<Tensor, ScheduleError> {
        let t = t.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?;
        if t.device() == Device::Cpu && t.numel() > 0 {
            let max = t.f_max()?.f_int64_value(&[])?;
            let min = t.f_min()?.f_int64_value(&[])?;
            if min < 0 || max >= self.num_train_timesteps {
                return Err(ScheduleError::Invalid(format!(
                    "timesteps must lie in [0, {}), got min {min}, max {max}",
                    self.num_train_timesteps
                )));
            }
        }
        let t = t.f_to_device(self.device())?;
        let a = self.alphas_cumprod.f_index_select(0, &t)?;
        let mut shape = vec![-1i64];
        shape.resize(ndim.max(1), 1);
        Ok(a.f_view(shape.as_slice())?)
    }

    /// diffusers' `add_noise`: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with
    /// one t per sample. The coefficients are float32 (see module docs), so
    /// half-precision inputs give a float32 result.
    pub fn add_noise(
        &self,
        x0: &Tensor,
        eps: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor, ScheduleError> {
        let a = self.alpha_bar_at(t, x0.dim())?;
        Ok(add_noise_at(x0, eps, &a)?)
    }

    /// diffusers' `get_velocity`: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.
    pub fn get_velocity(
        &self,
        x0: &Tensor,
        eps: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor, ScheduleError> {
        let a = self.alpha_bar_at(t, x0.dim())?;
        let (sa, sb) = sqrt_pair(&a)?;
        Ok(eps.f_mul(&sa)?.f_sub(&x0.f_mul(&sb)?)?)
    }

    /// The noise a model output implies at x_t (per-sample t), for this
    /// schedule's prediction type.
    pub fn to_epsilon(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor, ScheduleError> {
        let a = self.alpha_bar_at(t, x_t.dim())?;
        Ok(to_epsilon(self.prediction_type, model_output, x_t, &a)?)
    }

    /// The clean sample a model output implies at x_t (per-sample t).
    pub fn to_x0(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor, ScheduleError> {
        let a = self.alpha_bar_at(t, x_t.dim())?;
        Ok(to_x0(self.prediction_type, model_output, x_t, &a)?)
    }
}

/// 1 - abar.
pub fn one_minus(alpha_bar: &Tensor) -> Result<Tensor, tch::TchError> {
    alpha_bar.f_neg()?.f_add_scalar(1.0)
}

/// (sqrt(abar), sqrt(1 - abar)).
fn sqrt_pair(alpha_bar: &Tensor) -> Result<(Tensor, Tensor), tch::TchError> {
    let sa = alpha_bar.f_pow_tensor_scalar(0.5)?;
    let sb = one_minus(alpha_bar)?.f_pow_tensor_scalar(0.5)?;
    Ok((sa, sb))
}

/// The forward process at a given abar (any shape broadcasting against
/// x0): sqrt(abar) x0 + sqrt(1 - abar) eps, as [`NoiseSchedule::add_noise`]
/// with the abar already looked up.
pub fn add_noise_at(
    x0: &Tensor,
    eps: &Tensor,
    alpha_bar: &Tensor,
) -> Result<Tensor, tch::TchError> {
    let (sa, sb) = sqrt_pair(alpha_bar)?;
    x0.f_mul(&sa)?.f_add(&eps.f_mul(&sb)?)
}

/// Epsilon from a model output, given abar (any shape broadcasting against
/// x_t: a per-sample [B,1,1,1] tensor or a 0-dim one). The formulas are
/// those of diffusers' DDIMScheduler.step.
pub fn to_epsilon(
    prediction: PredictionType,
    model_output: &Tensor,
    x_t: &Tensor,
    alpha_bar: &Tensor,
) -> Result<Tensor, tch::TchError> {
    let (sa, sb) = sqrt_pair(alpha_bar)?;
    let eps = match prediction {
        PredictionType::Epsilon => model_output.shallow_clone(),
        PredictionType::VPrediction => model_output.f_mul(&sa)?.f_add(&x_t.f_mul(&sb)?)?,
        PredictionType::Sample => x_t.f_sub(&model_output.f_mul(&sa)?)?.f_div(&sb)?,
    };
    Ok(eps)
}

/// x0 from a model output, given abar (as [`to_epsilon`]).
pub fn to_x0(
    prediction: PredictionType,
    model_output: &Tensor,
    x_t: &Tensor,
    alpha_bar: &Tensor,
) -> Result<Tensor, tch::TchError> {
    let (sa, sb) = sqrt_pair(alpha_bar)?;
    let x0 = match prediction {
        PredictionType::Epsilon => x_t.f_sub(&model_output.f_mul(&sb)?)?.f_div(&sa)?,
        PredictionType::VPrediction => x_t.f_mul(&sa)?.f_sub(&model_output.f_mul(&sb)?)?,
        PredictionType::Sample => model_output.shallow_clone(),
    };
    Ok(x0)
}
