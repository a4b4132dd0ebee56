//! NCCL for CUDA ranks: [`NcclComm`] implements the trainer's `GradientSync`.
//!
//! The whole API a worker process needs:
//!
//! - [`NcclComm::unique_id`] (rank 0 only, before `new`): NCCL's 128-byte
//!   unique id, the bootstrap blob the coordinator relays (rank 0
//!   PublishBootstrap, the others FetchBootstrap; docs/PROTOCOL.md). It
//!   holds the address of a bootstrap listener inside the calling process,
//!   so that process must live until every rank has joined.
//! - [`NcclComm::new`]`(device, rank, world_size, &id, NcclOptions)` on every
//!   rank at about the same time: returns once the world is connected, or
//!   fails after `options.timeout` (a rank that never joins), with the
//!   communicator aborted.
//! - `GradientSync::all_reduce_mean` / `all_ok`, from the training thread.
//! - [`NcclComm::abort_handle`]: a `Send + Sync + Clone` handle whose
//!   `abort()` may be called from any thread (the heartbeat thread, on
//!   AbortAndReform); a collective waiting on a dead peer then returns an
//!   error on the training thread, and the worker forms a new world with a
//!   new id. Dropping the `NcclComm` aborts as well.
//!
//! How it works. Gradients are packed per dtype into ~25 MB buckets
//! (buckets.rs) and each bucket is all-reduced in place with `ncclAvg` (the
//! mean in one pass: sum and division by the world size). The buckets go to
//! NCCL in groups of up to 1 GiB (`NcclOptions::group_bytes`), each one
//! `ncclGroupStart` / `ncclGroupEnd` waited for once, not one call and one
//! wait per bucket (issue 30, item 5). Collectives are
//! queued on libtorch's current CUDA stream (collective/cuda.rs, through the
//! C++ shim), the stream the backward pass ran on and the optimizer will run
//! on, so they need no device synchronisation to be ordered. The
//! communicator is nonblocking (`blocking = 0`): no NCCL call waits on
//! peers; instead each method polls until its work is done on the GPU,
//! watching NCCL's asynchronous error state, the abort flag and the
//! deadline, and aborts the communicator on error or timeout. Each method
//! therefore returns with its collective finished, so a dead peer shows up
//! here as an error rather than as a hang in a later libtorch call.
//!
//! Without CUDA or NCCL every constructor returns an error naming what is
//! missing (collective/nccl_lib.rs finds the library); nothing panics.
//! Nothing in this file has run on a GPU yet: worker/tests/nccl.rs holds the
//! GPU tests, which skip (and say so) without one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::buckets::{self, DEFAULT_BUCKET_BYTES, DEFAULT_GROUP_BYTES};
use super::cuda::{self, RawStream};
use super::nccl_lib::{
    self, Config, LoadError, NCCL_AVG, NCCL_BFLOAT16, NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64,
    NCCL_IN_PROGRESS, NCCL_INT32, NCCL_MIN, NCCL_SUCCESS, NCCL_SUM, NcclLib, NcclResult, RawComm,
    UNIQUE_ID_BYTES, UniqueId,
};
use crate::trainer::gradient_sync::{GradientSync, SyncError};

#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(
        "the NCCL backend needs a CUDA device and this rank is on {device}; CPU ranks use \
         world.backend: tcp"
    )]
    NotCuda { device: String },
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("rank {rank} is outside a world of {world_size} (world sizes 1..=2^31-1)")]
    BadRank { rank: u64, world_size: u64 },
    #[error(
        "the NCCL unique id must be {UNIQUE_ID_BYTES} bytes, got {got}: the bootstrap blob \
         is not an NCCL id (another backend's, or damaged in transit)"
    )]
    BadUniqueId { got: usize },
    #[error("gradient {index} is on {found}, the communicator on cuda:{expected}")]
    WrongDevice {
        index: usize,
        found: String,
        expected: usize,
    },
    #[error(
        "gradient {index} has dtype {kind:?}; NCCL reduces float32, float16, bfloat16 and \
         float64 gradients here"
    )]
    UnsupportedKind { index: usize, kind: Kind },
    #[error("{call} failed: {message}; the communicator was aborted")]
    Call { call: &'static str, message: String },
    #[error(
        "{what} did not finish within {timeout_ms} ms (a rank is missing, dead or stalled); \
         the communicator was aborted"
    )]
    Timeout {
        what: &'static str,
        timeout_ms: u128,
    },
    #[error("the NCCL communicator was aborted ({what} cannot run); form a new world")]
    Aborted { what: &'static str },
    #[error(
        "NCCL_COMM_BLOCKING={value} is set: swiftbrush makes nonblocking communicators so that \
         the heartbeat thread can abort one when a peer dies, and in blocking mode \
         ncclAllReduce holds the lock the abort needs (a dead peer would hang the job); unset \
         NCCL_COMM_BLOCKING"
    )]
    BlockingRequested { value: String },
}

