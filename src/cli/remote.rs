//! What the operator commands (launch, status, cancel) share: the flags
//! that reach a coordinator (address, job token, TLS), the connection, and
//! turning a refused call into a sentence that says what to fix.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use swiftbrush_proto::rpc::{self, ClientTls, CoordinatorConnection, TOKEN_ENV};
use tonic::Code;

/// The environment variable that may hold the coordinator's address.
pub const COORDINATOR_ENV: &str = "SWIFTBRUSH_COORDINATOR";

#[derive(Debug, clap::Args)]
pub struct RemoteArgs {
    /// The coordinator's gRPC address: http://HOST:PORT, or https://HOST:PORT
    /// with --tls-ca. A bare HOST:PORT means http://.
    #[arg(long, env = COORDINATOR_ENV)]
    coordinator: String,
    /// File whose first line is the job token. Without it the token comes
    /// from the SWIFTBRUSH_TOKEN environment variable (never an argument:
    /// arguments show up in `ps`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The CA that signed the coordinator's certificate (PEM): TLS.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// A client certificate (PEM), when the coordinator requires one ...
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// ... and its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name to check the coordinator's certificate against (default:
    /// the host of the address).
    #[arg(long, requires = "tls_ca")]
    tls_domain: Option<String>,
    /// How long to keep trying while nothing answers at the address (a
    /// coordinator started a moment ago with `&`); 0: try once.
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
}

impl RemoteArgs {
    /// The address as given, with `http://` added when it has no scheme.
    pub fn address(&self) -> String {
        if self.coordinator.contains("://") {
            self.coordinator.clone()
        } else {
            format!("http://{}", self.coordinator)
        }
    }

    pub async fn connect(&self) -> anyhow::Result<CoordinatorConnection> {
        let address = self.address();
        let token = rpc::read_job_token(self.token_file.as_deref())?;
        let tls = self.tls()?;
        if address.starts_with("https://") != tls.is_some() {
            bail!(
                "{address}: an https:// address needs --tls-ca (the CA of the coordinator's \
                 certificate), and --tls-ca needs an https:// address"
            );
        }
        let deadline = Instant::now() + Duration::from_millis(self.connect_timeout_ms);
        let mut pause = Duration::from_millis(50);
        loop {
            match rpc::connect(&address, &token, tls.clone()).await {
                Ok(connection) => return Ok(connection),
                // Nothing answers yet: a coordinator still starting.
                Err(rpc::ConnectError::Transport { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(pause.min(deadline - Instant::now())).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                // tonic nests the same words several levels deep; the root
                // cause ("Connection refused") is what the operator needs.
                Err(e @ rpc::ConnectError::Transport { .. }) => {
                    bail!(
                        "cannot connect to the coordinator at {address}: {} (tried for {} ms: \
                         is it running? --connect-timeout-ms waits longer)",
                        root_cause(&e),
                        self.connect_timeout_ms
                    )
                }
                Err(other) => return Err(other.into()),
            }
        }
    }

    fn tls(&self) -> anyhow::Result<Option<ClientTls>> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let identity_pem = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((
                read_file("TLS certificate", cert)?,
                read_file("TLS key", key)?,
            )),
            _ => None,
        };
        Ok(Some(ClientTls {
            ca_pem: read_file("TLS CA", ca)?,
            identity_pem,
            domain: self.tls_domain.clone(),
        }))
    }

    /// How this command was given the token, as flags to repeat in a hint:
    /// ` --token-file PATH`, or nothing when it came from the environment.
    pub fn token_flag(&self) -> String {
        self.token_file
            .as_ref()
            .map_or_else(String::new, |p| format!(" --token-file {}", p.display()))
    }

    /// A refused call as a sentence naming the coordinator and what to do.
    pub fn refused(&self, call: &str, status: &tonic::Status) -> anyhow::Error {
        let address = self.address();
        let message = status.message();
        match status.code() {
            Code::Unauthenticated => anyhow::anyhow!(
                "the coordinator at {address} refused the job token ({message}): use the token \
                 it was started with (--token-file PATH or {TOKEN_ENV})"
            ),
            Code::Unavailable | Code::Unknown | Code::Cancelled => {
                anyhow::anyhow!("{call}: cannot reach the coordinator at {address}: {message}")
            }
            code => anyhow::anyhow!(
                "{call} refused by {address} ({}): {message}",
                code_name(code)
            ),
        }
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

fn read_file(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// gRPC's name for a code, as the coordinator's docs spell it.
fn code_name(code: Code) -> String {
    format!("{code:?}")
        .chars()
        .enumerate()
        .fold(String::new(), |mut out, (i, c)| {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
            out
        })
}

/// A small runtime for one command's few calls.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// An enum value's proto name in lower case without its prefix
/// (`JOB_PHASE_RUNNING` -> `running`).
pub fn short_name(proto_name: &str, prefix: &str) -> String {
    proto_name
        .strip_prefix(prefix)
        .unwrap_or(proto_name)
        .to_ascii_lowercase()
}

pub fn job_phase_name(phase: i32) -> String {
    rpc::JobPhase::try_from(phase).map_or_else(
        |_| format!("unknown({phase})"),
        |p| short_name(p.as_str_name(), "JOB_PHASE_"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_match_grpc_spelling() {
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
        assert_eq!(code_name(Code::AlreadyExists), "ALREADY_EXISTS");
        assert_eq!(code_name(Code::Internal), "INTERNAL");
    }

    #[test]
    fn phase_names_are_short() {
        assert_eq!(job_phase_name(rpc::JobPhase::Running as i32), "running");
        assert_eq!(job_phase_name(99), "unknown(99)");
    }
}
