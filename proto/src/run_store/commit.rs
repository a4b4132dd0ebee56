//! The commit protocol: check the writer is not stale and its files are all
//! there, create the manifest only if no one else has (the commit point),
//! then move `LATEST` forward.

use bytes::Bytes;
use chrono::Utc;
use object_store::PutMode;

use super::error::{Result, RunStoreError};
use super::latest::{self, Advance, LatestPointer};
use super::layout;
use super::manifest::{CheckpointMeta, MANIFEST_FORMAT_VERSION, Manifest};
use super::scan;
use super::store::Ctx;
use super::writer::StagedCheckpoint;

pub(crate) async fn commit(
    ctx: &Ctx,
    staged: StagedCheckpoint,
    meta: CheckpointMeta,
) -> Result<Manifest> {
    let step = staged.step;
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        step,
        attempt: staged.attempt,
        created_at: Utc::now(),
        files: staged.files,
        meta,
    };
    manifest
        .check_self(step)
        .map_err(|problem| RunStoreError::InvalidWrite { step, problem })?;
    reject_stale_generation(ctx, &manifest).await?;
    check_files_present(ctx, &manifest).await?;

    let path = layout::manifest_path(step);
    // A manifest is a few hundred bytes of plain data: serialising cannot fail.
    let body = Bytes::from(serde_json::to_vec_pretty(&manifest).expect("Manifest serialises"));
    match ctx.put_mode(&path, body, PutMode::Create).await {
        Ok(_) => {}
        // GCS reports a lost create as a failed precondition.
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => {
            // A create retried after a lost reply finds its own manifest:
            // that is this writer's commit, not a lost race.
            if !is_own_manifest(ctx, &path, &manifest.attempt).await {
                return Err(RunStoreError::AlreadyCommitted {
                    run: ctx.run.clone(),
                    step,
                });
            }
        }
        Err(e) => return Err(ctx.err("create manifest", &path)(e)),
    }
    tracing::info!(run = %ctx.run, step, generation = manifest.meta.generation, "checkpoint committed");

    // The checkpoint is committed whatever happens to the pointer, and
    // resolution never reads it; failing here would make the caller retry a
    // commit that can only lose. Log instead.
    match latest::advance(ctx, &LatestPointer::new(step, manifest.meta.generation)).await {
        Ok(Advance::Moved) => {}
        Ok(Advance::AlreadyAt(newer)) => {
            tracing::info!(run = %ctx.run, step, latest = newer, "LATEST already names a newer step");
        }
        Err(e) => tracing::warn!(run = %ctx.run, step, error = %e, "could not move LATEST"),
    }
    Ok(manifest)
}

/// Whether the manifest at `path` names this writer's attempt folder.
async fn is_own_manifest(ctx: &Ctx, path: &object_store::path::Path, attempt: &str) -> bool {
    match ctx.get_bytes(path).await {
        Ok(Some(bytes)) => serde_json::from_slice::<Manifest>(&bytes)
            .is_ok_and(|existing| existing.attempt == attempt),
        _ => false,
    }
}

/// Stale generations cannot commit: once a newer generation has committed
/// (as recorded in `LATEST`), an older one is refused. The coordinator is the
/// primary fence; this catches a stale writer that commits on its own.
async fn reject_stale_generation(ctx: &Ctx, manifest: &Manifest) -> Result<()> {
    if let Some(current) = latest::read(ctx).await?
        && current.generation > manifest.meta.generation
    {
        return Err(RunStoreError::StaleGeneration {
            run: ctx.run.clone(),
            step: manifest.step,
            generation: manifest.meta.generation,
            newer_generation: current.generation,
            newer_step: current.step,
        });
    }
    Ok(())
}

/// A manifest must never vouch for files that are not there (a retention
/// pass may have removed a stale writer's folder, or a staged list may come
/// from elsewhere).
async fn check_files_present(ctx: &Ctx, manifest: &Manifest) -> Result<()> {
    let objects = scan::scan_step(ctx, manifest.step).await?;
    let sizes = objects
        .files
        .iter()
        .map(|(key, meta)| (key.clone(), meta.size))
        .collect();
    manifest
        .check_sizes(&sizes)
        .map_err(|problem| RunStoreError::InvalidWrite {
            step: manifest.step,
            problem: format!("cannot commit: {problem}"),
        })?;
    Ok(())
}
