//! How a network's parameters lie in one flat buffer for the sharded
//! collectives: in name order (Adam's), each flattened, back to back; one
//! dtype. A rank's slice is a contiguous range of it (the collective's
//! `shard_range`), which may start or end inside a parameter.

use std::ops::Range;

use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct FlatLayout {
    names: Vec<String>,
    sizes: Vec<Vec<i64>>,
    numels: Vec<usize>,
    total: usize,
    kind: Kind,
    /// This rank's slice.
    range: Range<usize>,
}

impl FlatLayout {
    /// The layout of `named` (sorted by name here), with this rank's
    /// `range` of the `total` elements chosen by `range_of(total)`. All
    /// parameters must share one dtype.
    pub fn new(
        named: &[(String, Tensor)],
        range_of: impl FnOnce(usize) -> Range<usize>,
    ) -> Result<Self, String> {
        let mut named: Vec<&(String, Tensor)> = named.iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let kind = named.first().map_or(Kind::Float, |(_, t)| t.kind());
        if let Some((n, t)) = named.iter().find(|(_, t)| t.kind() != kind) {
            return Err(format!(
                "world.shard_state flattens a network's parameters into one buffer of one dtype: \
                 `{n}` is {:?}, the first is {kind:?}",
                t.kind()
            ));
        }
        let numels: Vec<usize> = named.iter().map(|(_, t)| t.numel()).collect();
        let total = numels.iter().sum();
        let range = range_of(total);
        if range.end > total || range.start > range.end {
            return Err(format!(
                "the collective gave the slice {range:?} of {total} elements"
            ));
        }
        Ok(Self {
            names: named.iter().map(|(n, _)| n.clone()).collect(),
            sizes: named.iter().map(|(_, t)| t.size()).collect(),
            numels,
            total,
            kind,
            range,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// `tensors` (in name order) flattened into one new buffer.
    pub fn flatten(&self, tensors: &[Tensor]) -> Tensor {
        tch::no_grad(|| {
            let parts: Vec<Tensor> = tensors
                .iter()
                .map(|t| t.detach().to_kind(self.kind).reshape([-1]))
                .collect();
            Tensor::cat(&parts, 0)
        })
    }

    /// This rank's slice of a flat buffer (a view).
    pub fn slice_of(&self, flat: &Tensor) -> Tensor {
        flat.narrow(0, self.range.start as i64, self.range.len() as i64)
    }

    /// A flat buffer of zeros with `slice` at this rank's range: what an
    /// all-gather fills in.
    pub fn placed(&self, slice: &Tensor) -> Tensor {
        let flat = Tensor::zeros([self.total as i64], (slice.kind(), slice.device()));
        tch::no_grad(|| self.slice_of(&flat).copy_(slice));
        flat
    }

    /// Copies a flat buffer back into `targets` (in name order).
    pub fn write_back(&self, flat: &Tensor, targets: &[Tensor]) {
        tch::no_grad(|| {
            let mut offset = 0i64;
            for (t, &n) in targets.iter().zip(&self.numels) {
                let part = flat.narrow(0, offset, n as i64).view(t.size().as_slice());
                t.detach().copy_(&part);
                offset += n as i64;
            }
        });
    }

    /// A flat buffer as named tensors of the parameters' shapes (views of
    /// `flat`, which they keep alive: no second copy of the state), each
    /// name prefixed with `prefix`.
    pub fn split(&self, flat: &Tensor, prefix: &str) -> Vec<(String, Tensor)> {
        let mut offset = 0i64;
        self.names
            .iter()
            .zip(&self.sizes)
            .zip(&self.numels)
            .map(|((n, size), &k)| {
                let t = flat.narrow(0, offset, k as i64).view(size.as_slice());
                offset += k as i64;
                (format!("{prefix}{n}"), t)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattening_splits_and_writes_back_in_name_order() {
        let b = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]);
        let a = Tensor::from_slice(&[10.0f32, 11.0]);
        let named = vec![("b".to_owned(), b.copy()), ("a".to_owned(), a.copy())];
        let layout = FlatLayout::new(&named, |n| 1..n - 2).unwrap();
        assert_eq!(layout.names(), ["a", "b"]);
        assert_eq!((layout.total(), layout.range()), (8, 1..6));
        let flat = layout.flatten(&[a.copy(), b.copy()]);
        let v: Vec<f32> = Vec::try_from(&flat).unwrap();
        assert_eq!(v, vec![10.0, 11.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let slice: Vec<f32> = Vec::try_from(&layout.slice_of(&flat)).unwrap();
        assert_eq!(slice, vec![11.0, 0.0, 1.0, 2.0, 3.0]);
        let placed: Vec<f32> = Vec::try_from(&layout.placed(&layout.slice_of(&flat))).unwrap();
        assert_eq!(placed, vec![0.0, 11.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0]);
        let split = layout.split(&(&flat * 2.0), "m.");
        assert_eq!(split[1].0, "m.b");
        assert!(split[1].1.equal(&(&b * 2.0)));
        let targets = [a.zeros_like(), b.zeros_like()];
        layout.write_back(&flat, &targets);
        assert!(targets[0].equal(&a) && targets[1].equal(&b));
        let mixed = vec![
            ("a".to_owned(), a.copy()),
            ("b".to_owned(), b.to_kind(Kind::BFloat16)),
        ];
        let e = FlatLayout::new(&mixed, |n| 0..n).unwrap_err();
        assert!(e.contains("world.shard_state") && e.contains("`b`"), "{e}");
    }
}
