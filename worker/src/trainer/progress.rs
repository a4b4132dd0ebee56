//! Progress: a bar with step, losses, images/s and ETA on a terminal;
//! structured log lines (every `logging.every_steps`) otherwise, so log
//! collectors get fields, not carriage returns.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::vsd::VsdLosses;

pub struct Progress {
    bar: Option<ProgressBar>,
    max_steps: u64,
    every: u64,
}

impl Progress {
    pub fn new(max_steps: u64, every: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(max_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} step {pos}/{len} [{bar:30}] {msg} ({eta} left)",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            max_steps,
            every: every.max(1),
        }
    }

    pub fn start(&self, step: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.reset_eta();
        }
        tracing::info!(step, max_steps = self.max_steps, "training");
    }

    pub fn step(&self, step: u64, losses: &VsdLosses, images_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!(
                "vsd {:.3e} fake score {:.4} {:.2} img/s",
                losses.vsd, losses.fake_score, images_per_s
            ));
        } else if step.is_multiple_of(self.every) || step == self.max_steps {
            tracing::info!(
                step,
                loss_vsd = losses.vsd,
                // loss_lora: the old name, kept for one release.
                loss_lora = losses.fake_score,
                loss_fake_score = losses.fake_score,
                images_per_s,
                "step"
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
