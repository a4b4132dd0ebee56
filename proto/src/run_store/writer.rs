//! Writing one checkpoint's files into a private attempt folder. Nothing a
//! writer does is visible as a checkpoint until [`commit`](AsyncCheckpointWriter::commit);
//! a writer dropped (or a process killed) before that leaves only files that
//! readers ignore and retention removes.

use bytes::Bytes;
use object_store::path::Path;
use object_store::{PutMode, PutMultipartOptions, WriteMultipart};
use serde::{Deserialize, Serialize};

use super::commit;
use super::error::{Result, RunStoreError};
use super::layout;
use super::manifest::{CheckpointMeta, FileEntry, Manifest};
use super::store::{AsyncRunStore, Ctx, hash_off_thread};

/// Parts in flight per multipart file: enough to fill a link, few enough
/// not to exhaust connections.
const MAX_PARTS_IN_FLIGHT: usize = 4;

/// A checkpoint whose files are written but not yet committed: what rank 0
/// reports to the coordinator, which commits it with
/// [`AsyncRunStore::commit_staged`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedCheckpoint {
    pub step: u64,
    pub attempt: String,
    pub files: Vec<FileEntry>,
}

#[derive(Debug)]
pub struct AsyncCheckpointWriter {
    store: AsyncRunStore,
    staged: StagedCheckpoint,
}

impl AsyncCheckpointWriter {
    pub(crate) fn new(store: AsyncRunStore, step: u64) -> Self {
        Self {
            store,
            staged: StagedCheckpoint {
                step,
                attempt: layout::new_attempt_id(),
                files: Vec::new(),
            },
        }
    }

    pub fn step(&self) -> u64 {
        self.staged.step
    }

    /// The files written so far.
    pub fn staged(&self) -> &StagedCheckpoint {
        &self.staged
    }

    /// Uploads one file (hashing it alongside) and records its size and sha256.
    pub async fn put_file(&mut self, name: &str, bytes: Bytes) -> Result<FileEntry> {
        layout::validate_name(name)?;
        if self.staged.files.iter().any(|f| f.name == name) {
            return Err(RunStoreError::InvalidWrite {
                step: self.staged.step,
                problem: format!("file {name:?} was already written to this checkpoint"),
            });
        }
        let ctx = self.store.ctx();
        let path = layout::file_path(self.staged.step, &self.staged.attempt, name);
        let size = bytes.len() as u64;
        let (digest, uploaded) =
            tokio::join!(hash_off_thread(bytes.clone()), upload(ctx, &path, bytes));
        uploaded?;
        let entry = FileEntry {
            name: name.to_owned(),
            size,
            sha256: digest,
        };
        self.staged.files.push(entry.clone());
        Ok(entry)
    }

    /// Stops here and hands the written files over for someone else to commit.
    pub fn into_staged(self) -> StagedCheckpoint {
        self.staged
    }

    /// Writes the manifest (conditional create: if another writer committed
    /// this step first, [`RunStoreError::AlreadyCommitted`]), then moves `LATEST`.
    pub async fn commit(self, meta: CheckpointMeta) -> Result<Manifest> {
        commit::commit(self.store.ctx(), self.staged, meta).await
    }
}

async fn upload(ctx: &Ctx, path: &Path, bytes: Bytes) -> Result<()> {
    if bytes.len() <= ctx.part_size {
        ctx.put_mode(path, bytes, PutMode::Overwrite)
            .await
            .map_err(ctx.err("write", path))?;
        return Ok(());
    }
    let upload = ctx
        .store
        .put_multipart_opts(path, PutMultipartOptions::default())
        .await
        .map_err(ctx.err("start multipart upload of", path))?;
    let mut parts = WriteMultipart::new_with_chunk_size(upload, ctx.part_size);
    let mut offset = 0;
    while offset < bytes.len() {
        let end = (offset + ctx.part_size).min(bytes.len());
        if let Err(e) = parts.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await {
            // Best effort: an abandoned upload only costs storage until the
            // bucket's lifecycle rule removes it.
            let _ = parts.abort().await;
            return Err(ctx.err("upload part of", path)(e));
        }
        // Slices of `bytes` share its buffer: no copy.
        parts.put(bytes.slice(offset..end));
        offset = end;
    }
    parts
        .finish()
        .await
        .map_err(ctx.err("finish multipart upload of", path))?;
    Ok(())
}
