//! The coordinator's command line, shared by the libtorch-free
//! `swiftbrush-coordinator` binary and `swiftbrush coordinator`: one flag
//! definition, one way to turn flags into [`ServeOptions`], so the two
//! cannot drift apart (deploy/ launches either).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use swiftbrush_proto::rpc::TOKEN_ENV;
use swiftbrush_proto::run_store::DEFAULT_LEASE_TTL;
use swiftbrush_proto::{ConfigError, JobConfig};

use crate::grpc::{JobToken, TokenError};
use crate::{DEFAULT_LISTEN, ServeError, ServeOptions, TlsOptions};

/// How often time passes in the core of a served coordinator.
const TICK_MS: u64 = 250;

#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// gRPC address. The default serves this machine only; use 0.0.0.0:PORT
    /// (with TLS, or on a private network) to serve a cluster.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// HTTP address for the status page (/), /metrics, /status, /healthz and
    /// /readyz (off if unset).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// The run directory: a local path, file://, s3://, gs:// or memory://.
    #[arg(long)]
    pub store: String,
    /// A job config to start at once (else a job comes through SubmitJob,
    /// e.g. `swiftbrush launch`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// File whose first line is the job token. Without it the token comes
    /// from the SWIFTBRUSH_TOKEN environment variable; it is never an argument.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate chain (PEM) ...
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// ... and this private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Wait this long for more workers before forming a smaller world.
    #[arg(long, default_value_t = 3_000)]
    pub settle_ms: u64,
    /// Most workers registered at once; more are refused (RESOURCE_EXHAUSTED).
    /// A job raises it to twice its world.max_size.
    #[arg(long, default_value_t = 4_096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_workers: u32,
    /// Take the run directory from the job that holds it (after a crash
    /// whose lease has not expired yet). If that job is still running, it
    /// stops at its next lease renewal with an error.
    #[arg(long)]
    pub take_over: bool,
    /// Seconds the run directory's lease lasts unless renewed (it is
    /// renewed every third of that). A crashed job holds its run directory
    /// this long; a slow store may need longer.
    #[arg(long, default_value_t = DEFAULT_LEASE_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_ttl: u64,
    /// Logs as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("the job token (--token-file or {TOKEN_ENV}): {0}")]
    Token(#[from] TokenError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl CoordinatorArgs {
    /// Reads the token, the job config and the TLS files the flags name.
    pub fn into_options(self) -> Result<ServeOptions, CliError> {
        let token = JobToken::load(self.token_file.as_deref())?;
        let mut options = ServeOptions::new(self.store, token);
        options.listen = self.listen;
        options.http_listen = self.http;
        options.core.settle_ms = self.settle_ms;
        options.core.max_workers = self.max_workers as usize;
        options.tick = Duration::from_millis(TICK_MS);
        options.lease.take_over = self.take_over;
        options.lease.ttl = Duration::from_secs(self.lease_ttl);
        if let Some(path) = &self.config {
            options.config = Some(JobConfig::from_yaml_file(path)?);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options.tls = Some(TlsOptions {
                cert_pem: read("TLS certificate", cert)?,
                key_pem: read("TLS key", key)?,
                client_ca_pem: self
                    .tls_client_ca
                    .as_deref()
                    .map(|ca| read("client CA", ca))
                    .transpose()?,
            });
        }
        Ok(options)
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Serves until SIGTERM or ctrl-c on a runtime of its own (the caller sets
/// up logging).
pub fn run(args: CoordinatorArgs) -> Result<(), CliError> {
    let options = args.into_options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(crate::serve(options))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: CoordinatorArgs,
    }

    fn parse(argv: &[&str]) -> Result<CoordinatorArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("coordinator").chain(argv.iter().copied()))
            .map(|w| w.args)
    }

    #[test]
    fn flags_become_options() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "cli-test-token-0123456789\n").unwrap();
        let token = token.display().to_string();
        let args = parse(&[
            "--store",
            "memory://cli/run",
            "--listen",
            "0.0.0.0:7000",
            "--http",
            "0.0.0.0:7001",
            "--token-file",
            &token,
            "--settle-ms",
            "10",
            "--max-workers",
            "7",
        ])
        .unwrap();
        let options = args.into_options().unwrap();
        assert_eq!(options.listen.port(), 7000);
        assert_eq!(options.http_listen.map(|a| a.port()), Some(7001));
        assert_eq!(options.store_url, "memory://cli/run");
        assert_eq!(options.core.settle_ms, 10);
        assert_eq!(options.core.max_workers, 7);
        assert!(options.config.is_none() && options.tls.is_none());
        assert!(!options.lease.take_over);
        assert_eq!(options.lease.ttl, DEFAULT_LEASE_TTL);
    }

    #[test]
    fn tls_flags_come_in_pairs_and_missing_files_are_named() {
        let err = parse(&["--store", "x", "--tls-cert", "c.pem"]).unwrap_err();
        assert!(err.to_string().contains("--tls-key"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "cli-test-token-0123456789\n").unwrap();
        let token = token.display().to_string();
        let missing = dir.path().join("missing-cert.pem").display().to_string();
        let args = parse(&[
            "--store",
            "x",
            "--token-file",
            &token,
            "--tls-cert",
            &missing,
            "--tls-key",
            &missing,
        ])
        .unwrap();
        let err = args.into_options().unwrap_err().to_string();
        assert!(
            err.contains("TLS certificate") && err.contains("missing-cert.pem"),
            "{err}"
        );
    }
}
