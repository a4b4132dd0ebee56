//! The run directory's lease as the coordinator keeps it: held from start
//! to shutdown, renewed by a background task and before every commit. Once
//! a renewal finds it taken (another job started with `--take-over`, or
//! took it after this one failed to renew in time), the job fails with
//! that error, nothing more is committed or submitted, and
//! [`Coordinator::lease_lost`] says why (the served coordinator exits).

use std::time::Duration;

use swiftbrush_proto::run_store::{LeaseHolder, RunLease, RunStoreError};

use super::Coordinator;
use super::error::AppError;

impl Coordinator {
    /// Hands the coordinator the lease it acquired for its run directory.
    pub async fn hold_lease(&self, lease: RunLease) {
        *self.inner.lease.lock().await = Some(lease);
    }

    /// How often the held lease wants renewing (None: no lease held).
    pub async fn lease_renew_every(&self) -> Option<Duration> {
        self.inner
            .lease
            .lock()
            .await
            .as_ref()
            .map(RunLease::renew_every)
    }

    /// Renews the lease now. A lost lease fails the job (once) and is an
    /// error here and in every later call; other errors (storage out of
    /// reach) are logged and left for the next renewal.
    pub async fn renew_lease(&self) -> Result<(), AppError> {
        if let Some(error) = self.lease_lost_error() {
            return Err(error.into());
        }
        let mut lease = self.inner.lease.lock().await;
        let Some(held) = lease.as_mut() else {
            return Ok(());
        };
        match held.renew().await {
            Ok(()) => Ok(()),
            Err(RunStoreError::LeaseLost { holder, .. }) => {
                drop(lease);
                self.on_lease_lost(*holder);
                Err(self
                    .lease_lost_error()
                    .map_or_else(|| AppError::Internal("lease lost".into()), AppError::from))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the run directory's lease; trying again");
                Err(e.into())
            }
        }
    }

    /// Lets the next job in at once (clean shutdown). A lease lost or never
    /// held is left alone.
    pub async fn release_lease(&self) {
        let Some(lease) = self.inner.lease.lock().await.take() else {
            return;
        };
        if let Err(e) = lease.release().await {
            tracing::warn!(error = %e, "cannot release the run directory's lease; it expires by itself");
        }
    }

    /// Why this coordinator must stop: another job holds its run directory.
    pub fn lease_lost(&self) -> Option<String> {
        self.lease_lost_error().map(|e| e.to_string())
    }

    /// Resolves once the lease is lost (never, if it is not).
    pub async fn lease_lost_wait(&self) -> String {
        let mut lost = self.inner.lease_lost.subscribe();
        let _ = lost.wait_for(Option::is_some).await;
        self.lease_lost().unwrap_or_default()
    }

    pub(crate) fn lease_lost_error(&self) -> Option<RunStoreError> {
        self.inner
            .lease_lost
            .borrow()
            .as_ref()
            .map(|holder| RunStoreError::LeaseLost {
                run: self.store().name().to_owned(),
                holder: Box::new(holder.clone()),
            })
    }

    fn on_lease_lost(&self, holder: LeaseHolder) {
        let first = self.inner.lease_lost.send_if_modified(|lost| {
            if lost.is_some() {
                return false;
            }
            *lost = Some(holder);
            true
        });
        if first && let Some(message) = self.lease_lost() {
            tracing::error!("{message}");
            self.fail_job(message);
        }
    }

    /// Fails the running job, if any (workers stop at their next heartbeat).
    pub(crate) fn fail_job(&self, reason: String) {
        let _ = self.transition(|s, now| s.fail(reason, now));
    }
}
