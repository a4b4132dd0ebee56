//! The worker's connection to the coordinator, for synchronous callers (the
//! training thread, the heartbeat thread, the upload thread): the generated
//! client from `swiftbrush_proto::rpc::connect` on a small tokio runtime
//! the link owns, every call bounded by a timeout, and each failure
//! classified by what the worker should do about it (docs/PROTOCOL.md,
//! "What a worker does with a status code").

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use swiftbrush_proto::rpc::{self, ClientTls, CoordinatorConnection};
use tonic::Code;

/// How long an ordinary call may take before it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot start the worker's I/O runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{0}")]
    Connect(String),
    #[error("{call}: {message} ({code:?})")]
    Status {
        call: &'static str,
        code: Code,
        message: String,
    },
    #[error("{call}: no answer from the coordinator within {timeout_ms} ms")]
    Timeout { call: &'static str, timeout_ms: u64 },
}

/// What a failed call means for the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// A bug or misconfiguration (wrong token, malformed request): stop.
    Fatal,
    /// The coordinator does not know this worker (declared dead, or it
    /// restarted): register again.
    Reregister,
    /// The request's generation is not current: the world is gone.
    Stale,
    /// Try again later (coordinator busy, unreachable, restarting).
    Retry,
    /// What the call wanted is already done (a checkpoint that exists).
    AlreadyDone,
}

impl RpcError {
    pub fn reaction(&self) -> Reaction {
        let code = match self {
            Self::Runtime(_) => return Reaction::Fatal,
            Self::Connect(_) | Self::Timeout { .. } => return Reaction::Retry,
            Self::Status { code, .. } => *code,
        };
        match code {
            Code::Unauthenticated
            | Code::InvalidArgument
            | Code::PermissionDenied
            | Code::OutOfRange
            | Code::Unimplemented => Reaction::Fatal,
            Code::NotFound => Reaction::Reregister,
            Code::FailedPrecondition => Reaction::Stale,
            Code::AlreadyExists => Reaction::AlreadyDone,
            _ => Reaction::Retry,
        }
    }

    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A connection to the coordinator. Cheap to clone; clones share the
/// runtime and the HTTP/2 connection, and may call from any thread (never
/// from inside a tokio runtime).
#[derive(Clone)]
pub struct CoordinatorLink {
    runtime: Arc<tokio::runtime::Runtime>,
    conn: CoordinatorConnection,
    address: String,
}

impl std::fmt::Debug for CoordinatorLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorLink")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl CoordinatorLink {
    /// Connects to `address` (`http://host:port`, or `https://` with `tls`),
    /// retrying until `patience` has passed: workers may start before the
    /// coordinator does.
    pub fn connect(
        address: &str,
        token: &str,
        tls: Option<ClientTls>,
        patience: Duration,
    ) -> Result<Self, RpcError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("worker-io")
            .enable_all()
            .build()
            .map_err(RpcError::Runtime)?;
        let deadline = Instant::now() + patience;
        let mut backoff = Backoff::new();
        let conn = loop {
            match runtime.block_on(rpc::connect(address, token, tls.clone())) {
                Ok(conn) => break conn,
                // A token that cannot travel in a header never will.
                Err(e @ rpc::ConnectError::Token(_)) => {
                    return Err(RpcError::Connect(e.to_string()));
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(RpcError::Connect(e.to_string()));
                }
                Err(e) => {
                    tracing::info!(error = %e, "coordinator not reachable yet; retrying");
                    std::thread::sleep(backoff.next_delay());
                }
            }
        };
        Ok(Self {
            runtime: Arc::new(runtime),
            conn,
            address: address.to_owned(),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The runtime the link's calls run on (the health server and signal
    /// handlers live there too).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// Runs one call to completion, bounded by `timeout`.
    pub fn call<T, F, Fut>(
        &self,
        name: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, RpcError>
    where
        F: FnOnce(CoordinatorConnection) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.runtime
            .block_on(timed(name, timeout, f(self.conn.clone())))
    }

    /// One call, for code already running on the link's runtime (the
    /// caption prefetch task).
    pub async fn call_async<T, F, Fut>(
        &self,
        name: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, RpcError>
    where
        F: FnOnce(CoordinatorConnection) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        timed(name, timeout, f(self.conn.clone())).await
    }

    /// Waits for a task started on [`CoordinatorLink::runtime`].
    pub fn join<T>(
        &self,
        name: &'static str,
        handle: tokio::task::JoinHandle<Result<T, RpcError>>,
    ) -> Result<T, RpcError> {
        match self.runtime.block_on(handle) {
            Ok(result) => result,
            Err(e) => Err(RpcError::Status {
                call: name,
                code: Code::Internal,
                message: format!("the call's task ended: {e}"),
            }),
        }
    }
}

async fn timed<T>(
    name: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, RpcError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(RpcError::Status {
            call: name,
            code: status.code(),
            message: status.message().to_owned(),
        }),
        Err(_) => Err(RpcError::Timeout {
            call: name,
            timeout_ms: timeout.as_millis() as u64,
        }),
    }
}

/// Retry delays: 100 ms doubling to 2 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(2));
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code) -> RpcError {
        RpcError::Status {
            call: "Test",
            code,
            message: String::new(),
        }
    }

    #[test]
    fn status_codes_map_to_what_the_protocol_says() {
        assert_eq!(status(Code::Unauthenticated).reaction(), Reaction::Fatal);
        assert_eq!(status(Code::OutOfRange).reaction(), Reaction::Fatal);
        assert_eq!(status(Code::NotFound).reaction(), Reaction::Reregister);
        assert_eq!(status(Code::FailedPrecondition).reaction(), Reaction::Stale);
        assert_eq!(status(Code::Aborted).reaction(), Reaction::Retry);
        assert_eq!(status(Code::Unavailable).reaction(), Reaction::Retry);
        assert_eq!(
            status(Code::AlreadyExists).reaction(),
            Reaction::AlreadyDone
        );
        let timeout = RpcError::Timeout {
            call: "Heartbeat",
            timeout_ms: 5,
        };
        assert_eq!(timeout.reaction(), Reaction::Retry);
        assert!(timeout.to_string().contains("Heartbeat"));
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::new();
        let delays: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1600, 2000, 2000]);
    }
}
