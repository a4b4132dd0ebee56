//! What a training checkpoint holds and how it is written and read back.
//!
//! Files (safetensors unless noted): one per [`TensorGroup`] (the student,
//! its EMA, the fake score: LoRA adapters by PEFT name or the full copy by
//! diffusers name, both Adam states), and `state.json`. Tensors are
//! copied to host bytes on the training thread (that copy is the snapshot);
//! the upload runs on a background thread, one checkpoint in flight, and the
//! manifest is written last, so a checkpoint killed mid-write never exists
//! for a resume. Who writes the manifest is the job's [`CheckpointSink`]:
//! the process itself, or the coordinator.

use std::collections::HashMap;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use swiftbrush_proto::run_store::{
    CheckpointMeta, Manifest, RunStore, RunStoreError, StagedCheckpoint,
};
use tch::Tensor;

use super::tensor_bytes::{self, TensorBytesError};

/// The tensor files of a checkpoint, in the order they are written and
/// read: one list for saving and restoring (`persist.rs` says what each
/// holds). The file names are the format's: the fake score's files keep
/// their first names (`lora`) for both forms, so old checkpoints load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorGroup {
    Student,
    Ema,
    FakeScore,
    StudentOptimizer,
    FakeScoreOptimizer,
}

impl TensorGroup {
    pub const ALL: [TensorGroup; 5] = [
        TensorGroup::Student,
        TensorGroup::Ema,
        TensorGroup::FakeScore,
        TensorGroup::StudentOptimizer,
        TensorGroup::FakeScoreOptimizer,
    ];

    pub fn file(self) -> &'static str {
        match self {
            TensorGroup::Student => "student.safetensors",
            TensorGroup::Ema => "ema.safetensors",
            TensorGroup::FakeScore => "lora.safetensors",
            TensorGroup::StudentOptimizer => "optimizer_student.safetensors",
            TensorGroup::FakeScoreOptimizer => "optimizer_lora.safetensors",
        }
    }
}

pub const STATE: &str = "state.json";

/// The loop's own state, saved as `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed: training resumes at this step index.
    pub step: u64,
    /// The epoch and in-epoch caption index the next step starts at.
    pub epoch: u64,
    pub caption_index: u64,
    /// Steps whose updates were skipped because a loss or gradient was not
    /// finite.
    pub num_nonfinite_steps: u64,
    /// Captions cut at 77 tokens so far.
    pub num_truncated_captions: u64,
    /// EMA updates applied (skipped steps do not update it).
    pub ema_updates: i64,
    pub seed: u64,
    pub config_fingerprint: String,
    pub teacher_fingerprint: String,
    /// The teacher folder as given, so `sample --student RUN` finds the
    /// text encoder, tokenizer and VAE.
    pub teacher: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] RunStoreError),
    #[error(transparent)]
    Tensors(#[from] TensorBytesError),
    #[error("checkpoint step {step}: {file} is not valid: {reason}")]
    BadFile {
        step: u64,
        file: String,
        reason: String,
    },
    #[error("the checkpoint uploader stopped: {0}")]
    UploaderGone(String),
    #[error("reporting checkpoint step {step} to the coordinator: {reason}")]
    Report { step: u64, reason: String },
}

/// One checkpoint, serialized, ready to upload.
pub struct Snapshot {
    pub step: u64,
    pub files: Vec<(String, Bytes)>,
    pub meta: CheckpointMeta,
}

impl Snapshot {
    pub fn new(
        state: &TrainState,
        tensors: [(TensorGroup, Vec<(String, Tensor)>); 5],
    ) -> Result<Self, CheckpointError> {
        let mut files = Vec::with_capacity(6);
        for (group, named) in tensors {
            files.push((
                group.file().to_owned(),
                Bytes::from(tensor_bytes::to_bytes(&named)?),
            ));
        }
        let json = serde_json::to_vec_pretty(state).map_err(|e| CheckpointError::BadFile {
            step: state.step,
            file: STATE.to_owned(),
            reason: e.to_string(),
        })?;
        files.push((STATE.to_owned(), Bytes::from(json)));
        Ok(Self {
            step: state.step,
            files,
            meta: CheckpointMeta {
                epoch: state.epoch,
                generation: 0,
                config_fingerprint: state.config_fingerprint.clone(),
                teacher_fingerprint: state.teacher_fingerprint.clone(),
                extra: serde_json::Value::Null,
            },
        })
    }
}

/// A checkpoint read back.
pub struct Restored {
    pub state: TrainState,
    pub tensors: HashMap<String, HashMap<String, Tensor>>,
}