/// Refuses an environment that makes NCCL calls block (issue 30, item 9):
/// NCCL_COMM_BLOCKING overrides the communicator's nonblocking config.
pub fn check_environment(var: impl Fn(&str) -> Option<String>) -> Result<(), NcclError> {
    match var("NCCL_COMM_BLOCKING") {
        Some(value) if value.trim() != "0" && !value.trim().is_empty() => {
            Err(NcclError::BlockingRequested { value })
        }
        _ => Ok(()),
    }
}

impl From<NcclError> for SyncError {
    fn from(e: NcclError) -> Self {
        SyncError::Collective(e.to_string())
    }
}

/// Tuning knobs; the defaults are PyTorch DDP's bucket size and
/// ProcessGroupNCCL's timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclOptions {
    /// Bytes of gradients per all-reduce.
    pub bucket_bytes: usize,
    /// Bytes of buckets queued in one NCCL group (one ncclGroupStart /
    /// ncclGroupEnd and one wait; buckets.rs `groups`); it bounds the flat
    /// copies alive at once. 0: one bucket per group.
    pub group_bytes: usize,
    /// How long joining the world, or one method's collectives, may take.
    /// It includes waiting for the slowest rank to arrive, so it must
    /// exceed the spread of the ranks' step times.
    pub timeout: Duration,
}

impl Default for NcclOptions {
    fn default() -> Self {
        Self {
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            group_bytes: DEFAULT_GROUP_BYTES,
            timeout: Duration::from_secs(600),
        }
    }
}

/// A `ncclComm_t` that is handed between threads under the mutex.
struct CommPtr(RawComm);

// SAFETY: NCCL communicators may be used from any thread as long as calls
// are not concurrent; every call goes through `Shared::state`'s mutex.
unsafe impl Send for CommPtr {}

enum State {
    Live(CommPtr),
    Aborted,
}

/// What the communicator and its abort handles share.
struct Shared {
    lib: &'static NcclLib,
    /// The communicator's CUDA device, made current on the aborting thread.
    device: usize,
    abort_requested: AtomicBool,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the live communicator, holding the lock (NCCL calls on one
    /// communicator must not overlap).
    fn with_comm<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(RawComm) -> T,
    ) -> Result<T, NcclError> {
        match &*self.lock() {
            State::Live(c) => Ok(f(c.0)),
            State::Aborted => Err(NcclError::Aborted { what }),
        }
    }

    /// ncclCommAbort, once: frees the communicator and ends its kernels.
    fn abort(&self) {
        let mut state = self.lock();
        if let State::Live(c) = &*state {
            // ncclCommAbort switches to the communicator's device and back
            // to the thread's current one: on a thread that never chose one
            // (the heartbeat's), that is device 0, and switching back
            // creates a CUDA context there (0.3-0.5 GB of GPU 0 per worker
            // at every re-formation). Choose the communicator's first
            // (issue 30, item 2).
            if let Err(e) = cuda::set_device(self.device) {
                tracing::warn!(device = self.device, error = %e, "cannot set the device before ncclCommAbort");
            }
            // SAFETY: a live communicator, not used concurrently (lock held);
            // after this it is never touched again.
            let rc = unsafe { (self.lib.comm_abort)(c.0) };
            if rc != NCCL_SUCCESS {
                tracing::warn!(code = rc, "ncclCommAbort returned an error");
            }
            *state = State::Aborted;
        }
    }

