//! The run-directory lease: one job at a time writes a run directory.
//!
//! A job (its coordinator) holds the lease while it runs and renews it
//! every third of its time to live; a second job finds it held and is
//! refused, naming the holder. A lease that is not renewed expires (its
//! holder crashed), and then a new job may take it; `take_over` takes it
//! at once. The old holder, if it is still alive, learns at its next
//! renewal that the lease is gone ([`RunStoreError::LeaseLost`]) and stops.
//!
//! # How it is stored: records numbered by a sequence, written by create
//!
//! Every acquisition, renewal and release writes a new record,
//! `lease/<sequence>.json`, numbered one past the newest, with a
//! conditional create ([`PutMode::Create`]): of two writers of the same
//! number exactly one succeeds, on every backend (S3 and GCS with their
//! if-none-match preconditions, local disk with a no-clobber link). The
//! newest record is the lease. A renewal that finds its number taken has
//! lost the lease to whoever took it. After a create succeeds the writer
//! lists the folder once more: a number below the newest (a slot freed by
//! cleanup, reached by a writer with a stale view) is not the lease, and
//! counts as lost. Older records are deleted once a newer one is written;
//! the newest is never deleted (a clean release writes a `released` record
//! rather than deleting), so numbers are never reused and a holder that was
//! taken over cannot come back to life.
//!
//! This needs no conditional *update* (compare-and-swap on an ETag), which
//! local disk lacks in `object_store`; so local disk gets the same
//! guarantees as S3, with no overwrite fallback and no race window.
//!
//! # Time
//!
//! Records carry wall-clock Unix milliseconds: `expires_at_ms` is the
//! writer's clock plus the time to live, compared with the reader's clock.
//! Hosts sharing a run directory need clocks that agree to well within the
//! time to live (NTP does).
//!
//! # A crashed holder on this machine
//!
//! A holder on the same host, boot and pid namespace whose process no
//! longer exists is dead, whatever its expiry says: a `train` that was
//! killed can be run again at once. A holder elsewhere is only known dead
//! when its lease expires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode};
use serde::{Deserialize, Serialize};

use super::error::{Result, RunStoreError};
use super::store::{AsyncRunStore, Ctx};

/// How long a lease lasts without renewal.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

pub(crate) const LEASE_DIR: &str = "lease";
const RECORD_DIGITS: usize = 20;

/// Contention on the lease settles within a few rounds; the bound only
/// guards against a store that keeps answering inconsistently.
const MAX_ROUNDS: usize = 16;

/// Who holds (or held) a run directory's lease: one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseHolder {
    /// Random, unique per acquisition: what tells two holders apart.
    pub holder_id: String,
    pub host: String,
    pub pid: u32,
    /// What holds it (`swiftbrush train`, `swiftbrush coordinator`, ...).
    #[serde(default)]
    pub command: String,
    /// When this holder acquired the lease (Unix ms).
    pub since_ms: u64,
    /// When this record was written (Unix ms).
    pub renewed_ms: u64,
    /// When the lease ends unless renewed (Unix ms, the writer's clock).
    pub expires_at_ms: u64,
    /// How often the holder renews.
    pub renew_every_ms: u64,
    /// Written by a holder that ended cleanly: the lease is free.
    #[serde(default)]
    pub released: bool,
    /// Identify this machine's boot and pid namespace, so that a holder on
    /// the same machine whose process is gone can be known dead.
    #[serde(default)]
    pub boot_id: String,
    #[serde(default)]
    pub pid_namespace: String,
}

impl LeaseHolder {
    /// Whether the lease still keeps others out at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        !self.released && now_ms < self.expires_at_ms && !self.is_dead_process_here()
    }

    /// The holder's process ran on this machine (same host, boot and pid
    /// namespace) and no longer exists.
    pub fn is_dead_process_here(&self) -> bool {
        let here = Identity::current();
        !self.boot_id.is_empty()
            && !self.pid_namespace.is_empty()
            && self.host == here.host
            && self.boot_id == here.boot_id
            && self.pid_namespace == here.pid_namespace
            && process_is_gone(self.pid)
    }
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = now_ms();
        let what = if self.command.is_empty() {
            String::new()
        } else {
            format!("{} ", self.command)
        };
        write!(
            f,
            "{what}on host {}, pid {}, since {}",
            self.host,
            self.pid,
            format_ms(self.since_ms)
        )?;
        if self.released {
            return write!(f, ", released at {}", format_ms(self.renewed_ms));
        }
        let expiry = format_ms(self.expires_at_ms);
        if now < self.expires_at_ms {
            let left = (self.expires_at_ms - now).div_ceil(1000);
            write!(
                f,
                ", lease expires at {expiry} (in {left} s unless renewed, every {} s)",
                self.renew_every_ms.div_ceil(1000)
            )
        } else {
            let ago = (now - self.expires_at_ms) / 1000;
            write!(f, ", lease expired at {expiry} ({ago} s ago)")
        }
    }
}