/// Reads every file of a committed checkpoint (sizes and sha256 checked by
/// the store).
pub fn read_checkpoint(store: &RunStore, manifest: &Manifest) -> Result<Restored, CheckpointError> {
    let bad = |file: &str, reason: String| CheckpointError::BadFile {
        step: manifest.step,
        file: file.to_owned(),
        reason,
    };
    let state_bytes = store.read_manifest_file(manifest, STATE)?;
    let state: TrainState =
        serde_json::from_slice(&state_bytes).map_err(|e| bad(STATE, e.to_string()))?;
    let mut tensors = HashMap::new();
    for name in TensorGroup::ALL.map(TensorGroup::file) {
        let bytes = store.read_manifest_file(manifest, name)?;
        let what = format!("checkpoint step {} {name}", manifest.step);
        tensors.insert(name.to_owned(), tensor_bytes::from_bytes(&bytes, &what)?);
    }
    Ok(Restored { state, tensors })
}

/// How a checkpoint whose files are written becomes a checkpoint: the
/// last step of an upload, on the upload thread. A single process commits
/// it itself ([`CommitToStore`]); a distributed rank 0 hands it to the
/// coordinator, which commits (`distributed::report`).
pub trait CheckpointSink: Send + Sync {
    fn finish(
        &self,
        writer: CheckpointWriter,
        meta: CheckpointMeta,
        upload_seconds: f64,
    ) -> Result<Landing, CheckpointError>;
}

/// Where a finished upload landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landing {
    /// The checkpoint at this step exists (committed now, or already).
    Committed { step: u64 },
    /// Not committed, and that is not an error of this run: the world that
    /// wrote it is gone (a stale generation cannot commit).
    Refused { step: u64, reason: String },
}

/// Commits in the run store directly, then applies retention.
#[derive(Debug, Clone, Copy)]
pub struct CommitToStore {
    pub keep_last: usize,
    pub generation: u64,
}

impl CheckpointSink for CommitToStore {
    fn finish(
        &self,
        writer: CheckpointWriter,
        mut meta: CheckpointMeta,
        _upload_seconds: f64,
    ) -> Result<Landing, CheckpointError> {
        let step = writer.step();
        let store = writer.store().clone();
        meta.generation = self.generation;
        writer.commit(meta)?;
        match store.apply_retention(self.keep_last) {
            Ok(r) => tracing::debug!(?r, "retention applied"),
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint retention failed; old checkpoints kept")
            }
        }
        Ok(Landing::Committed { step })
    }
}

/// A checkpoint writer with its store (retention needs the store).
pub struct CheckpointWriter {
    inner: swiftbrush_proto::run_store::CheckpointWriter,
    store: RunStore,
}

impl CheckpointWriter {
    pub fn step(&self) -> u64 {
        self.inner.step()
    }
    pub fn store(&self) -> &RunStore {
        &self.store
    }
    /// Commits the files (manifest by conditional create, then LATEST).
    pub fn commit(self, meta: CheckpointMeta) -> Result<Manifest, CheckpointError> {
        Ok(self.inner.commit(meta)?)
    }
    /// Stops here: the files are written, someone else commits them.
    pub fn into_staged(self) -> StagedCheckpoint {
        self.inner.into_staged()
    }
}

type Job = (Snapshot, Arc<dyn CheckpointSink>);

/// Uploads checkpoints on a background thread, one at a time: writes the
/// files, then lets the job's sink make them a checkpoint.
pub struct Uploader {
    jobs: Option<mpsc::SyncSender<Job>>,
    results: mpsc::Receiver<Result<Landing, CheckpointError>>,
    thread: Option<JoinHandle<()>>,
    in_flight: Option<u64>,
}

