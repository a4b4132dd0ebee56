//! Forming one world's communicator: the collective backend chosen by the
//! assignment's `backend`, and its bootstrap through the coordinator (the
//! all-reduce itself is `crate::collective`). "tcp": every rank publishes the
//! address of its ring listener, fetches everyone's and joins a
//! `collective::TcpRing`. "nccl": rank 0 publishes an NCCL unique id, the
//! others fetch it, and every rank joins a `collective::NcclComm` behind
//! the same `GradientSync`. A worker offers "nccl" when it registers only
//! if it can run it (a CUDA device and a libnccl that loads), so `auto`
//! picks NCCL only for worlds that can.
//!
//! Every communicator leaves an abort handle in the [`AbortSlot`], which the
//! heartbeat thread fires when the coordinator says the world is gone.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use swiftbrush_proto::rpc;
use tch::{Device, Kind, Tensor};

use super::link::{CoordinatorLink, Reaction, RpcError};
pub use crate::collective::Backend;
use crate::collective::buckets::DEFAULT_BUCKET_BYTES;
use crate::collective::nccl::{self, NcclAbortHandle, NcclComm, NcclError, NcclJoin, NcclOptions};
use crate::collective::tcp_ring::{RingAbort, RingOptions, TcpRing};
use crate::trainer::gradient_sync::{GradientSync, SingleProcess, StepVote, SyncError};

/// The collective backends this worker can run on `device` (sent with
/// Register).
pub fn supported_backends(device: Device) -> Vec<String> {
    let mut backends = vec![Backend::Tcp];
    if nccl::check_available(device).is_ok() {
        backends.push(Backend::Nccl);
    }
    backends.iter().map(|b| b.name().to_owned()).collect()
}

/// Ends a communicator's blocking calls from another thread.
pub trait CollectiveAbort: Send + Sync {
    fn abort(&self);
}

impl CollectiveAbort for RingAbort {
    fn abort(&self) {
        RingAbort::abort(self);
    }
}

impl CollectiveAbort for NcclAbortHandle {
    fn abort(&self) {
        NcclAbortHandle::abort(self);
    }
}

/// A communicator's abort handle and its world's generation.
type Registered = Option<(u64, Arc<dyn CollectiveAbort>)>;

/// The abort handle of the current world's communicator, if any.
#[derive(Clone, Default)]
pub struct AbortSlot(Arc<Mutex<Registered>>);