/// How to acquire a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOptions {
    /// How long the lease lasts without renewal; renewed every third of it.
    pub ttl: Duration,
    /// Take the lease even from a live holder (after a crash whose lease
    /// has not expired yet; the old holder stops at its next renewal).
    pub take_over: bool,
    /// What holds it, for messages (`swiftbrush train`, ...).
    pub command: String,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_LEASE_TTL,
            take_over: false,
            command: String::new(),
        }
    }
}

impl LeaseOptions {
    /// How often a holder renews: a third of the time to live, so two
    /// renewals may fail before it expires.
    pub fn renew_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(1))
    }
}

/// A lease this process holds. Renew it every [`RunLease::renew_every`];
/// release it when the job ends cleanly.
#[derive(Debug)]
pub struct RunLease {
    store: AsyncRunStore,
    /// The number of the newest record this holder wrote.
    seq: u64,
    record: LeaseHolder,
    ttl: Duration,
    /// Set once the lease is found lost: every later renewal says so again.
    lost: Option<Box<LeaseHolder>>,
}

impl RunLease {
    pub fn holder(&self) -> &LeaseHolder {
        &self.record
    }

    pub fn renew_every(&self) -> Duration {
        Duration::from_millis(self.record.renew_every_ms.max(1))
    }

    /// The holder that took the lease, once a renewal found it lost.
    pub fn lost_to(&self) -> Option<&LeaseHolder> {
        self.lost.as_deref()
    }

    /// Extends the lease by its time to live: writes the next record. If
    /// another holder wrote it first (a take-over), the lease is lost:
    /// [`RunStoreError::LeaseLost`] naming that holder, now and on every
    /// later call. Other errors (storage unreachable) leave the lease as it
    /// was; the caller tries again at the next renewal.
    pub async fn renew(&mut self) -> Result<()> {
        if let Some(holder) = &self.lost {
            return Err(self.lost_error(holder.as_ref().clone()));
        }
        let store = self.store.clone();
        let ctx = store.ctx();
        let now = now_ms();
        let mut record = self.record.clone();
        record.renewed_ms = now;
        record.expires_at_ms = now.saturating_add(millis(self.ttl));
        let next = self.seq + 1;
        match write_record(ctx, next, &record).await? {
            Written::Ours => {}
            Written::Theirs(other) => return Err(self.lose(*other)),
        }
        if let Some((newest, holder)) = newest(ctx).await?
            && newest > next
        {
            let holder = holder.unwrap_or_else(|| unreadable_holder(newest));
            return Err(self.lose(holder));
        }
        delete_record(ctx, self.seq).await;
        self.seq = next;
        self.record = record;
        Ok(())
    }

    /// Ends the lease cleanly: writes a `released` record (unless someone
    /// took the lease meanwhile) so that the next job gets in at once.
    pub async fn release(mut self) -> Result<()> {
        if self.lost.is_some() {
            return Ok(());
        }
        let store = self.store.clone();
        let ctx = store.ctx();
        let now = now_ms();
        let mut record = self.record.clone();
        record.renewed_ms = now;
        record.expires_at_ms = now;
        record.released = true;
        let next = self.seq + 1;
        match write_record(ctx, next, &record).await? {
            Written::Ours => {
                delete_record(ctx, self.seq).await;
                tracing::info!(run = %ctx.run, "run directory lease released");
            }
            Written::Theirs(other) => {
                let error = self.lose(*other);
                tracing::warn!(run = %ctx.run, error = %error, "the lease was gone at release");
            }
        }
        Ok(())
    }

