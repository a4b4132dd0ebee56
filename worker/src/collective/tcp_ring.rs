//! Ring all-reduce over TCP: the CPU collective (tests, CPU clusters), the
//! same `GradientSync` contract as NCCL. Each rank listens on its own
//! address, connects to the next rank and accepts the previous one; a sum
//! is a reduce-scatter then an all-gather around the ring (2(W-1) steps,
//! each moving 1/W of the buffer), so every rank ends with identical bytes.
//!
//! A dead peer must never hang a survivor: every socket has read and write
//! timeouts (`RingOptions::io_timeout`), and a [`RingAbort`] handle lets
//! another thread (the worker's heartbeat, once the coordinator says the
//! world is gone) end every blocking call at once.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::trainer::gradient_sync::{GradientSync, SyncError};

/// Sent first on each connection: who is calling, and for which world, so
/// a stray or stale connection is refused rather than summed.
const MAGIC: u32 = 0x5342_5247; // "SBRG"

pub struct TcpRing {
    rank: u64,
    world_size: u64,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
}

fn err(what: impl std::fmt::Display) -> SyncError {
    SyncError::Collective(what.to_string())
}

/// Ends a ring's blocking calls from another thread: every socket it holds
/// is shut down and the connect loops give up. Cheap to clone; clones are
/// the same handle.
#[derive(Debug, Clone, Default)]
pub struct RingAbort {
    inner: Arc<AbortInner>,
}

#[derive(Debug, Default)]
struct AbortInner {
    aborted: AtomicBool,
    streams: Mutex<Vec<TcpStream>>,
}

impl RingAbort {
    pub fn new() -> Self {
        Self::default()
    }

    /// Shuts every socket of the ring down; calls in progress fail at once
    /// and later ones fail too.
    pub fn abort(&self) {
        self.inner.aborted.store(true, Ordering::SeqCst);
        let streams = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in streams.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), SyncError> {
        if self.is_aborted() {
            Err(err("the ring was aborted"))
        } else {
            Ok(())
        }
    }

    /// Keeps a handle on `stream` so that `abort` can shut it down (at once
    /// if the ring is already aborted).
    fn register(&self, stream: &TcpStream) -> Result<(), SyncError> {
        let clone = stream.try_clone().map_err(err)?;
        let mut streams = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.is_aborted() {
            let _ = clone.shutdown(Shutdown::Both);
        }
        streams.push(clone);
        drop(streams);
        self.check()
    }
}

/// How patient a ring is.
#[derive(Debug, Clone)]
pub struct RingOptions {
    /// How long to keep trying to reach the neighbours (ranks start at
    /// different times).
    pub connect_timeout: Duration,
    /// The longest one read or write may block; `None`: forever.
    pub io_timeout: Option<Duration>,
    pub abort: RingAbort,
}

impl TcpRing {
    /// Joins the ring: `listener` is bound to `addrs[rank]`; `generation`
    /// distinguishes worlds. Retries connecting to the next rank until
    /// `timeout` (ranks start at different times). No I/O timeout.
    pub fn connect(
        rank: u64,
        addrs: &[SocketAddr],
        listener: TcpListener,
        generation: u64,
        timeout: Duration,
    ) -> Result<Self, SyncError> {
        let options = RingOptions {
            connect_timeout: timeout,
            io_timeout: None,
            abort: RingAbort::new(),
        };
        Self::connect_with(rank, addrs, listener, generation, &options)
    }

    /// [`TcpRing::connect`] with I/O timeouts and an abort handle.
    pub fn connect_with(
        rank: u64,
        addrs: &[SocketAddr],
        listener: TcpListener,
        generation: u64,
        options: &RingOptions,
    ) -> Result<Self, SyncError> {
        let timeout = options.connect_timeout;
        let abort = options.abort.clone();
        let world_size = addrs.len() as u64;
        if rank >= world_size {
            return Err(err(format!("rank {rank} outside a world of {world_size}")));
        }
        if world_size == 1 {
            return Ok(Self {
                rank,
                world_size,
                next: None,
                prev: None,
            });
        }
        let next_addr = addrs[((rank + 1) % world_size) as usize];
        let deadline = Instant::now() + timeout;
        let io_timeout = options.io_timeout;
        // Connect and accept concurrently: with two ranks each is the
        // other's next and prev.
        let accept_abort = abort.clone();
        let accept = std::thread::spawn(move || {
            accept_prev(
                listener,
                (rank, world_size, generation),
                deadline,
                io_timeout,
                &accept_abort,
            )
        });
        let next = connect_next(next_addr, (rank, generation), deadline, io_timeout, &abort);
        let prev = accept.join().map_err(|_| err("accept thread panicked"))?;
        let (next, prev) = match (next, prev) {
            (Ok(next), Ok(prev)) => (next, prev),
            (Err(e), _) | (_, Err(e)) => {
                // The other half must not stay connected to a ring that
                // failed to form.
                abort.abort();
                return Err(e);
            }
        };
        Ok(Self {
            rank,
            world_size,
            next: Some(next),
            prev: Some(prev),
        })
    }

