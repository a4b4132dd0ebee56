//! The bounded gather of one sharded state tensor (a checkpoint's Adam
//! moments and EMA, the sample step's EMA): every rank's slice, gathered
//! in pieces of at most [`PIECE_BYTES`] on the slice's device, each piece
//! moved to host memory before the next is gathered. Gathering a whole
//! flat state tensor at once would put the full, unsharded state back on
//! every rank's GPU for a moment (12 bytes per student parameter for
//! Adam's moments and the EMA), the memory sharding is meant to save.
//!
//! The collective's `all_gather` fills each rank's `shard_range` of one
//! buffer, so a piece cannot be a contiguous range of the flat layout
//! (the ranks' slices would cover it unevenly). Piece k instead carries
//! elements `k * per .. (k + 1) * per` of every rank's slice, each rank's
//! in its own part of a buffer of `W * per` elements (W parts of exactly
//! `per`: the ring's bounds `len * i / W` and NCCL's `ceil(len / W)` both
//! split a multiple of W evenly, and NCCL then needs no padded copy); a
//! rank whose slice ends first sends a shorter part. Every rank computes
//! the same pieces from the world's ranges, so all make the same calls
//! with the same sizes in the same order, as the ring and NCCL require.
//! Only data moves: the result is the whole gather's, bit for bit.

use std::ops::Range;

use tch::{Device, Tensor};

use crate::trainer::gradient_sync::{GradientSync, SyncError};

/// Bytes of one gathered piece on the device (all ranks' parts together).
/// Large enough that each piece's fixed costs vanish beside its bytes: the
/// TCP ring's all-gather of 1 kB takes 56 us against 0.14 s for 32 MB
/// (`swiftbrush bench allreduce --backend tcp --world 2 --size-mb 0.001`
/// and `--size-mb 32`, this 2-core box, debug build), and on a GPU each
/// piece also pays one NCCL call and one device-to-host copy (32 MiB
/// crosses PCIe in a few ms); small beside a GPU's memory and beside the
/// sharded step's own transient (two flat copies of a network).
pub const PIECE_BYTES: usize = 32 << 20;

