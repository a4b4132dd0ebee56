//! Exponential moving average of the student's weights, as diffusers'
//! EMAModel computes it (update_after_step 0, no warm-up power):
//! at optimization step n, k = n - 1, decay = 0 when k = 0 and
//! min((1 + k) / (10 + k), max_decay) after; ema <- ema - (1 - decay)(ema - theta).
//! Exported student weights are these.

use std::collections::HashMap;

use tch::Tensor;

pub struct Ema {
    max_decay: f64,
    names: Vec<String>,
    shadow: Vec<Tensor>,
    /// EMA updates applied so far (diffusers' optimization_step).
    num_updates: i64,
    /// Parameter bytes per multi-tensor call (crate::torch::foreach).
    chunk_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EmaError {
    #[error("EMA state does not match the student:\n{0}")]
    Mismatch(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

impl Ema {
    /// Starts from a copy of the given weights.
    pub fn new(params: impl IntoIterator<Item = (String, Tensor)>, max_decay: f64) -> Self {
        let mut named: Vec<(String, Tensor)> = params.into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, shadow) = named
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .unzip();
        Self {
            max_decay,
            names,
            shadow,
            num_updates: 0,
            chunk_bytes: crate::torch::foreach::CHUNK_BYTES,
        }
    }

    /// How many bytes of weights one multi-tensor update takes at most
    /// (default [`crate::torch::foreach::CHUNK_BYTES`]); the results do not
    /// depend on it.
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_bytes = bytes.max(1);
    }

    /// The decay diffusers uses at optimization step `n` (1-based).
    pub fn decay_at(&self, n: i64) -> f64 {
        let k = (n - 1).max(0) as f64;
        if k <= 0.0 {
            return 0.0;
        }
        ((1.0 + k) / (10.0 + k)).min(self.max_decay)
    }

    /// One update towards `params` (same names as at construction, any order).
    pub fn update(&mut self, params: &HashMap<String, Tensor>) {
        self.num_updates += 1;
        let one_minus = 1.0 - self.decay_at(self.num_updates);
        tch::no_grad(|| {
            // Aligned lists for the multi-tensor update (crate::torch::foreach);
            // the loop is the same arithmetic, for mixed kinds.
            let (mut ss, mut ps) = (Vec::new(), Vec::new());
            for (name, s) in self.names.iter().zip(&self.shadow) {
                if let Some(p) = params.get(name) {
                    ss.push(s.shallow_clone());
                    ps.push(p.shallow_clone());
                }
            }
            // A chunk at a time: `delta` is bounded by the chunk.
            let bytes = crate::torch::foreach::tensor_bytes(&ss);
            for r in crate::torch::foreach::chunks(&bytes, self.chunk_bytes) {
                let (ss, ps) = (&mut ss[r.clone()], &ps[r]);
                let done = crate::torch::foreach::ema_update(ss, ps, one_minus)
                    .unwrap_or_else(|e| panic!("EMA update: {e}"));
                if !done {
                    for (s, p) in ss.iter_mut().zip(ps) {
                        let delta = (&*s - p.to_kind(s.kind())) * one_minus;
                        let _ = s.g_sub_(&delta);
                    }
                }
            }
        });
    }

    pub fn num_updates(&self) -> i64 {
        self.num_updates
    }

    /// The averaged weights, by name.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .cloned()
            .zip(self.shadow.iter().map(Tensor::shallow_clone))
            .collect()
    }

    /// Exchanges the averaged weights with `params`' values in place (one
    /// tensor at a time, so it costs one tensor's memory): after one call
    /// the network holds the EMA weights, after a second everything is as
    /// before, bit for bit. Names not in `params` are left alone.
    pub fn swap_with(&mut self, params: &HashMap<String, Tensor>) {
        tch::no_grad(|| {
            for (name, s) in self.names.iter().zip(self.shadow.iter_mut()) {
                if let Some(p) = params.get(name) {
                    let held = p.detach().copy();
                    let mut p = p.detach();
                    p.copy_(s);
                    s.copy_(&held);
                }
            }
        });
    }

    /// Restores weights and the update count saved from [`Self::tensors`].
    pub fn load(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        num_updates: i64,
    ) -> Result<(), EmaError> {
        let mut problems = Vec::new();
        for (n, s) in self.names.iter().zip(&self.shadow) {
            match tensors.get(n) {
                None => problems.push(format!("missing `{n}`")),
                Some(t) if t.size() != s.size() => problems.push(format!(
                    "`{n}`: expected shape {:?}, found {:?}",
                    s.size(),
                    t.size()
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(EmaError::Mismatch(problems.join("\n")));
        }
        tch::no_grad(|| -> Result<(), EmaError> {
            for (n, s) in self.names.iter().zip(self.shadow.iter_mut()) {
                let t = &tensors[n];
                s.f_copy_(&t.f_to_kind(s.kind())?.f_to_device(s.device())?)?;
            }
            Ok(())
        })?;
        self.num_updates = num_updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_follows_diffusers() {
        let ema = Ema::new(Vec::new(), 0.9999);
        assert_eq!(ema.decay_at(1), 0.0);
        assert!((ema.decay_at(2) - 2.0 / 11.0).abs() < 1e-15);
        assert!((ema.decay_at(101) - 101.0 / 110.0).abs() < 1e-15);
        assert_eq!(ema.decay_at(10_000_000), 0.9999);
    }

    #[test]
    fn first_update_copies_then_averages() {
        let w = Tensor::from_slice(&[1.0f32, 2.0]);
        let mut ema = Ema::new([("w".to_owned(), w.copy())], 0.9999);
        let mut params = HashMap::new();
        params.insert("w".to_owned(), Tensor::from_slice(&[3.0f32, 4.0]));
        ema.update(&params);
        let got: Vec<f32> = Vec::try_from(&ema.tensors()[0].1).unwrap();
        assert_eq!(got, vec![3.0, 4.0]);
        params.insert("w".to_owned(), Tensor::from_slice(&[14.0f32, 4.0]));
        ema.update(&params);
        // decay 2/11: 3 - (9/11)(3 - 14) = 12
        let got: Vec<f32> = Vec::try_from(&ema.tensors()[0].1).unwrap();
        assert!((got[0] - 12.0).abs() < 1e-5 && (got[1] - 4.0).abs() < 1e-6);
        assert_eq!(ema.num_updates(), 2);
    }

    #[test]
    fn swapping_twice_restores_both_sides_bitwise() {
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut ema = Ema::new([("w".to_owned(), w.detach().copy())], 0.9999);
        let mut params = HashMap::new();
        params.insert("w".to_owned(), w.shallow_clone());
        tch::no_grad(|| {
            w.detach().copy_(&Tensor::from_slice(&[0.1f32, 0.3]));
        });
        ema.swap_with(&params);
        assert_eq!(Vec::<f32>::try_from(w.detach()).unwrap(), vec![1.0, 2.0]);
        let shadow: Vec<f32> = Vec::try_from(&ema.tensors()[0].1).unwrap();
        assert_eq!(shadow, vec![0.1, 0.3]);
        ema.swap_with(&params);
        assert_eq!(Vec::<f32>::try_from(w.detach()).unwrap(), vec![0.1, 0.3]);
        let shadow: Vec<f32> = Vec::try_from(&ema.tensors()[0].1).unwrap();
        assert_eq!(shadow, vec![1.0, 2.0]);
        assert!(w.requires_grad(), "the parameter stays trainable");
    }
}
