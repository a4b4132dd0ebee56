//! The swiftbrush coordinator. It never links libtorch (it runs on CPU
//! nodes). `domain` is the pure core (job state machine, worker health,
//! world formation, checkpoint bookkeeping) and holds no RPC types; `app`
//! runs it with a clock, storage and the caption corpus; `grpc` and `http`
//! expose it; `serve` wires everything into one server; `cli` is the
//! command line both coordinator binaries share. The caption ledger and the
//! caption file parsing, which workers share, are in `swiftbrush_proto`.

pub mod app;
pub mod cli;
pub mod domain;
pub mod grpc;
pub mod http;
mod serve;

pub use serve::{
    DEFAULT_LISTEN, RunningCoordinator, ServeError, ServeOptions, ShutdownSignal, TlsOptions,
    serve, shutdown_signal, start, start_with_clock,
};
