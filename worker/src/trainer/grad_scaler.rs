//! fp16 dynamic loss scaling with torch.amp.GradScaler's semantics and
//! defaults, one scaler per optimizer (the student's; the fake score's):
//! the loss is multiplied by the scale before its backward (the VSD step,
//! `LossScales`), the gradients are unscaled before clipping, and a step
//! whose gradients hold an inf or NaN is skipped, the scale halved and the
//! growth tracker reset; otherwise the step is taken and counted, and after
//! 2000 consecutive finite steps the scale doubles.
//!
//! Active only with the student under fp16 autocast
//! (`precision::loss_scaling`): fp16 underflows small gradients that bf16
//! and float32 hold. The scale lives on the host: whether a step's
//! gradients are finite is already read back in the step's one device read
//! and agreed by every rank in the step vote (optimizers.rs), so the
//! decision, and so the scale, is the same on every rank with no further
//! sync. Its state goes into the checkpoint (`TrainState::loss_scalers`).
//!
//! Scales stay powers of two (2^16, x2, x0.5), so scaling and unscaling are
//! exact in float32 unless a value overflows or leaves the normal range.

use serde::{Deserialize, Serialize};

/// torch.amp.GradScaler's defaults.
pub const INIT_SCALE: f64 = 65536.0;
pub const GROWTH_FACTOR: f64 = 2.0;
pub const BACKOFF_FACTOR: f64 = 0.5;
pub const GROWTH_INTERVAL: u32 = 2000;

/// One optimizer's loss scale and the finite steps since it last changed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    pub scale: f64,
    /// Consecutive finite steps since the last growth or backoff.
    pub growth_tracker: u32,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self {
            scale: INIT_SCALE,
            growth_tracker: 0,
        }
    }
}

impl GradScaler {
    /// The multiplier that unscales the gradients, as torch computes it
    /// (the reciprocal in float64, rounded to float32).
    pub fn inv_scale(&self) -> f64 {
        f64::from((1.0 / self.scale) as f32)
    }

    /// After an optimizer's step decision (torch's `update` after `step`):
    /// `found_inf` backs off and resets the tracker; a finite step counts,
    /// and the interval's last one grows the scale (only while the grown
    /// scale is finite in float32, where torch keeps it).
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            return;
        }
        let successful = self.growth_tracker + 1;
        if successful == GROWTH_INTERVAL {
            let grown = self.scale * GROWTH_FACTOR;
            if (grown as f32).is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = successful;
        }
    }
}

/// Both optimizers' scalers: what a checkpoint keeps
/// (`state.json`'s `loss_scalers`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LossScalers {
    pub student: GradScaler,
    pub fake_score: GradScaler,
}

impl LossScalers {
    /// What the VSD step multiplies each loss by.
    pub fn scales(&self) -> crate::vsd::LossScales {
        crate::vsd::LossScales {
            student: self.student.scale,
            fake_score: self.fake_score.scale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_torch_amp_grad_scalers() {
        let s = GradScaler::default();
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
        assert_eq!(s.inv_scale(), 1.0 / 65536.0);
    }

    #[test]
    fn an_inf_halves_the_scale_and_resets_the_tracker() {
        let mut s = GradScaler::default();
        for _ in 0..5 {
            s.update(false);
        }
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 5));
        s.update(true);
        assert_eq!((s.scale, s.growth_tracker), (32768.0, 0));
        s.update(true);
        assert_eq!((s.scale, s.growth_tracker), (16384.0, 0));
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (16384.0, 1));
    }

    #[test]
    fn the_scale_doubles_after_the_interval_of_finite_steps() {
        let mut s = GradScaler::default();
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(false);
        }
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 1999));
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (131072.0, 0));
        // An inf just before the next growth starts the count again.
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(false);
        }
        s.update(true);
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
        for _ in 0..GROWTH_INTERVAL {
            s.update(false);
        }
        assert_eq!((s.scale, s.growth_tracker), (131072.0, 0));
    }

    #[test]
    fn growth_stops_where_float32_would_overflow() {
        let mut s = GradScaler {
            scale: 2f64.powi(127),
            growth_tracker: GROWTH_INTERVAL - 1,
        };
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (2f64.powi(127), 0));
    }

    #[test]
    fn state_round_trips_through_json() {
        let s = LossScalers {
            student: GradScaler {
                scale: 1024.0,
                growth_tracker: 7,
            },
            fake_score: GradScaler::default(),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LossScalers>(&json).unwrap(), s);
    }
}
