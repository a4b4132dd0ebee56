//! The platform under the method: which libtorch this process runs on and
//! what was loaded beside it, the device and its driver, the host's memory
//! allocator, reads from the device, and what tch 0.24 does not expose
//! (the C++ shim). Nothing here knows about diffusion or training.
//!
//! | file | owns |
//! |---|---|
//! | `libtorch.rs` | the directory the loader really took libtorch from; `dlopen` with the loader's message |
//! | `device.rs` | the CUDA backend load, `--device` parsing (a worker's local rank) |
//! | `math_mode.rs` | TF32 and cuDNN benchmark mode (`precision.tf32`, `precision.cudnn_benchmark`) |
//! | `cuda_driver.rs` | the GPUs the driver reports (libcuda.so.1 by name) |
//! | `host_memory.rs` | glibc malloc tuned for tensor-sized buffers |
//! | `host_read.rs` | one device-to-host read of several scalars |
//! | `foreach.rs` | the multi-tensor (`_foreach_*`) ops of Adam, the clip and the EMA |
//! | `precision.rs` | autocast plans and their guard |
//! | `shim.rs` | the C ABI of the C++ shim in `worker/csrc/` |

pub mod cuda_driver;
pub mod device;
pub mod foreach;
pub mod host_memory;
pub mod host_read;
pub mod libtorch;
pub mod math_mode;
pub mod precision;
/// The C ABI of the C++ shim in csrc/ (autocast, CUDA stream, TF32 and
/// cuDNN benchmark, multi-tensor ops).
pub(crate) mod shim;
