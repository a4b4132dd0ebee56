//! The Prometheus text exposition of a status snapshot, written by hand:
//! every number comes from the core's state at scrape time, so there is no
//! global recorder to share between coordinators (tests run several in one
//! process) and nothing to keep in sync.

use std::fmt::Write;

use crate::domain::{Health, JobPhase, StatusSnapshot, WorkerSnapshot};

const PHASES: [JobPhase; 7] = [
    JobPhase::Pending,
    JobPhase::Forming,
    JobPhase::Running,
    JobPhase::Reforming,
    JobPhase::Completed,
    JobPhase::Failed,
    JobPhase::Cancelled,
];

/// A per-worker gauge: name, help, and how to read it off a worker.
type PerWorker = (&'static str, &'static str, fn(&WorkerSnapshot) -> f64);

struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{key}=\"{}\"", escape(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(value));
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        value.to_string()
    }
}

/// The whole exposition for `/metrics`.
pub fn render(s: &StatusSnapshot) -> String {
    let mut out = Exposition(String::with_capacity(4096));
    out.family(
        "swiftbrush_job_phase",
        "gauge",
        "1 for the job's current phase.",
    );
    for phase in PHASES {
        let on = if phase == s.phase { 1.0 } else { 0.0 };
        out.sample("swiftbrush_job_phase", &[("phase", phase.name())], on);
    }
    out.single(
        "swiftbrush_generation",
        "gauge",
        "The current world generation.",
        s.generation as f64,
    );
    out.single(
        "swiftbrush_world_size",
        "gauge",
        "Ranks in the running world (0: none).",
        f64::from(s.world_size),
    );
    out.single(
        "swiftbrush_committed_step",
        "gauge",
        "Step of the newest committed checkpoint.",
        s.committed_step as f64,
    );
    out.single(
        "swiftbrush_max_steps",
        "gauge",
        "train.max_steps of the job.",
        s.max_steps as f64,
    );
    out.single(
        "swiftbrush_step_rate",
        "gauge",
        "Training steps per second, from rank 0's heartbeats.",
        s.step_rate,
    );
    out.single(
        "swiftbrush_samples_committed_total",
        "counter",
        "Captions trained on up to the newest committed checkpoint.",
        s.samples_committed as f64,
    );
    out.single(
        "swiftbrush_captions_served_total",
        "counter",
        "Captions handed out by GetCaptions (replays included).",
        s.captions_served as f64,
    );
    out.single(
        "swiftbrush_restarts_total",
        "counter",
        "Worlds broken by a failure.",
        f64::from(s.restarts),
    );
    out.single(
        "swiftbrush_checkpoints_committed_total",
        "counter",
        "Checkpoints committed by this coordinator.",
        s.checkpoints_committed as f64,
    );
    out.single(
        "swiftbrush_checkpoint_upload_seconds",
        "gauge",
        "Upload time of the newest committed checkpoint, as rank 0 reported it.",
        s.last_upload_seconds,
    );
    out.single(
        "swiftbrush_checkpoint_upload_seconds_total",
        "counter",
        "Upload time of all committed checkpoints.",
        s.upload_seconds_total,
    );

    out.family(
        "swiftbrush_workers",
        "gauge",
        "Registered workers by health.",
    );
    for (health, name) in [
        (Health::Alive, "alive"),
        (Health::Suspect, "suspect"),
        (Health::Dead, "dead"),
    ] {
        let n = s.workers.iter().filter(|w| w.health == health).count();
        out.sample("swiftbrush_workers", &[("health", name)], n as f64);
    }
    out.single(
        "swiftbrush_quarantined_hosts",
        "gauge",
        "Hosts refused after repeated failures.",
        s.quarantined_hosts.len() as f64,
    );

    let live: Vec<_> = s
        .workers
        .iter()
        .filter(|w| w.health != Health::Dead)
        .collect();
    let per_worker: [PerWorker; 6] = [
        (
            "swiftbrush_worker_heartbeat_age_seconds",
            "Seconds since the worker was last heard from.",
            |w| w.heartbeat_age_ms as f64 / 1000.0,
        ),
        (
            "swiftbrush_worker_step",
            "Completed steps the worker reported.",
            |w| w.step as f64,
        ),
        (
            "swiftbrush_worker_step_time_seconds",
            "The worker's last step time.",
            |w| w.metrics.step_time_ms / 1000.0,
        ),
        (
            "swiftbrush_worker_allreduce_seconds",
            "The worker's last all-reduce time.",
            |w| w.metrics.allreduce_ms / 1000.0,
        ),
        (
            "swiftbrush_worker_checkpoint_stall_seconds",
            "How long the worker's newest checkpoint held its training thread.",
            |w| w.metrics.checkpoint_stall_ms / 1000.0,
        ),
        (
            "swiftbrush_worker_samples_per_second",
            "The worker's throughput.",
            |w| w.metrics.samples_per_s,
        ),
    ];
    for (name, help, value) in per_worker {
        out.family(name, "gauge", help);
        for w in &live {
            let id = w.worker.to_string();
            let rank = w.rank.map_or_else(|| "none".to_owned(), |r| r.to_string());
            out.sample(
                name,
                &[("worker", &id), ("host", &w.host), ("rank", &rank)],
                value(w),
            );
        }
    }
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CoordinatorState, CoreOptions};

    #[test]
    fn exposition_is_well_formed_and_escapes_labels() {
        let mut state = CoordinatorState::new(CoreOptions::default());
        let input = crate::domain::RegisterInput {
            host: "we\"ird\\host".to_owned(),
            device: "cpu".to_owned(),
            capabilities: Default::default(),
        };
        state.register(input, 0).unwrap();
        let text = render(&state.snapshot(2_500));
        assert!(
            text.contains("swiftbrush_job_phase{phase=\"pending\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("host=\"we\\\"ird\\\\host\""), "{text}");
        assert!(text.contains("swiftbrush_worker_heartbeat_age_seconds{worker=\"w1\",host=\"we\\\"ird\\\\host\",rank=\"none\"} 2.5\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok() || value == "NaN", "{line}");
        }
    }
}
