//! A worker's life (docs/ARCHITECTURE.md, "A worker's life"): register,
//! then one iteration per world: rendezvous until placed, restore the
//! state of the world's resume step, bootstrap the collective, train with
//! the coordinator's caption stream, checkpoint sink and orders, and when
//! the world ends either leave (the job ended, or this worker was asked to
//! stop) or join the next one. The models stay loaded between worlds;
//! a world that starts from scratch after this worker trained gets a
//! freshly built trainer (the initial state is not kept around).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use swiftbrush_proto::rpc::{self, ClientTls, rendezvous_reply};
use swiftbrush_proto::{ConfigError, JobConfig};
use tch::Device;

use super::captions::CoordinatorCaptionFeed;
use super::collective::{
    self, AbortSlot, Backend, CollectiveError, CollectiveOptions, Membership, supported_backends,
};
use super::control::WorldControl;
use super::heartbeat::Heartbeat;
use super::link::{Backoff, CALL_TIMEOUT, CoordinatorLink, Reaction, RpcError};
use super::report::ReportToCoordinator;
use super::signals;
use super::status::WorkerStatus;
use crate::trainer::caption_audit::{AuditError, CaptionAudit};
use crate::trainer::{Phase, Resume, TrainError, TrainSummary, Trainer, WorldEnd, WorldParts};

/// How long one Rendezvous call waits (short, so a signal is noticed soon).
const RENDEZVOUS_WAIT_MS: u64 = 2_000;

/// Worlds in a row this worker may fail to join (bootstrap or connect)
/// before it gives up: a worker that no peer can reach would otherwise
/// break every world it is placed in, forever.
const MAX_FAILED_JOINS: u32 = 4;

/// How a worker is started.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `http://host:port` (or `https://` with `tls`).
    pub coordinator: String,
    pub token: String,
    pub tls: Option<ClientTls>,
    /// `cpu`, `cuda:N` or `auto`: the device is the worker's, whatever the
    /// job's `train.device` says (one worker per device).
    pub device: String,
    /// The host name the coordinator charges failures to.
    pub host: String,
    /// Where the TCP ring listener binds (default: the interface that routes
    /// to the coordinator, any port).
    pub ring_listen: Option<SocketAddr>,
    /// Serve `/healthz` here (off when unset).
    pub health_listen: Option<SocketAddr>,
    /// Append the caption audit (one JSON line per trained step) to
    /// `DIR/worker-<id>.jsonl`.
    pub caption_audit: Option<PathBuf>,
    /// Overrides the job's `train.micro_batch` on this worker (its device's
    /// memory decides; the result does not change).
    pub micro_batch: Option<u32>,
    /// How long to keep trying to reach the coordinator at start.
    pub connect_timeout: Duration,
}

/// Why the worker stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEnd {
    /// The job completed.
    Completed,
    /// The job ended otherwise (failed, cancelled).
    JobEnded {
        phase: rpc::JobPhase,
        reason: String,
    },
    /// A signal asked this worker to stop; `step` is where its world
    /// checkpointed (None: it was not training).
    Preempted { step: Option<u64>, committed: bool },
}

