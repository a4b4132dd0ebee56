//! One coordinator server: the gRPC service (token-checked, size-limited,
//! optionally TLS with client certificates) with the standard health
//! service, the HTTP side, and the ticker that lets time pass in the core.
//! `serve` runs until SIGTERM or ctrl-c; `start` returns a handle (tests,
//! the CLI) that shuts everything down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::rpc::coordinator_server::CoordinatorServer;
use swiftbrush_proto::rpc::{MAX_REPLY_BYTES, MAX_REQUEST_BYTES};
use swiftbrush_proto::run_store::{AsyncRunStore, LeaseOptions, RunStoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::app::{AppError, Clock, Coordinator, TokioClock};
use crate::domain::CoreOptions;
use crate::grpc::{CoordinatorService, JobToken};

/// The gRPC address when none is given: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// TLS for the gRPC side, as PEM.
#[derive(Clone)]
pub struct TlsOptions {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("client_certificates", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// The HTTP side (the status page /, /metrics, /status, /history,
    /// /healthz, /readyz); none if unset.
    pub http_listen: Option<SocketAddr>,
    /// The run directory (local path, file://, s3://, gs://, memory://).
    pub store_url: String,
    /// Submitted at start; without it, a job comes through SubmitJob.
    pub config: Option<JobConfig>,
    pub token: JobToken,
    pub tls: Option<TlsOptions>,
    pub core: CoreOptions,
    /// How often time passes in the core (timeouts are checked this often).
    pub tick: Duration,
    /// The run directory's lease: its time to live, and whether to take it
    /// from a live holder (`--take-over`).
    pub lease: LeaseOptions,
}

impl ServeOptions {
    pub fn new(store_url: impl Into<String>, token: JobToken) -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 50051))),
            http_listen: None,
            store_url: store_url.into(),
            config: None,
            token,
            tls: None,
            core: CoreOptions::default(),
            tick: Duration::from_millis(250),
            lease: LeaseOptions {
                command: "swiftbrush coordinator".to_owned(),
                ..LeaseOptions::default()
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] RunStoreError),
    #[error("cannot start the job: {0}")]
    Job(#[from] AppError),
    #[error("TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("the gRPC server failed: {0}")]
    Grpc(#[source] tonic::transport::Error),
    #[error("the HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    /// Another job took the run directory (`--take-over`): this one stops.
    #[error("{0}")]
    LeaseLost(String),
    #[error("a server task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A running coordinator.
#[derive(Debug)]
pub struct RunningCoordinator {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub app: Coordinator,
    stop: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
    ticker: JoinHandle<()>,
    lease_keeper: JoinHandle<()>,
}

impl RunningCoordinator {
    /// Stops accepting, answers waiting calls, drains connections.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.app.begin_shutdown();
        let _ = self.stop.send(true);
        self.ticker.await?;
        self.lease_keeper.await?;
        let grpc = self.grpc.await?.map_err(ServeError::Grpc);
        let http = match self.http {
            Some(http) => http.await?.map_err(ServeError::Http),
            None => Ok(()),
        };
        // Last, once nothing serves: the next job may start at once.
        self.app.release_lease().await;
        grpc?;
        http?;
        tracing::info!("coordinator stopped");
        Ok(())
    }
}

/// After losing the lease, how long the coordinator goes on answering so
/// that its workers hear at their heartbeat that the job has failed.
const LOST_LEASE_DRAIN: Duration = Duration::from_secs(10);

/// Runs a coordinator until SIGTERM or ctrl-c, then shuts down gracefully.
pub async fn serve(options: ServeOptions) -> Result<(), ServeError> {
    // Listening for the signals before anything is served: a SIGTERM that
    // comes right after "coordinator listening" (an orchestrator changing
    // its mind) must stop the coordinator gracefully, not kill it.
    let signals = ShutdownSignal::install();
    let running = start(options).await?;
    let app = running.app.clone();
    let lost = tokio::select! {
        () = signals.recv() => None,
        lost = app.lease_lost_wait() => Some(lost),
    };
    if let Some(lost) = lost {
        // The job has failed; its workers learn so at their next heartbeat.
        tracing::error!("{lost}; stopping once the workers have left");
        let deadline = tokio::time::Instant::now() + LOST_LEASE_DRAIN;
        while tokio::time::Instant::now() < deadline && has_live_workers(&app) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.shutdown().await?;
        return Err(ServeError::LeaseLost(lost));
    }
    tracing::info!("shutting down");
    running.shutdown().await
}

/// Binds, submits the configured job, and serves in the background.
pub async fn start(options: ServeOptions) -> Result<RunningCoordinator, ServeError> {
    start_with_clock(options, Arc::new(TokioClock::new())).await
}

/// [`start`] with another clock (tests move a manual one).
pub async fn start_with_clock(
    mut options: ServeOptions,
    clock: Arc<dyn Clock>,
) -> Result<RunningCoordinator, ServeError> {
    if options.core.worker_id_base == 0 {
        options.core.worker_id_base = instance_id_base();
    }
    let store = AsyncRunStore::open(&options.store_url)?;
    // Before anything else touches the run directory: one job at a time.
    let lease = store.acquire_lease(&options.lease).await?;
    let app = Coordinator::new(options.core.clone(), store, clock);
    app.hold_lease(lease).await;
    if let Err(e) = submit_at_start(&app, options.config.take()).await {
        app.release_lease().await;
        return Err(e);
    }
    let (stop, stopped) = watch::channel(false);
    let signal = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };

    let listener = bind(options.listen).await?;
    let grpc_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: options.listen,
        source,
    })?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let service = CoordinatorServer::new(CoordinatorService::new(app.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REPLY_BYTES);
    let service = InterceptedService::new(service, options.token.clone().interceptor());
    let mut builder = Server::builder();
    if let Some(tls) = &options.tls {
        swiftbrush_proto::rpc::install_crypto_provider();
        builder = builder
            .tls_config(tls_config(tls))
            .map_err(ServeError::Tls)?;
    }
    let router = builder.add_service(health_service).add_service(service);
    let stopping = signal();
    let grpc_signal = async move {
        stopping.await;
        // Probes see the coordinator going before connections drain.
        health
            .set_not_serving::<CoordinatorServer<CoordinatorService>>()
            .await;
    };
    let grpc = tokio::spawn(async move {
        router
            // TCP_NODELAY: a reply is one small frame; with Nagle it waits
            // for the client's delayed ACK, ~40 ms on a quiet connection.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                grpc_signal,
            )
            .await
    });

    let (http, http_addr) = match options.http_listen {
        Some(addr) => {
            let listener = bind(addr).await?;
            let http_addr = listener
                .local_addr()
                .map_err(|source| ServeError::Bind { addr, source })?;
            let router = crate::http::router(app.clone());
            let http_signal = signal();
            let task = tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(http_signal)
                    .await
            });
            (Some(task), Some(http_addr))
        }
        None => (None, None),
    };
    let ticker = tokio::spawn(app.clone().run_ticker(options.tick, signal()));
    let lease_keeper = tokio::spawn(keep_lease(app.clone(), signal()));
    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        store = %app.store().name(),
        tls = options.tls.is_some(),
        "coordinator listening"
    );
    Ok(RunningCoordinator {
        grpc_addr,
        http_addr,
        app,
        stop,
        grpc,
        http,
        ticker,
        lease_keeper,
    })
}

