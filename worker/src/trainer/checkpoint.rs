//! What a training checkpoint holds and how it is written and read back.
//!
//! Files (safetensors unless noted): the student, its EMA, the LoRA
//! adapters (PEFT names), both Adam states, and `state.json`. Tensors are
//! copied to host bytes on the training thread (that copy is the snapshot);
//! the upload runs on a background thread, one checkpoint in flight, and the
//! manifest is written last by the run store, so a checkpoint killed
//! mid-write never exists for `--resume`.

use std::collections::HashMap;
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use swiftbrush_proto::run_store::{CheckpointMeta, Manifest, RunStore, RunStoreError};
use tch::Tensor;

use super::tensor_bytes::{self, TensorBytesError};

pub const STUDENT: &str = "student.safetensors";
pub const EMA: &str = "ema.safetensors";
pub const LORA: &str = "lora.safetensors";
pub const OPTIM_STUDENT: &str = "optimizer_student.safetensors";
pub const OPTIM_LORA: &str = "optimizer_lora.safetensors";
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
        tensors: [(&str, Vec<(String, Tensor)>); 5],
    ) -> Result<Self, CheckpointError> {
        let mut files = Vec::with_capacity(6);
        for (name, named) in tensors {
            files.push((
                name.to_owned(),
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
    for name in [STUDENT, EMA, LORA, OPTIM_STUDENT, OPTIM_LORA] {
        let bytes = store.read_manifest_file(manifest, name)?;
        let what = format!("checkpoint step {} {name}", manifest.step);
        tensors.insert(name.to_owned(), tensor_bytes::from_bytes(&bytes, &what)?);
    }
    Ok(Restored { state, tensors })
}

/// Uploads checkpoints on a background thread, one at a time, then applies
/// retention.
pub struct Uploader {
    jobs: Option<mpsc::SyncSender<Snapshot>>,
    results: mpsc::Receiver<Result<Manifest, String>>,
    thread: Option<JoinHandle<()>>,
    in_flight: Option<u64>,
}

impl Uploader {
    pub fn new(store: RunStore, keep_last: usize) -> Self {
        // Capacity 0: `submit` hands over only when the thread is idle.
        let (jobs, rx) = mpsc::sync_channel::<Snapshot>(0);
        let (tx, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("checkpoint-upload".to_owned())
            .spawn(move || {
                for snap in rx {
                    let result = upload(&store, snap, keep_last).map_err(|e| e.to_string());
                    if tx.send(result).is_err() {
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
    pub fn submit(&mut self, snap: Snapshot) -> Result<Option<Manifest>, CheckpointError> {
        let previous = self.wait()?;
        let step = snap.step;
        self.jobs
            .as_ref()
            .ok_or_else(|| CheckpointError::UploaderGone("closed".to_owned()))?
            .send(snap)
            .map_err(|_| CheckpointError::UploaderGone("thread exited".to_owned()))?;
        self.in_flight = Some(step);
        Ok(previous)
    }

    /// Waits for the upload in flight, if any.
    pub fn wait(&mut self) -> Result<Option<Manifest>, CheckpointError> {
        if self.in_flight.take().is_none() {
            return Ok(None);
        }
        match self.results.recv() {
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(e)) => Err(CheckpointError::UploaderGone(e)),
            Err(_) => Err(CheckpointError::UploaderGone("thread exited".to_owned())),
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        let _ = self.wait();
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn upload(store: &RunStore, snap: Snapshot, keep_last: usize) -> Result<Manifest, CheckpointError> {
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
    let manifest = writer.commit(snap.meta)?;
    match store.apply_retention(keep_last) {
        Ok(r) => tracing::debug!(?r, "retention applied"),
        Err(e) => tracing::warn!(error = %e, "checkpoint retention failed; old checkpoints kept"),
    }
    Ok(manifest)
}

/// `SWIFTBRUSH_FAULT_CHECKPOINT=STEP:FILES`: abort after writing FILES
/// files of checkpoint STEP. Only for fault-injection tests.
fn fault_point() -> Option<(u64, usize)> {
    let v = std::env::var("SWIFTBRUSH_FAULT_CHECKPOINT").ok()?;
    let (s, f) = v.split_once(':')?;
    Some((s.parse().ok()?, f.parse().ok()?))
}
