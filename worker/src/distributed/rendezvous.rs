//! Rendezvous: a worker's calls to the coordinator outside a world, each
//! a loop that retries what can be retried. Register (again after the
//! coordinator forgot this worker), rendezvous until placed in a world (or
//! the job finished, or a signal came), wait after a broken world until
//! the coordinator has moved on too, leave; and the job these calls bring,
//! its config parsed once when it arrives. The worker's life that calls
//! them is `runtime.rs`.

use std::time::{Duration, Instant};

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::rpc::{self, rendezvous_reply};

use super::communicator::{Backend, CollectiveError, supported_backends};
use super::link::{Backoff, CALL_TIMEOUT, Reaction};
use super::runtime::{Worker, WorkerError};
use super::signals;

/// How long one Rendezvous call waits (short, so a signal is noticed soon).
const RENDEZVOUS_WAIT_MS: u64 = 2_000;

/// The job this worker trains, its config parsed once when it arrives.
pub(super) struct Job {
    pub(super) info: rpc::JobInfo,
    /// As this worker runs it (`--micro-batch` applied).
    pub(super) config: JobConfig,
    /// The fingerprint of this host's copy of the job's teacher, which
    /// every Rendezvous reports: the coordinator places only workers with
    /// the job's teacher.
    pub(super) teacher_fingerprint: String,
}

impl Job {
    /// The job the coordinator sent, its config parsed once, with this
    /// worker's `--micro-batch`. A config this worker cannot read (a newer
    /// coordinator's key, a broken message) is an error naming it, never
    /// a default to fall back on.
    fn parse(
        info: rpc::JobInfo,
        micro_batch: Option<u32>,
        known: Option<&Job>,
    ) -> Result<Self, WorkerError> {
        let mut config = JobConfig::from_yaml_str(&info.config_yaml, "the job config")?;
        if micro_batch.is_some() {
            config.train.micro_batch = micro_batch;
        }
        let teacher = config.model.teacher.clone().unwrap_or_default();
        // The same teacher as the job already known: no need to read it again.
        let teacher_fingerprint = match known {
            Some(job) if job.config.model.teacher.as_deref() == Some(teacher.as_str()) => {
                job.teacher_fingerprint.clone()
            }
            _ => crate::pipeline::teacher_fingerprint(std::path::Path::new(&teacher))
                .map_err(|e| WorkerError::Invalid(format!("the job's teacher: {e}")))?,
        };
        Ok(Job {
            info,
            config,
            teacher_fingerprint,
        })
    }
}

/// A place in a world, as the coordinator's assignment gives it, with the
/// backend's name turned into a [`Backend`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Assignment {
    pub(super) generation: u64,
    pub(super) rank: u32,
    pub(super) world_size: u32,
    pub(super) resume_step: u64,
    pub(super) backend: Backend,
    /// Members of the world on this worker's host (itself included).
    pub(super) local_members: u32,
}

impl TryFrom<&rpc::Assignment> for Assignment {
    type Error = CollectiveError;

    fn try_from(a: &rpc::Assignment) -> Result<Self, CollectiveError> {
        Ok(Self {
            generation: a.generation,
            rank: a.rank,
            world_size: a.world_size,
            resume_step: a.resume_step,
            backend: Backend::from_name(&a.backend)
                .ok_or_else(|| CollectiveError::UnknownBackend(a.backend.clone()))?,
            local_members: 1,
        })
    }
}

pub(super) enum Placement {
    Assigned(Assignment),
    Finished {
        phase: rpc::JobPhase,
        reason: String,
    },
    Preempted,
}

impl Worker {
    /// The job this worker was given (Register's reply or an assignment).
    pub(super) fn job(&self) -> Result<&Job, WorkerError> {
        self.job.as_ref().ok_or_else(|| {
            WorkerError::Invalid("the coordinator placed this worker without a job".to_owned())
        })
    }

    /// Takes the job the coordinator sent, parsing its config once: a
    /// config this worker cannot read is an error now, not a fallback
    /// later.
    fn set_job(&mut self, info: rpc::JobInfo) -> Result<(), WorkerError> {
        self.job = Some(Job::parse(
            info,
            self.options.micro_batch,
            self.job.as_ref(),
        )?);
        Ok(())
    }

