//! Choosing the compute device, and making CUDA usable from the pip wheel's
//! libtorch.
//!
//! The linker drops libtorch_cuda.so from our binaries (nothing references
//! it by symbol: `--as-needed`), and then libtorch sees no CUDA. Loading it
//! explicitly at start-up registers the CUDA backend; on machines without a
//! driver that load still succeeds and CUDA simply reports no devices. It is
//! loaded from the running libtorch's own directory (libtorch.rs), so a
//! binary started with LD_LIBRARY_PATH on another machine uses that
//! machine's backend.

use std::path::PathBuf;
use std::sync::OnceLock;

use tch::{Cuda, Device};

/// What became of libtorch's CUDA backend in this process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CudaBackend {
    /// libtorch_cuda.so is loaded from `path`.
    Loaded { path: PathBuf },
    /// The libtorch in use has no CUDA backend (a CPU-only build), or its
    /// directory is unknown.
    Missing { reason: String },
    /// It is there but did not load (the dynamic loader's message).
    Failed { path: PathBuf, error: String },
}

/// Loads libtorch's CUDA backend from the directory the running libtorch
/// was loaded from (see libtorch.rs why never another). Idempotent; the
/// outcome is kept.
pub fn load_cuda_backend() -> &'static CudaBackend {
    static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        apply_tf32_setting();
        let Some(dir) = crate::libtorch::lib_dir() else {
            return CudaBackend::Missing {
                reason: "the libtorch directory is unknown".to_owned(),
            };
        };
        let path = dir.path.join("libtorch_cuda.so");
        if !path.exists() {
            return CudaBackend::Missing {
                reason: format!(
                    "{} does not exist (a CPU-only libtorch): CUDA is unavailable",
                    path.display()
                ),
            };
        }
        // RTLD_GLOBAL: the backend registers itself with libtorch.
        if let Err(error) = crate::libtorch::dlopen(&path, libc::RTLD_NOW | libc::RTLD_GLOBAL) {
            tracing::debug!(path = %path.display(), %error, "libtorch_cuda.so did not load; CUDA disabled");
            return CudaBackend::Failed { path, error };
        }
        CudaBackend::Loaded { path }
    })
}

/// The variable that lets float32 work on CUDA use TF32.
pub const TF32_VAR: &str = "SWIFTBRUSH_TF32";

/// Whether float32 matrix products and convolutions on CUDA may run in TF32:
/// only with `SWIFTBRUSH_TF32=1`. By default fp32 means IEEE fp32 on a GPU
/// too, as on the CPU and in the references it is checked against;
/// libtorch's own default would make cuDNN convolutions (but not cuBLAS
/// products) TF32. Training's teacher passes run under bf16 autocast
/// either way; this decides the fp32 parts (the student's passes).
pub fn tf32_requested() -> Result<bool, String> {
    match std::env::var(TF32_VAR).as_deref() {
        Err(_) | Ok("" | "0" | "false") => Ok(false),
        Ok("1" | "true") => Ok(true),
        Ok(other) => Err(format!("{TF32_VAR}={other:?}: expected 1 or 0")),
    }
}

/// What cuBLAS and cuDNN may do now: (TF32 products, TF32 convolutions).
pub fn tf32_state() -> (bool, bool) {
    let bits = crate::shim::sb_allow_tf32();
    (bits & 1 != 0, bits & 2 != 0)
}

fn apply_tf32_setting() {
    let allow = tf32_requested().unwrap_or_else(|e| {
        tracing::warn!("{e}; TF32 stays off");
        false
    });
    // SAFETY: `shim::call` provides the error buffer.
    if let Err(e) = crate::shim::call(|err, len| unsafe {
        crate::shim::sb_set_allow_tf32(allow.into(), err, len)
    }) {
        tracing::warn!("setting TF32 failed: {e}");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: expected auto, cpu or cuda:N")]
    Unknown(String),
    #[error("device {requested} requested but {available} CUDA device(s) are available")]
    Unavailable { requested: String, available: i64 },
}

/// Parses `auto` (first CUDA device, else CPU), `cpu` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    load_cuda_backend();
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        _ => {
            let n: usize = spec
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| DeviceError::Unknown(spec.to_owned()))?;
            let available = Cuda::device_count();
            if (n as i64) < available {
                Ok(Device::Cuda(n))
            } else {
                Err(DeviceError::Unavailable {
                    requested: spec.to_owned(),
                    available,
                })
            }
        }
    }
}

/// This machine's name (Linux), else `localhost`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_names_bad_ones() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let auto = parse_device("auto").unwrap();
        assert_eq!(auto == Device::Cpu, !Cuda::is_available());
        let err = parse_device("gpu0").unwrap_err().to_string();
        assert!(err.contains("\"gpu0\"") && err.contains("cuda:N"), "{err}");
        let err = parse_device("cuda:99").unwrap_err().to_string();
        assert!(
            err.contains("cuda:99") && err.contains("available"),
            "{err}"
        );
    }
}
