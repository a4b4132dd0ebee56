//! A worker's life (docs/ARCHITECTURE.md, "A worker's life"): register,
//! then one iteration per world: rendezvous until placed (the calls to
//! the coordinator outside a world: `rendezvous.rs`), restore the
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

use swiftbrush_proto::rpc::{self, ClientTls};
use swiftbrush_proto::{ConfigError, JobConfig};
use tch::Device;

use super::captions::CoordinatorCaptionFeed;
use super::communicator::{self, AbortSlot, CollectiveError, CollectiveOptions, Membership};
use super::control::WorldControl;
use super::heartbeat::Heartbeat;
use super::link::{CoordinatorLink, Reaction, RpcError};
use super::rendezvous::{Assignment, Job, Placement};
use super::report::ReportToCoordinator;
use super::status::WorkerStatus;
use crate::trainer::caption_audit::{AuditError, CaptionAudit};
use crate::trainer::{Phase, Resume, TrainError, TrainSummary, Trainer, WorldEnd, WorldParts};

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
    /// The cores to share among this host's members of each world, when
    /// the thread count was not given (`threads::ThreadPlan::
    /// shares_with_world`); None keeps the threads as they are.
    pub world_threads: Option<u32>,
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
    let device = crate::torch::device::parse_worker_device(&options.device).map_err(|e| {
        WorkerError::Device {
            device: options.device.clone(),
            reason: e.to_string(),
        }
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
    let advertise_ip = communicator::local_ip_towards(&options.coordinator);
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

pub(super) struct Worker {
    pub(super) options: WorkerOptions,
    pub(super) device: Device,
    pub(super) device_name: String,
    pub(super) link: CoordinatorLink,
    pub(super) status: Arc<WorkerStatus>,
    abort: AbortSlot,
    advertise_ip: std::net::IpAddr,
    /// The job, from Register or an assignment.
    pub(super) job: Option<Job>,
    trainer: Option<Trainer>,
    /// (first step trained, when).
    train_started: Option<(u64, Instant)>,
    num_worlds: u32,
    /// Worlds in a row this worker could not join.
    failed_joins: u32,
}

impl Worker {
    fn run(&mut self) -> Result<WorkerSummary, WorkerError> {
        let result = self.register().and_then(|()| self.run_registered());
        if let Err(e) = &result
            && !matches!(e, WorkerError::Rpc(_))
            && self.status.worker_id() != 0
        {
            // The operator sees why in `status` instead of "silent for
            // 10 s" and a restart spent (a coordinator that cannot be
            // reached cannot be told: RPC errors are not reported).
            self.report_failure(e);
        }
        result
    }

    fn run_registered(&mut self) -> Result<WorkerSummary, WorkerError> {
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
        self.share_threads(&a);
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

    /// Workers side by side on a host, none told how many they are, learn
    /// it from their world: each takes its share of the cores, so their
    /// OpenMP threads do not starve each other and the ring (issue 29).
    fn share_threads(&self, a: &Assignment) {
        let Some(cores) = self.options.world_threads else {
            return;
        };
        let n = crate::threads::world_share(cores, a.local_members);
        let n = i32::try_from(n).unwrap_or(1);
        if tch::get_num_threads() != n {
            tch::set_num_threads(n);
            tracing::info!(
                "threads: {n} intra-op ({cores} cores / {} workers of this world on this host)",
                a.local_members
            );
        }
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
        let sync = communicator::form(&self.link, &membership, &options, &self.abort, self.device)?;
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