impl AbortSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registered> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set(&self, generation: u64, abort: Arc<dyn CollectiveAbort>) {
        *self.lock() = Some((generation, abort));
    }

    pub fn clear(&self) {
        *self.lock() = None;
    }

    /// Aborts the communicator if it belongs to a generation before
    /// `generation`.
    pub fn abort_below(&self, generation: u64) {
        if let Some((g, abort)) = self.lock().as_ref()
            && *g < generation
        {
            abort.abort();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error(
        "the job's world.backend is nccl, but this worker cannot run it: {reason}; use \
         world.backend tcp or auto"
    )]
    NcclUnavailable { reason: String },
    #[error("NCCL: {0}")]
    Nccl(#[from] NcclError),
    #[error("the assignment names an unknown collective backend {0:?} (expected tcp or nccl)")]
    UnknownBackend(String),
    #[error("cannot listen for ring peers on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("bootstrap of generation {generation}: {reason}")]
    Bootstrap { generation: u64, reason: String },
    #[error("bootstrap: {0}")]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Sync(#[from] SyncError),
}

impl CollectiveError {
    /// Whether no later world can do better (the worker should stop),
    /// rather than this world having broken.
    pub fn is_fatal(&self) -> bool {
        match self {
            Self::NcclUnavailable { .. } | Self::UnknownBackend(_) | Self::Bind { .. } => true,
            Self::Nccl(e) => matches!(e, NcclError::Load(_) | NcclError::NotCuda { .. }),
            Self::Rpc(e) => e.reaction() == Reaction::Fatal,
            Self::Bootstrap { .. } | Self::Sync(_) => false,
        }
    }
}

/// Which world to join, as the assignment says.
#[derive(Debug, Clone)]
pub struct Membership {
    pub worker_id: u64,
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    pub backend: Backend,
}

#[derive(Debug, Clone)]
pub struct CollectiveOptions {
    /// Where the ring listener binds (port 0: any); `None`: the interface
    /// that routes to the coordinator.
    pub ring_listen: Option<SocketAddr>,
    /// The address peers can reach this worker at, when the listener binds
    /// to 0.0.0.0.
    pub advertise_ip: IpAddr,
    /// How long every rank may take to publish, fetch and connect.
    pub connect_timeout: Duration,
    /// The longest a ring read or write may block (a peer stopped, not dead).
    pub io_timeout: Duration,
}

/// Bootstraps and joins the world's collective on `device`.
pub fn form(
    link: &CoordinatorLink,
    world: &Membership,
    options: &CollectiveOptions,
    slot: &AbortSlot,
    device: Device,
) -> Result<Box<dyn GradientSync>, CollectiveError> {
    let mut sync = match world.backend {
        _ if world.world_size == 1 => return Ok(Box::new(SingleProcess)),
        Backend::Tcp => tcp_ring(link, world, options, slot)?,
        Backend::Nccl => nccl_comm(link, world, options, slot, device)?,
    };
    warm_up(sync.as_mut(), device, warm_up_elements(world.backend))?;
    Ok(sync)
}

/// How many float32 elements the warm-up all-reduce takes: one gradient
/// bucket for NCCL (its buffers are what the warm-up allocates), a few for
/// the ring (whose buffers are the host's).
pub fn warm_up_elements(backend: Backend) -> i64 {
    match backend {
        Backend::Nccl => (DEFAULT_BUCKET_BYTES / 4) as i64,
        Backend::Tcp => 1024,
    }
}

/// Runs what a step's collectives run, once, right after the communicator
/// is created and before the first step: a float32 all-reduce of
/// `elements` on `device` and one vote (issue 30, item 1). NCCL connects
/// lazily and allocates its channel buffers (0.5-2 GB, outside libtorch's
/// caching allocator) at the first collective; without this that is the
/// first student all-reduce, right after the first backward, at the
/// step's memory peak, where a batch that fits would fail.
pub fn warm_up(
    sync: &mut dyn GradientSync,
    device: Device,
    elements: i64,
) -> Result<(), SyncError> {
    let t = Tensor::zeros([elements], (Kind::Float, device));
    sync.all_reduce_mean(std::slice::from_ref(&t))?;
    sync.vote(StepVote {
        finite: true,
        ..StepVote::default()
    })?;
    Ok(())
}

/// A communicator created and joining its world, whose join an abort
/// handle can end.
trait Joining {
    fn abort_handle(&self) -> Arc<dyn CollectiveAbort>;
    fn wait(self) -> Result<Box<dyn GradientSync>, CollectiveError>;
}

impl Joining for NcclJoin {
    fn abort_handle(&self) -> Arc<dyn CollectiveAbort> {
        Arc::new(NcclJoin::abort_handle(self))
    }
    fn wait(self) -> Result<Box<dyn GradientSync>, CollectiveError> {
        Ok(Box::new(NcclJoin::wait(self)?))
    }
}

/// Registers the join's abort handle in `slot`, then waits for the join
/// (issue 30, item 4): a peer dying during bootstrap is then ended by the
/// heartbeat thread's abort, not by the timeout.
fn join_abortable<J: Joining>(
    slot: &AbortSlot,
    generation: u64,
    joining: J,
) -> Result<Box<dyn GradientSync>, CollectiveError> {
    slot.set(generation, joining.abort_handle());
    joining.wait()
}

/// Rank 0 makes the NCCL unique id and publishes it (its process hosts
/// NCCL's bootstrap root until everyone joined); the others fetch it.
///
/// A failed join leaves nothing of ours behind: every failure after
/// `NcclComm::init` (an NCCL error, the timeout, an abort from the
/// heartbeat thread) aborts the half-made communicator (`ncclCommAbort`
/// joins NCCL's init thread and frees the communicator), and so does
/// dropping an `NcclJoin` that was never waited for. What stays is NCCL's:
/// `ncclGetUniqueId` started a detached thread with a listening socket
/// (bootstrap.cc, bootstrapRoot) that accepts connections without any
/// abort flag until every rank of the world has connected, and NCCL has no
/// call that stops it; after a failed world it may wait forever. That is
/// one thread and one socket in rank 0's process per world that failed
/// before all its ranks reached the root (bounded by world.max_restarts),
/// said once in a warning here.
fn nccl_comm(
    link: &CoordinatorLink,
    world: &Membership,
    options: &CollectiveOptions,
    slot: &AbortSlot,
    device: Device,
) -> Result<Box<dyn GradientSync>, CollectiveError> {
    let mut made_root = false;
    let joined = nccl_join(link, world, options, slot, device, &mut made_root);
    if let Err(e) = &joined
        && made_root
    {
        tracing::warn!(
            generation = world.generation,
            error = %e,
            "the NCCL world did not form; NCCL's bootstrap root for its id (a thread and a \
             listening socket of this process) may stay until the process exits: NCCL has no \
             call that stops it"
        );
    }
    joined
}

fn nccl_join(
    link: &CoordinatorLink,
    world: &Membership,
    options: &CollectiveOptions,
    slot: &AbortSlot,
    device: Device,
    made_root: &mut bool,
) -> Result<Box<dyn GradientSync>, CollectiveError> {
    let deadline = Instant::now() + options.connect_timeout;
    let id = if world.rank == 0 {
        let id = NcclComm::unique_id()?;
        *made_root = true;
        publish(link, world, id.clone())?;
        id
    } else {
        let blobs = fetch(link, world, false, deadline)?;
        blobs
            .into_iter()
            .find(|b| b.rank == 0)
            .map(|b| b.blob)
            .ok_or_else(|| CollectiveError::Bootstrap {
                generation: world.generation,
                reason: "no NCCL unique id from rank 0".to_owned(),
            })?
    };
    let joining = NcclComm::init(
        device,
        u64::from(world.rank),
        u64::from(world.world_size),
        &id,
        NcclOptions {
            timeout: options.io_timeout,
            ..NcclOptions::default()
        },
    )?;
    join_abortable(slot, world.generation, joining)
}

fn tcp_ring(
    link: &CoordinatorLink,
    world: &Membership,
    options: &CollectiveOptions,
    slot: &AbortSlot,
) -> Result<Box<dyn GradientSync>, CollectiveError> {
    let bind = options
        .ring_listen
        .unwrap_or(SocketAddr::new(options.advertise_ip, 0));
    let listener =
        TcpListener::bind(bind).map_err(|source| CollectiveError::Bind { addr: bind, source })?;
    let mut addr = listener
        .local_addr()
        .map_err(|source| CollectiveError::Bind { addr: bind, source })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(options.advertise_ip);
    }
    let deadline = Instant::now() + options.connect_timeout;
    publish(link, world, addr.to_string().into_bytes())?;
    let blobs = fetch(link, world, true, deadline)?;
    let addrs = ring_addresses(world, &blobs)?;
    let abort = RingAbort::new();
    slot.set(world.generation, Arc::new(abort.clone()));
    let ring = TcpRing::connect_with(
        u64::from(world.rank),
        &addrs,
        listener,
        world.generation,
        &RingOptions {
            connect_timeout: deadline.saturating_duration_since(Instant::now()),
            io_timeout: Some(options.io_timeout),
            abort,
        },
    )?;
    tracing::info!(generation = world.generation, rank = world.rank, world_size = world.world_size, %addr, "joined the TCP ring");
    Ok(Box::new(ring))
}

