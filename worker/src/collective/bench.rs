//! `bench allreduce`: the bandwidth of a collective backend, with W ranks as
//! threads of this process (tcp: a ring on loopback; nccl: one GPU each),
//! every rank all-reducing `size_mb` of float32, as one buffer or split
//! into `tensors` gradients as a model's parameter list is (NCCL then packs
//! them into its buckets and queues the buckets in groups: the trainer's
//! path, with the bucket and group sizes to choose). Reports the
//! median time and the bus bandwidth in nccl-tests' convention
//! (algbw * 2(W-1)/W, the bytes each link carries). Timings live here, never
//! in pass/fail tests. The all-reduce's two halves, reduce-scatter and
//! all-gather (world.shard_state), are measured on the same bytes as one
//! flat buffer and checked the same way. Each rank checks its first result (the mean of
//! rank-dependent values), so a wrong collective is an error, not a number.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::{Backend, NcclComm, NcclError, NcclOptions, TcpRing, buckets};
use crate::trainer::gradient_sync::{GradientSync, SyncError};

#[derive(Debug, thiserror::Error)]
pub enum AllReduceBenchError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Nccl(#[from] NcclError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("rank {rank}: the all-reduce gave {got}, expected {want}")]
    WrongResult { rank: usize, got: f64, want: f64 },
    #[error("a rank's thread panicked")]
    Panicked,
}

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct AllReduceSpec {
    pub backend: Backend,
    pub size_mb: f64,
    pub world_size: usize,
    pub iters: usize,
    /// Gradients the buffer is split into (1: one buffer).
    pub tensors: usize,
    /// NCCL's bucket and group bytes (NcclOptions); `None`: its defaults.
    /// The ring has neither (it reduces everything as one flat buffer).
    pub bucket_bytes: Option<usize>,
    pub group_bytes: Option<usize>,
}

