//! The checkpoint's upload path: the upload thread, one checkpoint in
//! flight, writes a [`Snapshot`]'s files, and the manifest is written
//! last, so a checkpoint killed mid-write never exists for a resume. Who
//! writes the manifest is the job's [`CheckpointSink`]: the process itself
//! ([`CommitToStore`]), or the coordinator.

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use swiftbrush_proto::run_store::{CheckpointMeta, Manifest, RunStore, StagedCheckpoint};

use super::CheckpointError;
use super::format::Snapshot;

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
    use crate::trainer::checkpoint::{STATE, TensorGroup};
    use bytes::Bytes;

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
