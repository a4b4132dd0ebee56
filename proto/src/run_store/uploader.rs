//! Checkpoint uploads off the training thread: the trainer hands over owned
//! buffers and goes on; one upload thread writes, commits and applies
//! retention. At most one checkpoint is in flight: submitting the next one
//! waits for the previous, which bounds memory to two checkpoints' buffers.

use std::thread::JoinHandle;

use bytes::Bytes;

use super::blocking::RunStore;
use super::error::{Result, RunStoreError};
use super::layout;
use super::manifest::{CheckpointMeta, Manifest};
use super::retention::RetentionReport;

/// One checkpoint to upload.
#[derive(Debug, Clone)]
pub struct CheckpointJob {
    pub step: u64,
    /// (name, contents), written in this order.
    pub files: Vec<(String, Bytes)>,
    pub meta: CheckpointMeta,
    /// After a successful commit, keep this many newest checkpoints.
    pub keep_last: Option<usize>,
}

/// How an upload ended.
#[derive(Debug)]
pub struct UploadOutcome {
    pub step: u64,
    /// The commit: its manifest, or why there is no checkpoint.
    pub result: Result<Manifest>,
    /// Retention after the commit, if asked for and the commit succeeded.
    /// Kept apart so that a failed clean-up never reads as a lost checkpoint.
    pub retention: Option<Result<RetentionReport>>,
}

#[derive(Debug)]
enum Pending {
    Running {
        step: u64,
        thread: JoinHandle<UploadOutcome>,
    },
    /// Ended before a thread ran (the thread could not be started).
    Ended(Box<UploadOutcome>),
}

/// Runs checkpoint uploads on a background thread, one at a time.
///
/// Dropping the uploader waits for the upload in flight (a process that
/// exits right after its last checkpoint must not lose it) and logs how it
/// ended.
#[derive(Debug)]
pub struct CheckpointUploader {
    store: RunStore,
    pending: Option<Pending>,
}

impl CheckpointUploader {
    pub fn new(store: RunStore) -> Self {
        Self {
            store,
            pending: None,
        }
    }

    /// Starts uploading `job` after the previous upload finishes; returns the
    /// previous upload's outcome if it was not collected yet.
    #[must_use = "the previous upload's outcome may be an error"]
    pub fn submit(&mut self, job: CheckpointJob) -> Option<UploadOutcome> {
        let previous = self.wait();
        let store = self.store.clone();
        let step = job.step;
        let thread = std::thread::Builder::new()
            .name(format!("checkpoint-upload-{step}"))
            .spawn(move || run(&store, job));
        self.pending = Some(match thread {
            Ok(thread) => Pending::Running { step, thread },
            Err(e) => Pending::Ended(Box::new(UploadOutcome {
                step,
                result: Err(RunStoreError::Runtime(e)),
                retention: None,
            })),
        });
        previous
    }

    /// The step being uploaded, if any.
    pub fn in_flight_step(&self) -> Option<u64> {
        match &self.pending {
            Some(Pending::Running { step, thread }) if !thread.is_finished() => Some(*step),
            _ => None,
        }
    }

    /// The outcome of a finished upload, without blocking.
    #[must_use = "the outcome may be an error"]
    pub fn poll(&mut self) -> Option<UploadOutcome> {
        match &self.pending {
            Some(Pending::Running { thread, .. }) if !thread.is_finished() => None,
            _ => self.wait(),
        }
    }

    /// Blocks until the upload in flight ends; its outcome, or `None` if
    /// nothing was in flight.
    #[must_use = "the outcome may be an error"]
    pub fn wait(&mut self) -> Option<UploadOutcome> {
        let (step, thread) = match self.pending.take()? {
            Pending::Running { step, thread } => (step, thread),
            Pending::Ended(outcome) => return Some(*outcome),
        };
        Some(thread.join().unwrap_or_else(|panic| UploadOutcome {
            step,
            result: Err(RunStoreError::UploadPanicked {
                run: self.store.name().to_owned(),
                step,
                message: panic_message(panic.as_ref()),
            }),
            retention: None,
        }))
    }
}

impl Drop for CheckpointUploader {
    fn drop(&mut self) {
        if let Some(outcome) = self.wait() {
            match &outcome.result {
                Ok(_) => tracing::info!(step = outcome.step, "last checkpoint upload finished"),
                Err(e) => {
                    tracing::error!(step = outcome.step, error = %e, "last checkpoint upload failed")
                }
            }
        }
    }
}

fn run(store: &RunStore, job: CheckpointJob) -> UploadOutcome {
    let CheckpointJob {
        step,
        files,
        meta,
        keep_last,
    } = job;
    let result = (|| {
        check_names(step, &files)?;
        let mut writer = store.begin_checkpoint(step);
        for (name, bytes) in files {
            writer.put_file(&name, bytes)?;
        }
        writer.commit(meta)
    })();
    let retention = match (&result, keep_last) {
        (Ok(_), Some(keep_last)) => Some(store.apply_retention(keep_last)),
        _ => None,
    };
    UploadOutcome {
        step,
        result,
        retention,
    }
}

/// Before any upload, so that a bad job leaves nothing behind.
fn check_names(step: u64, files: &[(String, Bytes)]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (name, _) in files {
        layout::validate_name(name)?;
        if !seen.insert(name.as_str()) {
            return Err(RunStoreError::InvalidWrite {
                step,
                problem: format!("file {name:?} is listed twice"),
            });
        }
    }
    Ok(())
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}
