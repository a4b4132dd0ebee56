//! The coordinator as its own binary, without libtorch: for CPU nodes that
//! only coordinate. `swiftbrush coordinator` (the main CLI) runs the same
//! `swiftbrush_coordinator::serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use swiftbrush_coordinator::grpc::JobToken;
use swiftbrush_coordinator::{DEFAULT_LISTEN, ServeOptions, TlsOptions};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::rpc::TOKEN_ENV;

#[derive(Debug, Parser)]
#[command(
    name = "swiftbrush-coordinator",
    version,
    about = "Coordinate a distributed SwiftBrush job: worlds, captions, health, checkpoints"
)]
struct Args {
    /// gRPC address. The default serves this machine only; use 0.0.0.0:PORT
    /// (with TLS) to serve a cluster.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// HTTP address for /metrics, /status, /healthz and /readyz (off if unset).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// The run directory: a local path, file://, s3://, gs:// or memory://.
    #[arg(long)]
    store: String,
    /// A job config to start at once (else a job comes through SubmitJob).
    #[arg(long)]
    config: Option<PathBuf>,
    /// File whose first line is the job token. Without it the token comes
    /// from the SWIFTBRUSH_TOKEN environment variable; it is never an argument.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate chain (PEM) ...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ... and this private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Wait this long for more workers before forming a smaller world.
    #[arg(long, default_value_t = 3_000)]
    settle_ms: u64,
    /// Logs as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_json);
    let options = options(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(swiftbrush_coordinator::serve(options))?;
    Ok(())
}

fn options(args: Args) -> anyhow::Result<ServeOptions> {
    let token = JobToken::load(args.token_file.as_deref())
        .with_context(|| format!("the job token (--token-file or {TOKEN_ENV})"))?;
    let mut options = ServeOptions::new(args.store, token);
    options.listen = args.listen;
    options.http_listen = args.http;
    options.core.settle_ms = args.settle_ms;
    if let Some(path) = &args.config {
        options.config = Some(JobConfig::from_yaml_file(path)?);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        options.tls = Some(TlsOptions {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: args.tls_client_ca.as_ref().map(read).transpose()?,
        });
    }
    options.tick = Duration::from_millis(250);
    Ok(options)
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
