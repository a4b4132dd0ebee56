//! The `checkpoints/LATEST` pointer: names the newest committed step for
//! people and tools, and only ever moves forward.

use bytes::Bytes;
use object_store::{PutMode, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::error::Result;
use super::layout;
use super::store::Ctx;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatestPointer {
    pub step: u64,
    pub generation: u64,
    /// The manifest's path relative to the run directory.
    pub manifest: String,
}

impl LatestPointer {
    pub(crate) fn new(step: u64, generation: u64) -> Self {
        Self {
            step,
            generation,
            manifest: layout::manifest_path(step).to_string(),
        }
    }
}

/// What [`advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Advance {
    Moved,
    /// The pointer already named this step or a newer one.
    AlreadyAt(u64),
}

/// Contention on one small object settles within a few rounds; the bound
/// only guards against a store that keeps failing preconditions.
const MAX_ROUNDS: usize = 32;

pub(crate) async fn read(ctx: &Ctx) -> Result<Option<LatestPointer>> {
    Ok(read_versioned(ctx).await?.and_then(|(pointer, _)| pointer))
}

/// The pointer (None if unparseable) and the version to update it against.
async fn read_versioned(ctx: &Ctx) -> Result<Option<(Option<LatestPointer>, UpdateVersion)>> {
    let path = layout::latest_path();
    let Some((bytes, meta)) = ctx.get_with_meta(&path).await? else {
        return Ok(None);
    };
    let pointer = match serde_json::from_slice(&bytes) {
        Ok(pointer) => Some(pointer),
        Err(e) => {
            tracing::warn!(run = %ctx.run, error = %e, "LATEST is unreadable; it will be replaced");
            None
        }
    };
    let version = UpdateVersion {
        e_tag: meta.e_tag,
        version: meta.version,
    };
    Ok(Some((pointer, version)))
}

/// Moves the pointer to `new` unless it already names `new.step` or later:
/// read, compare, then a conditional write that fails if anyone wrote in
/// between (retry). Stores without conditional update (local disk) get a
/// plain overwrite after the compare: a narrow race that can move the hint
/// backwards, never the checkpoints themselves.
pub(crate) async fn advance(ctx: &Ctx, new: &LatestPointer) -> Result<Advance> {
    let path = layout::latest_path();
    // Two integers and a path: serialising cannot fail.
    let body = Bytes::from(serde_json::to_vec_pretty(new).expect("LatestPointer serialises"));
    for _ in 0..MAX_ROUNDS {
        let mode = match read_versioned(ctx).await? {
            None => PutMode::Create,
            Some((Some(current), _)) if current.step >= new.step => {
                return Ok(Advance::AlreadyAt(current.step));
            }
            Some((_, version)) => PutMode::Update(version),
        };
        match ctx.put_mode(&path, body.clone(), mode.clone()).await {
            Ok(_) => return Ok(Advance::Moved),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                continue;
            }
            Err(
                object_store::Error::NotImplemented { .. }
                | object_store::Error::NotSupported { .. },
            ) if matches!(mode, PutMode::Update(_)) => {
                ctx.put_mode(&path, body, PutMode::Overwrite)
                    .await
                    .map_err(ctx.err("write", &path))?;
                return Ok(Advance::Moved);
            }
            Err(e) => return Err(ctx.err("write", &path)(e)),
        }
    }
    Err(ctx.err("write", &path)(object_store::Error::Generic {
        store: "run_store",
        source: format!("gave up after {MAX_ROUNDS} conflicting updates").into(),
    }))
}