#[derive(Debug, Clone)]
pub struct WorkerSummary {
    pub end: WorkerEnd,
    pub worker_id: u64,
    /// What this worker trained; `None` if it never trained.
    pub train: Option<TrainSummary>,
    /// Worlds this worker trained in.
    pub num_worlds: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("the job config the coordinator sent: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("--device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error("cannot start the heartbeat thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot serve /healthz on {addr}: {source}")]
    Health {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Runs a worker until the job ends or a signal stops it.
pub fn run_worker(options: WorkerOptions) -> Result<WorkerSummary, WorkerError> {
    let device =
        crate::device::parse_worker_device(&options.device).map_err(|e| WorkerError::Device {
            device: options.device.clone(),
            reason: e.to_string(),
        })?;
    let link = CoordinatorLink::connect(
        &options.coordinator,
        &options.token,
        options.tls.clone(),
        options.connect_timeout,
    )?;
    let status = Arc::new(WorkerStatus::new(1_000));
    let abort = AbortSlot::default();
    let _heartbeat = Heartbeat::start(link.clone(), status.clone(), abort.clone())
        .map_err(WorkerError::Thread)?;
    if let Some(addr) = options.health_listen {
        super::health::serve(link.runtime(), addr, status.clone())
            .map_err(|source| WorkerError::Health { addr, source })?;
    }
    let advertise_ip = collective::local_ip_towards(&options.coordinator);
    let mut worker = Worker {
        device_name: device_name(device),
        device,
        options,
        link,
        status,
        abort,
        advertise_ip,
        job: None,
        trainer: None,
        train_started: None,
        num_worlds: 0,
        failed_joins: 0,
    };
    worker.run()
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_owned(),
    }
}

struct Worker {
    options: WorkerOptions,
    device: Device,
    device_name: String,
    link: CoordinatorLink,
    status: Arc<WorkerStatus>,
    abort: AbortSlot,
    advertise_ip: std::net::IpAddr,
    /// The job, from Register or an assignment.
    job: Option<Job>,
    trainer: Option<Trainer>,
    /// (first step trained, when).
    train_started: Option<(u64, Instant)>,
    num_worlds: u32,
    /// Worlds in a row this worker could not join.
    failed_joins: u32,
}

/// The job this worker trains, its config parsed once when it arrives.
struct Job {
    info: rpc::JobInfo,
    /// As this worker runs it (`--micro-batch` applied).
    config: JobConfig,
}

impl Job {
    /// The job the coordinator sent, its config parsed once, with this
    /// worker's `--micro-batch`. A config this worker cannot read (a newer
    /// coordinator's key, a broken message) is an error naming it, never
    /// a default to fall back on.
    fn parse(info: rpc::JobInfo, micro_batch: Option<u32>) -> Result<Self, WorkerError> {
        let mut config = JobConfig::from_yaml_str(&info.config_yaml, "the job config")?;
        if micro_batch.is_some() {
            config.train.micro_batch = micro_batch;
        }
        Ok(Job { info, config })
    }
}

/// A place in a world, as the coordinator's assignment gives it, with the
/// backend's name turned into a [`Backend`].
#[derive(Debug, Clone, Copy)]
struct Assignment {
    generation: u64,
    rank: u32,
    world_size: u32,
    resume_step: u64,
    backend: Backend,
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
        })
    }
}

enum Placement {
    Assigned(Assignment),
    Finished {
        phase: rpc::JobPhase,
        reason: String,
    },
    Preempted,
}

impl Worker {
    fn run(&mut self) -> Result<WorkerSummary, WorkerError> {
        self.register()?;
        let mut known_generation = 0;
        loop {
            self.status.set_world(0, self.status.step());
            self.status.set_phase(Phase::Idle);
            let assignment = match self.rendezvous(known_generation)? {
                Placement::Assigned(a) => a,
                Placement::Finished { phase, reason } => {
                    return Ok(self.finish(job_end(phase, reason)));
                }
                Placement::Preempted => {
                    return Ok(self.finish(WorkerEnd::Preempted {
                        step: None,
                        committed: false,
                    }));
                }
            };
            known_generation = assignment.generation;
            let generation = assignment.generation;
            match self.train_in(assignment)? {
                Some(end) => return Ok(self.finish(end)),
                None => self.await_world_end(generation)?,
            }
        }
    }