    /// The message for `code`, then abort.
    fn fail(&self, call: &'static str, code: NcclResult) -> NcclError {
        let message = self
            .with_comm(call, |c| self.lib.describe(code, c))
            .unwrap_or_else(|_| self.lib.describe(code, std::ptr::null_mut()));
        self.abort();
        NcclError::Call { call, message }
    }
}

/// Ends a communicator from any thread; see the module docs.
#[derive(Clone)]
pub struct NcclAbortHandle {
    shared: Arc<Shared>,
}

impl NcclAbortHandle {
    /// Aborts the communicator (idempotent). A method running on the
    /// training thread returns `NcclError::Aborted` soon after.
    pub fn abort(&self) {
        self.shared.abort_requested.store(true, Ordering::Release);
        self.shared.abort();
    }
}

/// One rank's NCCL communicator on one CUDA device.
pub struct NcclComm {
    rank: u64,
    world_size: u64,
    device: usize,
    options: NcclOptions,
    shared: Arc<Shared>,
}

/// A communicator created by [`NcclComm::init`] whose join is under way.
/// Dropping it aborts the communicator.
pub struct NcclJoin {
    comm: NcclComm,
    /// What ncclCommInitRankConfig returned.
    rc: NcclResult,
    deadline: Instant,
}

impl NcclJoin {
    /// A handle that can abort the join (and then the communicator) from
    /// another thread.
    pub fn abort_handle(&self) -> NcclAbortHandle {
        self.comm.abort_handle()
    }

    /// Waits until every rank has joined (or an abort, an error, the
    /// timeout: the communicator is then aborted).
    pub fn wait(self) -> Result<NcclComm, NcclError> {
        let comm = self.comm;
        comm.after_call(
            "ncclCommInitRankConfig",
            self.rc,
            "joining the NCCL world",
            self.deadline,
        )?;
        tracing::info!(
            rank = comm.rank,
            world_size = comm.world_size,
            device = comm.device,
            nccl = %nccl_lib::version_string(comm.shared.lib.version),
            "joined the NCCL world"
        );
        Ok(comm)
    }
}

/// Polling intervals while waiting for NCCL or the GPU: short at first (a
/// collective often finishes within microseconds of the call), then capped
/// so an idle wait costs little CPU.
const FIRST_PAUSE: Duration = Duration::from_micros(20);
const MAX_PAUSE: Duration = Duration::from_millis(2);

/// The CUDA runtime's `cudaStreamPerThread` handle (driver_types.h).
const CUDA_STREAM_PER_THREAD: usize = 0x2;

