//! `swiftbrush doctor`: which libtorch, CUDA backend and libnccl this
//! process loaded and from where, and the GPUs it sees; a plain line for
//! each part that is missing, saying what that costs.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use crate::collective::nccl_lib;
use crate::threads::{self, ThreadPlan, ThreadRequest};
use crate::torch::cuda_driver;
use crate::torch::device::{self, CudaBackend};
use crate::torch::libtorch::{self, Source};
use crate::torch::math_mode;

#[derive(Debug, Clone, Serialize)]
pub struct LibtorchReport {
    pub dir: Option<PathBuf>,
    pub source: Option<Source>,
    /// The wheel's torch version (torch/version.py), if it is a wheel.
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum NcclReport {
    Loaded { path: String, version: String },
    Missing { error: String },
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum GpusReport {
    Found {
        driver_cuda_version: String,
        gpus: Vec<cuda_driver::Gpu>,
    },
    Missing {
        error: String,
    },
}

/// The threads a `swiftbrush worker` started here (with the same
/// environment and thread flags) would give libtorch (threads.rs).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WorkerThreadsReport {
    Planned {
        #[serde(flatten)]
        plan: ThreadPlan,
        /// The plan in words, as the worker's start line says it.
        summary: String,
    },
    /// The flags or the environment do not read (the worker would refuse
    /// to start).
    Invalid { error: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    pub libtorch: LibtorchReport,
    pub cuda_backend: CudaBackend,
    /// What libtorch itself sees (tch): devices and cuDNN.
    pub libtorch_cuda_devices: i64,
    pub cudnn_available: bool,
    pub nccl: NcclReport,
    pub gpus: GpusReport,
    /// Whether float32 cuBLAS products / cuDNN convolutions may use TF32
    /// (math_mode::TF32_VAR; training follows precision.tf32).
    pub tf32_matmul: bool,
    pub tf32_conv: bool,
    /// Whether cuDNN's benchmark mode is on (off outside training;
    /// training follows precision.cudnn_benchmark).
    pub cudnn_benchmark: bool,
    /// This process's libtorch intra-op threads (doctor keeps libtorch's
    /// choice; `worker_threads` is what a worker would set).
    pub cpu_threads: i32,
    pub worker_threads: WorkerThreadsReport,
    /// How CPU tensors take memory from malloc (host_memory.rs); None if
    /// this process never tuned it (a library user's).
    pub host_malloc: Option<crate::torch::host_memory::HostMalloc>,
}

/// Loads what can be loaded and reports it; `threads` is what a worker
/// would be asked for (`--threads`, `--local-workers`).
pub fn report(threads: ThreadRequest) -> DoctorReport {
    let cuda_backend = device::load_cuda_backend().clone();
    let dir = libtorch::lib_dir();
    let libtorch = LibtorchReport {
        dir: dir.map(|d| d.path.clone()),
        source: dir.map(|d| d.source),
        version: dir.and_then(|d| libtorch::wheel_version(&d.path)),
    };
    let nccl = match nccl_lib::library() {
        Ok(lib) => NcclReport::Loaded {
            path: lib.path.clone(),
            version: nccl_lib::version_string(lib.version),
        },
        Err(e) => NcclReport::Missing {
            error: e.to_string(),
        },
    };
    let gpus = match cuda_driver::report() {
        Ok(r) => GpusReport::Found {
            driver_cuda_version: r.driver_cuda_version.clone(),
            gpus: r.gpus.clone(),
        },
        Err(error) => GpusReport::Missing { error },
    };
    DoctorReport {
        libtorch,
        cuda_backend,
        libtorch_cuda_devices: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        nccl,
        gpus,
        tf32_matmul: math_mode::tf32_state().0,
        tf32_conv: math_mode::tf32_state().1,
        cudnn_benchmark: math_mode::current().cudnn_benchmark,
        cpu_threads: tch::get_num_threads(),
        worker_threads: match threads::plan_here(threads) {
            Ok(plan) => WorkerThreadsReport::Planned {
                summary: plan.to_string(),
                plan,
            },
            Err(e) => WorkerThreadsReport::Invalid {
                error: e.to_string(),
            },
        },
        host_malloc: crate::torch::host_memory::state().cloned(),
    }
}

impl DoctorReport {
    /// One line per part: what was loaded and from where, or "missing:" and
    /// why.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: String| {
            let _ = writeln!(out, "{key:<14} {value}");
        };
        line(
            "libtorch",
            match (&self.libtorch.dir, self.libtorch.source) {
                (Some(dir), Some(source)) => format!(
                    "{} from {} ({})",
                    self.libtorch
                        .version
                        .as_deref()
                        .unwrap_or("version unknown"),
                    dir.display(),
                    match source {
                        Source::Loaded => "where the dynamic loader found it",
                        Source::Build => "the build machine's path",
                    }
                ),
                _ => "missing: the libtorch directory is unknown".to_owned(),
            },
        );
        line(
            "CUDA backend",
            match &self.cuda_backend {
                CudaBackend::Loaded { path } => format!("loaded from {}", path.display()),
                CudaBackend::Missing { reason } => format!("missing: {reason}"),
                CudaBackend::Failed { path, error } => format!(
                    "missing: {} did not load ({error}): CUDA is unavailable",
                    path.display()
                ),
            },
        );
        line(
            "libnccl",
            match &self.nccl {
                NcclReport::Loaded { path, version } => format!("{version} from {path}"),
                NcclReport::Missing { error } => format!("missing: {error}"),
            },
        );
        line(
            "GPUs",
            match &self.gpus {
                GpusReport::Found {
                    driver_cuda_version,
                    gpus,
                } if gpus.is_empty() => {
                    format!("none: the driver (CUDA {driver_cuda_version}) sees no GPU")
                }
                GpusReport::Found {
                    driver_cuda_version,
                    gpus,
                } => {
                    let list: Vec<String> = gpus
                        .iter()
                        .map(|g| {
                            format!(
                                "cuda:{} {} ({:.1} GiB)",
                                g.index,
                                g.name,
                                g.total_memory_bytes as f64 / (1u64 << 30) as f64
                            )
                        })
                        .collect();
                    format!("{} (driver CUDA {driver_cuda_version})", list.join(", "))
                }
                GpusReport::Missing { error } => format!("none: {error}"),
            },
        );
        line(
            "libtorch CUDA",
            format!(
                "{} device(s), cuDNN {}",
                self.libtorch_cuda_devices,
                if self.cudnn_available {
                    "available"
                } else {
                    "unavailable"
                }
            ),
        );
        line(
            "fp32 on CUDA",
            match (self.tf32_matmul, self.tf32_conv) {
                (false, false) => format!(
                    "IEEE fp32 (no TF32; training: precision.tf32: true allows it, other \
                     commands: {}=1)",
                    math_mode::TF32_VAR
                ),
                (m, c) => format!(
                    "TF32 allowed (matrix products {m}, convolutions {c}; {}; training follows \
                     precision.tf32)",
                    math_mode::TF32_VAR
                ),
            },
        );
        line(
            "cuDNN bench",
            if self.cudnn_benchmark {
                "benchmark mode on".to_owned()
            } else {
                "benchmark mode off (training: precision.cudnn_benchmark: true turns it on)"
                    .to_owned()
            },
        );
        line("CPU threads", self.cpu_threads.to_string());
        line(
            "worker threads",
            match &self.worker_threads {
                WorkerThreadsReport::Planned { summary, .. } => summary.clone(),
                WorkerThreadsReport::Invalid { error } => format!("invalid: {error}"),
            },
        );
        line(
            "host memory",
            crate::torch::host_memory::describe(self.host_malloc.as_ref()),
        );
        out
    }
}
