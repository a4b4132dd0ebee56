//! Mixed precision of the step's passes: what `precision.autocast` means on
//! a device for the teacher passes (`teacher_autocast`) and, with
//! `precision.student_autocast`, the student's (`student_autocast`; with
//! fp16 also `loss_scaling`, trainer/grad_scaler.rs), and a guard that turns libtorch's autocast
//! on for the calling thread and restores the previous state when dropped,
//! also on panic or early return (`AutocastPlan::enter`).
//!
//! tch 0.24's `tch::autocast` only toggles CUDA autocast with its default
//! dtype (fp16) and does nothing without CUDA; the guard calls ATen's
//! autocast API through the C++ shim (csrc/autocast.cpp) instead, with
//! bf16 or fp16, on CPU or CUDA, exactly as `torch.autocast` does.
//!
//! Under autocast, matmuls, convolutions and attention run in the half
//! dtype; which other ops are kept in float32 follows libtorch's per-device
//! lists (on CUDA normalisations, softmax and reductions; on CPU only a few
//! losses and linear-algebra ops, so a bf16-stored teacher computes the same
//! with or without CPU autocast). The VSD step casts each pass's output back
//! to float32 before any schedule, guidance, x0 or loss arithmetic
//! (vsd/step.rs).
//!
//! Autocast state is thread-local in libtorch, so a guard is neither Send
//! nor Sync: it must be dropped on the thread that made it.

use std::marker::PhantomData;

use swiftbrush_proto::config::{Autocast, Dtype, PrecisionConfig};
use tch::{Device, Kind};

use crate::torch::shim;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrecisionError {
    #[error(
        "precision.autocast {autocast}: autocast runs on cpu and cuda devices, not {device}; \
         set precision.autocast: none"
    )]
    UnsupportedDevice {
        autocast: &'static str,
        device: String,
    },
    #[error(
        "precision.autocast {autocast} with precision.teacher_dtype {teacher}: autocast \
         would convert the {teacher} weights to {autocast} in every matmul ({risk}); set \
         precision.teacher_dtype to {autocast} or fp32, or precision.autocast to none"
    )]
    TeacherDtype {
        autocast: &'static str,
        teacher: &'static str,
        risk: &'static str,
    },
}

/// The half dtypes autocast computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfDtype {
    Bf16,
    Fp16,
}

impl HalfDtype {
    pub fn kind(self) -> Kind {
        match self {
            HalfDtype::Bf16 => Kind::BFloat16,
            HalfDtype::Fp16 => Kind::Half,
        }
    }

    /// The config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            HalfDtype::Bf16 => "bf16",
            HalfDtype::Fp16 => "fp16",
        }
    }

    fn scalar_type(self) -> i32 {
        match self {
            HalfDtype::Bf16 => shim::SCALAR_BFLOAT16,
            HalfDtype::Fp16 => shim::SCALAR_HALF,
        }
    }
}

/// Autocast checked against its device: entering it cannot fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutocastPlan {
    device_type: i32,
    dtype: HalfDtype,
}

impl AutocastPlan {
    /// Autocast in `dtype` on `device` (CPU or CUDA; libtorch has no autocast
    /// for the others in every build).
    pub fn new(device: Device, dtype: HalfDtype) -> Result<Self, PrecisionError> {
        let device_type = match device {
            Device::Cpu => shim::DEVICE_CPU,
            Device::Cuda(_) => shim::DEVICE_CUDA,
            other => {
                return Err(PrecisionError::UnsupportedDevice {
                    autocast: dtype.name(),
                    device: format!("{other:?}"),
                });
            }
        };
        Ok(Self { device_type, dtype })
    }

    pub fn dtype(&self) -> HalfDtype {
        self.dtype
    }

    /// Turns autocast on for this thread until the guard is dropped. Nested
    /// guards restore each other's state in reverse order.
    pub fn enter(&self) -> AutocastGuard {
        let mut prev = shim::AutocastState::default();
        // SAFETY: `prev` is a valid out-pointer; `shim::call` provides the
        // error buffer.
        let entered = shim::call(|err, len| unsafe {
            shim::sb_autocast_enter(
                self.device_type,
                self.dtype.scalar_type(),
                &mut prev,
                err,
                len,
            )
        });
        if let Err(e) = &entered {
            // Cannot happen for CPU and CUDA (the shim only sets thread-local
            // flags); if it ever does, the pass runs without autocast.
            tracing::error!(error = %e, "could not enable autocast; running without it");
        }
        AutocastGuard {
            device_type: self.device_type,
            prev: entered.is_ok().then_some(prev),
            _not_send: PhantomData,
        }
    }
}

