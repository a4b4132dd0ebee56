//! The distributed checkpoint sink: rank 0's files are written into their
//! attempt folder by the uploader; this stages them (`into_staged`) and
//! reports them with ReportCheckpoint, and the coordinator commits them
//! (conditional create of the manifest, then LATEST). It runs on the upload
//! thread, never on the training thread.

use std::time::{Duration, Instant};

use swiftbrush_proto::rpc;
use swiftbrush_proto::run_store::CheckpointMeta;

use super::link::{Backoff, CALL_TIMEOUT, CoordinatorLink, Reaction};
use crate::trainer::checkpoint::{CheckpointError, CheckpointSink, CheckpointWriter, Landing};

/// How long a busy coordinator (another commit in flight, unreachable) is
/// asked again before the checkpoint is given up.
const RETRY_FOR: Duration = Duration::from_secs(60);

pub struct ReportToCoordinator {
    pub link: CoordinatorLink,
    pub worker_id: u64,
    pub generation: u64,
}

impl CheckpointSink for ReportToCoordinator {
    fn finish(
        &self,
        writer: CheckpointWriter,
        meta: CheckpointMeta,
        upload_seconds: f64,
    ) -> Result<Landing, CheckpointError> {
        let step = writer.step();
        let staged = writer.into_staged();
        let staged_json = serde_json::to_string(&staged).map_err(|e| CheckpointError::Report {
            step,
            reason: e.to_string(),
        })?;
        let request = rpc::ReportCheckpointRequest {
            worker_id: self.worker_id,
            generation: self.generation,
            step,
            staged_json,
            teacher_fingerprint: meta.teacher_fingerprint,
            upload_seconds: if upload_seconds.is_finite() {
                upload_seconds.max(0.0)
            } else {
                0.0
            },
        };
        let deadline = Instant::now() + RETRY_FOR;
        let mut backoff = Backoff::new();
        loop {
            let req = request.clone();
            // A commit writes to storage: give it longer than a plain call.
            let result = self
                .link
                .call("ReportCheckpoint", CALL_TIMEOUT * 6, |mut c| async move {
                    c.report_checkpoint(req).await
                });
            let e = match result {
                Ok(reply) => {
                    tracing::info!(step, manifest = %reply.manifest_path, "checkpoint committed");
                    return Ok(Landing::Committed { step });
                }
                Err(e) => e,
            };
            match e.reaction() {
                // A checkpoint at or after this step exists already.
                Reaction::AlreadyDone => return Ok(Landing::Committed { step }),
                Reaction::Stale | Reaction::Reregister => {
                    return Ok(Landing::Refused {
                        step,
                        reason: e.to_string(),
                    });
                }
                Reaction::Retry if Instant::now() < deadline => {
                    tracing::debug!(step, error = %e, "checkpoint report not taken yet; retrying");
                    std::thread::sleep(backoff.next_delay());
                }
                Reaction::Retry => {
                    return Ok(Landing::Refused {
                        step,
                        reason: e.to_string(),
                    });
                }
                Reaction::Fatal => {
                    return Err(CheckpointError::Report {
                        step,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
}
