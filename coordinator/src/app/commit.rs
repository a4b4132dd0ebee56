//! Committing a checkpoint that rank 0 staged: the core checks and reserves
//! the commit, the run store writes the manifest (conditional create) and
//! moves LATEST, and the core records the result. The storage part runs in
//! its own task, so a caller that hangs up mid-commit cannot leave the
//! commit slot taken.

use serde::Serialize;
use swiftbrush_proto::run_store::{RunStoreError, StagedCheckpoint};

use super::Coordinator;
use super::error::AppError;
use crate::domain::{CheckpointReport, CommitResult};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Committed {
    pub step: u64,
    /// The manifest, relative to the run directory.
    pub manifest_path: String,
}

impl Coordinator {
    pub async fn report_checkpoint(
        &self,
        report: CheckpointReport,
        staged: StagedCheckpoint,
    ) -> Result<Committed, AppError> {
        if staged.step != report.step {
            return Err(AppError::invalid(
                "staged_json",
                format!(
                    "stages step {} but the report is for step {}",
                    staged.step, report.step
                ),
            ));
        }
        let ticket = self.transition(|s, now| s.begin_commit(report, now))?;
        let this = self.clone();
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            // Only the lease's holder commits: a job that was taken over
            // learns it here at the latest, before it writes anything.
            let result = match this.renew_lease().await {
                Err(lost @ AppError::Store(RunStoreError::LeaseLost { .. })) => Err(lost),
                _ => this
                    .store()
                    .commit_staged(staged, ticket.meta.clone())
                    .await
                    .map_err(AppError::from),
            };
            let outcome = match &result {
                Ok(_) => CommitResult::Committed,
                Err(e) => {
                    tracing::warn!(step = ticket.step, error = %e, "checkpoint not committed");
                    CommitResult::NotCommitted
                }
            };
            tracing::debug!(step = ticket.step, elapsed = ?started.elapsed(), "commit finished");
            this.transition(|s, now| s.finish_commit(&ticket, outcome, now));
            // Another writer committed a step this job reserved: someone
            // else writes this run directory. Retrying or retraining can
            // only lose again, so the job ends with the error.
            if let Err(AppError::Store(e)) = &result
                && e.is_lost_race()
            {
                this.fail_job(format!(
                    "{e}: another job is writing this run directory; this job stops"
                ));
            }
            result
        });
        let manifest = task
            .await
            .map_err(|e| AppError::Internal(format!("the commit task ended: {e}")))??;
        Ok(Committed {
            step: manifest.step,
            manifest_path: format!("checkpoints/step-{:08}/manifest.json", manifest.step),
        })
    }
}