    /// One world: restore, bootstrap, train. `None`: the world ended and
    /// the worker joins the next one.
    fn train_in(&mut self, a: Assignment) -> Result<Option<WorkerEnd>, WorkerError> {
        let job = self.job()?;
        let (config, num_captions) = (job.config.clone(), job.info.num_captions);
        tracing::info!(
            generation = a.generation,
            rank = a.rank,
            world_size = a.world_size,
            resume_step = a.resume_step,
            backend = a.backend.name(),
            "placed in a world"
        );
        self.status.set_phase(Phase::Loading);
        let trainer = self.trainer_for(&config, a.resume_step)?;
        trainer.restore(Resume::Step(a.resume_step))?;
        let parts = match self.world_parts(&a, &config, num_captions) {
            Ok(parts) => parts,
            Err(WorkerError::Collective(e)) if !e.is_fatal() => {
                // A world that ended meanwhile is nobody's fault; one that
                // still runs without us might be ours.
                let gone = matches!(&e, CollectiveError::Rpc(r)
                    if matches!(r.reaction(), Reaction::Stale | Reaction::Reregister));
                if !gone {
                    self.failed_joins += 1;
                    if self.failed_joins >= MAX_FAILED_JOINS {
                        return Err(e.into());
                    }
                }
                tracing::warn!(generation = a.generation, error = %e, "could not join the world");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        self.failed_joins = 0;
        let trainer = self
            .trainer
            .as_mut()
            .ok_or_else(|| WorkerError::Invalid("no trainer for the world".to_owned()))?;
        let mut world = trainer.join(parts)?;
        self.status.set_world(a.generation, a.resume_step);
        self.train_started
            .get_or_insert((a.resume_step, Instant::now()));
        self.num_worlds += 1;
        let end = trainer.run_world(&mut world);
        // Leaving the world drops its collective and caption feed.
        drop(world);
        self.abort.clear();
        Ok(match end? {
            WorldEnd::Completed => Some(WorkerEnd::Completed),
            WorldEnd::Stopped { reason } => Some(match self.status.orders().stop {
                Some(stop) => job_end(stop.phase, stop.reason),
                None => job_end(rpc::JobPhase::Unspecified, reason),
            }),
            WorldEnd::Broken { reason } => {
                tracing::warn!(generation = a.generation, %reason, "the world broke");
                None
            }
            WorldEnd::Preempted {
                step,
                committed,
                this_rank: true,
            } => Some(WorkerEnd::Preempted {
                step: Some(step),
                committed,
            }),
            WorldEnd::Preempted { step, .. } => {
                tracing::info!(step, "a peer is leaving the world");
                None
            }
        })
    }

    /// The trainer for a world resuming at `resume_step`: the loaded one,
    /// unless the world starts from scratch and this one has trained.
    fn trainer_for(
        &mut self,
        config: &JobConfig,
        resume_step: u64,
    ) -> Result<&mut Trainer, WorkerError> {
        let stale = self.trainer.as_ref().is_some_and(|t| {
            (resume_step == 0 && !t.is_initial())
                || t.config().fingerprint() != config.fingerprint()
        });
        if stale {
            tracing::info!("rebuilding the trainer for a world that starts from scratch");
            self.trainer = None;
        }
        let trainer = match self.trainer.take() {
            Some(t) => t,
            None => {
                tracing::info!(device = %self.device_name, "loading the teacher and building the student");
                Trainer::load(config.clone(), self.device)?
            }
        };
        Ok(self.trainer.insert(trainer))
    }

    /// The job this worker was given (Register's reply or an assignment).
    fn job(&self) -> Result<&Job, WorkerError> {
        self.job.as_ref().ok_or_else(|| {
            WorkerError::Invalid("the coordinator placed this worker without a job".to_owned())
        })
    }

    /// Takes the job the coordinator sent, parsing its config once: a
    /// config this worker cannot read is an error now, not a fallback
    /// later.
    fn set_job(&mut self, info: rpc::JobInfo) -> Result<(), WorkerError> {
        self.job = Some(Job::parse(info, self.options.micro_batch)?);
        Ok(())
    }

    fn world_parts(
        &self,
        a: &Assignment,
        config: &JobConfig,
        num_captions: u64,
    ) -> Result<WorldParts, WorkerError> {
        let worker_id = self.status.worker_id();
        let world = &config.world;
        let options = CollectiveOptions {
            ring_listen: self.options.ring_listen,
            advertise_ip: self.advertise_ip,
            // Every member restores before it connects; allow for a slow one.
            connect_timeout: Duration::from_millis(world.heartbeat_timeout_ms.max(30_000)),
            // A stopped peer is declared dead after the heartbeat timeout and
            // the abort ends the wait then; this bound only matters when the
            // coordinator cannot be heard either. Generous: rank 0's
            // checkpoint snapshot holds the collective for a while.
            io_timeout: Duration::from_millis(
                world.heartbeat_timeout_ms.saturating_mul(3).max(60_000),
            ),
        };
        let membership = Membership {
            worker_id,
            generation: a.generation,
            rank: a.rank,
            world_size: a.world_size,
            backend: a.backend,
        };
        let sync = collective::form(&self.link, &membership, &options, &self.abort, self.device)?;
        let feed = CoordinatorCaptionFeed::new(
            self.link.clone(),
            (worker_id, a.generation, a.rank),
            a.resume_step,
            config.train.max_steps,
            num_captions,
        );
        let audit = match &self.options.caption_audit {
            Some(dir) => Some(CaptionAudit::open(dir, &format!("worker-{worker_id}"))?),
            None => None,
        };
        Ok(WorldParts {
            generation: a.generation,
            feed: Box::new(feed),
            sync,
            sink: Arc::new(ReportToCoordinator {
                link: self.link.clone(),
                worker_id,
                generation: a.generation,
            }),
            control: Box::new(WorldControl::new(self.status.clone(), a.generation)),
            audit,
        })
    }

    fn register(&mut self) -> Result<(), WorkerError> {
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
                    tracing::info!(worker_id = reply.worker_id, host = %self.options.host, device = %self.device_name, "registered");
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

    fn rendezvous(&mut self, mut known_generation: u64) -> Result<Placement, WorkerError> {
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
            };
            let result = self.link.call(
                "Rendezvous",
                Duration::from_millis(RENDEZVOUS_WAIT_MS) + CALL_TIMEOUT,
                |mut c| async move { c.rendezvous(request).await },
            );
            match result.map(|r| r.outcome) {
                Ok(Some(rendezvous_reply::Outcome::Assignment(a))) => {
                    let placed = Assignment::try_from(&a)?;
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
    fn await_world_end(&mut self, generation: u64) -> Result<(), WorkerError> {
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

    fn leave(&self, reason: &str) {
        let request = rpc::LeaveRequest {
            worker_id: self.status.worker_id(),
            reason: reason.to_owned(),
            failed: false,
        };
        if let Err(e) = self.link.call("Leave", CALL_TIMEOUT, |mut c| async move {
            c.leave(request).await
        }) {
            tracing::debug!(error = %e, "leave not delivered");
        }
    }

    fn finish(&mut self, end: WorkerEnd) -> WorkerSummary {
        let reason = match &end {
            WorkerEnd::Completed => "the job completed".to_owned(),
            WorkerEnd::JobEnded { phase, reason } => format!("the job ended ({phase:?}): {reason}"),
            WorkerEnd::Preempted { .. } => "preempted".to_owned(),
        };
        self.leave(&reason);
        tracing::info!(%reason, "worker leaving");
        let train = match (&self.trainer, self.train_started) {
            (Some(t), Some((start, at))) => Some(t.summary(start, at.elapsed().as_secs_f64())),
            _ => None,
        };
        WorkerSummary {
            end,
            worker_id: self.status.worker_id(),
            train,
            num_worlds: self.num_worlds,
        }
    }
}

fn job_end(phase: rpc::JobPhase, reason: String) -> WorkerEnd {
    if phase == rpc::JobPhase::Completed {
        WorkerEnd::Completed
    } else {
        WorkerEnd::JobEnded { phase, reason }
    }
}

/// What a worker reports as its device memory: a CUDA device's total memory
/// as the driver reports it; 0 ("unknown", swiftbrush.proto) for the CPU,
/// whose share of host memory is not the worker's to claim.
fn device_memory_bytes(device: tch::Device) -> u64 {
    match device {
        tch::Device::Cuda(index) => crate::cuda_driver::total_memory_bytes(index).unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let yaml = JobConfig::from_yaml_file(std::path::Path::new(path))
            .unwrap()
            .to_yaml();
        let job = Job::parse(info(&yaml), Some(3)).unwrap();
        assert_eq!(
            job.config.train.micro_batch,
            Some(3),
            "--micro-batch applies"
        );
        // A key from a newer coordinator: refused, naming it.
        let newer = yaml.replacen("train:\n", "train:\n  warp_speed: 9\n", 1);
        assert_ne!(newer, yaml);
        let err = match Job::parse(info(&newer), None) {
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
        if crate::cuda_driver::report().is_err() {
            assert_eq!(device_memory_bytes(tch::Device::Cuda(0)), 0);
        }
    }
}
