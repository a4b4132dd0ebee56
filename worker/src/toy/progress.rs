//! Training progress for people: an indicatif bar (step, loss, it/s, ETA)
//! when stderr is a terminal, plain log lines otherwise (files, CI), so logs
//! never fill with carriage returns.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on a terminal, else log lines.
    Auto,
    /// Log lines every `every` steps.
    Lines { every: u64 },
    /// Nothing (tests).
    Quiet,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    every: u64,
    total: u64,
    start_step: u64,
    started: Instant,
}

impl Progress {
    pub fn new(mode: ProgressMode, start_step: u64, total: u64) -> Self {
        let (bar, every) = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => {
                let bar = ProgressBar::new(total);
                let style = ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.set_position(start_step);
                bar.reset_eta();
                (Some(bar), 0)
            }
            ProgressMode::Auto => (None, 50),
            ProgressMode::Lines { every } => (None, every.max(1)),
            ProgressMode::Quiet => (None, 0),
        };
        Self {
            bar,
            every,
            total,
            start_step,
            started: Instant::now(),
        }
    }

    /// After step `step` (1-based count of steps done) with this loss.
    pub fn update(&self, step: u64, loss: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4}"));
            return;
        }
        if self.every == 0 || (!step.is_multiple_of(self.every) && step != self.total) {
            return;
        }
        let done = step.saturating_sub(self.start_step);
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(step)) as f64 / rate
        } else {
            0.0
        };
        tracing::info!(
            "step {step}/{} loss {loss:.4} {rate:.2} it/s ETA {}",
            self.total,
            format_secs(eta)
        );
    }

    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => tracing::info!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn format_secs(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}
