//! `swiftbrush worker`: one training process on one device that joins a
//! coordinator's job and works until the job ends or a signal stops it
//! (SIGTERM: checkpoint at the next step boundary, leave, exit 0).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use swiftbrush_proto::rpc::{ClientTls, JobPhase};
use swiftbrush_worker::distributed::{self, WorkerEnd, WorkerOptions};
use swiftbrush_worker::threads::{self, ThreadRequest};

/// How many CPU threads a worker gives libtorch (worker/src/threads.rs):
/// `--threads`, else MKL_NUM_THREADS / OMP_NUM_THREADS, else the cores
/// divided by the workers on this host.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ThreadArgs {
    /// libtorch's intra-op and inter-op threads in this process (over
    /// OMP_NUM_THREADS and MKL_NUM_THREADS).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// The worker processes on this host, which share its cores (default:
    /// SWIFTBRUSH_LOCAL_WORKERS, else torchrun's LOCAL_WORLD_SIZE, else
    /// srun's tasks on this node, else 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    local_workers: Option<u32>,
}

impl ThreadArgs {
    pub fn request(&self) -> ThreadRequest {
        ThreadRequest {
            threads: self.threads,
            local_workers: self.local_workers,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The coordinator's gRPC address: http://host:port, or https://host:port
    /// with --tls-ca.
    #[arg(long)]
    coordinator: String,
    /// The device this worker trains on: auto (the first CUDA device, else
    /// the CPU), cpu or cuda:N. It overrides the job's train.device.
    #[arg(long, default_value = "auto")]
    device: String,
    /// File whose first line is the job token. Without it the token comes
    /// from the SWIFTBRUSH_TOKEN environment variable; it is never an argument.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The CA (PEM) that signed a TLS coordinator's certificate.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for a coordinator that requires one ...
    #[arg(long, requires = "tls_key", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// ... and its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name to check the coordinator's certificate against (default:
    /// the host of --coordinator).
    #[arg(long, requires = "tls_ca")]
    tls_domain: Option<String>,
    /// The host name the coordinator knows this worker by (failures are
    /// charged to it; default: this machine's name).
    #[arg(long)]
    host: Option<String>,
    /// Where the TCP ring listens for its neighbours (default: the address
    /// that routes to the coordinator, any port).
    #[arg(long)]
    ring_listen: Option<SocketAddr>,
    /// Serve /healthz (id, world, step, phase, last heartbeat ack) here; off
    /// by default. No authentication: use loopback or a private network.
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Append one JSON line per trained step (generation, rank, step,
    /// caption ids) to DIR/worker-<id>.jsonl: proof of exactly-once.
    #[arg(long)]
    caption_audit: Option<PathBuf>,
    /// At most N samples through the networks at once on this worker's
    /// device (overrides the job's train.micro_batch: gradient accumulation
    /// changes the memory, not the result).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    micro_batch: Option<u32>,
    /// How long to keep trying to reach the coordinator at start.
    #[arg(long, default_value_t = 120_000)]
    connect_timeout_ms: u64,
    /// After SIGTERM, exit anyway if the checkpoint has not landed by then.
    #[arg(long, default_value_t = 25_000)]
    grace_ms: u64,
    #[command(flatten)]
    threads: ThreadArgs,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    // Before this process's first tensor: its share of the host's cores,
    // so that workers side by side do not starve each other (issue 29).
    let plan = threads::plan_here(args.threads.request())?;
    let applied = threads::apply(&plan);
    tracing::info!(
        intra_op = applied.intra_op,
        inter_op = applied.inter_op,
        "threads: {plan}"
    );
    if let Some(reason) = &applied.inter_op_refused {
        tracing::warn!(%reason, "libtorch kept its inter-op threads");
    }
    let token = swiftbrush_proto::rpc::read_job_token(args.token_file.as_deref())?;
    let tls = client_tls(&args)?;
    // Signals are the process's: they are watched on a runtime of its own,
    // which outlives the worker.
    let signals = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the signal runtime")?;
    distributed::signals::install(signals.handle(), Duration::from_millis(args.grace_ms));
    let options = WorkerOptions {
        coordinator: args.coordinator,
        token,
        tls,
        device: args.device,
        host: args
            .host
            .unwrap_or_else(swiftbrush_worker::torch::device::host_name),
        ring_listen: args.ring_listen,
        health_listen: args.health_listen,
        caption_audit: args.caption_audit,
        micro_batch: args.micro_batch,
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        // Not told how many workers share this host: the world says.
        world_threads: plan.shares_with_world(),
    };
    let summary = distributed::run_worker(options)?;
    let trained = summary.train.as_ref().map_or_else(
        || "trained nothing".to_owned(),
        |t| {
            format!(
                "trained steps {}..{} in {:.1}s",
                t.start_step, t.end_step, t.seconds
            )
        },
    );
    let id = summary.worker_id;
    let worlds = match summary.num_worlds {
        1 => "1 world".to_owned(),
        n => format!("{n} worlds"),
    };
    match summary.end {
        WorkerEnd::Completed => {
            println!("worker {id}: the job completed; {trained} in {worlds}")
        }
        WorkerEnd::Preempted { step, committed } => println!(
            "worker {id}: stopped by a signal; {trained}; checkpoint {}",
            match (step, committed) {
                (Some(s), true) => format!("at step {s} committed"),
                (Some(s), false) => format!("at step {s} NOT committed"),
                (None, _) => "not needed (it was not training)".to_owned(),
            }
        ),
        WorkerEnd::JobEnded {
            phase: JobPhase::Cancelled,
            reason,
        } => println!(
            "worker {id}: the job was cancelled ({reason}); {trained}{}",
            not_kept(&reason, summary.train.as_ref())
        ),
        WorkerEnd::JobEnded { phase, reason } => {
            anyhow::bail!("worker {id}: the job ended ({phase:?}): {reason}; {trained}")
        }
    }
    Ok(())
}

/// A cancelled job keeps what its final checkpoint holds. The stop reaches
/// the workers a heartbeat after rank 0 wrote that checkpoint, and they
/// train on meanwhile: the steps past it are said to be lost, so the
/// worker's "trained steps A..B" agrees with `cancel`'s final checkpoint.
/// The step comes from the coordinator's reason ("... (after the final
/// checkpoint at step N)"): only rank 0's trainer knows it otherwise.
fn not_kept(reason: &str, train: Option<&swiftbrush_worker::trainer::run::TrainSummary>) -> String {
    let Some(t) = train else {
        return String::new();
    };
    let at = reason
        .rsplit_once("final checkpoint at step ")
        .and_then(|(_, rest)| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        });
    match at {
        Some(at) if t.end_step > at => format!(
            "; the run keeps the final checkpoint at step {at}: steps {at}..{} were trained \
             before the stop arrived and are not kept",
            t.end_step
        ),
        Some(_) => String::new(),
        None => "; the run keeps what its final checkpoint holds".to_owned(),
    }
}

fn client_tls(args: &WorkerArgs) -> anyhow::Result<Option<ClientTls>> {
    let Some(ca) = &args.tls_ca else {
        return Ok(None);
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let identity_pem = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    Ok(Some(ClientTls {
        ca_pem: read(ca)?,
        identity_pem,
        domain: args.tls_domain.clone(),
    }))
}
