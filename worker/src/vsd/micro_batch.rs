//! Gradient accumulation (`train.micro_batch`): a rank's batch run a few
//! rows at a time, each micro-batch's losses scaled by its share of the
//! batch before their backward, so the gradients left behind are the whole
//! batch's while activations live for one micro-batch. One micro-batch is
//! exactly the unsplit step, bit for bit.

use tch::{TchError, Tensor};

/// The micro-batches of a batch of `b` rows taken at most `micro` at a time
/// (None: all at once), as (start, len); the last may be shorter.
pub fn micro_batches(b: i64, micro: Option<u32>) -> Vec<(i64, i64)> {
    let size = micro.map_or(b, |m| i64::from(m).clamp(1, b.max(1)));
    (0..b)
        .step_by(size.max(1) as usize)
        .map(|start| (start, size.min(b - start)))
        .collect()
}

/// One micro-batch: its rows and its fraction of the batch's rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroBatch {
    pub start: i64,
    pub len: i64,
    /// Exactly 1 when the micro-batch is the whole batch, whose views of
    /// the batch's tensors then are those tensors.
    pub share: f64,
}

impl MicroBatch {
    /// The backward of this micro-batch's share of `loss` (the plain
    /// backward at share 1, so the one-micro-batch step is the unsplit one).
    pub fn backward(&self, loss: &Tensor) -> Result<(), TchError> {
        if self.share == 1.0 {
            loss.f_backward()
        } else {
            loss.f_mul_scalar(self.share)?.f_backward()
        }
    }

    /// [`Self::backward`] of the share times `scale` (fp16 loss scaling:
    /// accelerate divides by the accumulation steps, then the GradScaler
    /// multiplies); None: exactly [`Self::backward`].
    pub fn backward_scaled(&self, loss: &Tensor, scale: Option<f64>) -> Result<(), TchError> {
        let Some(scale) = scale else {
            return self.backward(loss);
        };
        let part = if self.share == 1.0 {
            loss.shallow_clone()
        } else {
            loss.f_mul_scalar(self.share)?
        };
        part.f_mul_scalar(scale)?.f_backward()
    }
}

/// Runs `part` on each micro-batch of a batch of `b` rows, in order, and
/// returns each result with its share; the first error stops the loop.
pub fn each_micro_batch<T, E>(
    b: i64,
    micro: Option<u32>,
    mut part: impl FnMut(MicroBatch) -> Result<T, E>,
) -> Result<Vec<(f64, T)>, E> {
    micro_batches(b, micro)
        .into_iter()
        .map(|(start, len)| {
            let share = if len == b { 1.0 } else { len as f64 / b as f64 };
            part(MicroBatch { start, len, share }).map(|r| (share, r))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_cover_the_batch_in_order() {
        assert_eq!(micro_batches(6, None), vec![(0, 6)]);
        assert_eq!(micro_batches(6, Some(6)), vec![(0, 6)]);
        assert_eq!(micro_batches(6, Some(64)), vec![(0, 6)]);
        assert_eq!(micro_batches(6, Some(2)), vec![(0, 2), (2, 2), (4, 2)]);
        assert_eq!(micro_batches(7, Some(3)), vec![(0, 3), (3, 3), (6, 1)]);
        assert_eq!(micro_batches(1, Some(1)), vec![(0, 1)]);
    }

    #[test]
    fn shares_sum_to_one_and_the_whole_batch_is_exactly_one() {
        let whole = each_micro_batch(6, None, Ok::<_, ()>).unwrap();
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].0, 1.0);
        let parts = each_micro_batch(7, Some(3), |m| Ok::<_, ()>(m.len)).unwrap();
        let total: f64 = parts.iter().map(|(s, _)| s).sum();
        assert!((total - 1.0).abs() < 1e-12, "{total}");
        assert_eq!(parts.iter().map(|p| p.1).collect::<Vec<_>>(), [3, 3, 1]);
        // The first error stops the loop.
        let mut seen = 0;
        let r = each_micro_batch(6, Some(2), |m| {
            seen += 1;
            if m.start == 2 { Err("boom") } else { Ok(()) }
        });
        assert_eq!((r.unwrap_err(), seen), ("boom", 2));
    }
}