fn publish(
    link: &CoordinatorLink,
    world: &Membership,
    blob: Vec<u8>,
) -> Result<(), CollectiveError> {
    let request = rpc::PublishBootstrapRequest {
        worker_id: world.worker_id,
        generation: world.generation,
        rank: world.rank,
        blob,
    };
    link.call(
        "PublishBootstrap",
        super::link::CALL_TIMEOUT,
        |mut c| async move { c.publish_bootstrap(request).await },
    )?;
    Ok(())
}

/// Long-polls until every rank's blob (`all_ranks`) or rank 0's is there.
fn fetch(
    link: &CoordinatorLink,
    world: &Membership,
    all_ranks: bool,
    deadline: Instant,
) -> Result<Vec<rpc::RankBlob>, CollectiveError> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let wait_ms = remaining.as_millis().min(10_000) as u64;
        let request = rpc::FetchBootstrapRequest {
            worker_id: world.worker_id,
            generation: world.generation,
            all_ranks,
            wait_ms,
        };
        let reply = link.call(
            "FetchBootstrap",
            Duration::from_millis(wait_ms) + super::link::CALL_TIMEOUT,
            |mut c| async move { c.fetch_bootstrap(request).await },
        )?;
        if reply.complete {
            return Ok(reply.blobs);
        }
        if Instant::now() >= deadline {
            return Err(CollectiveError::Bootstrap {
                generation: world.generation,
                reason: format!(
                    "only {} of {} ranks published their bootstrap in time",
                    reply.blobs.len(),
                    if all_ranks { world.world_size } else { 1 }
                ),
            });
        }
    }
}

