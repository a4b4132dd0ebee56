//! What a world reports of its steps: rank 0's progress (a bar on a
//! terminal, structured lines otherwise) and its TensorBoard event file
//! (`logging.tensorboard`), written through the run store at most once a
//! minute and whenever forced (checkpoints, the end), and the step's
//! measurements they report ([`StepReport`]). Other ranks report nothing
//! here; every rank's step report goes to its control.

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::run_store::RunStore;

use super::events::EventFile;
use super::progress::Progress;
use crate::vsd::VsdLosses;

/// Measurements after a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Completed steps.
    pub step: u64,
    pub losses: VsdLosses,
    pub step_ms: f64,
    pub allreduce_ms: f64,
    pub samples_per_s: f64,
    /// How long the newest checkpoint held this thread (0: none yet).
    pub checkpoint_stall_ms: f64,
}

pub struct Metrics {
    progress: Option<Progress>,
    events: Option<EventFile>,
    store: RunStore,
}

impl Metrics {
    /// Rank `rank`'s reporting in world `generation`.
    pub fn for_rank(rank: u64, generation: u64, cfg: &JobConfig, store: &RunStore) -> Self {
        let progress =
            (rank == 0).then(|| Progress::new(cfg.train.max_steps, cfg.logging.every_steps));
        let events = (rank == 0 && cfg.logging.tensorboard).then(|| {
            let tag = format!("{}.g{generation}", std::process::id());
            EventFile::new(&crate::torch::device::host_name(), &tag)
        });
        Self {
            progress,
            events,
            store: store.clone(),
        }
    }

    /// The loop starts (again) at `step`.
    pub fn start(&self, step: u64) {
        if let Some(p) = &self.progress {
            p.start(step);
        }
    }

    /// A step completed.
    pub fn step(&mut self, report: &StepReport) {
        if let Some(p) = &self.progress {
            p.step(report.step, &report.losses, report.samples_per_s);
        }
        if let Some(events) = self.events.as_mut() {
            events.scalars(
                report.step,
                &[
                    ("loss/vsd", report.losses.vsd),
                    ("loss/fake_score", report.losses.fake_score),
                    // The old tag, kept for one release.
                    ("loss/lora", report.losses.fake_score),
                    ("perf/images_per_s", report.samples_per_s),
                    ("perf/step_ms", report.step_ms),
                    ("perf/allreduce_ms", report.allreduce_ms),
                ],
            );
        }
        self.flush(false);
    }

    /// The sample step's picture of step `step` (a PNG), beside the losses.
    pub fn image(&mut self, step: u64, tag: &str, png: &[u8]) {
        if let Some(events) = self.events.as_mut() {
            events.image(step, tag, png);
        }
        self.flush(false);
    }

    /// Writes the TensorBoard file when it changed and a minute has passed,
    /// or now with `force`. A file that cannot be written is reported and
    /// training goes on.
    pub fn flush(&mut self, force: bool) {
        let Some(events) = self.events.as_mut() else {
            return;
        };
        let name = events.name().to_owned();
        if let Some(bytes) = events.take_due(force)
            && let Err(e) = self
                .store
                .put_run_file(&name, bytes::Bytes::copy_from_slice(bytes))
        {
            tracing::warn!(file = %name, "TensorBoard events not written: {e}");
        }
    }

    /// The world's loop ended.
    pub fn finish(&self) {
        if let Some(p) = &self.progress {
            p.finish();
        }
    }
}