impl Uploader {
    pub fn new(store: RunStore) -> Self {
        // Capacity 0: `submit` hands over only when the thread is idle.
        let (jobs, rx) = mpsc::sync_channel::<Job>(0);
        let (tx, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("checkpoint-upload".to_owned())
            .spawn(move || {
                for (snap, sink) in rx {
                    if tx.send(upload(&store, snap, sink.as_ref())).is_err() {
                        break;
                    }
                }
            })
            .ok();
        Self {
            jobs: Some(jobs),
            results,
            thread,
            in_flight: None,
        }
    }

    /// Starts uploading `snap` after the previous upload finished; returns
    /// the previous one's outcome, if there was one.
    pub fn submit(
        &mut self,
        snap: Snapshot,
        sink: Arc<dyn CheckpointSink>,
    ) -> Result<Option<Landing>, CheckpointError> {
        let previous = self.wait()?;
        let step = snap.step;
        self.jobs
            .as_ref()
            .ok_or_else(|| CheckpointError::UploaderGone("closed".to_owned()))?
            .send((snap, sink))
            .map_err(|_| CheckpointError::UploaderGone("thread exited".to_owned()))?;
        self.in_flight = Some(step);
        Ok(previous)
    }

    /// The outcome of the upload in flight if it has ended, without
    /// blocking.
    pub fn poll(&mut self) -> Result<Option<Landing>, CheckpointError> {
        if self.in_flight.is_none() {
            return Ok(None);
        }
        match self.results.try_recv() {
            Ok(result) => {
                self.in_flight = None;
                result.map(Some)
            }
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => {
                self.in_flight = None;
                Err(CheckpointError::UploaderGone("thread exited".to_owned()))
            }
        }
    }

    /// Waits for the upload in flight, if any.
    pub fn wait(&mut self) -> Result<Option<Landing>, CheckpointError> {
        if self.in_flight.take().is_none() {
            return Ok(None);
        }
        match self.results.recv() {
            Ok(result) => result.map(Some),
            Err(_) => Err(CheckpointError::UploaderGone("thread exited".to_owned())),
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // A process that exits right after its last checkpoint must not
        // lose it.
        if let Err(e) = self.wait() {
            tracing::error!(error = %e, "the last checkpoint upload failed");
        }
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn upload(
    store: &RunStore,
    snap: Snapshot,
    sink: &dyn CheckpointSink,
) -> Result<Landing, CheckpointError> {
    let started = std::time::Instant::now();
    let fault = fault_point();
    let mut writer = store.begin_checkpoint(snap.step);
    for (i, (name, bytes)) in snap.files.into_iter().enumerate() {
        if fault == Some((snap.step, i)) {
            // Fault injection for tests: die as a killed process would,
            // with some files written and no manifest.
            tracing::error!(step = snap.step, "fault injection: aborting mid-checkpoint");
            std::process::abort();
        }
        writer.put_file(&name, bytes)?;
    }
    let writer = CheckpointWriter {
        inner: writer,
        store: store.clone(),
    };
    sink.finish(writer, snap.meta, started.elapsed().as_secs_f64())
}

/// `SWIFTBRUSH_FAULT_CHECKPOINT=STEP:FILES`: abort after writing FILES
/// files of checkpoint STEP. Only in builds with the `fault-injection`
/// feature (the tests' build), so no user's binary can be crashed by an
/// environment variable.
#[cfg(feature = "fault-injection")]
fn fault_point() -> Option<(u64, usize)> {
    let v = std::env::var("SWIFTBRUSH_FAULT_CHECKPOINT").ok()?;
    let (s, f) = v.split_once(':')?;
    Some((s.parse().ok()?, f.parse().ok()?))
}

#[cfg(not(feature = "fault-injection"))]
fn fault_point() -> Option<(u64, usize)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(step: u64, extra: Option<&str>) -> Snapshot {
        let mut files = vec![
            (
                STATE.to_owned(),
                Bytes::from(format!("{{\"step\": {step}}}")),
            ),
            (
                TensorGroup::Student.file().to_owned(),
                Bytes::from(vec![step as u8; 64]),
            ),
        ];
        if let Some(name) = extra {
            files.push((name.to_owned(), Bytes::new()));
        }
        Snapshot {
            step,
            files,
            meta: CheckpointMeta {
                epoch: 0,
                generation: 0,
                config_fingerprint: "c".to_owned(),
                teacher_fingerprint: "t".to_owned(),
                extra: serde_json::Value::Null,
            },
        }
    }

    #[test]
    fn uploads_run_in_the_background_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = RunStore::open(&dir.path().display().to_string()).unwrap();
        let sink: Arc<dyn CheckpointSink> = Arc::new(CommitToStore {
            keep_last: 2,
            generation: 0,
        });
        let mut up = Uploader::new(store.clone());
        assert_eq!(up.submit(snapshot(10, None), sink.clone()).unwrap(), None);
        assert_eq!(up.in_flight, Some(10));
        // Submitting waits for the previous upload and returns its outcome.
        let first = up.submit(snapshot(20, None), sink.clone()).unwrap();
        assert_eq!(first, Some(Landing::Committed { step: 10 }));
        assert_eq!(up.wait().unwrap(), Some(Landing::Committed { step: 20 }));
        assert_eq!(up.wait().unwrap(), None, "nothing left in flight");
        assert_eq!(up.poll().unwrap(), None);

        // The same step again loses the commit race and says so.
        up.submit(snapshot(20, None), sink.clone()).unwrap();
        let e = up.wait().unwrap_err().to_string();
        assert!(e.contains("20"), "{e}");

        // A bad file name fails in the background and is reported, not lost.
        up.submit(snapshot(30, Some("../escape")), sink.clone())
            .unwrap();
        assert!(up.wait().is_err());
        assert_eq!(store.valid_steps().unwrap(), vec![10, 20]);

        // Dropping the uploader waits for the upload in flight.
        up.submit(snapshot(40, None), sink).unwrap();
        drop(up);
        assert_eq!(
            store.valid_steps().unwrap(),
            vec![20, 40],
            "retention kept 2"
        );
    }
}
