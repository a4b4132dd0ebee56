//! The newest training-samples picture of the run (`RUN/samples/step-N.png`,
//! written by rank 0 every `train.sample_every_steps`), for the status page:
//! `/samples/latest` names it (JSON, `null` before the first), and
//! `/samples/latest.png` serves it.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;

use crate::app::Coordinator;

#[derive(Serialize)]
pub struct LatestSample {
    pub name: String,
    pub step: Option<u64>,
}

/// The newest `samples/step-*.png`: the names sort by step (zero-padded).
async fn newest(app: &Coordinator) -> Result<Option<Path>, String> {
    let store = app.store().object_store();
    let listed: Vec<_> = store
        .list(Some(&Path::from("samples")))
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(listed
        .into_iter()
        .map(|meta| meta.location)
        .filter(|p| {
            p.filename()
                .is_some_and(|n| n.starts_with("step-") && n.ends_with(".png"))
        })
        .max_by(|a, b| a.as_ref().cmp(b.as_ref())))
}

pub async fn latest(State(app): State<Coordinator>) -> Response {
    match newest(&app).await {
        Ok(found) => Json(found.map(|path| {
            let name = path.as_ref().to_owned();
            let step = path
                .filename()
                .and_then(|n| n.strip_prefix("step-")?.strip_suffix(".png")?.parse().ok());
            LatestSample { name, step }
        }))
        .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    }
}

pub async fn latest_png(State(app): State<Coordinator>) -> Response {
    let path = match newest(&app).await {
        Ok(Some(path)) => path,
        Ok(None) => return (StatusCode::NOT_FOUND, "no samples yet\n").into_response(),
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    };
    let store = app.store().object_store();
    match store.get(&path).await {
        Ok(got) => match got.bytes().await {
            Ok(bytes) => (
                [
                    (header::CONTENT_TYPE, "image/png"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                bytes,
            )
                .into_response(),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        },
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}
