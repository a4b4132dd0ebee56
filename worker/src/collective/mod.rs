//! Collectives behind the trainer's `GradientSync`: the TCP ring for CPU
//! ranks (NCCL for CUDA ranks lands with the distributed runtime).

pub mod tcp_ring;

pub use tcp_ring::TcpRing;
