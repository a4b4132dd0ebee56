//! Listing `checkpoints/` into per-step inventories and deciding each step's
//! status (uncommitted, valid, invalid) from its manifest and its objects.

use std::collections::{BTreeMap, HashMap};

use object_store::ObjectMeta;

use super::error::Result;
use super::layout;
use super::manifest::Manifest;
use super::store::Ctx;

/// One checkpoint step as found in storage.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    pub step: u64,
    pub status: CheckpointStatus,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckpointStatus {
    /// Files without a manifest: a writer still at work, or one that died.
    Uncommitted,
    /// Committed, and every listed file is present with the listed size.
    Valid(Box<Manifest>),
    /// A manifest exists but is unreadable or does not match the files.
    Invalid { problem: String },
}

impl CheckpointInfo {
    pub fn is_valid(&self) -> bool {
        matches!(self.status, CheckpointStatus::Valid(_))
    }

    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.status {
            CheckpointStatus::Valid(m) => Some(m),
            _ => None,
        }
    }
}

/// Everything stored under one `checkpoints/step-S/` folder.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepObjects {
    pub manifest: Option<ObjectMeta>,
    /// Every other object, keyed by its path under the step folder.
    pub files: BTreeMap<String, ObjectMeta>,
}

impl StepObjects {
    fn sizes(&self) -> HashMap<String, u64> {
        self.files
            .iter()
            .map(|(k, meta)| (k.clone(), meta.size))
            .collect()
    }
}

/// All steps under `checkpoints/`, in one recursive listing.
pub(crate) async fn scan_all(ctx: &Ctx) -> Result<BTreeMap<u64, StepObjects>> {
    let objects = ctx.list(&layout::checkpoints_dir()).await?;
    Ok(group_by_step(ctx, objects))
}

/// The objects of one step (listing only that folder).
pub(crate) async fn scan_step(ctx: &Ctx, step: u64) -> Result<StepObjects> {
    let objects = ctx.list(&layout::step_dir(step)).await?;
    Ok(group_by_step(ctx, objects)
        .remove(&step)
        .unwrap_or_default())
}

fn group_by_step(ctx: &Ctx, objects: Vec<ObjectMeta>) -> BTreeMap<u64, StepObjects> {
    let root = layout::checkpoints_dir();
    let mut steps: BTreeMap<u64, StepObjects> = BTreeMap::new();
    for meta in objects {
        let Some(parts) = meta.location.prefix_match(&root) else {
            continue;
        };
        let parts: Vec<String> = parts.map(|p| p.as_ref().to_owned()).collect();
        let Some((folder, rest)) = parts.split_first() else {
            continue;
        };
        if rest.is_empty() && folder == layout::LATEST_FILE {
            continue;
        }
        let Some(step) = layout::parse_step_dir(folder) else {
            tracing::debug!(run = %ctx.run, location = %meta.location, "ignoring unknown object under checkpoints/");
            continue;
        };
        let entry = steps.entry(step).or_default();
        if rest.len() == 1 && rest[0] == layout::MANIFEST_FILE {
            entry.manifest = Some(meta);
        } else if !rest.is_empty() {
            entry.files.insert(rest.join("/"), meta);
        }
    }
    steps
}

/// Reads and checks the manifest of `step`. Storage errors propagate; a bad
/// manifest or missing data makes the checkpoint invalid (logged, never a panic).
pub(crate) async fn status_of(
    ctx: &Ctx,
    step: u64,
    objects: &StepObjects,
) -> Result<CheckpointStatus> {
    if objects.manifest.is_none() {
        return Ok(CheckpointStatus::Uncommitted);
    }
    let status = match ctx.get_bytes(&layout::manifest_path(step)).await? {
        // Deleted between the listing and the read: retention got there first.
        None => CheckpointStatus::Invalid {
            problem: "the manifest disappeared while being read".to_owned(),
        },
        Some(bytes) => match parse_and_check(step, &bytes, objects) {
            Ok(manifest) => CheckpointStatus::Valid(Box::new(manifest)),
            Err(problem) => CheckpointStatus::Invalid { problem },
        },
    };
    if let CheckpointStatus::Invalid { problem } = &status {
        tracing::warn!(run = %ctx.run, step, %problem, "skipping invalid checkpoint");
    }
    Ok(status)
}

fn parse_and_check(step: u64, bytes: &[u8], objects: &StepObjects) -> Result<Manifest, String> {
    let manifest: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| format!("{} is not a valid manifest: {e}", layout::MANIFEST_FILE))?;
    manifest.check_self(step)?;
    manifest.check_sizes(&objects.sizes())?;
    Ok(manifest)
}

/// Status of every step, oldest first.
pub(crate) async fn list_all(ctx: &Ctx) -> Result<Vec<CheckpointInfo>> {
    let mut infos = Vec::new();
    for (step, objects) in scan_all(ctx).await? {
        let status = status_of(ctx, step, &objects).await?;
        infos.push(CheckpointInfo { step, status });
    }
    Ok(infos)
}
