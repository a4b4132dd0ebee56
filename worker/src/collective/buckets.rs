//! Gradient buckets, as PyTorch DDP forms them: the gradients of one dtype,
//! in parameter order, packed into flat buffers of about `bucket_bytes`, so
//! a collective moves a few large buffers instead of hundreds of small
//! tensors. Pure functions on tensors of any device: the planning and the
//! flatten / copy-back are tested on CPU; NCCL (nccl.rs) only supplies the
//! in-place reduction of each flat buffer.

use std::collections::HashMap;

use tch::{Kind, Tensor};

/// PyTorch DDP's default bucket size (25 MiB).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Gradients reduced together: indices into the gradient list, all of one
/// dtype, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub kind: Kind,
    pub members: Vec<usize>,
    pub numel: usize,
}

impl Bucket {
    pub fn num_bytes(&self) -> usize {
        self.numel * self.kind.elt_size_in_bytes()
    }
}

/// Buckets for gradients of (dtype, element count), in the order given.
/// A bucket is closed when the next gradient of its dtype would take it
/// past `bucket_bytes`; a gradient larger than that gets a bucket of its
/// own. Empty gradients are left out. Buckets are ordered by their first
/// member, so ranks with the same parameters build the same plan.
pub fn plan(grads: &[(Kind, usize)], bucket_bytes: usize) -> Vec<Bucket> {
    let mut done: Vec<Bucket> = Vec::new();
    let mut open: HashMap<Kind, Bucket> = HashMap::new();
    for (i, &(kind, numel)) in grads.iter().enumerate() {
        if numel == 0 {
            continue;
        }
        let bytes = numel * kind.elt_size_in_bytes();
        if let Some(b) = open.get(&kind)
            && b.num_bytes() + bytes > bucket_bytes
        {
            done.extend(open.remove(&kind));
        }
        let b = open.entry(kind).or_insert_with(|| Bucket {
            kind,
            members: Vec::new(),
            numel: 0,
        });
        b.members.push(i);
        b.numel += numel;
    }
    done.extend(open.into_values());
    done.sort_by_key(|b| b.members[0]);
    done
}

/// The plan for these tensors (their dtypes and sizes).
pub fn plan_for(grads: &[Tensor], bucket_bytes: usize) -> Vec<Bucket> {
    let metas: Vec<(Kind, usize)> = grads.iter().map(|g| (g.kind(), g.numel())).collect();
    plan(&metas, bucket_bytes)
}

/// The most bytes of buckets one group hands to the backend at once
/// (NCCL: one ncclGroupStart/ncclGroupEnd and one wait): 1 GiB. It bounds
/// the flat copies alive at once, as the optimizer's chunks bound its
/// temporaries (torch/foreach.rs), while SD 2.1's 3.5 GB of fp32 gradients
/// take 4 groups instead of ~140 separate calls.
pub const DEFAULT_GROUP_BYTES: usize = 1 << 30;

/// Consecutive runs of buckets, each of at most `group_bytes` in all
/// (a bucket larger than that is a group of its own; `group_bytes` 0: one
/// bucket per group), in order.
pub fn groups(buckets: &[Bucket], group_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, b) in buckets.iter().enumerate() {
        if i > start && bytes + b.num_bytes() > group_bytes {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += b.num_bytes();
    }
    if start < buckets.len() {
        out.push(start..buckets.len());
    }
    out
}

/// Runs `reduce` once per group of buckets (see [`groups`]) on the
/// group's flat buffers, each holding one bucket's gradients back to back,
/// then copies the results back into every gradient. `reduce` works in
/// place, on all of a group's buffers together (NCCL: one group call). A
/// bucket of one contiguous gradient is reduced in place, without a copy.
/// The flat buffers live until their copies back are queued, so on CUDA
/// they are freed in stream order after the collective that wrote them.
pub fn reduce_in_groups<E>(
    grads: &[Tensor],
    buckets: &[Bucket],
    group_bytes: usize,
    mut reduce: impl FnMut(&[Tensor]) -> Result<(), E>,
) -> Result<(), E> {
    for group in groups(buckets, group_bytes) {
        let group = &buckets[group];
        let flats: Vec<Tensor> = group.iter().map(|b| flatten(grads, b)).collect();
        reduce(&flats)?;
        for (bucket, flat) in group.iter().zip(&flats) {
            copy_back(grads, bucket, flat);
        }
    }
    Ok(())
}