impl NcclComm {
    /// A fresh NCCL unique id (rank 0 only; see the module docs).
    pub fn unique_id() -> Result<Vec<u8>, NcclError> {
        let lib = nccl_lib::library()?;
        let mut id = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: a valid out-pointer.
        let rc = unsafe { (lib.get_unique_id)(&mut id) };
        if rc != NCCL_SUCCESS {
            return Err(NcclError::Call {
                call: "ncclGetUniqueId",
                message: lib.describe(rc, std::ptr::null_mut()),
            });
        }
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// Joins the world as `rank` of `world_size` on `device`, with rank 0's
    /// `unique_id`: [`Self::init`], then [`NcclJoin::wait`].
    pub fn new(
        device: Device,
        rank: u64,
        world_size: u64,
        unique_id: &[u8],
        options: NcclOptions,
    ) -> Result<Self, NcclError> {
        Self::init(device, rank, world_size, unique_id, options)?.wait()
    }

    /// Starts joining the world: creates the (nonblocking) communicator and
    /// returns at once, before the peers are connected. The join's
    /// [`NcclJoin::abort_handle`] can end it from another thread while
    /// [`NcclJoin::wait`] waits (issue 30, item 4: a peer dying during
    /// bootstrap then costs an abort, not `options.timeout`).
    pub fn init(
        device: Device,
        rank: u64,
        world_size: u64,
        unique_id: &[u8],
        options: NcclOptions,
    ) -> Result<NcclJoin, NcclError> {
        let Device::Cuda(index) = device else {
            return Err(NcclError::NotCuda {
                device: format!("{device:?}"),
            });
        };
        let (Ok(nranks), Ok(my_rank)) = (i32::try_from(world_size), i32::try_from(rank)) else {
            return Err(NcclError::BadRank { rank, world_size });
        };
        if rank >= world_size {
            return Err(NcclError::BadRank { rank, world_size });
        }
        let id = unique_id_from(unique_id)?;
        check_environment(|v| std::env::var(v).ok())?;
        let lib = nccl_lib::library()?;
        // NCCL binds the communicator to the calling thread's device.
        cuda::set_device(index).map_err(NcclError::Cuda)?;

        let mut config = Config::nonblocking();
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: valid out-pointers; the id is passed by value as nccl.h
        // declares.
        let rc = unsafe { (lib.comm_init_rank_config)(&mut raw, nranks, id, my_rank, &mut config) };
        if raw.is_null() {
            return Err(NcclError::Call {
                call: "ncclCommInitRankConfig",
                message: lib.describe(rc, raw),
            });
        }
        let comm = Self {
            rank,
            world_size,
            device: index,
            options,
            shared: Arc::new(Shared {
                lib,
                device: index,
                abort_requested: AtomicBool::new(false),
                state: Mutex::new(State::Live(CommPtr(raw))),
            }),
        };
        Ok(NcclJoin {
            comm,
            rc,
            deadline: Instant::now() + options.timeout,
        })
    }

    /// A handle that can abort this communicator from another thread.
    pub fn abort_handle(&self) -> NcclAbortHandle {
        NcclAbortHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The result of an NCCL call: done, still being queued (wait for it),
    /// or failed (abort). A nonblocking call that returns ncclInProgress may
    /// not have put its kernel on the stream yet, so nothing else may be
    /// queued on the stream (the copy back of a bucket) until the state is
    /// ncclSuccess: hence the wait here, before returning.
    fn after_call(
        &self,
        call: &'static str,
        rc: NcclResult,
        what: &'static str,
        deadline: Instant,
    ) -> Result<(), NcclError> {
        match rc {
            NCCL_SUCCESS => Ok(()),
            NCCL_IN_PROGRESS => self.watch(what, deadline, |state| Ok(state == NCCL_SUCCESS)),
            code => Err(self.shared.fail(call, code)),
        }
    }

    /// Polls until `done(nccl state)` is true, while watching for an abort
    /// request, an NCCL error and the deadline. On error or timeout the
    /// communicator is aborted.
    fn watch(
        &self,
        what: &'static str,
        deadline: Instant,
        mut done: impl FnMut(NcclResult) -> Result<bool, NcclError>,
    ) -> Result<(), NcclError> {
        let lib = self.shared.lib;
        let mut pause = FIRST_PAUSE;
        loop {
            if self.shared.abort_requested.load(Ordering::Acquire) {
                self.shared.abort();
                return Err(NcclError::Aborted { what });
            }
            let mut state: NcclResult = NCCL_IN_PROGRESS;
            // SAFETY: a live communicator (checked under the lock) and a
            // valid out-pointer.
            let rc = self.shared.with_comm(what, |c| unsafe {
                (lib.comm_get_async_error)(c, &mut state)
            })?;
            if rc != NCCL_SUCCESS {
                return Err(self.shared.fail("ncclCommGetAsyncError", rc));
            }
            if state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS {
                return Err(self.shared.fail("NCCL (asynchronous error)", state));
            }
            if done(state)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.shared.abort();
                return Err(NcclError::Timeout {
                    what,
                    timeout_ms: self.options.timeout.as_millis(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Until libtorch's current stream (hence every collective queued on it)
    /// has finished.
    fn wait_for_stream(&self, what: &'static str, deadline: Instant) -> Result<(), NcclError> {
        let device = self.device;
        self.watch(what, deadline, |state| {
            if state != NCCL_SUCCESS {
                return Ok(false);
            }
            cuda::current_stream_idle(device).map_err(NcclError::Cuda)
        })
    }

    /// Queues an in-place all-reduce of `t` on `stream`.
    fn all_reduce_in_place(
        &self,
        t: &Tensor,
        op: i32,
        stream: RawStream,
        what: &'static str,
        deadline: Instant,
    ) -> Result<(), NcclError> {
        let dtype = nccl_dtype(t.kind()).ok_or(NcclError::UnsupportedKind {
            index: 0,
            kind: t.kind(),
        })?;
        let ptr = t.data_ptr();
        let count = t.numel();
        let lib = self.shared.lib;
        // SAFETY: `ptr` is `count` elements of `dtype` on this communicator's
        // device, alive until the stream has run the collective: the caller
        // keeps `t` until after it has queued its next use on the same stream.
        let rc = self.shared.with_comm(what, |c| unsafe {
            (lib.all_reduce)(ptr, ptr, count, dtype, op, c, stream.0)
        })?;
        self.after_call("ncclAllReduce", rc, what, deadline)
    }

    /// Queues an in-place all-reduce of every tensor of `bufs` on `stream`
    /// as one NCCL group, and waits once until NCCL has queued the group
    /// (on a nonblocking communicator ncclGroupEnd returns ncclInProgress
    /// while its thread launches the group's kernels).
    fn all_reduce_group(
        &self,
        bufs: &[Tensor],
        op: i32,
        stream: RawStream,
        what: &'static str,
        deadline: Instant,
    ) -> Result<(), NcclError> {
        let calls = bufs
            .iter()
            .map(|t| {
                let dtype = nccl_dtype(t.kind()).ok_or(NcclError::UnsupportedKind {
                    index: 0,
                    kind: t.kind(),
                })?;
                Ok((t.data_ptr(), t.numel(), dtype))
            })
            .collect::<Result<Vec<_>, NcclError>>()?;
        let lib = self.shared.lib;
        let (call, rc) = self.shared.with_comm(what, |c| {
            grouped(
                // SAFETY: NCCL's group calls; the group is this thread's.
                || unsafe { (lib.group_start)() },
                calls.iter().map(|&(ptr, count, dtype)| {
                    // SAFETY: `ptr` is `count` elements of `dtype` on this
                    // communicator's device, alive until the stream has run
                    // the collective: the caller keeps `bufs` until after
                    // it has queued their next use on the same stream.
                    move || unsafe { (lib.all_reduce)(ptr, ptr, count, dtype, op, c, stream.0) }
                }),
                // SAFETY: as for the start.
                || unsafe { (lib.group_end)() },
            )
        })?;
        self.after_call(call, rc, what, deadline)
    }

    /// Checks the gradients and prepares the thread: device and stream.
    fn prepare(&self, grads: &[Tensor]) -> Result<RawStream, NcclError> {
        for (index, g) in grads.iter().enumerate() {
            if g.device() != Device::Cuda(self.device) {
                return Err(NcclError::WrongDevice {
                    index,
                    found: format!("{:?}", g.device()),
                    expected: self.device,
                });
            }
            if nccl_dtype(g.kind()).is_none() || g.kind() == Kind::Int {
                return Err(NcclError::UnsupportedKind {
                    index,
                    kind: g.kind(),
                });
            }
        }
        self.stream()
    }

    /// Makes the communicator's device current and returns libtorch's
    /// current stream on it, the stream every collective is queued on.
    fn stream(&self) -> Result<RawStream, NcclError> {
        cuda::set_device(self.device).map_err(NcclError::Cuda)?;
        let stream = cuda::current_stream(self.device).map_err(NcclError::Cuda)?;
        // A nonblocking communicator launches from its own thread, where
        // cudaStreamPerThread names another stream (NVIDIA/nccl#1976): the
        // collective would run unordered with libtorch's work. libtorch
        // never hands it out unless built for per-thread default streams.
        if stream.0 as usize == CUDA_STREAM_PER_THREAD {
            return Err(NcclError::Cuda(
                "libtorch's current stream is cudaStreamPerThread, which NCCL's nonblocking \
                 communicators do not order with the caller's work"
                    .to_owned(),
            ));
        }
        Ok(stream)
    }

    fn reduce_mean(&self, grads: &[Tensor]) -> Result<(), NcclError> {
        const WHAT: &str = "all-reducing gradients";
        if grads.is_empty() {
            return Ok(());
        }
        let stream = self.prepare(grads)?;
        let deadline = Instant::now() + self.options.timeout;
        let plan = buckets::plan_for(grads, self.options.bucket_bytes);
        buckets::reduce_in_groups(grads, &plan, self.options.group_bytes, |flats| {
            self.all_reduce_group(flats, NCCL_AVG, stream, WHAT, deadline)
        })?;
        self.wait_for_stream(WHAT, deadline)
    }

    /// Equal parts of `numel` elements, `rank`'s: NCCL's reduce-scatter
    /// and all-gather move `ceil(numel / W)` elements per rank (the buffer
    /// is padded with zeros to W of them), so the last parts may be short
    /// or empty.
    fn part(&self, numel: usize, rank: u64) -> std::ops::Range<usize> {
        let per = numel.div_ceil(self.world_size.max(1) as usize);
        let start = (per * rank as usize).min(numel);
        start..(start + per).min(numel)
    }

    /// `flat` padded with zeros to W equal parts (itself when it divides).
    fn padded(&self, flat: &Tensor) -> Tensor {
        let w = self.world_size.max(1) as usize;
        let numel = flat.numel();
        let pad = numel.div_ceil(w) * w - numel;
        let flat = flat.reshape([-1]);
        if pad == 0 && flat.is_contiguous() {
            return flat;
        }
        let zeros = Tensor::zeros([pad as i64], (flat.kind(), flat.device()));
        Tensor::cat(&[flat, zeros], 0)
    }

    /// ncclReduceScatter with ncclAvg: this rank's part of the mean.
    fn reduce_scatter(&self, flat: &Tensor) -> Result<Tensor, NcclError> {
        const WHAT: &str = "reduce-scattering gradients";
        let stream = self.prepare(std::slice::from_ref(flat))?;
        let deadline = Instant::now() + self.options.timeout;
        let send = self.padded(flat);
        let per = send.numel() / self.world_size.max(1) as usize;
        let recv = Tensor::empty([per as i64], (flat.kind(), flat.device()));
        let dtype = nccl_dtype(flat.kind()).ok_or(NcclError::UnsupportedKind {
            index: 0,
            kind: flat.kind(),
        })?;
        let (sp, rp) = (send.data_ptr(), recv.data_ptr());
        let lib = self.shared.lib;
        // SAFETY: `send` holds W * `per` and `recv` `per` elements of
        // `dtype` on this communicator's device, both alive until the
        // stream has run the collective (waited for below).
        let rc = self.shared.with_comm(WHAT, |c| unsafe {
            (lib.reduce_scatter)(sp, rp, per, dtype, NCCL_AVG, c, stream.0)
        })?;
        self.after_call("ncclReduceScatter", rc, WHAT, deadline)?;
        self.wait_for_stream(WHAT, deadline)?;
        let range = self.part(flat.numel(), self.rank);
        Ok(recv.narrow(0, 0, range.len() as i64))
    }

    /// ncclAllGather in place: every rank's part of `flat` to every rank.
    fn all_gather_parts(&self, flat: &Tensor) -> Result<(), NcclError> {
        const WHAT: &str = "all-gathering weights";
        let stream = self.prepare(std::slice::from_ref(flat))?;
        let deadline = Instant::now() + self.options.timeout;
        let buf = self.padded(flat);
        let per = buf.numel() / self.world_size.max(1) as usize;
        let dtype = nccl_dtype(flat.kind()).ok_or(NcclError::UnsupportedKind {
            index: 0,
            kind: flat.kind(),
        })?;
        let elt = flat.kind().elt_size_in_bytes();
        let recv = buf.data_ptr();
        // In place, as NCCL defines it: this rank's part already lies at
        // offset rank * per of the receive buffer.
        let send = (recv as usize + self.rank as usize * per * elt) as *mut std::ffi::c_void;
        let lib = self.shared.lib;
        // SAFETY: `buf` holds W * `per` elements of `dtype` on this
        // communicator's device, alive until the stream has run the
        // collective (waited for below); `send` lies inside it.
        let rc = self.shared.with_comm(WHAT, |c| unsafe {
            (lib.all_gather)(send, recv, per, dtype, c, stream.0)
        })?;
        self.after_call("ncclAllGather", rc, WHAT, deadline)?;
        self.wait_for_stream(WHAT, deadline)?;
        if buf.data_ptr() != flat.data_ptr() {
            let n = flat.numel() as i64;
            tch::no_grad(|| {
                flat.shallow_clone()
                    .copy_(&buf.narrow(0, 0, n).view(flat.size().as_slice()))
            });
        }
        Ok(())
    }

    fn all_ranks_ok(&self, ok: bool) -> Result<bool, NcclError> {
        const WHAT: &str = "the all-ranks-finite vote";
        let stream = self.stream()?;
        let deadline = Instant::now() + self.options.timeout;
        let flag = Tensor::from_slice(&[i32::from(ok)]).to_device(Device::Cuda(self.device));
        self.all_reduce_in_place(&flag, NCCL_MIN, stream, WHAT, deadline)?;
        self.wait_for_stream(WHAT, deadline)?;
        Ok(flag.int64_value(&[0]) != 0)
    }

    /// A few host floats summed over the ranks (the trainer's step vote).
    fn sum_small(&self, values: &mut [f32]) -> Result<(), NcclError> {
        const WHAT: &str = "the step vote";
        if values.is_empty() {
            return Ok(());
        }
        let stream = self.stream()?;
        let deadline = Instant::now() + self.options.timeout;
        let t = Tensor::from_slice(values).to_device(Device::Cuda(self.device));
        self.all_reduce_in_place(&t, NCCL_SUM, stream, WHAT, deadline)?;
        self.wait_for_stream(WHAT, deadline)?;
        let summed = Vec::<f32>::try_from(t.to_device(Device::Cpu))
            .map_err(|e| NcclError::Cuda(format!("copying {WHAT} back to the host: {e}")))?;
        values.copy_from_slice(&summed);
        Ok(())
    }
}

/// Whether this process can run the NCCL backend on `device`: a CUDA device
/// and a libnccl that loads. The reason when not.
pub fn check_available(device: Device) -> Result<(), NcclError> {
    if !device.is_cuda() {
        return Err(NcclError::NotCuda {
            device: format!("{device:?}"),
        });
    }
    check_environment(|v| std::env::var(v).ok())?;
    nccl_lib::library()?;
    Ok(())
}

impl GradientSync for NcclComm {
    fn rank(&self) -> u64 {
        self.rank
    }

    fn world_size(&self) -> u64 {
        self.world_size
    }

    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<(), SyncError> {
        Ok(self.reduce_mean(grads)?)
    }

    fn all_sum(&mut self, values: &mut [f32]) -> Result<(), SyncError> {
        Ok(self.sum_small(values)?)
    }

    fn shard_range(&self, numel: usize, rank: u64) -> std::ops::Range<usize> {
        self.part(numel, rank)
    }

    fn reduce_scatter_mean(&mut self, flat: &Tensor) -> Result<Tensor, SyncError> {
        Ok(self.reduce_scatter(flat)?)
    }

    fn all_gather(&mut self, flat: &Tensor) -> Result<(), SyncError> {
        Ok(self.all_gather_parts(flat)?)
    }

    fn all_ok(&mut self, ok: bool) -> Result<bool, SyncError> {
        Ok(self.all_ranks_ok(ok)?)
    }
}

impl Drop for NcclComm {
    /// Abort rather than finalize: ncclCommFinalize waits for every peer,
    /// and a dropped communicator is often one whose peers are gone.
    fn drop(&mut self) {
        self.shared.abort();
    }
}

/// Runs `calls` between `start` and `end`, NCCL's group bracket. The group
/// is ended whatever happens inside it: the group is the calling thread's
/// state, and one left open would swallow this thread's next NCCL calls
/// (an abort's among them). Returns the call that decides and its result:
/// the first call that failed, else the end's (ncclInProgress on a
/// nonblocking communicator: the group is being queued).
fn grouped<C: FnOnce() -> NcclResult>(
    start: impl FnOnce() -> NcclResult,
    calls: impl IntoIterator<Item = C>,
    end: impl FnOnce() -> NcclResult,
) -> (&'static str, NcclResult) {
    let rc = start();
    if rc != NCCL_SUCCESS {
        return ("ncclGroupStart", rc);
    }
    let mut failed = None;
    for call in calls {
        let rc = call();
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            failed = Some(("ncclAllReduce", rc));
            break;
        }
    }
    let ended = end();
    failed.unwrap_or(("ncclGroupEnd", ended))
}

fn unique_id_from(bytes: &[u8]) -> Result<UniqueId, NcclError> {
    if bytes.len() != UNIQUE_ID_BYTES {
        return Err(NcclError::BadUniqueId { got: bytes.len() });
    }
    let mut id = UniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    for (dst, &src) in id.internal.iter_mut().zip(bytes) {
        *dst = src as std::ffi::c_char;
    }
    Ok(id)
}

/// NCCL's data type for a tensor kind (Int only for the vote's flag).
fn nccl_dtype(kind: Kind) -> Option<i32> {
    match kind {
        Kind::Float => Some(NCCL_FLOAT32),
        Kind::Half => Some(NCCL_FLOAT16),
        Kind::BFloat16 => Some(NCCL_BFLOAT16),
        Kind::Double => Some(NCCL_FLOAT64),
        Kind::Int => Some(NCCL_INT32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocking_nccl_environment_is_refused_naming_the_variable() {
        let set = |value: &'static str| {
            move |v: &str| (v == "NCCL_COMM_BLOCKING").then(|| value.to_owned())
        };
        let e = check_environment(set("1")).unwrap_err().to_string();
        assert!(
            e.contains("NCCL_COMM_BLOCKING=1") && e.contains("unset"),
            "{e}"
        );
        assert!(check_environment(set("0")).is_ok());
        assert!(check_environment(|_| None).is_ok());
    }

    #[test]
    fn a_group_is_always_ended_and_its_first_failure_decides() {
        use std::cell::RefCell;
        let log = RefCell::new(Vec::new());
        let run = |start_rc: NcclResult, call_rcs: &[NcclResult], end_rc: NcclResult| {
            log.borrow_mut().clear();
            let out = grouped(
                || {
                    log.borrow_mut().push("start".to_owned());
                    start_rc
                },
                call_rcs.iter().enumerate().map(|(i, &rc)| {
                    let log = &log;
                    move || {
                        log.borrow_mut().push(format!("call {i}"));
                        rc
                    }
                }),
                || {
                    log.borrow_mut().push("end".to_owned());
                    end_rc
                },
            );
            (out, log.borrow().join(", "))
        };
        // Every call queued, then one end whose in-progress is the wait.
        assert_eq!(
            run(
                NCCL_SUCCESS,
                &[NCCL_SUCCESS, NCCL_SUCCESS],
                NCCL_IN_PROGRESS
            ),
            (
                ("ncclGroupEnd", NCCL_IN_PROGRESS),
                "start, call 0, call 1, end".to_owned()
            )
        );
        // A failing call stops the queueing, the group is still ended, and
        // the failure is what is reported.
        assert_eq!(
            run(NCCL_SUCCESS, &[NCCL_SUCCESS, 3, NCCL_SUCCESS], NCCL_SUCCESS),
            (
                ("ncclAllReduce", 3),
                "start, call 0, call 1, end".to_owned()
            )
        );
        // No group, nothing to end.
        assert_eq!(
            run(2, &[NCCL_SUCCESS], NCCL_SUCCESS),
            (("ncclGroupStart", 2), "start".to_owned())
        );
    }

    #[test]
    fn unique_ids_round_trip_and_bad_lengths_are_named() {
        let bytes: Vec<u8> = (0..UNIQUE_ID_BYTES).map(|i| i as u8).collect();
        let id = unique_id_from(&bytes).unwrap();
        assert!(id.internal.iter().zip(&bytes).all(|(&a, &b)| a as u8 == b));
        let err = unique_id_from(&bytes[..16]).unwrap_err().to_string();
        assert!(err.contains("128 bytes, got 16"), "{err}");
    }

    #[test]
    fn gradient_dtypes_map_to_nccl_types() {
        assert_eq!(nccl_dtype(Kind::Float), Some(NCCL_FLOAT32));
        assert_eq!(nccl_dtype(Kind::BFloat16), Some(NCCL_BFLOAT16));
        assert_eq!(nccl_dtype(Kind::Half), Some(NCCL_FLOAT16));
        assert_eq!(nccl_dtype(Kind::Int64), None);
    }
}