/// Every rank's address, in rank order.
fn ring_addresses(
    world: &Membership,
    blobs: &[rpc::RankBlob],
) -> Result<Vec<SocketAddr>, CollectiveError> {
    let bad = |reason: String| CollectiveError::Bootstrap {
        generation: world.generation,
        reason,
    };
    let mut addrs: Vec<Option<SocketAddr>> = vec![None; world.world_size as usize];
    for b in blobs {
        let slot = addrs.get_mut(b.rank as usize).ok_or_else(|| {
            bad(format!(
                "a blob for rank {} of {}",
                b.rank, world.world_size
            ))
        })?;
        let text = std::str::from_utf8(&b.blob)
            .map_err(|_| bad(format!("rank {}'s ring address is not UTF-8", b.rank)))?;
        *slot = Some(
            text.parse()
                .map_err(|e| bad(format!("rank {}'s ring address {text:?}: {e}", b.rank)))?,
        );
    }
    addrs
        .into_iter()
        .enumerate()
        .map(|(r, a)| a.ok_or_else(|| bad(format!("no ring address for rank {r}"))))
        .collect()
}

/// The local address that routes to the coordinator at `address`
/// (`http://host:port`): what ring peers can most likely reach. Found by
/// "connecting" a UDP socket, which sends nothing. Loopback if unknown.
pub fn local_ip_towards(address: &str) -> IpAddr {
    let authority = address
        .split_once("://")
        .map_or(address, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let target = authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next());
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let Some(target) = target else {
        return loopback;
    };
    let unspecified: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    UdpSocket::bind(unspecified)
        .and_then(|s| {
            s.connect(target)?;
            s.local_addr()
        })
        .map_or(loopback, |a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(size: u32) -> Membership {
        Membership {
            worker_id: 1,
            generation: 4,
            rank: 0,
            world_size: size,
            backend: Backend::Tcp,
        }
    }

    #[test]
    fn ring_addresses_come_in_rank_order_and_bad_blobs_are_named() {
        let blob = |rank: u32, s: &str| rpc::RankBlob {
            rank,
            blob: s.as_bytes().to_vec(),
        };
        let addrs =
            ring_addresses(&world(2), &[blob(1, "127.0.0.1:9"), blob(0, "127.0.0.1:8")]).unwrap();
        assert_eq!(addrs[0].port(), 8);
        assert_eq!(addrs[1].port(), 9);
        let e = ring_addresses(&world(2), &[blob(0, "127.0.0.1:8")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no ring address for rank 1"), "{e}");
        let e = ring_addresses(&world(2), &[blob(0, "nonsense"), blob(1, "127.0.0.1:9")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 0") && e.contains("nonsense"), "{e}");
    }

    #[test]
    fn a_cpu_worker_offers_only_the_ring_and_nccl_refusals_are_final() {
        assert_eq!(supported_backends(Device::Cpu), vec!["tcp".to_owned()]);
        let e = CollectiveError::Nccl(nccl::check_available(Device::Cpu).unwrap_err());
        assert!(e.is_fatal(), "{e}");
        assert!(e.to_string().contains("CUDA device"), "{e}");
    }

    #[test]
    fn backends_are_parsed_by_their_protocol_names() {
        for b in [Backend::Tcp, Backend::Nccl] {
            assert_eq!(Backend::from_name(b.name()), Some(b));
        }
        assert_eq!(Backend::from_name("gloo"), None);
    }

    #[test]
    fn loopback_coordinators_are_reached_over_loopback() {
        assert!(local_ip_towards("http://127.0.0.1:50051").is_loopback());
        assert!(local_ip_towards("not a url").is_loopback());
    }

    /// What a fake communicator was asked to do, in order.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<String>,
    }

    impl GradientSync for Recorder {
        fn rank(&self) -> u64 {
            0
        }
        fn world_size(&self) -> u64 {
            2
        }
        fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<(), SyncError> {
            for g in grads {
                self.calls.push(format!(
                    "all_reduce {:?} {:?} {}",
                    g.kind(),
                    g.device(),
                    g.numel()
                ));
            }
            Ok(())
        }
        fn all_sum(&mut self, values: &mut [f32]) -> Result<(), SyncError> {
            self.calls.push(format!("all_sum {}", values.len()));
            Ok(())
        }
    }

    #[test]
    fn the_warm_up_runs_a_bucket_sized_fp32_all_reduce_and_one_vote() {
        let mut r = Recorder::default();
        warm_up(&mut r, Device::Cpu, warm_up_elements(Backend::Nccl)).unwrap();
        assert_eq!(
            r.calls,
            vec![
                format!("all_reduce Float Cpu {}", DEFAULT_BUCKET_BYTES / 4),
                "all_sum 5".to_owned()
            ]
        );
    }

    /// The join's abort handle is in the slot while the join waits: an
    /// abort from the heartbeat thread ends a join that would otherwise
    /// wait out its timeout (a peer died during bootstrap).
    #[test]
    fn a_join_waiting_on_a_dead_peer_can_be_aborted() {
        use std::sync::atomic::{AtomicBool, Ordering};
        #[derive(Default)]
        struct Flag(AtomicBool);
        impl CollectiveAbort for Flag {
            fn abort(&self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        struct FakeJoin(Arc<Flag>);
        impl Joining for FakeJoin {
            fn abort_handle(&self) -> Arc<dyn CollectiveAbort> {
                self.0.clone()
            }
            fn wait(self) -> Result<Box<dyn GradientSync>, CollectiveError> {
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    if self.0.0.load(Ordering::SeqCst) {
                        return Err(CollectiveError::Bootstrap {
                            generation: 4,
                            reason: "aborted".to_owned(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                panic!("the join was not aborted: its handle was not registered");
            }
        }
        let slot = AbortSlot::default();
        let heartbeat = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                slot.abort_below(5);
            })
        };
        let started = Instant::now();
        let e = join_abortable(&slot, 4, FakeJoin(Arc::new(Flag::default())))
            .err()
            .unwrap();
        assert!(e.to_string().contains("aborted"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        heartbeat.join().unwrap();
    }

    #[test]
    fn only_aborts_older_worlds() {
        #[derive(Default)]
        struct Flag(std::sync::atomic::AtomicBool);
        impl CollectiveAbort for Flag {
            fn abort(&self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let slot = AbortSlot::default();
        let flag = Arc::new(Flag::default());
        slot.set(5, flag.clone());
        slot.abort_below(5);
        assert!(!flag.0.load(std::sync::atomic::Ordering::SeqCst));
        slot.abort_below(6);
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
    }
}
