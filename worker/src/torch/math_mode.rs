//! How libtorch computes on CUDA, process-wide: whether float32 matrix
//! products and convolutions may use TF32, and whether cuDNN times its
//! convolution algorithms per shape (benchmark mode). Both are flags in
//! libtorch's global context, set through the shim (csrc/math_mode.cpp);
//! setting them needs no GPU, and on the CPU they change nothing.
//!
//! Who decides:
//! - training (`train`, a worker, `bench vsd-step`): the job config's
//!   `precision.tf32` and `precision.cudnn_benchmark`, applied when the
//!   trainer is built on a CUDA device ([`apply`]); both default to off;
//! - every other command: TF32 only with `SWIFTBRUSH_TF32=1` ([`TF32_VAR`],
//!   read when the CUDA backend loads), cuDNN benchmark off.
//!
//! By default fp32 means IEEE fp32 on a GPU too, as on the CPU and in the
//! references it is checked against; libtorch's own default would make
//! cuDNN convolutions (but not cuBLAS products) TF32.

use swiftbrush_proto::config::PrecisionConfig;
use tch::Device;

use crate::torch::shim;

/// The two switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MathMode {
    /// Float32 cuBLAS products and cuDNN convolutions may use TF32.
    pub tf32: bool,
    /// cuDNN's benchmark mode.
    pub cudnn_benchmark: bool,
}

impl MathMode {
    /// What the job config asks for.
    pub fn of(cfg: &PrecisionConfig) -> Self {
        Self {
            tf32: cfg.tf32,
            cudnn_benchmark: cfg.cudnn_benchmark,
        }
    }

    /// For `bench vsd-step`'s precision line.
    pub fn describe(self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        format!(
            "TF32 {}, cuDNN benchmark {}",
            on(self.tf32),
            on(self.cudnn_benchmark)
        )
    }
}

/// Sets both switches for the process.
pub fn set(mode: MathMode) -> Result<(), String> {
    // SAFETY: `shim::call` provides the error buffer.
    shim::call(|err, len| unsafe { shim::sb_set_allow_tf32(mode.tf32.into(), err, len) })?;
    // SAFETY: as above.
    shim::call(|err, len| unsafe {
        shim::sb_set_benchmark_cudnn(mode.cudnn_benchmark.into(), err, len)
    })
}

/// The switches as libtorch holds them now (TF32 counts as on when either
/// products or convolutions may use it; [`tf32_state`] tells them apart).
pub fn current() -> MathMode {
    let (matmul, conv) = tf32_state();
    MathMode {
        tf32: matmul || conv,
        cudnn_benchmark: shim::sb_benchmark_cudnn() != 0,
    }
}

/// Applies the config's switches when the trainer is built on `device`: on
/// CUDA both are set as the config says (so `SWIFTBRUSH_TF32` does not
/// decide a training run's arithmetic; a disagreeing one is named in a
/// warning); on the CPU nothing is touched (they change nothing there).
pub fn apply(cfg: &PrecisionConfig, device: Device) -> Result<(), String> {
    if !device.is_cuda() {
        return Ok(());
    }
    let mode = MathMode::of(cfg);
    if let Ok(Some(env)) = tf32_from_environment()
        && env != mode.tf32
    {
        tracing::warn!(
            "{TF32_VAR} asks for TF32 {}, and the job config's precision.tf32 is {}: training \
             follows the config",
            if env { "on" } else { "off" },
            mode.tf32
        );
    }
    set(mode).map_err(|e| format!("setting precision.tf32 / precision.cudnn_benchmark: {e}"))?;
    tracing::debug!(mode = %mode.describe(), "CUDA math mode");
    Ok(())
}

/// The variable that lets float32 work on CUDA use TF32 outside training.
pub const TF32_VAR: &str = "SWIFTBRUSH_TF32";

/// `SWIFTBRUSH_TF32`, if set: 1/true or 0/false (empty reads as unset).
fn tf32_from_environment() -> Result<Option<bool>, String> {
    match std::env::var(TF32_VAR).as_deref() {
        Err(_) | Ok("") => Ok(None),
        Ok("0" | "false") => Ok(Some(false)),
        Ok("1" | "true") => Ok(Some(true)),
        Ok(other) => Err(format!("{TF32_VAR}={other:?}: expected 1 or 0")),
    }
}

/// Whether the environment asks for TF32 (`SWIFTBRUSH_TF32=1`); off unless
/// it does.
pub fn tf32_requested() -> Result<bool, String> {
    tf32_from_environment().map(|v| v.unwrap_or(false))
}

/// What cuBLAS and cuDNN may do now: (TF32 products, TF32 convolutions).
pub fn tf32_state() -> (bool, bool) {
    let bits = shim::sb_allow_tf32();
    (bits & 1 != 0, bits & 2 != 0)
}

/// The process default, set when the CUDA backend loads: TF32 as
/// `SWIFTBRUSH_TF32` says (off unless it asks).
pub(crate) fn apply_environment() {
    let allow = tf32_requested().unwrap_or_else(|e| {
        tracing::warn!("{e}; TF32 stays off");
        false
    });
    // SAFETY: `shim::call` provides the error buffer.
    if let Err(e) =
        shim::call(|err, len| unsafe { shim::sb_set_allow_tf32(allow.into(), err, len) })
    {
        tracing::warn!("setting TF32 failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tf32: bool, cudnn_benchmark: bool) -> PrecisionConfig {
        PrecisionConfig {
            tf32,
            cudnn_benchmark,
            ..PrecisionConfig::default()
        }
    }

    // One test: the switches are process-wide, and tests of one binary
    // share the process.
    #[test]
    fn the_switches_follow_the_config_on_cuda_and_are_left_alone_on_the_cpu() {
        let before = current();
        let on = MathMode {
            tf32: true,
            cudnn_benchmark: true,
        };
        set(on).unwrap();
        assert_eq!(current(), on);
        assert_eq!(tf32_state(), (true, true));
        set(MathMode::default()).unwrap();
        assert_eq!(current(), MathMode::default());
        assert_eq!(tf32_state(), (false, false));

        // On the CPU the trainer leaves them as they are.
        apply(&config(true, true), Device::Cpu).unwrap();
        assert_eq!(current(), MathMode::default());
        assert_eq!(
            MathMode::of(&config(true, false)).describe(),
            "TF32 on, cuDNN benchmark off"
        );
        assert_eq!(
            MathMode::of(&PrecisionConfig::default()),
            MathMode::default()
        );
        set(before).unwrap();
    }

    #[test]
    #[ignore = "needs a CUDA GPU (apply sets the switches only for a CUDA device): \
                cargo test -p swiftbrush-worker --lib math_mode -- --ignored"]
    fn gpu_apply_sets_the_switches_for_a_cuda_device() {
        crate::torch::device::load_cuda_backend();
        assert!(tch::Cuda::is_available(), "this test needs a CUDA device");
        let before = current();
        apply(&config(true, true), Device::Cuda(0)).unwrap();
        assert_eq!(
            current(),
            MathMode {
                tf32: true,
                cudnn_benchmark: true
            }
        );
        apply(&config(false, false), Device::Cuda(0)).unwrap();
        assert_eq!(current(), MathMode::default());
        set(before).unwrap();
    }
}