impl AllReduceSpec {
    /// One buffer of `size_mb`, NCCL's defaults.
    pub fn new(backend: Backend, size_mb: f64, world_size: usize, iters: usize) -> Self {
        Self {
            backend,
            size_mb,
            world_size,
            iters,
            tensors: 1,
            bucket_bytes: None,
            group_bytes: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AllReduceReport {
    pub backend: String,
    pub world_size: usize,
    pub bytes: u64,
    /// Gradients the bytes were split into.
    pub tensors: usize,
    /// NCCL only: its bucket and group bytes, and how many buckets and
    /// groups (ncclGroupStart/End, each waited for once) one all-reduce
    /// took.
    pub bucket_bytes: Option<u64>,
    pub group_bytes: Option<u64>,
    pub buckets: Option<usize>,
    pub groups: Option<usize>,
    pub iters: usize,
    /// Median over rank 0's timed iterations.
    pub median_s: f64,
    /// bytes / median_s, GB/s.
    pub algbw_gb_s: f64,
    /// algbw * 2(W-1)/W, GB/s.
    pub busbw_gb_s: f64,
    /// The all-reduce's two halves on the same bytes, as one flat buffer
    /// (world.shard_state's collectives): median seconds and bus
    /// bandwidth in nccl-tests' convention (algbw * (W-1)/W, algbw being
    /// the whole buffer's bytes over the time).
    pub reduce_scatter_median_s: f64,
    pub reduce_scatter_busbw_gb_s: f64,
    pub all_gather_median_s: f64,
    pub all_gather_busbw_gb_s: f64,
}

impl AllReduceReport {
    pub fn table(&self) -> String {
        let layout = match (
            self.buckets,
            self.groups,
            self.bucket_bytes,
            self.group_bytes,
        ) {
            (Some(b), Some(g), Some(bb), Some(gb)) => format!(
                "{b} bucket(s) of <= {:.1} MiB in {g} group(s) of <= {:.1} MiB",
                bb as f64 / (1 << 20) as f64,
                gb as f64 / (1 << 20) as f64
            ),
            _ => "one flat buffer (the ring)".to_owned(),
        };
        format!(
            "backend           {}\nworld size        {}\nbuffer            {:.1} MB in {} tensor(s)\nlayout            {}\niterations        {}\nmedian            {:.6} s\nalgorithm bw      {:.3} GB/s\nbus bw            {:.3} GB/s\nreduce-scatter    {:.6} s, bus bw {:.3} GB/s\nall-gather        {:.6} s, bus bw {:.3} GB/s\n",
            self.backend,
            self.world_size,
            self.bytes as f64 / 1e6,
            self.tensors,
            layout,
            self.iters,
            self.median_s,
            self.algbw_gb_s,
            self.busbw_gb_s,
            self.reduce_scatter_median_s,
            self.reduce_scatter_busbw_gb_s,
            self.all_gather_median_s,
            self.all_gather_busbw_gb_s,
        )
    }
}

/// One untimed all-reduce (checked), then `iters` timed ones per rank.
pub fn bench_allreduce(spec: &AllReduceSpec) -> Result<AllReduceReport, AllReduceBenchError> {
    let AllReduceSpec {
        backend,
        size_mb,
        world_size,
        iters,
        tensors,
        ..
    } = *spec;
    if world_size == 0 || iters == 0 || !(size_mb > 0.0 && size_mb.is_finite()) {
        return Err(AllReduceBenchError::Invalid(format!(
            "--world ({world_size}) and --iters ({iters}) must be at least 1 and --size-mb \
             ({size_mb}) positive"
        )));
    }
    let numel = ((size_mb * 1e6) / 4.0).ceil().max(1.0) as i64;
    if tensors == 0 || tensors as i64 > numel {
        return Err(AllReduceBenchError::Invalid(format!(
            "--tensors ({tensors}) must be between 1 and the buffer's {numel} float32 elements"
        )));
    }
    let options = NcclOptions {
        bucket_bytes: spec
            .bucket_bytes
            .unwrap_or(NcclOptions::default().bucket_bytes),
        group_bytes: spec
            .group_bytes
            .unwrap_or(NcclOptions::default().group_bytes),
        ..NcclOptions::default()
    };
    let sizes = split(numel, tensors);
    let layout = match backend {
        Backend::Tcp if spec.bucket_bytes.is_some() || spec.group_bytes.is_some() => {
            return Err(AllReduceBenchError::Invalid(
                "--bucket-mib and --group-mib apply to --backend nccl: the ring reduces all \
                 gradients as one flat buffer"
                    .to_owned(),
            ));
        }
        Backend::Tcp => None,
        Backend::Nccl => {
            let plan = buckets::plan(
                &sizes
                    .iter()
                    .map(|&n| (Kind::Float, n as usize))
                    .collect::<Vec<_>>(),
                options.bucket_bytes,
            );
            Some((
                plan.len(),
                buckets::groups(&plan, options.group_bytes).len(),
            ))
        }
    };
    let ranks: Vec<Join> = match backend {
        Backend::Tcp => tcp_ranks(world_size)?,
        Backend::Nccl => nccl_ranks(world_size, options)?,
    };
    let handles: Vec<_> = ranks
        .into_iter()
        .enumerate()
        .map(|(rank, join)| {
            let device = match backend {
                Backend::Tcp => Device::Cpu,
                Backend::Nccl => Device::Cuda(rank),
            };
            let sizes = sizes.clone();
            std::thread::spawn(move || -> Result<[Vec<f64>; 3], AllReduceBenchError> {
                let mut sync = join()?;
                run_rank(sync.as_mut(), rank, world_size, &sizes, iters, device)
            })
        })
        .collect();
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for (rank, h) in handles.into_iter().enumerate() {
        let t = h.join().map_err(|_| AllReduceBenchError::Panicked)??;
        if rank == 0 {
            times = t;
        }
    }
    let median = |t: &mut Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let [mut all_reduce, mut reduce_scatter, mut all_gather] = times;
    let median_s = median(&mut all_reduce);
    let bytes = numel as u64 * 4;
    let algbw = bytes as f64 / median_s / 1e9;
    let w = world_size as f64;
    let half_busbw = |s: f64| bytes as f64 / s / 1e9 * (w - 1.0) / w;
    let reduce_scatter_median_s = median(&mut reduce_scatter);
    let all_gather_median_s = median(&mut all_gather);
    Ok(AllReduceReport {
        backend: backend.name().to_owned(),
        world_size,
        bytes,
        tensors,
        bucket_bytes: layout.map(|_| options.bucket_bytes as u64),
        group_bytes: layout.map(|_| options.group_bytes as u64),
        buckets: layout.map(|(b, _)| b),
        groups: layout.map(|(_, g)| g),
        iters,
        median_s,
        algbw_gb_s: algbw,
        busbw_gb_s: algbw * 2.0 * (w - 1.0) / w,
        reduce_scatter_median_s,
        reduce_scatter_busbw_gb_s: half_busbw(reduce_scatter_median_s),
        all_gather_median_s,
        all_gather_busbw_gb_s: half_busbw(all_gather_median_s),
    })
}

/// Joins one rank's world (run on that rank's thread).
type Join = Box<dyn FnOnce() -> Result<Box<dyn GradientSync>, AllReduceBenchError> + Send>;

fn tcp_ranks(world_size: usize) -> Result<Vec<Join>, AllReduceBenchError> {
    let listeners = (0..world_size)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AllReduceBenchError::Invalid(format!("binding 127.0.0.1: {e}")))?;
    let addrs = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<Vec<SocketAddr>, _>>()
        .map_err(|e| AllReduceBenchError::Invalid(e.to_string()))?;
    Ok(listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let addrs = addrs.clone();
            Box::new(move || {
                let ring =
                    TcpRing::connect(rank as u64, &addrs, listener, 0, Duration::from_secs(60))?;
                Ok(Box::new(ring) as Box<dyn GradientSync>)
            }) as Join
        })
        .collect())
}