fn has_live_workers(app: &Coordinator) -> bool {
    app.status()
        .workers
        .iter()
        .any(|w| w.health != crate::domain::Health::Dead)
}

async fn submit_at_start(app: &Coordinator, config: Option<JobConfig>) -> Result<(), ServeError> {
    if let Some(config) = config {
        app.submit_config(config).await?;
    }
    Ok(())
}

/// Renews the lease every third of its time to live until shutdown, or
/// until a renewal finds it lost (the job has failed then).
async fn keep_lease(app: Coordinator, shutdown: impl std::future::Future<Output = ()>) {
    let Some(every) = app.lease_renew_every().await else {
        return;
    };
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: the lease was just acquired.
    interval.tick().await;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = interval.tick() => {
                if app.renew_lease().await.is_err() && app.lease_lost().is_some() {
                    return;
                }
            }
        }
    }
}

fn tls_config(tls: &TlsOptions) -> ServerTlsConfig {
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
    if let Some(ca) = &tls.client_ca_pem {
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    config
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// High 32 bits for this instance's worker ids: workers of a previous
/// coordinator process cannot be mistaken for this one's.
fn instance_id_base() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let digest = Sha256::digest(format!("{nanos}:{}", std::process::id()));
    let high = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]).max(1);
    u64::from(high) << 32
}

/// SIGTERM (how Kubernetes and Slurm stop a process) or ctrl-c (SIGINT),
/// listened for from the moment it is installed (tokio's `ctrl_c()`
/// registers only when first polled).
pub struct ShutdownSignal {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    /// Registers the handlers now (inside a tokio runtime).
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for {name}");
                    None
                }
            };
            Self {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                int: listen(SignalKind::interrupt(), "ctrl-c"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for either signal.
    pub async fn recv(self) {
        #[cfg(unix)]
        {
            async fn next(s: Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = next(self.term) => {}
                _ = next(self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits for SIGTERM or ctrl-c (installed at the first poll; prefer
/// [`ShutdownSignal::install`] before serving).
pub async fn shutdown_signal() {
    ShutdownSignal::install().recv().await;
}