    fn lose(&mut self, holder: LeaseHolder) -> RunStoreError {
        let error = self.lost_error(holder.clone());
        self.lost = Some(Box::new(holder));
        error
    }

    fn lost_error(&self, holder: LeaseHolder) -> RunStoreError {
        RunStoreError::LeaseLost {
            run: self.store.name().to_owned(),
            holder: Box::new(holder),
        }
    }
}

impl AsyncRunStore {
    /// Acquires the run directory's lease: refused with
    /// [`RunStoreError::LeaseHeld`] (naming the holder) while another job
    /// holds a live one, unless `options.take_over`.
    pub async fn acquire_lease(&self, options: &LeaseOptions) -> Result<RunLease> {
        let ctx = self.ctx();
        let identity = Identity::current();
        let holder_id = random_id();
        for _ in 0..MAX_ROUNDS {
            let now = now_ms();
            let (next, current) = match newest(ctx).await? {
                None => (1, None),
                Some((seq, holder)) => (seq + 1, holder),
            };
            if let Some(current) = &current
                && current.is_live(now)
            {
                if !options.take_over {
                    return Err(RunStoreError::LeaseHeld {
                        run: ctx.run.clone(),
                        holder: Box::new(current.clone()),
                    });
                }
                tracing::warn!(run = %ctx.run, holder = %current, "taking over the run directory's lease");
            } else if let Some(current) = current.as_ref().filter(|c| !c.released) {
                tracing::warn!(run = %ctx.run, holder = %current, "the run directory's previous holder is gone; taking its lease");
            }
            let record = LeaseHolder {
                holder_id: holder_id.clone(),
                host: identity.host.clone(),
                pid: std::process::id(),
                command: options.command.clone(),
                since_ms: now,
                renewed_ms: now,
                expires_at_ms: now.saturating_add(millis(options.ttl)),
                renew_every_ms: millis(options.renew_every()),
                released: false,
                boot_id: identity.boot_id.clone(),
                pid_namespace: identity.pid_namespace.clone(),
            };
            if let Written::Theirs(_) = write_record(ctx, next, &record).await? {
                continue;
            }
            // A slot below the newest (freed by cleanup) is not the lease.
            let newest_now = newest(ctx).await?.map_or(0, |(seq, _)| seq);
            if newest_now > next {
                continue;
            }
            for stale in list_records(ctx).await? {
                if stale < next {
                    delete_record(ctx, stale).await;
                }
            }
            tracing::info!(run = %ctx.run, holder = %record, "run directory lease acquired");
            return Ok(RunLease {
                store: self.clone(),
                seq: next,
                record,
                ttl: options.ttl,
                lost: None,
            });
        }
        Err(ctx.err("acquire", &Path::from(LEASE_DIR))(
            object_store::Error::Generic {
                store: "run_store",
                source: format!("gave up after {MAX_ROUNDS} conflicting lease writes").into(),
            },
        ))
    }

    /// The newest lease record (live, expired or released), if any.
    pub async fn lease_holder(&self) -> Result<Option<LeaseHolder>> {
        Ok(newest(self.ctx()).await?.and_then(|(_, holder)| holder))
    }
}

enum Written {
    Ours,
    /// The number was taken by this record (another holder's).
    Theirs(Box<LeaseHolder>),
}

fn record_path(seq: u64) -> Path {
    Path::from_iter([LEASE_DIR.to_owned(), format!("{seq:0RECORD_DIGITS$}.json")])
}

fn parse_record_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".json")?;
    if digits.len() != RECORD_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Creates record `seq`. If it exists already, says whose it is: a retried
/// create whose first try landed reads back as ours.
async fn write_record(ctx: &Ctx, seq: u64, record: &LeaseHolder) -> Result<Written> {
    let path = record_path(seq);
    // Plain strings and integers: serialising cannot fail.
    let body = Bytes::from(serde_json::to_vec_pretty(record).expect("LeaseHolder serialises"));
    match ctx.put_mode(&path, body, PutMode::Create).await {
        Ok(_) => Ok(Written::Ours),
        // GCS reports a lost create as a failed precondition.
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => {
            let theirs = read_record(ctx, seq)
                .await?
                .unwrap_or_else(|| unreadable_holder(seq));
            if theirs.holder_id == record.holder_id && theirs.renewed_ms == record.renewed_ms {
                Ok(Written::Ours)
            } else {
                Ok(Written::Theirs(Box::new(theirs)))
            }
        }
        Err(e) => Err(ctx.err("write lease", &path)(e)),
    }
}