    /// Sums `buf` over all ranks, in place: the reduce-scatter phase then
    /// the all-gather phase.
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), SyncError> {
        self.reduce_scatter_sum(buf)?;
        self.all_gather_in_place(buf)
    }

    /// Chunk `i` of a buffer of `len` elements (W chunks, as even as
    /// integers allow).
    fn chunk(&self, len: usize, i: usize) -> (usize, usize) {
        let w = self.world_size as usize;
        (len * i / w, len * (i + 1) / w)
    }

    /// The chunk of a buffer of `len` elements that rank `rank` holds summed
    /// after [`Self::reduce_scatter_sum`]: (rank + 1) mod W, where the
    /// ring's W-1 steps end.
    pub fn owned_range(&self, len: usize, rank: u64) -> std::ops::Range<usize> {
        let w = self.world_size.max(1);
        let (a, b) = self.chunk(len, ((rank + 1) % w) as usize);
        a..b
    }

    /// The ring's first phase: after W-1 steps this rank holds the full sum
    /// of its [`Self::owned_range`] of `buf` (the rest of `buf` holds
    /// partial sums).
    pub fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), SyncError> {
        let w = self.world_size as usize;
        let r = self.rank as usize;
        let bounds: Vec<(usize, usize)> = (0..w).map(|i| self.chunk(buf.len(), i)).collect();
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        let mut incoming = vec![0f32; buf.len().div_ceil(w)];
        // Reduce-scatter: after W-1 steps rank r holds the full sum of
        // chunk (r + 1) mod W.
        for s in 0..w - 1 {
            let send = bounds[(r + w - s) % w];
            let recv = bounds[(r + w - s - 1) % w];
            let n = recv.1 - recv.0;
            exchange(next, prev, &buf[send.0..send.1], &mut incoming[..n])?;
            for (x, y) in buf[recv.0..recv.1].iter_mut().zip(&incoming[..n]) {
                *x += *y;
            }
        }
        Ok(())
    }

    /// The ring's second phase: every rank's [`Self::owned_range`] of `buf`
    /// passed around, so all ranks end with the same bytes.
    pub fn all_gather_in_place(&mut self, buf: &mut [f32]) -> Result<(), SyncError> {
        let w = self.world_size as usize;
        let r = self.rank as usize;
        let bounds: Vec<(usize, usize)> = (0..w).map(|i| self.chunk(buf.len(), i)).collect();
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        let mut incoming = vec![0f32; buf.len().div_ceil(w)];
        for s in 0..w - 1 {
            let send = bounds[(r + 1 + w - s) % w];
            let recv = bounds[(r + w - s) % w];
            let n = recv.1 - recv.0;
            exchange(next, prev, &buf[send.0..send.1], &mut incoming[..n])?;
            buf[recv.0..recv.1].copy_from_slice(&incoming[..n]);
        }
        Ok(())
    }
}

/// A 1-D tensor's values as host float32 (the ring's wire format).
fn host_f32(t: &Tensor) -> Result<Vec<f32>, SyncError> {
    Vec::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1])).map_err(err)
}

