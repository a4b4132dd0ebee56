//! The worker's own HTTP `/healthz` (off unless `--health-listen ADDR`):
//! 200 with the worker's id, world, step, phase and the age of the last
//! heartbeat the coordinator answered, for probes and people. No
//! authentication: bind it to loopback or a private network.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;

use super::heartbeat::proto_phase;
use super::status::WorkerStatus;

#[derive(Debug, Serialize)]
struct Health {
    alive: bool,
    worker_id: u64,
    generation: u64,
    step: u64,
    phase: &'static str,
    /// Milliseconds since the coordinator last answered a heartbeat (null:
    /// never).
    last_heartbeat_ack_ms: Option<u64>,
}

async fn healthz(State(status): State<Arc<WorkerStatus>>) -> Json<Health> {
    Json(Health {
        alive: true,
        worker_id: status.worker_id(),
        generation: status.generation(),
        step: status.step(),
        phase: proto_phase(status.phase()).as_str_name(),
        last_heartbeat_ack_ms: status.last_ack_age_ms(),
    })
}

/// Serves `/healthz` on `runtime` until the process exits; returns the
/// bound address.
pub fn serve(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    status: Arc<WorkerStatus>,
) -> std::io::Result<SocketAddr> {
    let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
    let bound = listener.local_addr()?;
    let router = axum::Router::new()
        .route("/healthz", get(healthz))
        .with_state(status);
    runtime.spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::warn!(error = %e, "the health endpoint stopped");
        }
    });
    tracing::info!(%bound, "health endpoint on /healthz");
    Ok(bound)
}