/// Autocast is on while this lives (see [`AutocastPlan::enter`]).
#[must_use = "autocast ends when the guard is dropped"]
pub struct AutocastGuard {
    device_type: i32,
    /// None when entering failed: nothing to restore.
    prev: Option<shim::AutocastState>,
    _not_send: PhantomData<*const ()>,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        let Some(prev) = self.prev else { return };
        // SAFETY: `prev` is the state saved by the matching enter.
        let exited = shim::call(|err, len| unsafe {
            shim::sb_autocast_exit(self.device_type, &prev, err, len)
        });
        if let Err(e) = exited {
            tracing::error!(error = %e, "could not restore the autocast state");
        }
    }
}

/// The dtype autocast computes in on `device` for this thread, or None when
/// it is off.
pub fn autocast_kind(device: Device) -> Option<Kind> {
    let device_type = match device {
        Device::Cpu => shim::DEVICE_CPU,
        Device::Cuda(_) => shim::DEVICE_CUDA,
        _ => return None,
    };
    if shim::sb_autocast_is_enabled(device_type) == 0 {
        return None;
    }
    match shim::sb_autocast_dtype(device_type) {
        shim::SCALAR_BFLOAT16 => Some(Kind::BFloat16),
        shim::SCALAR_HALF => Some(Kind::Half),
        shim::SCALAR_FLOAT => Some(Kind::Float),
        _ => None,
    }
}

/// What `precision` asks of the teacher passes on `device`: None to run them
/// as stored (inputs cast to `teacher_dtype`), or the autocast to run them
/// under. Both CPU and CUDA support bf16 and fp16 autocast; on CPU it saves
/// memory but is only faster with native bf16 (AVX512-BF16, AMX).
pub fn teacher_autocast(
    cfg: &PrecisionConfig,
    device: Device,
) -> Result<Option<AutocastPlan>, PrecisionError> {
    let dtype = match cfg.autocast {
        Autocast::None => return Ok(None),
        Autocast::Bf16 => HalfDtype::Bf16,
        Autocast::Fp16 => HalfDtype::Fp16,
    };
    // A teacher stored in the other half dtype would be converted in every
    // matmul: bf16 -> fp16 can overflow (bf16's range is float32's), fp16 ->
    // bf16 drops three mantissa bits the weights were stored with.
    let risk = match (cfg.teacher_dtype, dtype) {
        (Dtype::Bf16, HalfDtype::Fp16) => Some(("bf16", "values above 65504 overflow to inf")),
        (Dtype::Fp16, HalfDtype::Bf16) => Some(("fp16", "it drops precision the weights have")),
        _ => None,
    };
    if let Some((teacher, risk)) = risk {
        return Err(PrecisionError::TeacherDtype {
            autocast: dtype.name(),
            teacher,
            risk,
        });
    }
    AutocastPlan::new(device, dtype).map(Some)
}

/// What `precision` asks of the student's pass: None for float32, or the
/// teacher passes' autocast (`teacher`, from [`teacher_autocast`]) with
/// `precision.student_autocast` (validation refuses it with autocast none).
pub fn student_autocast(
    cfg: &PrecisionConfig,
    teacher: Option<AutocastPlan>,
) -> Option<AutocastPlan> {
    if cfg.student_autocast { teacher } else { None }
}

/// Whether `precision` asks for fp16 dynamic loss scaling: the student
/// under fp16 autocast (trainer/grad_scaler.rs). fp16 teacher passes alone
/// need none: no gradient flows through them in half precision except the
/// LoRA teacher's, which trained unscaled before this option and still does.
pub fn loss_scaling(cfg: &PrecisionConfig) -> bool {
    cfg.student_autocast && cfg.autocast == Autocast::Fp16
}

/// libtorch's element type for a config dtype.
pub fn kind_of(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::Fp32 => Kind::Float,
        Dtype::Fp16 => Kind::Half,
        Dtype::Bf16 => Kind::BFloat16,
    }
}

