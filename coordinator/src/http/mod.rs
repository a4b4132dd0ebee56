//! The coordinator's HTTP side (axum): the status page on `/` (one
//! self-contained HTML file, `status_page.html`: no script, style or font
//! from elsewhere), Prometheus `/metrics`, the status as JSON on `/status`,
//! the loss curves since this coordinator started on `/history`, the
//! newest training-samples picture on `/samples/latest(.png)`, liveness on
//! `/healthz` and readiness on `/readyz` (ready once a job is submitted and
//! has not failed). Unauthenticated and read-only; it binds to 127.0.0.1
//! unless told otherwise.

mod metrics;
mod samples;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;

use crate::app::Coordinator;
use crate::domain::JobPhase;

pub use metrics::render as render_metrics;

pub fn router(app: Coordinator) -> Router {
    Router::new()
        .route("/", get(status_html))
        .route("/history", get(history))
        .route("/samples/latest", get(samples::latest))
        .route("/samples/latest.png", get(samples::latest_png))
        .route("/metrics", get(metrics_page))
        .route("/status", get(status_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(app)
}

/// The status page: it draws everything from `/status`, `/history` and
/// `/samples/latest` in the browser, refreshed every second.
async fn status_html() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing outside this coordinator may load into the page.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src 'self' data:",
            ),
        ],
        include_str!("status_page.html"),
    )
}

async fn history(State(app): State<Coordinator>) -> impl IntoResponse {
    Json(serde_json::json!({ "series": app.loss_history() }))
}

async fn metrics_page(State(app): State<Coordinator>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&app.status()),
    )
}

async fn status_page(State(app): State<Coordinator>) -> impl IntoResponse {
    Json(app.status())
}

async fn ready(State(app): State<Coordinator>) -> impl IntoResponse {
    let status = app.status();
    let has_job = app.job_info().is_some();
    if has_job && status.phase != JobPhase::Failed {
        (StatusCode::OK, format!("ready: {}\n", status.phase.name()))
    } else if has_job {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the job failed: {}\n", status.reason),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no job submitted\n".to_owned(),
        )
    }
}
