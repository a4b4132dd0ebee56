//! The async run store: opening a run directory, run files, and finding and
//! reading committed checkpoints. Writing lives in writer.rs and commit.rs,
//! deleting in retention.rs.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, PutResult,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::commit;
use super::error::{Result, RunStoreError};
use super::latest::{self, LatestPointer};
use super::layout;
use super::location::{self, RunLocation, StoreOptions};
use super::manifest::CheckpointMeta;
use super::manifest::{Manifest, sha256_hex};
use super::retention::{self, RetentionReport};
use super::scan::{self, CheckpointInfo, CheckpointStatus};
use super::writer::{AsyncCheckpointWriter, StagedCheckpoint};

/// Files larger than this go up in parts of this size (S3 refuses single
/// PUTs over 5 GB; an SD optimizer state is about 7 GB).
pub const DEFAULT_UPLOAD_PART_SIZE: usize = 64 * 1024 * 1024;

/// Which checkpoint a run resumes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest valid checkpoint.
    Latest,
    Step(u64),
}

/// How much of a checkpoint to check before trusting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Manifest parses and every file is present with the listed size
    /// (listing only, no downloads).
    Sizes,
    /// Also download every file and compare its sha256.
    Full,
}

/// Shared by the parts of the store: the object store rooted at the run
/// directory, and how messages name it.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub store: Arc<dyn ObjectStore>,
    pub run: String,
    pub part_size: usize,
}

impl Ctx {
    pub fn err(
        &self,
        op: &'static str,
        location: &Path,
    ) -> impl FnOnce(object_store::Error) -> RunStoreError {
        let run = self.run.clone();
        let location = location.to_string();
        move |source| RunStoreError::Store {
            run,
            op,
            location,
            source: Box::new(source),
        }
    }

    /// `None` when the object does not exist.
    pub async fn get_bytes(&self, path: &Path) -> Result<Option<Bytes>> {
        Ok(self.get_with_meta(path).await?.map(|(bytes, _)| bytes))
    }

    pub async fn get_with_meta(&self, path: &Path) -> Result<Option<(Bytes, ObjectMeta)>> {
        let result = match self.store.get(path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("read", path)(e)),
        };
        let meta = result.meta.clone();
        let bytes = result.bytes().await.map_err(self.err("read", path))?;
        Ok(Some((bytes, meta)))
    }

    pub async fn put_mode(
        &self,
        path: &Path,
        bytes: Bytes,
        mode: PutMode,
    ) -> object_store::Result<PutResult> {
        let options = PutOptions {
            mode,
            ..Default::default()
        };
        self.store
            .put_opts(path, PutPayload::from(bytes), options)
            .await
    }

    pub async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>> {
        self.store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(self.err("list", prefix))
    }
}

/// A run directory. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct AsyncRunStore {
    ctx: Arc<Ctx>,
}