/// Every rank's slice of a flat state tensor of `total` elements (`slice`:
/// this rank's, its `sync.shard_range(total, rank)`), gathered piece by
/// piece (at most `piece_bytes` on the device at once, beyond the slice).
/// `keep`: whether this rank wants the result, a host tensor of `total`
/// elements; a rank that does not still takes part in every piece's
/// collective and returns None. A collective: every rank calls it with
/// the same `total`, dtype and `piece_bytes`.
pub fn to_host(
    sync: &mut dyn GradientSync,
    slice: &Tensor,
    total: usize,
    keep: bool,
    piece_bytes: usize,
) -> Result<Option<Tensor>, SyncError> {
    let bad = |what: String| Err(SyncError::Collective(what));
    let w = sync.world_size().max(1) as usize;
    let rank = sync.rank() as usize;
    let ranges: Vec<Range<usize>> = (0..w).map(|r| sync.shard_range(total, r as u64)).collect();
    if ranges[rank].len() != slice.numel() {
        return bad(format!(
            "rank {rank}'s slice holds {} elements, its part of {total} is {:?}",
            slice.numel(),
            ranges[rank]
        ));
    }
    let longest = ranges.iter().map(Range::len).max().unwrap_or(0);
    let kind = slice.kind();
    let per = (piece_bytes / (w * kind.elt_size_in_bytes())).clamp(1, longest.max(1));
    let len = w * per;
    let parts: Vec<Range<usize>> = (0..w).map(|r| sync.shard_range(len, r as u64)).collect();
    if parts.iter().any(|p| p.len() != per) {
        return bad(format!(
            "the collective splits a buffer of {len} elements unevenly over {w} ranks: {parts:?}"
        ));
    }
    let host = keep.then(|| Tensor::zeros([total as i64], (kind, Device::Cpu)));
    let buf = Tensor::zeros([len as i64], (kind, slice.device()));
    // Elements of a slice of `n` that piece k carries, from the slice's start.
    let carried = |n: usize, k: usize| (k * per).min(n)..((k + 1) * per).min(n);
    for k in 0..longest.div_ceil(per) {
        let mine = carried(ranges[rank].len(), k);
        if !mine.is_empty() {
            tch::no_grad(|| {
                buf.narrow(0, parts[rank].start as i64, mine.len() as i64)
                    .copy_(&slice.narrow(0, mine.start as i64, mine.len() as i64))
            });
        }
        sync.all_gather(&buf)?;
        let Some(host) = &host else { continue };
        let piece = buf.to_device(Device::Cpu);
        for (range, part) in ranges.iter().zip(&parts) {
            let theirs = carried(range.len(), k);
            if theirs.is_empty() {
                continue;
            }
            let n = theirs.len() as i64;
            tch::no_grad(|| {
                host.narrow(0, (range.start + theirs.start) as i64, n)
                    .copy_(&piece.narrow(0, part.start as i64, n))
            });
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::tcp_ring::tests::with_ring;
    use crate::shard::layout::FlatLayout;
    use crate::trainer::gradient_sync::SingleProcess;
    use tch::Kind;

    /// A collective that records the length of every buffer it gathers.
    struct Recording<'a, S> {
        inner: &'a mut S,
        gathered: Vec<usize>,
    }

    impl<S: GradientSync> GradientSync for Recording<'_, S> {
        fn rank(&self) -> u64 {
            self.inner.rank()
        }
        fn world_size(&self) -> u64 {
            self.inner.world_size()
        }
        fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<(), SyncError> {
            self.inner.all_reduce_mean(grads)
        }
        fn all_sum(&mut self, values: &mut [f32]) -> Result<(), SyncError> {
            self.inner.all_sum(values)
        }
        fn shard_range(&self, numel: usize, rank: u64) -> Range<usize> {
            self.inner.shard_range(numel, rank)
        }
        fn all_gather(&mut self, flat: &Tensor) -> Result<(), SyncError> {
            self.gathered.push(flat.numel());
            self.inner.all_gather(flat)
        }
    }

    /// Over the ring at W = 2 and 3, with a piece cap that makes several
    /// pieces and an uneven last one (the ranks' slices differ in length
    /// by one, and neither is a multiple of a piece), the pieces put
    /// together are the whole all-gather bit for bit, and no gathered
    /// buffer exceeds the cap; a rank that does not keep the result gets
    /// None and still takes part.
    #[test]
    fn the_pieces_together_are_the_whole_gather() {
        for w in [2usize, 3] {
            let results = with_ring(w, |mut ring| {
                let total = 103usize;
                let rank = ring.rank();
                let w = ring.world_size() as usize;
                let range = ring.shard_range(total, rank);
                // Values that differ between ranks and elements.
                let slice = (Tensor::arange(range.len() as i64, (Kind::Float, Device::Cpu))
                    + rank as f64 * 1000.0)
                    .sin();
                // Float32 a rank a piece: 7 at W = 2 (slices of 51 and
                // 52: 8 pieces), 5 at W = 3 (34, 34, 35: 7 pieces).
                let per = if w == 2 { 7 } else { 5 };
                let cap = w * per * 4;
                let mut rec = Recording {
                    inner: &mut ring,
                    gathered: Vec::new(),
                };
                let pieces = to_host(&mut rec, &slice, total, true, cap)
                    .unwrap()
                    .unwrap();
                let dropped = to_host(&mut rec, &slice, total, rank != 0, cap).unwrap();
                let gathered = rec.gathered;
                let layout = FlatLayout::new(
                    &[(
                        "p".to_owned(),
                        Tensor::zeros([total as i64], (Kind::Float, Device::Cpu)),
                    )],
                    |n| ring.shard_range(n, rank),
                )
                .unwrap();
                let whole = layout.placed(&slice);
                ring.all_gather(&whole).unwrap();
                (pieces, whole, dropped.is_some(), gathered, cap / 4)
            });
            for (rank, (pieces, whole, kept, gathered, cap)) in results.iter().enumerate() {
                assert_eq!(pieces.device(), Device::Cpu);
                let diff = (pieces - whole).abs().max().double_value(&[]);
                assert!(
                    pieces.equal(whole),
                    "W = {w}, rank {rank}: the pieces differ from the whole gather by {diff}"
                );
                assert_eq!(*kept, rank != 0);
                let want = if w == 2 { 8 } else { 7 };
                assert_eq!(gathered.len(), 2 * want, "W = {w}: {gathered:?}");
                assert!(gathered.iter().all(|n| n <= cap), "W = {w}: {gathered:?}");
            }
        }
    }

    #[test]
    fn a_slice_that_is_not_the_ranks_is_refused() {
        let e = to_host(
            &mut SingleProcess,
            &Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            4,
            true,
            PIECE_BYTES,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("rank 0's slice holds 3 elements"),
            "{e}"
        );
    }
}
