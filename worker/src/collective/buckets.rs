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

/// Runs `reduce` once per bucket on a flat buffer holding the bucket's
/// gradients back to back, then copies the result back into each gradient.
/// `reduce` works in place. A bucket of one contiguous gradient is reduced
/// in place, without a copy.
pub fn reduce_in_buckets<E>(
    grads: &[Tensor],
    buckets: &[Bucket],
    mut reduce: impl FnMut(&Tensor) -> Result<(), E>,
) -> Result<(), E> {
    for bucket in buckets {
        if let [only] = bucket.members[..]
            && grads[only].is_contiguous()
        {
            reduce(&grads[only])?;
            continue;
        }
        let parts: Vec<Tensor> = bucket
            .members
            .iter()
            .map(|&i| grads[i].reshape([-1]))
            .collect();
        let flat = Tensor::cat(&parts, 0);
        reduce(&flat)?;
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
    Ok(())
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
