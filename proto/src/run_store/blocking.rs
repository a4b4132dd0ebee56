//! The synchronous face of the run store for the trainer loop: the same
//! operations as [`AsyncRunStore`], each run to completion on a small I/O
//! runtime that the store owns.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStore;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{Result, RunStoreError};
use super::latest::LatestPointer;
use super::lease::{LeaseHolder, LeaseOptions, RunLease};
use super::location::StoreOptions;
use super::manifest::{CheckpointMeta, FileEntry, Manifest};
use super::retention::RetentionReport;
use super::scan::CheckpointInfo;
use super::store::{AsyncRunStore, ResumeFrom, Verify};
use super::writer::{AsyncCheckpointWriter, StagedCheckpoint};

/// Owns the tokio runtime the blocking calls run on.
#[derive(Debug)]
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    fn new() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            // Uploads are I/O bound; hashing goes to the blocking pool.
            .worker_threads(2)
            .thread_name("run-store-io")
            .enable_all()
            .build()
            .map_err(RunStoreError::Runtime)?;
        Ok(Self(Some(runtime)))
    }

    fn block_on<F: Future>(&self, future: F) -> Result<F::Output> {
        // tokio panics when a runtime blocks inside another; say what to do instead.
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(RunStoreError::BlockingInAsync);
        }
        match &self.0 {
            Some(runtime) => Ok(runtime.block_on(future)),
            None => unreachable!("the runtime is only taken in Drop"),
        }
    }
}

impl Drop for IoRuntime {
    // A plain drop panics when the last clone is dropped inside an async
    // context; shutting down in the background never does.
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A run directory for synchronous callers. Cheap to clone; clones share
/// the connection and the runtime. Calling it from inside a tokio runtime is
/// an error ([`RunStoreError::BlockingInAsync`]); use [`AsyncRunStore`] there.
#[derive(Debug, Clone)]
pub struct RunStore {
    inner: AsyncRunStore,
    runtime: Arc<IoRuntime>,
}

impl RunStore {
    /// See [`AsyncRunStore::open`].
    pub fn open(url: &str) -> Result<Self> {
        Self::from_async(AsyncRunStore::open(url)?)
    }

    pub fn open_with(url: &str, options: &StoreOptions) -> Result<Self> {
        Self::from_async(AsyncRunStore::open_with(url, options)?)
    }

    pub fn from_async(inner: AsyncRunStore) -> Result<Self> {
        Ok(Self {
            inner,
            runtime: Arc::new(IoRuntime::new()?),
        })
    }

    /// See [`AsyncRunStore::with_upload_part_size`].
    pub fn with_upload_part_size(self, bytes: usize) -> Self {
        Self {
            inner: self.inner.with_upload_part_size(bytes),
            runtime: self.runtime,
        }
    }

    pub fn name(&self) -> &str {
        self.inner.name()
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        self.inner.object_store()
    }

    /// Runs `future` on this store's runtime (for callers mixing in other
    /// async work against [`RunStore::object_store`]).
    pub fn block_on<F: Future>(&self, future: F) -> Result<F::Output> {
        self.runtime.block_on(future)
    }

    pub fn put_run_file(&self, name: &str, bytes: Bytes) -> Result<()> {
        self.block_on(self.inner.put_run_file(name, bytes))?
    }

    pub fn get_run_file(&self, name: &str) -> Result<Option<Bytes>> {
        self.block_on(self.inner.get_run_file(name))?
    }

    pub fn put_json<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        self.block_on(self.inner.put_json(name, value))?
    }

    pub fn get_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.block_on(self.inner.get_json(name))?
    }

    pub fn begin_checkpoint(&self, step: u64) -> CheckpointWriter {
        CheckpointWriter {
            inner: self.inner.begin_checkpoint(step),
            runtime: self.runtime.clone(),
        }
    }

    pub fn commit_staged(
        &self,
        staged: StagedCheckpoint,
        meta: CheckpointMeta,
    ) -> Result<Manifest> {
        self.block_on(self.inner.commit_staged(staged, meta))?
    }

    pub fn list_checkpoints(&self) -> Result<Vec<CheckpointInfo>> {
        self.block_on(self.inner.list_checkpoints())?
    }

    pub fn valid_steps(&self) -> Result<Vec<u64>> {
        self.block_on(self.inner.valid_steps())?
    }

    pub fn latest_valid(&self) -> Result<Option<Manifest>> {
        self.block_on(self.inner.latest_valid())?
    }

    pub fn latest_verified(&self) -> Result<Option<Manifest>> {
        self.block_on(self.inner.latest_verified())?
    }

    pub fn latest_valid_with(&self, verify: Verify) -> Result<Option<Manifest>> {
        self.block_on(self.inner.latest_valid_with(verify))?
    }

    pub fn resolve(&self, from: ResumeFrom) -> Result<Manifest> {
        self.block_on(self.inner.resolve(from))?
    }

    pub fn resolve_with(&self, from: ResumeFrom, verify: Verify) -> Result<Manifest> {
        self.block_on(self.inner.resolve_with(from, verify))?
    }

    pub fn verify_checkpoint(&self, manifest: &Manifest) -> Result<()> {
        self.block_on(self.inner.verify_checkpoint(manifest))?
    }

    pub fn read_file(&self, step: u64, name: &str) -> Result<Bytes> {
        self.block_on(self.inner.read_file(step, name))?
    }

    pub fn read_manifest_file(&self, manifest: &Manifest, name: &str) -> Result<Bytes> {
        self.block_on(self.inner.read_manifest_file(manifest, name))?
    }

    pub fn latest_pointer(&self) -> Result<Option<LatestPointer>> {
        self.block_on(self.inner.latest_pointer())?
    }

    pub fn apply_retention(&self, keep_last: usize) -> Result<RetentionReport> {
        self.block_on(self.inner.apply_retention(keep_last))?
    }

    /// See [`AsyncRunStore::acquire_lease`].
    pub fn acquire_lease(&self, options: &LeaseOptions) -> Result<RunLease> {
        self.block_on(self.inner.acquire_lease(options))?
    }

    /// See [`RunLease::renew`].
    pub fn renew_lease(&self, lease: &mut RunLease) -> Result<()> {
        self.block_on(lease.renew())?
    }

    /// See [`RunLease::release`].
    pub fn release_lease(&self, lease: RunLease) -> Result<()> {
        self.block_on(lease.release())?
    }

    /// See [`AsyncRunStore::lease_holder`].
    pub fn lease_holder(&self) -> Result<Option<LeaseHolder>> {
        self.block_on(self.inner.lease_holder())?
    }
}

/// Writes one checkpoint from synchronous code; see [`AsyncCheckpointWriter`].
#[derive(Debug)]
pub struct CheckpointWriter {
    inner: AsyncCheckpointWriter,
    runtime: Arc<IoRuntime>,
}

impl CheckpointWriter {
    pub fn step(&self) -> u64 {
        self.inner.step()
    }

    pub fn staged(&self) -> &StagedCheckpoint {
        self.inner.staged()
    }

    pub fn put_file(&mut self, name: &str, bytes: impl Into<Bytes>) -> Result<FileEntry> {
        self.runtime
            .block_on(self.inner.put_file(name, bytes.into()))?
    }

    pub fn into_staged(self) -> StagedCheckpoint {
        self.inner.into_staged()
    }

    pub fn commit(self, meta: CheckpointMeta) -> Result<Manifest> {
        self.runtime.block_on(self.inner.commit(meta))?
    }
}