/// One line for logs and `bench vsd-step`: what the step computes in (the
/// student's weights are float32: the config refuses another
/// `precision.student_dtype`).
pub fn describe(cfg: &PrecisionConfig, autocast: Option<&AutocastPlan>) -> String {
    let autocast = autocast.map_or("none", |a| a.dtype().name());
    let student = if cfg.student_autocast {
        format!("student fp32 weights (autocast {autocast})")
    } else {
        "student fp32".to_owned()
    };
    let scaling = if loss_scaling(cfg) {
        ", fp16 dynamic loss scaling"
    } else {
        ""
    };
    format!(
        "teacher {} (autocast {autocast}), {student}, schedule and losses fp32{scaling}",
        cfg.teacher_dtype.name(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(teacher_dtype: Dtype, autocast: Autocast) -> PrecisionConfig {
        PrecisionConfig {
            teacher_dtype,
            autocast,
            ..PrecisionConfig::default()
        }
    }

    #[test]
    fn config_to_plan_per_device() {
        let bf16 = cfg(Dtype::Bf16, Autocast::Bf16);
        let plan = teacher_autocast(&bf16, Device::Cpu).unwrap().unwrap();
        assert_eq!(plan.dtype(), HalfDtype::Bf16);
        let plan = teacher_autocast(&bf16, Device::Cuda(0)).unwrap().unwrap();
        assert_eq!(plan.dtype().kind(), Kind::BFloat16);
        assert_eq!(
            teacher_autocast(&cfg(Dtype::Bf16, Autocast::None), Device::Cpu).unwrap(),
            None
        );
        let fp32 = cfg(Dtype::Fp32, Autocast::Fp16);
        assert_eq!(
            teacher_autocast(&fp32, Device::Cpu)
                .unwrap()
                .unwrap()
                .dtype(),
            HalfDtype::Fp16
        );

        let err = teacher_autocast(&bf16, Device::Mps)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("precision.autocast bf16") && err.contains("Mps"),
            "{err}"
        );
        // `none` needs no autocast support from the device.
        assert_eq!(
            teacher_autocast(&cfg(Dtype::Bf16, Autocast::None), Device::Mps).unwrap(),
            None
        );
    }

    #[test]
    fn mismatched_half_dtypes_are_refused_with_both_keys() {
        let err = teacher_autocast(&cfg(Dtype::Bf16, Autocast::Fp16), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("precision.autocast fp16") && err.contains("precision.teacher_dtype bf16"),
            "{err}"
        );
        assert!(err.contains("overflow"), "{err}");
        assert!(teacher_autocast(&cfg(Dtype::Fp16, Autocast::Bf16), Device::Cpu).is_err());
        assert!(teacher_autocast(&cfg(Dtype::Fp16, Autocast::Fp16), Device::Cpu).is_ok());
    }

    #[test]
    fn guard_sets_and_restores_thread_state() {
        assert_eq!(autocast_kind(Device::Cpu), None);
        let bf16 = AutocastPlan::new(Device::Cpu, HalfDtype::Bf16).unwrap();
        let fp16 = AutocastPlan::new(Device::Cpu, HalfDtype::Fp16).unwrap();
        {
            let _outer = bf16.enter();
            assert_eq!(autocast_kind(Device::Cpu), Some(Kind::BFloat16));
            // CUDA's state is its own.
            assert_eq!(autocast_kind(Device::Cuda(0)), None);
            {
                let _inner = fp16.enter();
                assert_eq!(autocast_kind(Device::Cpu), Some(Kind::Half));
            }
            assert_eq!(autocast_kind(Device::Cpu), Some(Kind::BFloat16));
        }
        assert_eq!(autocast_kind(Device::Cpu), None);

        // A matmul of float32 inputs runs in the autocast dtype, and only
        // inside the region.
        let a = tch::Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        {
            let _g = bf16.enter();
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
        }
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }

    #[test]
    fn guard_restores_state_when_the_region_panics() {
        let plan = AutocastPlan::new(Device::Cpu, HalfDtype::Bf16).unwrap();
        let result = std::panic::catch_unwind(|| {
            let _g = plan.enter();
            assert_eq!(autocast_kind(Device::Cpu), Some(Kind::BFloat16));
            panic!("inside the autocast region");
        });
        assert!(result.is_err());
        assert_eq!(autocast_kind(Device::Cpu), None);
    }

    #[test]
    fn autocast_is_per_thread() {
        let plan = AutocastPlan::new(Device::Cpu, HalfDtype::Bf16).unwrap();
        let _g = plan.enter();
        let other = std::thread::spawn(|| autocast_kind(Device::Cpu))
            .join()
            .unwrap();
        assert_eq!(other, None);
        assert_eq!(autocast_kind(Device::Cpu), Some(Kind::BFloat16));
    }

    #[test]
    fn describe_names_every_part() {
        let c = PrecisionConfig::default();
        let plan = teacher_autocast(&c, Device::Cpu).unwrap();
        assert_eq!(
            describe(&c, plan.as_ref()),
            "teacher bf16 (autocast bf16), student fp32, schedule and losses fp32"
        );
        assert_eq!(student_autocast(&c, plan), None, "off by default");
        assert!(!loss_scaling(&c));
        let fp16 = PrecisionConfig {
            student_autocast: true,
            ..cfg(Dtype::Fp32, Autocast::Fp16)
        };
        let plan = teacher_autocast(&fp16, Device::Cpu).unwrap();
        assert_eq!(student_autocast(&fp16, plan), plan);
        assert!(loss_scaling(&fp16));
        assert_eq!(
            describe(&fp16, plan.as_ref()),
            "teacher fp32 (autocast fp16), student fp32 weights (autocast fp16), schedule and \
             losses fp32, fp16 dynamic loss scaling"
        );
        // fp16 teacher passes alone keep today's unscaled training.
        assert!(!loss_scaling(&cfg(Dtype::Fp16, Autocast::Fp16)));
    }
}
