//! Retention: keep the newest K valid checkpoints and remove what can no
//! longer be resumed from, without ever making the newest valid checkpoint
//! unreachable.
//!
//! Rules, with N the newest valid step:
//! - valid checkpoints older than the K newest are deleted;
//! - steps without a manifest older than N are leftovers of dead writers:
//!   deleted; newer ones may be a writer at work: kept;
//! - invalid checkpoints older than N are deleted; newer ones are kept for
//!   inspection (logged at every scan);
//! - in the checkpoints kept, attempt folders the manifest does not name
//!   (losers of a commit race) are deleted;
//! - without any valid checkpoint nothing is deleted.
//!
//! A checkpoint's manifest is deleted first, so a pass interrupted half way
//! leaves at worst an uncommitted leftover, never a valid-looking checkpoint
//! with missing files.

use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use super::error::{Result, RunStoreError};
use super::layout;
use super::scan::{self, CheckpointStatus, StepObjects};
use super::store::Ctx;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Valid checkpoints kept, oldest first.
    pub kept: Vec<u64>,
    /// Valid checkpoints deleted because K newer ones exist.
    pub deleted_checkpoints: Vec<u64>,
    /// Steps without a manifest, older than the newest valid one.
    pub deleted_uncommitted: Vec<u64>,
    /// Steps with an invalid manifest, older than the newest valid one.
    pub deleted_invalid: Vec<u64>,
    /// Objects of losing attempts removed from kept checkpoints.
    pub num_orphans_deleted: usize,
}

pub(crate) async fn apply(ctx: &Ctx, keep_last: usize) -> Result<RetentionReport> {
    if keep_last == 0 {
        return Err(RunStoreError::InvalidRetention);
    }
    let steps = scan::scan_all(ctx).await?;
    let mut statuses = Vec::with_capacity(steps.len());
    for (step, objects) in steps {
        let status = scan::status_of(ctx, step, &objects).await?;
        statuses.push((step, objects, status));
    }
    let mut valid: Vec<u64> = statuses
        .iter()
        .filter(|(_, _, s)| matches!(s, CheckpointStatus::Valid(_)))
        .map(|(step, _, _)| *step)
        .collect();
    valid.sort_unstable();
    let Some(&newest_valid) = valid.last() else {
        return Ok(RetentionReport::default());
    };
    let first_kept = valid[valid.len().saturating_sub(keep_last)];

    let mut report = RetentionReport::default();
    for (step, objects, status) in statuses {
        match status {
            CheckpointStatus::Valid(manifest) if step >= first_kept => {
                let attempt_prefix = format!("{}/", manifest.attempt);
                let orphans: Vec<Path> = objects
                    .files
                    .iter()
                    .filter(|(key, _)| !key.starts_with(&attempt_prefix))
                    .map(|(_, meta)| meta.location.clone())
                    .collect();
                report.num_orphans_deleted += orphans.len();
                delete_all(ctx, orphans).await?;
                report.kept.push(step);
            }
            CheckpointStatus::Valid(_) => {
                delete_step(ctx, step, objects).await?;
                report.deleted_checkpoints.push(step);
            }
            CheckpointStatus::Uncommitted if step < newest_valid => {
                delete_step(ctx, step, objects).await?;
                report.deleted_uncommitted.push(step);
            }
            CheckpointStatus::Invalid { .. } if step < newest_valid => {
                delete_step(ctx, step, objects).await?;
                report.deleted_invalid.push(step);
            }
            CheckpointStatus::Uncommitted | CheckpointStatus::Invalid { .. } => {}
        }
    }
    if report != RetentionReport::default() {
        tracing::info!(run = %ctx.run, ?report, "retention applied");
    }
    Ok(report)
}

/// Manifest first: from then on the step is uncommitted, whatever happens.
async fn delete_step(ctx: &Ctx, step: u64, objects: StepObjects) -> Result<()> {
    if let Some(manifest) = &objects.manifest {
        delete_one(ctx, &manifest.location).await?;
    }
    let rest = objects
        .files
        .into_values()
        .map(|meta| meta.location)
        .collect();
    delete_all(ctx, rest).await?;
    tracing::debug!(run = %ctx.run, step, "deleted checkpoint folder");
    Ok(())
}

/// One batched delete (S3 deletes up to 1000 keys a request).
async fn delete_all(ctx: &Ctx, paths: Vec<Path>) -> Result<()> {
    if paths.is_empty() {
        return Ok(());
    }
    let locations = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
    let mut results = ctx.store.delete_stream(locations);
    while let Some(result) = results.next().await {
        match result {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(ctx.err("delete", &layout::checkpoints_dir())(e)),
        }
    }
    Ok(())
}

/// Already gone counts as deleted: two retention passes may overlap.
async fn delete_one(ctx: &Ctx, path: &Path) -> Result<()> {
    match ctx.store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(ctx.err("delete", path)(e)),
    }
}
