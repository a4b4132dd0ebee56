//! Collectives behind the trainer's `GradientSync`: the TCP ring for CPU
//! ranks, NCCL for CUDA ranks (`NcclComm`; its first lines document the API
//! a worker process uses), the gradient buckets NCCL reduces, and the
//! all-reduce benchmark.

pub mod bench;
pub mod buckets;
mod cuda;
pub mod nccl;
pub(crate) mod nccl_lib;
pub mod tcp_ring;

pub use nccl::{NcclAbortHandle, NcclComm, NcclError, NcclOptions};

/// A collective backend, by the name the job config's `world.backend`, the
/// coordinator's assignments and `bench allreduce --backend` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The TCP ring (any device).
    Tcp,
    /// NCCL (CUDA devices).
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tcp => "tcp",
            Backend::Nccl => "nccl",
        }
    }

    /// The backend called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        [Backend::Tcp, Backend::Nccl]
            .into_iter()
            .find(|b| b.name() == name)
    }
}
pub use nccl_lib::LoadError as NcclLoadError;
pub use tcp_ring::TcpRing;
