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
        // TF32's process default (math_mode.rs; training sets its own).
        crate::torch::math_mode::apply_environment();
        let Some(dir) = crate::torch::libtorch::lib_dir() else {
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
        if let Err(error) = crate::torch::libtorch::dlopen(&path, libc::RTLD_NOW | libc::RTLD_GLOBAL) {
            tracing::debug!(path = %path.display(), %error, "libtorch_cuda.so did not load; CUDA disabled");
            return CudaBackend::Failed { path, error };
        }
        CudaBackend::Loaded { path }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: expected auto, cpu or cuda:N")]
    Unknown(String),
    #[error("device {requested} requested but {available} CUDA device(s) are available")]
    Unavailable { requested: String, available: i64 },
    #[error("device {requested} requested but libtorch cannot use CUDA: {why}")]
    CudaBroken { requested: String, why: String },
    #[error(
        "--device auto: this host has {gpus} GPUs and nothing says which one is this worker's \
         (each would take cuda:0): pass --device cuda:N, or start the workers with LOCAL_RANK \
         (torchrun) or SLURM_LOCALID (srun) set"
    )]
    Ambiguous { gpus: i64 },
    #[error("--device auto: {var}={rank}, but this host has {gpus} CUDA device(s)")]
    LocalRankOutOfRange { var: String, rank: usize, gpus: i64 },
}

/// Parses `auto` (first CUDA device, else CPU), `cpu` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    load_cuda_backend();
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if Cuda::is_available() {
            Device::Cuda(0)
        } else {
            warn_if_cuda_is_lost();
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
            } else if let Some(why) = lost_cuda() {
                Err(DeviceError::CudaBroken {
                    requested: spec.to_owned(),
                    why,
                })
            } else {
                Err(DeviceError::Unavailable {
                    requested: spec.to_owned(),
                    available,
                })
            }
        }
    }
}

/// As [`parse_device`], for one of several worker processes on a host:
/// `auto` takes the GPU of the process's local rank (`LOCAL_RANK` as
/// torchrun sets it, else `SLURM_LOCALID` as srun does), since every
/// worker taking cuda:0 would put two ranks on one GPU, which NCCL refuses.
pub fn parse_worker_device(spec: &str) -> Result<Device, DeviceError> {
    if spec != "auto" {
        return parse_device(spec);
    }
    load_cuda_backend();
    let gpus = Cuda::device_count();
    if gpus == 0 {
        return parse_device(spec);
    }
    auto_worker_device(gpus, local_rank(|name| std::env::var(name).ok()))
}

/// The local rank from the launcher's environment, with the variable it
/// came from.
pub fn local_rank(var: impl Fn(&str) -> Option<String>) -> Option<(String, usize)> {
    ["LOCAL_RANK", "SLURM_LOCALID"].iter().find_map(|name| {
        let rank = var(name)?.trim().parse().ok()?;
        Some(((*name).to_owned(), rank))
    })
}

/// `auto` for a worker on a host with `gpus` CUDA devices (at least one).
fn auto_worker_device(
    gpus: i64,
    local_rank: Option<(String, usize)>,
) -> Result<Device, DeviceError> {
    match local_rank {
        Some((_, rank)) if (rank as i64) < gpus => Ok(Device::Cuda(rank)),
        Some((var, rank)) => Err(DeviceError::LocalRankOutOfRange { var, rank, gpus }),
        None if gpus == 1 => Ok(Device::Cuda(0)),
        None => Err(DeviceError::Ambiguous { gpus }),
    }
}

/// Why libtorch sees no CUDA device while the driver reports GPUs (None
/// when the two agree).
fn lost_cuda() -> Option<String> {
    let driver_gpus = crate::torch::cuda_driver::report().map_or(0, |r| r.gpus.len());
    cuda_lost_reason(driver_gpus, Cuda::device_count(), load_cuda_backend())
}

fn cuda_lost_reason(driver_gpus: usize, torch_gpus: i64, backend: &CudaBackend) -> Option<String> {
    if driver_gpus == 0 || torch_gpus > 0 {
        return None;
    }
    Some(match backend {
        CudaBackend::Failed { path, error } => format!(
            "the driver reports {driver_gpus} GPU(s) but {} did not load: {error}",
            path.display()
        ),
        CudaBackend::Missing { reason } => {
            format!("the driver reports {driver_gpus} GPU(s) but {reason}")
        }
        CudaBackend::Loaded { path } => format!(
            "the driver reports {driver_gpus} GPU(s) but libtorch's CUDA backend ({}) sees none \
             (a driver older than the CUDA the wheel was built for?)",
            path.display()
        ),
    })
}

/// `auto` falls back to the CPU; where GPUs are there but unusable, that is
/// news the user must not miss.
fn warn_if_cuda_is_lost() {
    if let Some(why) = lost_cuda() {
        tracing::warn!("TRAINING ON THE CPU: {why}; see `swiftbrush doctor`");
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

    #[test]
    fn auto_for_a_worker_takes_its_local_rank_or_refuses_to_guess() {
        let rank = |r: usize| Some(("LOCAL_RANK".to_owned(), r));
        assert_eq!(auto_worker_device(1, None).unwrap(), Device::Cuda(0));
        assert_eq!(auto_worker_device(8, rank(3)).unwrap(), Device::Cuda(3));
        let e = auto_worker_device(8, None).unwrap_err().to_string();
        assert!(e.contains("8 GPUs") && e.contains("LOCAL_RANK"), "{e}");
        let e = auto_worker_device(2, rank(2)).unwrap_err().to_string();
        assert!(
            e.contains("LOCAL_RANK=2") && e.contains("2 CUDA device"),
            "{e}"
        );
        let env = |name: &str| (name == "SLURM_LOCALID").then(|| "5".to_owned());
        assert_eq!(local_rank(env), Some(("SLURM_LOCALID".to_owned(), 5)));
        let both = |name: &str| Some(if name == "LOCAL_RANK" { "1" } else { "5" }.to_owned());
        assert_eq!(local_rank(both), Some(("LOCAL_RANK".to_owned(), 1)));
        assert_eq!(local_rank(|_| Some("x".to_owned())), None);
    }

    #[test]
    fn gpus_the_driver_sees_and_libtorch_does_not_are_named_with_the_loaders_message() {
        let failed = CudaBackend::Failed {
            path: "/site/torch/lib/libtorch_cuda.so".into(),
            error: "libcudart.so.13: cannot open shared object file".to_owned(),
        };
        let why = cuda_lost_reason(2, 0, &failed).unwrap();
        assert!(
            why.contains("2 GPU(s)") && why.contains("libcudart.so.13"),
            "{why}"
        );
        assert_eq!(cuda_lost_reason(0, 0, &failed), None, "no GPU, no news");
        assert_eq!(cuda_lost_reason(2, 2, &failed), None, "both agree");
        let loaded = CudaBackend::Loaded {
            path: "/x/libtorch_cuda.so".into(),
        };
        assert!(
            cuda_lost_reason(1, 0, &loaded)
                .unwrap()
                .contains("sees none")
        );
    }
}