/// `numel` elements as `parts` tensor sizes, as equal as can be.
fn split(numel: i64, parts: usize) -> Vec<i64> {
    let parts = parts as i64;
    (0..parts)
        .map(|i| numel / parts + i64::from(i < numel % parts))
        .collect()
}

fn nccl_ranks(world_size: usize, options: NcclOptions) -> Result<Vec<Join>, AllReduceBenchError> {
    crate::torch::device::load_cuda_backend();
    let available = tch::Cuda::device_count().max(0) as usize;
    if available < world_size {
        return Err(AllReduceBenchError::Invalid(format!(
            "--backend nccl --world {world_size} needs {world_size} CUDA devices in this \
             process, and libtorch sees {available}"
        )));
    }
    let id = NcclComm::unique_id()?;
    Ok((0..world_size)
        .map(|rank| {
            let id = id.clone();
            Box::new(move || {
                let comm = NcclComm::new(
                    Device::Cuda(rank),
                    rank as u64,
                    world_size as u64,
                    &id,
                    options,
                )?;
                Ok(Box::new(comm) as Box<dyn GradientSync>)
            }) as Join
        })
        .collect())
}

fn run_rank(
    sync: &mut dyn GradientSync,
    rank: usize,
    world_size: usize,
    sizes: &[i64],
    iters: usize,
    device: Device,
) -> Result<[Vec<f64>; 3], AllReduceBenchError> {
    let grads: Vec<Tensor> = sizes
        .iter()
        .map(|&n| Tensor::full([n], (rank + 1) as f64, (Kind::Float, device)))
        .collect();
    sync.all_reduce_mean(&grads)?;
    // The mean of 1..=W, in every element of every gradient.
    let want = (world_size as f64 + 1.0) / 2.0;
    for g in &grads {
        let got = g.max().double_value(&[]);
        let low = g.min().double_value(&[]);
        if (got - want).abs() > 1e-4 || (low - want).abs() > 1e-4 {
            return Err(AllReduceBenchError::WrongResult {
                rank,
                got: if (got - want).abs() > (low - want).abs() {
                    got
                } else {
                    low
                },
                want,
            });
        }
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        // Both backends return with the collective finished.
        sync.all_reduce_mean(&grads)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let (rs, ag) = run_halves(sync, rank, world_size, sizes.iter().sum(), iters, device)?;
    Ok([times, rs, ag])
}

/// The reduce-scatter and the all-gather of one flat buffer of `numel`
/// float32: each checked once (the rank's part of the mean of 1..=W; the
/// parts, each rank's filled with its rank + 1, gathered everywhere), then
/// timed `iters` times.
fn run_halves(
    sync: &mut dyn GradientSync,
    rank: usize,
    world_size: usize,
    numel: i64,
    iters: usize,
    device: Device,
) -> Result<(Vec<f64>, Vec<f64>), AllReduceBenchError> {
    let opts = (Kind::Float, device);
    let flat = Tensor::full([numel], (rank + 1) as f64, opts);
    let part = sync.reduce_scatter_mean(&flat)?;
    let want = (world_size as f64 + 1.0) / 2.0;
    if part.numel() > 0 {
        let worst = (part - want).abs().max().double_value(&[]);
        if worst > 1e-4 {
            return Err(AllReduceBenchError::WrongResult {
                rank,
                got: want + worst,
                want,
            });
        }
    }
    // Rank q's part holds q + 1: gathered, element i holds its owner's.
    let owners = Tensor::zeros([numel], opts);
    for q in 0..world_size {
        let r = sync.shard_range(numel as usize, q as u64);
        let _ = owners
            .narrow(0, r.start as i64, r.len() as i64)
            .fill_((q + 1) as f64);
    }
    let mine = sync.shard_range(numel as usize, rank as u64);
    let gathered = Tensor::zeros([numel], opts);
    gathered
        .narrow(0, mine.start as i64, mine.len() as i64)
        .copy_(&owners.narrow(0, mine.start as i64, mine.len() as i64));
    sync.all_gather(&gathered)?;
    let worst = (&gathered - &owners).abs().max().double_value(&[]);
    if worst != 0.0 {
        return Err(AllReduceBenchError::WrongResult {
            rank,
            got: worst,
            want: 0.0,
        });
    }
    let mut rs = Vec::with_capacity(iters);
    let mut ag = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        let _ = sync.reduce_scatter_mean(&flat)?;
        rs.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        sync.all_gather(&gathered)?;
        ag.push(t0.elapsed().as_secs_f64());
    }
    Ok((rs, ag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_bench_checks_its_result_and_reports_every_field() {
        let r = bench_allreduce(&AllReduceSpec::new(Backend::Tcp, 0.25, 3, 2)).unwrap();
        assert_eq!((r.backend.as_str(), r.world_size, r.iters), ("tcp", 3, 2));
        assert_eq!(r.bytes, 250_000);
        assert_eq!((r.tensors, r.buckets, r.groups), (1, None, None));
        assert!(r.median_s > 0.0 && r.busbw_gb_s > 0.0);
        // nccl-tests' bus bandwidth factor for an all-reduce.
        let factor = r.busbw_gb_s / r.algbw_gb_s;
        assert!((factor - 4.0 / 3.0).abs() < 1e-9, "{factor}");
        assert!(r.table().contains("bus bw"));
        // The halves ran, checked, and their bus factor is (W-1)/W.
        assert!(r.reduce_scatter_median_s > 0.0 && r.all_gather_median_s > 0.0);
        let f = r.all_gather_busbw_gb_s * r.all_gather_median_s / (r.bytes as f64 / 1e9);
        assert!((f - 2.0 / 3.0).abs() < 1e-9, "{f}");
        assert!(r.table().contains("reduce-scatter"), "{}", r.table());
    }

    #[test]
    fn bad_arguments_and_missing_gpus_are_named() {
        let err = bench_allreduce(&AllReduceSpec::new(Backend::Tcp, 0.0, 2, 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--size-mb"), "{err}");
        let err = bench_allreduce(&AllReduceSpec {
            bucket_bytes: Some(1 << 20),
            ..AllReduceSpec::new(Backend::Tcp, 1.0, 2, 1)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("apply to --backend nccl"), "{err}");
        let err = bench_allreduce(&AllReduceSpec {
            tensors: 0,
            ..AllReduceSpec::new(Backend::Tcp, 1.0, 2, 1)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("--tensors (0)"), "{err}");
        if tch::Cuda::device_count() < 64 {
            let err = bench_allreduce(&AllReduceSpec::new(Backend::Nccl, 1.0, 64, 1))
                .unwrap_err()
                .to_string();
            assert!(err.contains("needs 64 CUDA devices"), "{err}");
        }
    }

    #[test]
    fn a_split_buffer_is_reduced_and_checked_in_every_tensor() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(10, 1), vec![10]);
        let r = bench_allreduce(&AllReduceSpec {
            tensors: 7,
            ..AllReduceSpec::new(Backend::Tcp, 0.1, 2, 1)
        })
        .unwrap();
        assert_eq!((r.tensors, r.bytes), (7, 100_000));
    }
}