/// Record `seq`; `None` if it is gone or unreadable.
async fn read_record(ctx: &Ctx, seq: u64) -> Result<Option<LeaseHolder>> {
    let path = record_path(seq);
    let Some(bytes) = ctx.get_bytes(&path).await? else {
        return Ok(None);
    };
    match serde_json::from_slice(&bytes) {
        Ok(holder) => Ok(Some(holder)),
        Err(e) => {
            tracing::warn!(run = %ctx.run, lease = %path, error = %e, "unreadable lease record; treated as expired");
            Ok(None)
        }
    }
}

async fn list_records(ctx: &Ctx) -> Result<Vec<u64>> {
    let objects = ctx.list(&Path::from(LEASE_DIR)).await?;
    let mut seqs: Vec<u64> = objects
        .iter()
        .filter_map(|meta| meta.location.filename().and_then(parse_record_name))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// The newest record's number and contents (`None` contents: unreadable,
/// or deleted between the listing and the read).
async fn newest(ctx: &Ctx) -> Result<Option<(u64, Option<LeaseHolder>)>> {
    let Some(&seq) = list_records(ctx).await?.last() else {
        return Ok(None);
    };
    Ok(Some((seq, read_record(ctx, seq).await?)))
}

/// Cleanup of a record below the newest: failure only leaves a file behind.
async fn delete_record(ctx: &Ctx, seq: u64) {
    let path = record_path(seq);
    match ctx.store.delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => {
            tracing::debug!(run = %ctx.run, lease = %path, error = %e, "cannot delete an old lease record")
        }
    }
}

/// What a message says of a record it cannot read.
fn unreadable_holder(seq: u64) -> LeaseHolder {
    LeaseHolder {
        holder_id: String::new(),
        host: format!("unknown (unreadable {})", record_path(seq)),
        pid: 0,
        command: String::new(),
        since_ms: 0,
        renewed_ms: 0,
        expires_at_ms: 0,
        renew_every_ms: 0,
        released: false,
        boot_id: String::new(),
        pid_namespace: String::new(),
    }
}

/// This process's machine, as lease records name it.
struct Identity {
    host: String,
    boot_id: String,
    pid_namespace: String,
}

impl Identity {
    fn current() -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let mut host = read("/proc/sys/kernel/hostname");
        if host.is_empty() {
            host = std::env::var("HOSTNAME").unwrap_or_default();
        }
        if host.is_empty() {
            host = "unknown-host".to_owned();
        }
        let pid_namespace = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Self {
            host,
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            pid_namespace,
        }
    }
}

/// Only ever true where /proc says so (Linux); elsewhere a holder is
/// assumed alive until its lease expires.
fn process_is_gone(pid: u32) -> bool {
    std::path::Path::new("/proc/self").exists()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let half = |salt: u64| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(salt);
        hasher.write_u32(std::process::id());
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        hasher.finish()
    };
    format!("{:016x}{:016x}", half(1), half(2))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn format_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || format!("{ms} ms"),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_round_trip_and_reject_others() {
        let path = record_path(42);
        assert_eq!(path.to_string(), "lease/00000000000000000042.json");
        assert_eq!(parse_record_name("00000000000000000042.json"), Some(42));
        for bad in [
            "42.json",
            "0000000000000000004x.json",
            "00000000000000000042",
        ] {
            assert_eq!(parse_record_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_holder_message_names_host_pid_and_times() {
        let now = now_ms();
        let holder = LeaseHolder {
            command: "swiftbrush train".to_owned(),
            host: "gpu-7".to_owned(),
            pid: 4242,
            since_ms: now - 5_000,
            expires_at_ms: now + 20_000,
            renew_every_ms: 10_000,
            ..unreadable_holder(1)
        };
        let text = holder.to_string();
        for part in [
            "swiftbrush train on host gpu-7",
            "pid 4242",
            "since ",
            "lease expires at",
            "in 20 s",
        ] {
            assert!(text.contains(part), "{text:?} lacks {part:?}");
        }
        assert!(holder.is_live(now));
        assert!(!holder.is_live(now + 20_000));
    }
}
