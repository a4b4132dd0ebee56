//! Collectives behind the trainer's `GradientSync`: the TCP ring for CPU
//! ranks, NCCL for CUDA ranks (`NcclComm`; its first lines document the API
//! a worker process uses), the gradient buckets NCCL reduces, and the
//! all-reduce benchmark.

pub mod bench;
pub mod buckets;
mod cuda;
pub mod nccl;
mod nccl_lib;
pub mod tcp_ring;

pub use nccl::{NcclAbortHandle, NcclComm, NcclError, NcclOptions};
pub use nccl_lib::LoadError as NcclLoadError;
pub use tcp_ring::TcpRing;
