//! Choosing the compute device, and making CUDA usable from the pip wheel's
//! libtorch.
//!
//! The linker drops libtorch_cuda.so from our binaries (nothing references
//! it by symbol: `--as-needed`), and then libtorch sees no CUDA. Loading it
//! explicitly at start-up registers the CUDA backend; on machines without a
//! driver that load still succeeds and CUDA simply reports no devices.

use std::sync::Once;

use tch::{Cuda, Device};

/// libtorch's lib directory, baked in by build.rs.
const LIBTORCH_LIB: Option<&str> = option_env!("SWIFTBRUSH_LIBTORCH_LIB");

static LOAD_CUDA: Once = Once::new();

/// Loads libtorch's CUDA backend if the wheel ships one. Idempotent.
pub fn load_cuda_backend() {
    LOAD_CUDA.call_once(|| {
        let Some(dir) = LIBTORCH_LIB else { return };
        let path = format!("{dir}/libtorch_cuda.so\0");
        if std::path::Path::new(&path[..path.len() - 1]).exists() {
            // SAFETY: a NUL-terminated path; the handle is intentionally kept
            // for the life of the process (the backend must stay registered).
            let handle =
                unsafe { libc::dlopen(path.as_ptr().cast(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                tracing::debug!(%path, "libtorch_cuda.so could not be loaded; CUDA disabled");
            }
        }
    });
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

/// What `swiftbrush doctor` prints: enough to debug an install.
pub fn describe() -> Vec<(&'static str, String)> {
    load_cuda_backend();
    vec![
        ("libtorch", LIBTORCH_LIB.unwrap_or("(unknown)").to_owned()),
        ("cpu threads", tch::get_num_threads().to_string()),
        ("cuda available", Cuda::is_available().to_string()),
        ("cuda devices", Cuda::device_count().to_string()),
        ("cudnn available", Cuda::cudnn_is_available().to_string()),
    ]
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