    pub(super) fn register(&mut self) -> Result<(), WorkerError> {
        let mut backoff = Backoff::new();
        loop {
            let request = rpc::RegisterRequest {
                host: self.options.host.clone(),
                device: self.device_name.clone(),
                capabilities: Some(rpc::Capabilities {
                    backends: supported_backends(self.device),
                    device_memory_bytes: device_memory_bytes(self.device),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                }),
            };
            let result = self
                .link
                .call("Register", CALL_TIMEOUT, |mut c| async move {
                    c.register(request).await
                });
            match result {
                Ok(reply) => {
                    self.status.set_worker_id(reply.worker_id);
                    self.status.set_interval_ms(reply.heartbeat_interval_ms);
                    if let Some(job) = reply.job {
                        self.set_job(job)?;
                    }
                    self.check_backend()?;
                    // Named as the coordinator names it in status and reasons.
                    tracing::info!(worker = %format!("w{:x}", reply.worker_id), host = %self.options.host, device = %self.device_name, "registered");
                    return Ok(());
                }
                Err(e) if signals::preempt_requested() => return Err(e.into()),
                // FAILED_PRECONDITION here: this host is quarantined.
                Err(e) if e.reaction() == Reaction::Stale => {
                    tracing::warn!(error = %e, "registration refused; retrying in 10 s");
                    std::thread::sleep(Duration::from_secs(10));
                }
                Err(e) if e.reaction() == Reaction::Retry => {
                    tracing::warn!(error = %e, "registration failed; retrying");
                    std::thread::sleep(backoff.next_delay());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A job that needs a backend this build lacks would never place this
    /// worker: say so instead of waiting forever.
    fn check_backend(&self) -> Result<(), WorkerError> {
        let Some(job) = &self.job else {
            return Ok(());
        };
        if job.config.world.backend == swiftbrush_proto::config::CollectiveBackend::Nccl
            && let Err(e) = crate::collective::nccl::check_available(self.device)
        {
            return Err(CollectiveError::NcclUnavailable {
                reason: e.to_string(),
            }
            .into());
        }
        Ok(())
    }

    pub(super) fn rendezvous(
        &mut self,
        mut known_generation: u64,
    ) -> Result<Placement, WorkerError> {
        let mut backoff = Backoff::new();
        let mut last_reason = String::new();
        loop {
            if signals::preempt_requested() {
                return Ok(Placement::Preempted);
            }
            let request = rpc::RendezvousRequest {
                worker_id: self.status.worker_id(),
                known_generation,
                wait_ms: RENDEZVOUS_WAIT_MS,
                teacher_fingerprint: self
                    .job
                    .as_ref()
                    .map(|j| j.teacher_fingerprint.clone())
                    .unwrap_or_default(),
            };
            let result = self.link.call(
                "Rendezvous",
                Duration::from_millis(RENDEZVOUS_WAIT_MS) + CALL_TIMEOUT,
                |mut c| async move { c.rendezvous(request).await },
            );
            match result.map(|r| r.outcome) {
                Ok(Some(rendezvous_reply::Outcome::Assignment(a))) => {
                    let mut placed = Assignment::try_from(&a)?;
                    let here = a.members.iter().filter(|m| m.host == self.options.host);
                    placed.local_members = u32::try_from(here.count()).unwrap_or(1).max(1);
                    if let Some(job) = a.job {
                        self.set_job(job)?;
                    }
                    return Ok(Placement::Assigned(placed));
                }
                Ok(Some(rendezvous_reply::Outcome::Finished(f))) => {
                    return Ok(Placement::Finished {
                        phase: f.phase(),
                        reason: f.reason,
                    });
                }
                Ok(Some(rendezvous_reply::Outcome::Waiting(w))) => {
                    // Sent when this worker has not reported its teacher.
                    if let Some(job) = w.job {
                        self.set_job(job)?;
                    }
                    if w.reason != last_reason {
                        tracing::info!(reason = %w.reason, num_ready = w.num_ready, min_size = w.min_size, "waiting for a world");
                        last_reason = w.reason;
                    }
                }
                Ok(None) => tracing::warn!("a Rendezvous reply without an outcome"),
                Err(e) => match e.reaction() {
                    Reaction::Reregister => self.register()?,
                    // The coordinator's generations restarted below ours.
                    Reaction::Stale => known_generation = 0,
                    Reaction::Retry => {
                        tracing::debug!(error = %e, "rendezvous failed; retrying");
                        std::thread::sleep(backoff.next_delay());
                    }
                    Reaction::Fatal | Reaction::AlreadyDone => return Err(e.into()),
                },
            }
        }
    }

    /// After a world ended on this side (collective or caption stream
    /// broke, a peer left): wait until the coordinator has moved on too,
    /// then rendezvous again. If it still counts the world as running after
    /// twice the heartbeat timeout (its members look alive to it, but this
    /// rank cannot train with them), leave and come back as a new worker,
    /// so that the world re-forms.
    pub(super) fn await_world_end(&mut self, generation: u64) -> Result<(), WorkerError> {
        let timeout_ms = self.job()?.config.world.heartbeat_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms.saturating_mul(2));
        loop {
            let orders = self.status.orders();
            if orders.unknown {
                return self.register();
            }
            if orders.stop.is_some()
                || orders.reform_to > generation
                || self.status.coordinator_generation() > generation
                || signals::preempt_requested()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    generation,
                    "the coordinator still runs the world this rank left; leaving and registering again"
                );
                self.leave("its collective failed while the world still ran");
                return self.register();
            }
            self.status.poke();
            self.status.wait_orders(Duration::from_millis(200));
        }
    }

    pub(super) fn leave(&self, reason: &str) {
        self.send_leave(reason.to_owned(), false);
    }

    /// Tells the coordinator this worker is exiting on `error` (best
    /// effort): it shows the reason, charges the host, and fails the job
    /// when every worker fails the same way.
    pub(super) fn report_failure(&self, error: &(dyn std::error::Error + 'static)) {
        tracing::info!("reporting the failure to the coordinator");
        self.send_leave(failure_reason(error), true);
    }

    fn send_leave(&self, reason: String, failed: bool) {
        let request = rpc::LeaveRequest {
            worker_id: self.status.worker_id(),
            reason,
            failed,
        };
        if let Err(e) = self.link.call("Leave", CALL_TIMEOUT, |mut c| async move {
            c.leave(request).await
        }) {
            tracing::debug!(error = %e, "leave not delivered");
        }
    }
}

/// An error and its causes on one line ([`swiftbrush_proto::error_line`]),
/// cut at a character boundary to what the coordinator accepts.
fn failure_reason(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = swiftbrush_proto::error_line(error);
    let mut end = line.len().min(swiftbrush_proto::rpc::MAX_REASON_BYTES);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line.truncate(end);
    line
}

/// What a worker reports as its device memory: a CUDA device's total memory
/// as the driver reports it; 0 ("unknown", swiftbrush.proto) for the CPU,
/// whose share of host memory is not the worker's to claim.
fn device_memory_bytes(device: tch::Device) -> u64 {
    match device {
        tch::Device::Cuda(index) => {
            crate::torch::cuda_driver::total_memory_bytes(index).unwrap_or(0)
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_reason_is_the_chain_once_and_fits_the_limit() {
        #[derive(Debug, thiserror::Error)]
        #[error("teacher /t: {0}")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("no such directory"));
        assert_eq!(failure_reason(&e), "teacher /t: no such directory");
        let long = Outer(std::io::Error::other("\u{e9}".repeat(5000)));
        let reason = failure_reason(&long);
        assert!(reason.len() <= swiftbrush_proto::rpc::MAX_REASON_BYTES);
        assert!(reason.starts_with("teacher /t: \u{e9}"));
    }

    fn info(yaml: &str) -> rpc::JobInfo {
        rpc::JobInfo {
            name: "job".to_owned(),
            config_yaml: yaml.to_owned(),
            config_fingerprint: String::new(),
            run_dir: "memory://job".to_owned(),
            num_captions: 4,
        }
    }

    #[test]
    fn a_job_config_this_worker_cannot_read_is_an_error_naming_the_key() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tiny.yaml");
        let mut config = JobConfig::from_yaml_file(std::path::Path::new(path)).unwrap();
        let fixtures = std::env::var("SWIFTBRUSH_FIXTURES").expect("make fixtures");
        let teacher = std::path::Path::new(&fixtures).join("pipelines/sd1");
        config.model.teacher = Some(teacher.display().to_string());
        let yaml = config.to_yaml();
        let job = Job::parse(info(&yaml), Some(3), None).unwrap();
        assert_eq!(
            job.teacher_fingerprint,
            crate::pipeline::teacher_fingerprint(&teacher).unwrap(),
            "the job's teacher as this host has it"
        );
        assert_eq!(
            job.config.train.micro_batch,
            Some(3),
            "--micro-batch applies"
        );
        // A key from a newer coordinator: refused, naming it.
        let newer = yaml.replacen("train:\n", "train:\n  warp_speed: 9\n", 1);
        assert_ne!(newer, yaml);
        let err = match Job::parse(info(&newer), None, None) {
            Ok(_) => panic!("a config with an unknown key was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("the job config the coordinator sent") && err.contains("warp_speed"),
            "{err}"
        );
    }

    #[test]
    fn a_cpu_worker_reports_its_device_memory_as_unknown() {
        assert_eq!(device_memory_bytes(tch::Device::Cpu), 0);
        if crate::torch::cuda_driver::report().is_err() {
            assert_eq!(device_memory_bytes(tch::Device::Cuda(0)), 0);
        }
    }
}