/// [`reduce_in_groups`] with one bucket per call.
pub fn reduce_in_buckets<E>(
    grads: &[Tensor],
    buckets: &[Bucket],
    mut reduce: impl FnMut(&Tensor) -> Result<(), E>,
) -> Result<(), E> {
    reduce_in_groups(grads, buckets, 0, |flats| {
        flats.iter().try_for_each(&mut reduce)
    })
}

/// The buffer a bucket is reduced in: its lone contiguous gradient itself,
/// else its gradients concatenated.
fn flatten(grads: &[Tensor], bucket: &Bucket) -> Tensor {
    if let [only] = bucket.members[..]
        && grads[only].is_contiguous()
    {
        return grads[only].shallow_clone();
    }
    let parts: Vec<Tensor> = bucket
        .members
        .iter()
        .map(|&i| grads[i].reshape([-1]))
        .collect();
    Tensor::cat(&parts, 0)
}

/// Writes a reduced flat buffer back into the bucket's gradients (nothing
/// to do for a gradient reduced in place).
fn copy_back(grads: &[Tensor], bucket: &Bucket, flat: &Tensor) {
    if let [only] = bucket.members[..]
        && grads[only].data_ptr() == flat.data_ptr()
    {
        return;
    }
    let mut offset = 0i64;
    for &i in &bucket.members {
        let g = &grads[i];
        let n = g.numel() as i64;
        // copy_ writes through the gradient's own strides.
        let mut target = g.shallow_clone();
        target.copy_(&flat.narrow(0, offset, n).view(g.size().as_slice()));
        offset += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const F32: Kind = Kind::Float;
    const BF16: Kind = Kind::BFloat16;

    fn members(plan: &[Bucket]) -> Vec<(Kind, Vec<usize>)> {
        plan.iter().map(|b| (b.kind, b.members.clone())).collect()
    }

    #[test]
    fn plans_fill_buckets_per_dtype_in_order() {
        // 4-byte floats, buckets of 40 bytes (10 floats).
        let grads = [
            (F32, 4),
            (F32, 4),
            (F32, 4),
            (BF16, 8),
            (F32, 30),
            (F32, 2),
            (BF16, 20),
            (F32, 0),
        ];
        let p = plan(&grads, 40);
        assert_eq!(
            members(&p),
            vec![
                (F32, vec![0, 1]),
                (F32, vec![2]),
                (BF16, vec![3]),
                // Larger than a bucket: alone.
                (F32, vec![4]),
                (F32, vec![5]),
                (BF16, vec![6]),
            ]
        );
        assert_eq!(p[0].numel, 8);
        assert_eq!(p[3].num_bytes(), 120);
        // Every non-empty gradient exactly once.
        let mut all: Vec<usize> = p.iter().flat_map(|b| b.members.clone()).collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5, 6]);
        // A bf16 bucket holds twice as many elements for the same bytes.
        let p = plan(&[(BF16, 10), (BF16, 10), (BF16, 10)], 40);
        assert_eq!(members(&p), vec![(BF16, vec![0, 1]), (BF16, vec![2])]);
        assert!(plan(&[], 40).is_empty());
    }

    #[test]
    fn flat_buffers_round_trip_into_every_gradient() {
        let opts = (F32, Device::Cpu);
        // A transposed (non-contiguous) gradient, a scalar-like one, a bf16
        // one and a large contiguous one that gets its own bucket.
        let a = Tensor::arange(6, opts).view([2, 3]);
        let b = Tensor::arange(6, opts).view([3, 2]).transpose(0, 1);
        assert!(!b.is_contiguous());
        let c = Tensor::from_slice(&[7.0f32]);
        let d = Tensor::arange(4, (BF16, Device::Cpu));
        let e = Tensor::arange(64, opts);
        let grads = [a, b, c, d, e];
        let before: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
        let buckets = plan_for(&grads, 64);
        assert_eq!(
            members(&buckets),
            vec![(F32, vec![0, 1, 2]), (BF16, vec![3]), (F32, vec![4])]
        );

        let grad_ptrs: Vec<_> = grads.iter().map(Tensor::data_ptr).collect();
        let mut seen = Vec::new();
        reduce_in_buckets(&grads, &buckets, |flat| {
            let in_place = grad_ptrs.contains(&flat.data_ptr());
            seen.push((flat.numel(), flat.kind(), in_place));
            // Stand-in for a collective: changes every element differently,
            // in place.
            let mut f = flat.shallow_clone();
            f.copy_(&(flat * 3.0 + 1.0));
            Ok::<(), ()>(())
        })
        .unwrap();
        // Three gradients packed into one buffer; the lone contiguous ones
        // reduced where they are.
        assert_eq!(
            seen,
            vec![(13, F32, false), (4, BF16, true), (64, F32, true)]
        );
        for (i, (g, b)) in grads.iter().zip(&before).enumerate() {
            let want = b * 3.0 + 1.0;
            assert!(g.equal(&want), "gradient {i}: {g} vs {want}");
            assert_eq!(g.size(), b.size());
        }
        // The transposed gradient kept its strides (written through them).
        assert!(!grads[1].is_contiguous());
    }

    #[test]
    fn groups_take_buckets_in_order_up_to_their_bytes() {
        // Buckets of 4, 4, 12, 4, 4, 4 floats (16, 16, 48, 16, 16, 16 bytes).
        let buckets = plan(
            &[(F32, 4), (F32, 4), (F32, 12), (F32, 4), (F32, 4), (F32, 4)],
            16,
        );
        assert_eq!(buckets.len(), 6);
        assert_eq!(groups(&buckets, 32), vec![0..2, 2..3, 3..5, 5..6]);
        // A bucket that fills a group is alone; the next group starts after
        // it.
        assert_eq!(groups(&buckets, 48), vec![0..2, 2..3, 3..6]);
        // Larger than a group: alone as well.
        assert_eq!(
            groups(&buckets, 20),
            vec![0..1, 1..2, 2..3, 3..4, 4..5, 5..6]
        );
        assert_eq!(groups(&buckets, usize::MAX), vec![0..6]);
        assert_eq!(
            groups(&buckets, 0),
            (0..6).map(|i| i..i + 1).collect::<Vec<_>>()
        );
        assert!(groups(&[], 32).is_empty());
    }

    #[test]
    fn a_group_reduces_its_buckets_together_and_copies_each_back() {
        let opts = (F32, Device::Cpu);
        let grads = [
            Tensor::arange(3, opts),
            Tensor::arange(3, opts).view([3, 1]).transpose(0, 1),
            Tensor::arange(40, opts),
            Tensor::arange(4, (BF16, Device::Cpu)),
            Tensor::arange(5, opts),
        ];
        let before: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
        // Buckets: [0, 1] (24 B), [2] (160 B, alone and in place), [3]
        // (bf16, 8 B), [4] (20 B).
        let buckets = plan_for(&grads, 32);
        assert_eq!(
            members(&buckets),
            vec![
                (F32, vec![0, 1]),
                (F32, vec![2]),
                (BF16, vec![3]),
                (F32, vec![4])
            ]
        );
        let mut calls = Vec::new();
        reduce_in_groups(&grads, &buckets, 190, |flats| {
            calls.push(flats.iter().map(Tensor::numel).collect::<Vec<_>>());
            for f in flats {
                let mut f = f.shallow_clone();
                f.copy_(&(&f * 2.0 - 1.0));
            }
            Ok::<(), ()>(())
        })
        .unwrap();
        // 24 + 160 bytes fit 190, the bf16 bucket's 8 more do not: the rest
        // make the second group.
        assert_eq!(calls, vec![vec![6, 40], vec![4, 5]]);
        for (i, (g, b)) in grads.iter().zip(&before).enumerate() {
            let want = b * 2.0 - 1.0;
            assert!(g.equal(&want), "gradient {i}: {g} vs {want}");
        }
        // A failing group stops there: nothing after it is reduced.
        let mut groups_seen = 0;
        let r = reduce_in_groups(&grads, &buckets, 190, |_| {
            groups_seen += 1;
            Err("peer gone")
        });
        assert_eq!((r, groups_seen), (Err("peer gone"), 1));
    }

    #[test]
    fn a_failing_reduction_stops_at_its_bucket() {
        let grads = [
            Tensor::ones([3], (F32, Device::Cpu)),
            Tensor::ones([3], (BF16, Device::Cpu)),
        ];
        let buckets = plan_for(&grads, 1024);
        let mut calls = 0;
        let r = reduce_in_buckets(&grads, &buckets, |_| {
            calls += 1;
            Err("peer gone")
        });
        assert_eq!(r, Err("peer gone"));
        assert_eq!(calls, 1);
    }
}
