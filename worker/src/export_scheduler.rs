//! The scheduler an exported pipeline carries (`export --pipeline`): a
//! stock diffusers LCMScheduler configured so that
//! `StableDiffusionPipeline.from_pretrained(DIR)(prompt,
//! num_inference_steps=K, guidance_scale=0, generator=g)` draws the
//! student's own picture (shared/SPEC.md "Few-step students"):
//!
//! - LCMScheduler.step is the student's chain: x0 from the output at
//!   alphas_cumprod[t], then (not at the last step) sqrt(abar_prev) x0 +
//!   sqrt(1 - abar_prev) noise with fresh noise from the pipeline's
//!   generator, which also drew the latents: the order
//!   `diffusion::draw_chain_noise` draws in.
//! - Its boundary scaling denoised = c_out x0 + c_skip x with
//!   c_skip = 0.25 / (s t)^2 + ..., c_out = s t / sqrt((s t)^2 + 0.25) is
//!   made the identity by `timestep_scaling` = [`TIMESTEP_SCALING`]: in
//!   float32, sqrt((s t)^2) is s t exactly, so c_out = 1, and c_skip is
//!   below 5e-14 for t >= 1 (the stock 10 leaves c_skip ~4e-8 at t = 249).
//! - `original_inference_steps` = K makes a plain `num_inference_steps=K`
//!   call take the timesteps (N/K)(K - j) - 1 (999, 749, 499, 249 at K = 4;
//!   999 at K = 1); other lists need `timesteps=[...]`.
//! - Step 0 reads the output with alphas_cumprod[t_0], the student with
//!   its constant A (0.0047 against the schedule's 0.004660 at 999).
//!   `trained_betas` with beta_{t_0} moved so that the scheduler's float32
//!   cumprod lands on A exactly makes it exact: only abar_t for t >= t_0
//!   moves, and the chain reads none of them after its first step.

use serde_json::{Map, Value};
use tch::{Device, Kind};

use crate::diffusion::{NoiseSchedule, SchedulerConfig};
use crate::export::{ExportError, OneStep};

/// LCMScheduler's `timestep_scaling` in exports (stock: 10).
pub const TIMESTEP_SCALING: f64 = 10_000.0;

/// The exported `scheduler/scheduler_config.json` for a student `o`, from
/// the teacher's scheduler config JSON `teacher`.
pub fn student_scheduler_config(teacher: &Value, o: &OneStep) -> Result<Value, ExportError> {
    let bad = |e: String| ExportError::Invalid(format!("the teacher's scheduler config: {e}"));
    let Value::Object(fields) = teacher else {
        return Err(bad("not a JSON object".into()));
    };
    let cfg: SchedulerConfig =
        serde_json::from_value(teacher.clone()).map_err(|e| bad(e.to_string()))?;
    let schedule = NoiseSchedule::new(&cfg, Device::Cpu).map_err(|e| bad(e.to_string()))?;
    let steps = o.steps();
    let mut out = Map::new();
    out.insert("_class_name".into(), "LCMScheduler".into());
    for key in [
        "_diffusers_version",
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "prediction_type",
        "rescale_betas_zero_snr",
    ] {
        if let Some(v) = fields.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    out.insert("original_inference_steps".into(), steps.len().into());
    out.insert("timestep_scaling".into(), TIMESTEP_SCALING.into());
    out.insert("clip_sample".into(), false.into());
    out.insert("thresholding".into(), false.into());
    out.insert("set_alpha_to_one".into(), true.into());
    // LCMScheduler ignores it; StableDiffusionPipeline warns unless 1.
    out.insert("steps_offset".into(), 1.into());
    let a = if o.alpha_bar_from_schedule {
        None
    } else {
        Some(o.student_alpha_bar)
    };
    let betas = betas_hitting(&cfg, &schedule, steps[0], a).map_err(bad)?;
    out.insert(
        "trained_betas".into(),
        match betas {
            Some(b) => Value::from(b),
            None => fields.get("trained_betas").cloned().unwrap_or(Value::Null),
        },
    );
    Ok(Value::Object(out))
}

/// The schedule's float32 betas with beta_{t0} moved so that the float32
/// cumprod of 1 - beta at t0 is A (as float32) exactly; None when it is
/// already (or no A is asked for).
fn betas_hitting(
    cfg: &SchedulerConfig,
    schedule: &NoiseSchedule,
    t0: i64,
    a: Option<f64>,
) -> Result<Option<Vec<f64>>, String> {
    // diffusers rescales trained betas to zero terminal SNR after reading
    // them: moving one would not land where it is aimed.
    let Some(a) = a.filter(|_| !cfg.rescale_betas_zero_snr) else {
        return Ok(None);
    };
    let target = a as f32;
    let at = |s: &NoiseSchedule| s.alpha_bar(t0).map(|v| v as f32);
    if at(schedule).map_err(|e| e.to_string())? == target {
        return Ok(None);
    }
    let betas: Vec<f32> =
        Vec::<f32>::try_from(schedule.betas().to_kind(Kind::Float).to_device(Device::Cpu))
            .map_err(|e| e.to_string())?;
    let before = if t0 == 0 {
        1.0
    } else {
        schedule.alpha_bar(t0 - 1).map_err(|e| e.to_string())?
    };
    let ideal = (1.0 - a / before) as f32;
    // The float32 cumprod rounds: try the neighbours of the ideal beta.
    let mut best: Option<(f32, Vec<f64>)> = None;
    for ulps in -64i32..=64 {
        let beta = f32::from_bits((ideal.to_bits() as i64 + i64::from(ulps)) as u32);
        let mut b: Vec<f64> = betas.iter().map(|&x| f64::from(x)).collect();
        b[t0 as usize] = f64::from(beta);
        let moved = SchedulerConfig {
            trained_betas: Some(b.clone()),
            ..cfg.clone()
        };
        let s = NoiseSchedule::new(&moved, Device::Cpu).map_err(|e| e.to_string())?;
        let miss = (at(&s).map_err(|e| e.to_string())? - target).abs();
        if miss == 0.0 {
            return Ok(Some(b));
        }
        if best.as_ref().is_none_or(|(m, _)| miss < *m) {
            best = Some((miss, b));
        }
    }
    Ok(best.map(|(_, b)| b))
}