/// Connects to the next rank and says who is calling.
fn connect_next(
    next_addr: SocketAddr,
    (rank, generation): (u64, u64),
    deadline: Instant,
    io_timeout: Option<Duration>,
    abort: &RingAbort,
) -> Result<TcpStream, SyncError> {
    let mut next = loop {
        abort.check()?;
        match TcpStream::connect_timeout(&next_addr, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(%next_addr, error = %e, "next rank not up yet");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(err(format!("cannot reach rank at {next_addr}: {e}"))),
        }
    };
    abort.register(&next)?;
    next.set_nodelay(true).map_err(err)?;
    next.set_read_timeout(io_timeout).map_err(err)?;
    next.set_write_timeout(io_timeout).map_err(err)?;
    let mut hello = Vec::with_capacity(20);
    hello.extend_from_slice(&MAGIC.to_le_bytes());
    hello.extend_from_slice(&rank.to_le_bytes());
    hello.extend_from_slice(&generation.to_le_bytes());
    next.write_all(&hello)
        .map_err(|e| err(format!("greeting rank at {next_addr}: {e}")))?;
    Ok(next)
}

/// Accepts the previous rank (and only it, in this generation).
fn accept_prev(
    listener: TcpListener,
    (rank, world_size, generation): (u64, u64, u64),
    deadline: Instant,
    io_timeout: Option<Duration>,
    abort: &RingAbort,
) -> Result<TcpStream, SyncError> {
    let want = (rank + world_size - 1) % world_size;
    listener.set_nonblocking(true).map_err(err)?;
    loop {
        abort.check()?;
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false).map_err(err)?;
                // A stranger that connects and says nothing must not block
                // the ring's formation for long.
                let hello_timeout = io_timeout
                    .unwrap_or(Duration::from_secs(10))
                    .min(Duration::from_secs(10));
                s.set_read_timeout(Some(hello_timeout)).map_err(err)?;
                let mut hello = [0u8; 20];
                if s.read_exact(&mut hello).is_err() {
                    continue;
                }
                let magic = u32::from_le_bytes(hello[0..4].try_into().unwrap_or_default());
                let from = u64::from_le_bytes(hello[4..12].try_into().unwrap_or_default());
                let generation_in =
                    u64::from_le_bytes(hello[12..20].try_into().unwrap_or_default());
                if magic != MAGIC || from != want || generation_in != generation {
                    tracing::warn!(%peer, from, generation_in, "refused a ring connection");
                    continue;
                }
                abort.register(&s)?;
                s.set_read_timeout(io_timeout).map_err(err)?;
                s.set_write_timeout(io_timeout).map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(err(format!("rank {want} never connected to rank {rank}")));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(err(e)),
        }
    }
}

// Floats travel in the hosts' own byte order, copied as they lie in memory
// (no per-element conversion: this loop is hot, also in debug builds).
#[cfg(not(target_endian = "little"))]
compile_error!("the TCP ring sends floats as little-endian bytes");

/// Sends `out` to the next rank while filling `incoming` from the previous
/// one (concurrently: both sides send at once, and a blocking send of a
/// large chunk would otherwise deadlock on full socket buffers).
fn exchange(
    next: &mut TcpStream,
    prev: &mut TcpStream,
    out: &[f32],
    incoming: &mut [f32],
) -> Result<(), SyncError> {
    let bytes: &[u8] = bytemuck::cast_slice(out);
    let into: &mut [u8] = bytemuck::cast_slice_mut(incoming);
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| next.write_all(bytes));
        let received = prev.read_exact(into);
        let sent = sender.join().map_err(|_| err("send thread panicked"))?;
        sent.map_err(|e| err(format!("send to next rank: {e}")))?;
        received.map_err(|e| err(format!("receive from previous rank: {e}")))
    })
}

impl GradientSync for TcpRing {
    fn rank(&self) -> u64 {
        self.rank
    }

