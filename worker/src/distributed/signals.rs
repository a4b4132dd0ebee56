//! Preemption: SIGTERM (how Kubernetes and Slurm stop a process) or ctrl-c
//! asks every worker of this process to stop at its next step boundary,
//! after a checkpoint there (the step vote tells all ranks of the world, so
//! rank 0 writes it wherever the signal arrived). If that takes longer than
//! the grace period, the process exits anyway.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static PREEMPT: AtomicBool = AtomicBool::new(false);
static INSTALLED: OnceLock<()> = OnceLock::new();

/// Exit status when the grace period runs out before a clean exit.
pub const GRACE_EXPIRED_EXIT: i32 = 143;

pub fn preempt_requested() -> bool {
    PREEMPT.load(Ordering::SeqCst)
}

/// Asks this process's workers to stop (what the signals do).
pub fn request_preemption() {
    PREEMPT.store(true, Ordering::SeqCst);
}

/// Listens for SIGTERM and ctrl-c on `runtime` (once per process; later
/// calls do nothing; the runtime must outlive the workers). The first
/// signal requests preemption and starts the grace timer; a second one
/// exits at once.
pub fn install(runtime: &tokio::runtime::Handle, grace: Duration) {
    if INSTALLED.set(()).is_err() {
        return;
    }
    runtime.spawn(async move {
        #[cfg(unix)]
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    None
                }
            };
        let mut signals = 0u32;
        loop {
            #[cfg(unix)]
            let sigterm = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let sigterm = std::future::pending::<()>();
            let interrupt = async {
                // Without ctrl-c support, SIGTERM still works.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = interrupt => {}
                _ = sigterm => {}
            }
            signals += 1;
            if signals > 1 {
                tracing::error!("second signal: exiting without waiting for a checkpoint");
                std::process::exit(GRACE_EXPIRED_EXIT);
            }
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "stop requested: checkpointing at the next step boundary"
            );
            request_preemption();
            std::thread::spawn(move || {
                std::thread::sleep(grace);
                tracing::error!(
                    grace_ms = grace.as_millis() as u64,
                    "the grace period ran out before the checkpoint; exiting"
                );
                std::process::exit(GRACE_EXPIRED_EXIT);
            });
        }
    });
}