impl AsyncRunStore {
    /// Opens a run directory from what a user typed: a local path, `file://`,
    /// `s3://bucket/prefix`, `gs://bucket/prefix` or `memory://[name]/prefix`.
    /// Cloud settings come from the `AWS_*` / `GOOGLE_*` environment. A local
    /// directory is created and checked writable; nothing else touches storage.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &StoreOptions::from_env())
    }

    /// [`open`](Self::open) with explicit cloud settings instead of the environment.
    pub fn open_with(url: &str, options: &StoreOptions) -> Result<Self> {
        let location = RunLocation::parse(url)?;
        let store = location::open_store(&location, options)?;
        Ok(Self::from_object_store(store, location.display()))
    }

    /// A run directory at the root of `store`; `name` is how messages name it.
    pub fn from_object_store(store: Arc<dyn ObjectStore>, name: impl Into<String>) -> Self {
        Self {
            ctx: Arc::new(Ctx {
                store,
                run: name.into(),
                part_size: DEFAULT_UPLOAD_PART_SIZE,
            }),
        }
    }

    /// Files larger than `bytes` upload in parts of `bytes` (S3 needs at
    /// least 5 MiB per part).
    pub fn with_upload_part_size(self, bytes: usize) -> Self {
        Self {
            ctx: Arc::new(Ctx {
                store: self.ctx.store.clone(),
                run: self.ctx.run.clone(),
                part_size: bytes.max(1),
            }),
        }
    }

    /// How messages name this run directory (the normalised URL or path).
    pub fn name(&self) -> &str {
        &self.ctx.run
    }

    /// The object store rooted at the run directory (for tools and tests).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.ctx.store
    }

    pub(crate) fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    /// Writes a run file (`config.yaml`, `run.json`), replacing any old one.
    pub async fn put_run_file(&self, name: &str, bytes: Bytes) -> Result<()> {
        layout::validate_run_file_name(name)?;
        let path = Path::from(name);
        self.ctx
            .put_mode(&path, bytes, PutMode::Overwrite)
            .await
            .map_err(self.ctx.err("write", &path))?;
        Ok(())
    }

    /// A run file, or `None` if it does not exist.
    pub async fn get_run_file(&self, name: &str) -> Result<Option<Bytes>> {
        layout::validate_run_file_name(name)?;
        self.ctx.get_bytes(&Path::from(name)).await
    }

    pub async fn put_json<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        let json = serde_json::to_vec_pretty(value).map_err(|source| RunStoreError::Json {
            run: self.ctx.run.clone(),
            location: name.to_owned(),
            source,
        })?;
        self.put_run_file(name, Bytes::from(json)).await
    }

    pub async fn get_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let Some(bytes) = self.get_run_file(name).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| RunStoreError::Json {
                run: self.ctx.run.clone(),
                location: name.to_owned(),
                source,
            })
    }

    /// Starts writing checkpoint `step`; nothing exists until it commits.
    pub fn begin_checkpoint(&self, step: u64) -> AsyncCheckpointWriter {
        AsyncCheckpointWriter::new(self.clone(), step)
    }

    /// Commits files that were written elsewhere (rank 0 writes, the
    /// coordinator commits): writes the manifest if no one has, then moves
    /// `LATEST` forward.
    pub async fn commit_staged(
        &self,
        staged: StagedCheckpoint,
        meta: CheckpointMeta,
    ) -> Result<Manifest> {
        commit::commit(&self.ctx, staged, meta).await
    }

    /// Every step found under `checkpoints/`, oldest first, with its status.
    pub async fn list_checkpoints(&self) -> Result<Vec<CheckpointInfo>> {
        scan::list_all(&self.ctx).await
    }

    /// The steps with a valid checkpoint, oldest first.
    pub async fn valid_steps(&self) -> Result<Vec<u64>> {
        Ok(self
            .list_checkpoints()
            .await?
            .into_iter()
            .filter(CheckpointInfo::is_valid)
            .map(|info| info.step)
            .collect())
    }

    /// The newest valid checkpoint; invalid ones are logged and skipped.
    pub async fn latest_valid(&self) -> Result<Option<Manifest>> {
        self.latest_valid_with(Verify::Sizes).await
    }

    pub async fn latest_valid_with(&self, verify: Verify) -> Result<Option<Manifest>> {
        let steps = scan::scan_all(&self.ctx).await?;
        for (step, objects) in steps.iter().rev() {
            if let CheckpointStatus::Valid(manifest) =
                scan::status_of(&self.ctx, *step, objects).await?
            {
                match self.verify_if(verify, &manifest).await {
                    Ok(()) => return Ok(Some(*manifest)),
                    Err(RunStoreError::InvalidCheckpoint { problem, .. }) => {
                        tracing::warn!(run = %self.ctx.run, step, %problem, "skipping corrupt checkpoint");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(None)
    }

    /// The newest committed checkpoint whose every file verifies (present,
    /// its size and its sha256 as the manifest lists them). A committed
    /// checkpoint that does not (a storage fault: a flipped byte, a
    /// truncated or missing file) is set aside, with a loud warning naming
    /// it and the problem, and the search goes on to older ones; a run then
    /// resumes from the newest good one instead of failing on the bad one
    /// forever. Uncommitted folders (a writer at work) are left alone.
    /// Downloads the checkpoints it checks: a job start pays one
    /// checkpoint's read.
    pub async fn latest_verified(&self) -> Result<Option<Manifest>> {
        let steps = scan::scan_all(&self.ctx).await?;
        for (step, objects) in steps.iter().rev() {
            let problem = match scan::status_of(&self.ctx, *step, objects).await? {
                CheckpointStatus::Uncommitted => continue,
                CheckpointStatus::Invalid { problem } => problem,
                CheckpointStatus::Valid(manifest) => {
                    match self.verify_checkpoint(&manifest).await {
                        Ok(()) => return Ok(Some(*manifest)),
                        Err(RunStoreError::InvalidCheckpoint { problem, .. }) => problem,
                        Err(e) => return Err(e),
                    }
                }
            };
            self.set_aside(*step, objects, &problem).await?;
        }
        Ok(None)
    }

    /// Moves every object of checkpoint `step` to
    /// `corrupt/step-S.<unix seconds>/` (never deletes it: the user may
    /// want to look, or to recover what is left). Retention and resume only
    /// see `checkpoints/`, so a set-aside checkpoint counts for nothing,
    /// and the step can be committed afresh.
    async fn set_aside(&self, step: u64, objects: &scan::StepObjects, problem: &str) -> Result<()> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dest = format!("corrupt/{}.{stamp}", layout::step_dir_name(step));
        tracing::warn!(
            run = %self.ctx.run,
            step,
            %problem,
            moved_to = %dest,
            "CHECKPOINT {step} IS CORRUPT ({problem}); set aside in {dest}, resuming from an older checkpoint"
        );
        let from_root = layout::step_dir(step);
        let locations = objects
            .manifest
            .iter()
            .chain(objects.files.values())
            .map(|meta| meta.location.clone());
        for from in locations {
            let rel: Vec<String> = from
                .prefix_match(&from_root)
                .map(|parts| parts.map(|p| p.as_ref().to_owned()).collect())
                .unwrap_or_default();
            let to = Path::from(format!("{dest}/{}", rel.join("/")));
            // Copy, then delete: what a rename is on S3 and GCS, and a local
            // store's delete also removes the folders it empties.
            self.ctx
                .store
                .copy(&from, &to)
                .await
                .map_err(self.ctx.err("copy", &from))?;
            self.ctx
                .store
                .delete(&from)
                .await
                .map_err(self.ctx.err("delete", &from))?;
        }
        Ok(())
    }

    pub async fn resolve(&self, from: ResumeFrom) -> Result<Manifest> {
        self.resolve_with(from, Verify::Sizes).await
    }

    /// The manifest to resume from. A step without a valid checkpoint is an
    /// error that lists the valid steps.
    pub async fn resolve_with(&self, from: ResumeFrom, verify: Verify) -> Result<Manifest> {
        match from {
            ResumeFrom::Latest => {
                self.latest_valid_with(verify)
                    .await?
                    .ok_or_else(|| RunStoreError::NoCheckpoint {
                        run: self.ctx.run.clone(),
                    })
            }
            ResumeFrom::Step(step) => {
                let objects = scan::scan_step(&self.ctx, step).await?;
                let status = scan::status_of(&self.ctx, step, &objects).await?;
                let CheckpointStatus::Valid(manifest) = status else {
                    return Err(RunStoreError::NoSuchCheckpoint {
                        run: self.ctx.run.clone(),
                        step,
                        valid: self.valid_steps().await?,
                    });
                };
                self.verify_if(verify, &manifest).await?;
                Ok(*manifest)
            }
        }
    }

    async fn verify_if(&self, verify: Verify, manifest: &Manifest) -> Result<()> {
        match verify {
            Verify::Sizes => Ok(()),
            Verify::Full => self.verify_checkpoint(manifest).await,
        }
    }

    /// Downloads every file of `manifest` and checks its size and sha256.
    pub async fn verify_checkpoint(&self, manifest: &Manifest) -> Result<()> {
        for file in &manifest.files {
            self.read_manifest_file(manifest, &file.name).await?;
        }
        Ok(())
    }

    /// File `name` of the valid checkpoint `step`, checked against the manifest.
    pub async fn read_file(&self, step: u64, name: &str) -> Result<Bytes> {
        let manifest = self.resolve(ResumeFrom::Step(step)).await?;
        self.read_manifest_file(&manifest, name).await
    }

    /// File `name` of a checkpoint already resolved, checked against its
    /// size and sha256 (saves a listing per file when reading several).
    pub async fn read_manifest_file(&self, manifest: &Manifest, name: &str) -> Result<Bytes> {
        let Some(entry) = manifest.file(name) else {
            return Err(RunStoreError::NoSuchFile {
                run: self.ctx.run.clone(),
                step: manifest.step,
                name: name.to_owned(),
                available: manifest.file_names(),
            });
        };
        let invalid = |problem: String| RunStoreError::InvalidCheckpoint {
            run: self.ctx.run.clone(),
            step: manifest.step,
            problem,
        };
        let path = layout::file_path(manifest.step, &manifest.attempt, name);
        let bytes = self
            .ctx
            .get_bytes(&path)
            .await?
            .ok_or_else(|| invalid(format!("file {name:?} is missing")))?;
        if bytes.len() as u64 != entry.size {
            return Err(invalid(format!(
                "file {name:?} has {} bytes, the manifest says {}",
                bytes.len(),
                entry.size
            )));
        }
        let digest = hash_off_thread(bytes.clone()).await;
        if digest != entry.sha256 {
            return Err(invalid(format!(
                "file {name:?} has sha256 {digest}, the manifest says {}",
                entry.sha256
            )));
        }
        Ok(bytes)
    }

    /// The `LATEST` pointer, if any (a hint: resolution uses manifests).
    pub async fn latest_pointer(&self) -> Result<Option<LatestPointer>> {
        latest::read(&self.ctx).await
    }

    /// Keeps the newest `keep_last` valid checkpoints and removes what can
    /// no longer be resumed from; see retention.rs for the rules.
    pub async fn apply_retention(&self, keep_last: usize) -> Result<RetentionReport> {
        retention::apply(&self.ctx, keep_last).await
    }
}

/// sha256 of a possibly multi-GB buffer without stalling the runtime's
/// worker threads.
pub(crate) async fn hash_off_thread(bytes: Bytes) -> String {
    let for_task = bytes.clone();
    match tokio::task::spawn_blocking(move || sha256_hex(&for_task)).await {
        Ok(digest) => digest,
        // Hashing cannot panic short of a bug; re-raise it where it is seen.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled because the runtime is shutting down: finish here.
        Err(_) => sha256_hex(&bytes),
    }
}