    fn world_size(&self) -> u64 {
        self.world_size
    }

    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<(), SyncError> {
        if self.world_size == 1 || grads.is_empty() {
            return Ok(());
        }
        // One flat float32 buffer for all gradients: one ring pass.
        let flat = Tensor::cat(
            &grads
                .iter()
                .map(|g| g.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))
                .collect::<Vec<_>>(),
            0,
        );
        let mut buf: Vec<f32> = Vec::try_from(&flat).map_err(err)?;
        self.all_reduce_sum(&mut buf)?;
        let inv = 1.0 / self.world_size as f64;
        let mut offset = 0i64;
        let summed = Tensor::from_slice(&buf) * inv;
        tch::no_grad(|| {
            for g in grads {
                let n = g.numel() as i64;
                let part = summed
                    .narrow(0, offset, n)
                    .reshape(g.size())
                    .to_kind(g.kind())
                    .to_device(g.device());
                let mut g = g.shallow_clone();
                g.copy_(&part);
                offset += n;
            }
        });
        Ok(())
    }

    fn all_sum(&mut self, values: &mut [f32]) -> Result<(), SyncError> {
        self.all_reduce_sum(values)
    }

    fn shard_range(&self, numel: usize, rank: u64) -> std::ops::Range<usize> {
        self.owned_range(numel, rank)
    }

    /// The ring's first phase alone; the owned chunk is scaled as
    /// `all_reduce_mean` scales it, so it is bit for bit that chunk of
    /// the all-reduce's mean.
    fn reduce_scatter_mean(&mut self, flat: &Tensor) -> Result<Tensor, SyncError> {
        let range = self.owned_range(flat.numel(), self.rank);
        if self.world_size == 1 {
            return Ok(flat.narrow(0, 0, flat.numel() as i64));
        }
        let mut buf = host_f32(flat)?;
        self.reduce_scatter_sum(&mut buf)?;
        let inv = 1.0 / self.world_size as f64;
        let mine = Tensor::from_slice(&buf[range]) * inv;
        Ok(mine.to_kind(flat.kind()).to_device(flat.device()))
    }

    /// The ring's second phase alone.
    fn all_gather(&mut self, flat: &Tensor) -> Result<(), SyncError> {
        if self.world_size == 1 {
            return Ok(());
        }
        let mut buf = host_f32(flat)?;
        self.all_gather_in_place(&mut buf)?;
        let gathered = Tensor::from_slice(&buf)
            .to_kind(flat.kind())
            .to_device(flat.device());
        tch::no_grad(|| flat.shallow_clone().copy_(&gathered));
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// W ranks on loopback, each in a thread running `f`.
    pub(crate) fn with_ring<T: Send + 'static>(
        w: usize,
        f: impl Fn(TcpRing) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let listeners: Vec<TcpListener> = (0..w)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                std::thread::spawn(move || {
                    let ring =
                        TcpRing::connect(r as u64, &addrs, l, 7, Duration::from_secs(10)).unwrap();
                    f(ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn sums_agree_for_several_world_sizes_and_odd_lengths() {
        for w in [2usize, 3, 4] {
            let results = with_ring(w, move |mut ring| {
                let r = ring.rank() as f32;
                // Length not divisible by W, values that depend on rank.
                let mut buf: Vec<f32> = (0..1001).map(|i| i as f32 * 0.5 + r).collect();
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            let wsum: f32 = (0..w).map(|r| r as f32).sum();
            for buf in &results {
                assert_eq!(buf, &results[0], "replicas differ");
                for (i, x) in buf.iter().enumerate() {
                    assert!((x - (i as f32 * 0.5 * w as f32 + wsum)).abs() < 1e-3);
                }
            }
        }
    }

    /// The reduce-scatter gives each rank its chunk of the all-reduce's mean
    /// bit for bit (the same sums in the same order), the chunks tile the
    /// buffer, and the all-gather of those chunks is the all-reduce.
    #[test]
    fn reduce_scatter_then_all_gather_is_the_all_reduce_bit_for_bit() {
        for w in [2usize, 3, 4] {
            let results = with_ring(w, move |mut ring| {
                let r = ring.rank() as f32;
                let data: Vec<f32> = (0..1001)
                    .map(|i| (i as f32 * 0.37 + r * 1.3).sin() * 1e3)
                    .collect();
                let grad = Tensor::from_slice(&data);
                ring.all_reduce_mean(std::slice::from_ref(&grad)).unwrap();
                let flat = Tensor::from_slice(&data);
                let mine = ring.reduce_scatter_mean(&flat).unwrap();
                let range = ring.shard_range(1001, ring.rank());
                let want = grad.narrow(0, range.start as i64, range.len() as i64);
                let same_chunk = mine.equal(&want);
                // Every rank puts its chunk of the mean into a buffer of
                // zeros; the all-gather fills in the others'.
                let gathered = Tensor::zeros([1001], (Kind::Float, Device::Cpu));
                gathered
                    .narrow(0, range.start as i64, range.len() as i64)
                    .copy_(&mine);
                ring.all_gather(&gathered).unwrap();
                (same_chunk, gathered.equal(&grad), range)
            });
            let mut covered = 0;
            for (r, (same_chunk, same_all, range)) in results.iter().enumerate() {
                assert!(
                    same_chunk,
                    "W={w} rank {r}: its chunk is not the all-reduce's"
                );
                assert!(
                    same_all,
                    "W={w} rank {r}: the all-gather is not the all-reduce"
                );
                covered += range.len();
            }
            assert_eq!(covered, 1001, "W={w}: the ranks' chunks tile the buffer");
        }
    }

    #[test]
    fn mean_of_gradients_and_the_finite_vote() {
        let results = with_ring(2, |mut ring| {
            let r = ring.rank() as f32;
            let p = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
            (&p * f64::from(r + 1.0)).sum(Kind::Float).backward();
            let grads = [p.grad()];
            ring.all_reduce_mean(&grads).unwrap();
            let mean: Vec<f32> = Vec::try_from(p.grad()).unwrap();
            let vote_all = ring.all_ok(true).unwrap();
            let vote_one = ring.all_ok(ring.rank() == 0).unwrap();
            (mean, vote_all, vote_one)
        });
        for (mean, all, one) in results {
            assert_eq!(mean, vec![1.5, 1.5, 1.5]);
            assert!(all);
            assert!(!one, "one rank's NaN must skip the step everywhere");
        }
    }

    #[test]
    fn a_stale_generation_is_refused() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        let a = addrs.clone();
        let h = std::thread::spawn(move || TcpRing::connect(1, &a, l1, 2, Duration::from_secs(2)));
        let r0 = TcpRing::connect(0, &addrs, l0, 1, Duration::from_secs(2));
        assert!(r0.is_err() || h.join().unwrap().is_err());
    }

    /// Two ranks with options; rank 1's ring goes to `peer`, rank 0's is returned.
    fn pair(options: RingOptions, peer: impl FnOnce(TcpRing) + Send + 'static) -> TcpRing {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        let a = addrs.clone();
        let peer_options = RingOptions {
            abort: RingAbort::new(),
            ..options.clone()
        };
        std::thread::spawn(move || {
            peer(TcpRing::connect_with(1, &a, l1, 5, &peer_options).unwrap());
        });
        TcpRing::connect_with(0, &addrs, l0, 5, &options).unwrap()
    }

    fn options(io_timeout: Option<Duration>) -> RingOptions {
        RingOptions {
            connect_timeout: Duration::from_secs(10),
            io_timeout,
            abort: RingAbort::new(),
        }
    }

    #[test]
    fn a_silent_peer_times_out_instead_of_hanging() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // The peer joins, then never takes part (as a SIGSTOPped process).
        let mut ring = pair(options(Some(Duration::from_millis(300))), move |ring| {
            let _ = rx.recv();
            drop(ring);
        });
        let mut buf = vec![1.0f32; 4096];
        let e = ring.all_reduce_sum(&mut buf).unwrap_err().to_string();
        assert!(
            e.contains("previous rank") || e.contains("next rank"),
            "{e}"
        );
        drop(tx);
    }

    #[test]
    fn a_dead_peer_is_an_error() {
        let mut ring = pair(options(None), drop);
        let mut buf = vec![1.0f32; 16];
        assert!(ring.all_reduce_sum(&mut buf).is_err());
        assert!(ring.all_ok(true).is_err());
    }

    #[test]
    fn abort_ends_a_blocked_call_from_another_thread() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let opts = options(None);
        let abort = opts.abort.clone();
        let mut ring = pair(opts, move |ring| {
            let _ = rx.recv();
            drop(ring);
        });
        let aborter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            abort.abort();
        });
        let e = ring.all_ok(true).unwrap_err().to_string();
        assert!(e.contains("collective failed"), "{e}");
        aborter.join().unwrap();
        // Later calls fail at once too.
        assert!(ring.all_ok(true).is_err());
        drop(tx);
    }

    #[test]
    fn an_aborted_ring_does_not_form() {
        let opts = options(None);
        opts.abort.abort();
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![l0.local_addr().unwrap(), other.local_addr().unwrap()];
        let e = TcpRing::connect_with(0, &addrs, l0, 1, &opts)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("aborted"), "{e}");
    }
}
