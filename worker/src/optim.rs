//! Adam and gradient-norm clipping with torch.optim semantics, over named
//! parameters, with state that can be saved and restored exactly.
//!
//! tch's own optimizers keep their moments out of reach, and a resumed run
//! must continue bit for bit, so the few lines of Adam live here.

use std::collections::HashMap;

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// L2 penalty added to the gradient (torch.optim.Adam, not AdamW).
    pub weight_decay: f64,
}

impl From<&swiftbrush_proto::config::OptimizerConfig> for AdamConfig {
    fn from(c: &swiftbrush_proto::config::OptimizerConfig) -> Self {
        Self {
            lr: c.lr,
            beta1: c.betas[0],
            beta2: c.betas[1],
            eps: c.eps,
            weight_decay: c.weight_decay,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer state does not match the parameters:\n{0}")]
    StateMismatch(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// Adam over a fixed, name-sorted list of parameters.
pub struct Adam {
    cfg: AdamConfig,
    names: Vec<String>,
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: i64,
    /// Parameter bytes per multi-tensor call (crate::torch::foreach).
    chunk_bytes: usize,
}

impl Adam {
    /// Moments start at zero (torch creates them lazily with zeros: same).
    pub fn new(params: impl IntoIterator<Item = (String, Tensor)>, cfg: AdamConfig) -> Self {
        let mut named: Vec<(String, Tensor)> = params.into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, params): (Vec<_>, Vec<_>) = named.into_iter().unzip();
        let zeros = |p: &Tensor| p.zeros_like().detach();
        let exp_avg = params.iter().map(zeros).collect();
        let exp_avg_sq = params.iter().map(zeros).collect();
        Self {
            cfg,
            names,
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
            chunk_bytes: crate::torch::foreach::CHUNK_BYTES,
        }
    }

    /// How many bytes of parameters one multi-tensor call takes at most
    /// (default [`crate::torch::foreach::CHUNK_BYTES`]); the results do not
    /// depend on it.
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_bytes = bytes.max(1);
    }

    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Steps taken so far.
    pub fn num_steps(&self) -> i64 {
        self.step
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// One Adam update from the parameters' current gradients. Parameters
    /// without a gradient are left alone (as torch does).
    pub fn step(&mut self) {
        let params: Vec<Tensor> = self.params.iter().map(Tensor::shallow_clone).collect();
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        self.step_with(&params, &grads);
    }

    /// One Adam update of `params` from `grads` (aligned with the moments,
    /// in name order; an undefined gradient leaves its parameter alone):
    /// [`Self::step`] on its own parameters, and the sharded optimizer's
    /// step on a slice of the flattened weights (crate::shard).
    pub fn step_with(&mut self, params: &[Tensor], grads: &[Tensor]) {
        self.step += 1;
        let c = self.cfg;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let step_size = c.lr / bias1;
        tch::no_grad(|| {
            // The parameters with a gradient, as aligned lists for the
            // multi-tensor step (crate::torch::foreach), taken a chunk at a
            // time so its temporaries (and the weight-decayed gradients) are
            // bounded by the chunk; the per-tensor loop below is the same
            // arithmetic, for what it does not take.
            let (mut ps, mut raw, mut ms, mut vs) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (((p, g), m), v) in params
                .iter()
                .zip(grads)
                .zip(&self.exp_avg)
                .zip(&self.exp_avg_sq)
            {
                if !g.defined() {
                    continue;
                }
                ps.push(p.shallow_clone());
                raw.push(g.shallow_clone());
                ms.push(m.shallow_clone());
                vs.push(v.shallow_clone());
            }
            let scalars = crate::torch::foreach::AdamScalars {
                one_minus_beta1: 1.0 - c.beta1,
                beta2: c.beta2,
                one_minus_beta2: 1.0 - c.beta2,
                bias2_sqrt,
                eps: c.eps,
                step_size,
            };
            let bytes = crate::torch::foreach::tensor_bytes(&ps);
            for r in crate::torch::foreach::chunks(&bytes, self.chunk_bytes) {
                let (ps, ms, vs) = (&mut ps[r.clone()], &mut ms[r.clone()], &mut vs[r.clone()]);
                let gs: Vec<Tensor> = ps
                    .iter()
                    .zip(&raw[r])
                    .map(|(p, g)| {
                        if c.weight_decay != 0.0 {
                            g + p * c.weight_decay
                        } else {
                            g.shallow_clone()
                        }
                    })
                    .collect();
                let done = crate::torch::foreach::adam_step(ps, &gs, ms, vs, scalars)
                    .unwrap_or_else(|e| panic!("Adam step: {e}"));
                if done {
                    continue;
                }
                for (((p, g), m), v) in ps.iter_mut().zip(&gs).zip(ms.iter_mut()).zip(vs.iter_mut())
                {
                    let _ = m.lerp_(g, 1.0 - c.beta1);
                    let _ = v.g_mul_scalar_(c.beta2);
                    let _ = v.addcmul_(&(g * (1.0 - c.beta2)), g);
                    let denom = v.sqrt() / bias2_sqrt + c.eps;
                    let _ = p.g_sub_(&(&*m / denom * step_size));
                }
            }
        });
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    /// An Adam over given moments and no parameters of its own, stepped by
    /// [`Self::step_with`]: a rank's shard of another Adam's state
    /// (crate::shard), named `names`.
    pub fn over_moments(
        names: Vec<String>,
        exp_avg: Vec<Tensor>,
        exp_avg_sq: Vec<Tensor>,
        step: i64,
        cfg: AdamConfig,
    ) -> Self {
        Self {
            cfg,
            names,
            params: Vec::new(),
            exp_avg,
            exp_avg_sq,
            step,
            chunk_bytes: crate::torch::foreach::CHUNK_BYTES,
        }
    }

    /// The parameter names, in the moments' (sorted) order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The first and second moments, in name order.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// Frees the moments (each left an empty tensor) while a shard of them
    /// lives elsewhere (crate::shard); [`Self::reset_moments`] gives back
    /// zeros of the parameters' shapes, before a checkpoint is loaded in.
    pub fn release_moments(&mut self) {
        for m in self.exp_avg.iter_mut().chain(self.exp_avg_sq.iter_mut()) {
            *m = Tensor::empty([0], (m.kind(), m.device()));
        }
    }

    /// Zero moments of the parameters' shapes, and no steps taken.
    pub fn reset_moments(&mut self) {
        let zeros = |p: &Tensor| p.zeros_like().detach();
        self.exp_avg = self.params.iter().map(zeros).collect();
        self.exp_avg_sq = self.params.iter().map(zeros).collect();
        self.step = 0;
    }

    /// The state as named tensors: `exp_avg.<name>`, `exp_avg_sq.<name>`
    /// and `step`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len() + 1);
        for (i, n) in self.names.iter().enumerate() {
            out.push((format!("exp_avg.{n}"), self.exp_avg[i].shallow_clone()));
            out.push((
                format!("exp_avg_sq.{n}"),
                self.exp_avg_sq[i].shallow_clone(),
            ));
        }
        out.push(("step".to_owned(), Tensor::from(self.step)));
        out
    }

    /// Restores a state saved by [`Self::state_tensors`], strictly.
    pub fn load_state(&mut self, mut state: HashMap<String, Tensor>) -> Result<(), OptimError> {
        let mut problems = Vec::new();
        let step = state.remove("step");
        if step.is_none() {
            problems.push("missing `step`".to_owned());
        }
        for (i, n) in self.names.iter().enumerate() {
            for (key, want) in [
                (format!("exp_avg.{n}"), &self.exp_avg[i]),
                (format!("exp_avg_sq.{n}"), &self.exp_avg_sq[i]),
            ] {
                match state.get(&key) {
                    None => problems.push(format!("missing `{key}`")),
                    Some(t) if t.size() != want.size() => problems.push(format!(
                        "`{key}`: expected shape {:?}, found {:?}",
                        want.size(),
                        t.size()
                    )),
                    Some(_) => {}
                }
            }
        }
        let known: std::collections::HashSet<String> = self
            .names
            .iter()
            .flat_map(|n| [format!("exp_avg.{n}"), format!("exp_avg_sq.{n}")])
            .collect();
        let mut extra: Vec<&String> = state.keys().filter(|k| !known.contains(*k)).collect();
        extra.sort();
        problems.extend(extra.into_iter().map(|k| format!("unexpected `{k}`")));
        if !problems.is_empty() {
            return Err(OptimError::StateMismatch(problems.join("\n")));
        }
        tch::no_grad(|| -> Result<(), OptimError> {
            for (i, n) in self.names.iter().enumerate() {
                let m = &state[&format!("exp_avg.{n}")];
                let v = &state[&format!("exp_avg_sq.{n}")];
                let dev = self.exp_avg[i].device();
                let kind = self.exp_avg[i].kind();
                self.exp_avg[i].f_copy_(&m.f_to_kind(kind)?.f_to_device(dev)?)?;
                self.exp_avg_sq[i].f_copy_(&v.f_to_kind(kind)?.f_to_device(dev)?)?;
            }
            Ok(())
        })?;
        self.step = step.map(|s| s.int64_value(&[])).unwrap_or(0);
        Ok(())
    }
}

/// torch.nn.utils.clip_grad_norm_: scales all gradients by
/// min(1, max_norm / (total_norm + 1e-6)) and returns the total L2 norm
/// before clipping (non-finite when any gradient is).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let grads = defined_grads(params);
    let total = grad_norm(&grads).double_value(&[]);
    scale_to_norm(&grads, total, max_norm);
    total
}

/// The parameters' gradients, skipping parameters without one.
pub fn defined_grads(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect()
}

/// The total L2 norm of `grads`, on their device (float32, 0-dim; 0 for
/// none): the norm of the per-tensor norms, as torch's clip_grad_norm_
/// computes it. Non-finite when any gradient entry is, so it doubles as the
/// finite check (the trainer reads it with the losses in one transfer).
pub fn grad_norm(grads: &[Tensor]) -> Tensor {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = match crate::torch::foreach::norms(grads) {
            Ok(Some(norms)) => norms,
            Ok(None) => grads
                .iter()
                .map(|g| g.to_kind(Kind::Float).norm())
                .collect(),
            Err(e) => panic!("gradient norms: {e}"),
        };
        match norms.first() {
            None => Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
            Some(_) => Tensor::stack(&norms, 0).norm(),
        }
    })
}

/// The second half of [`clip_grad_norm`]: scales `grads` by
/// min(1, max_norm / (total + 1e-6)), `total` being their norm read back
/// (the coefficient is computed on the host in float64, as before, so the
/// result is the same bit for bit).
pub fn scale_to_norm(grads: &[Tensor], total: f64, max_norm: f64) {
    tch::no_grad(|| {
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        crate::torch::foreach::mul_scalar_(grads, coef)
            .unwrap_or_else(|e| panic!("gradient clip: {e}"));
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &[f32]) {
        let mut grad = p.grad();
        if !grad.defined() {
            // Create the grad buffer through autograd once.
            (p * Tensor::from_slice(g)).sum(Kind::Float).backward();
            return;
        }
        tch::no_grad(|| grad.copy_(&Tensor::from_slice(g)));
    }

    #[test]
    fn first_adam_step_moves_each_weight_by_lr() {
        // With zero moments, step 1 moves every weight by lr * sign(g)
        // (up to eps): m_hat = g, v_hat = g^2.
        let p = param(&[1.0, -2.0, 3.0]);
        let mut opt = Adam::new(
            [("w".to_owned(), p.shallow_clone())],
            AdamConfig {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        );
        set_grad(&p, &[0.5, -4.0, 1e-3]);
        opt.step();
        let got: Vec<f32> = Vec::try_from(p.detach()).unwrap();
        let want = [0.9f32, -1.9, 2.9];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        assert_eq!(opt.num_steps(), 1);
    }

    #[test]
    fn state_round_trips_and_mismatch_is_named() {
        let p = param(&[1.0, 2.0]);
        let cfg = AdamConfig {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut a = Adam::new([("w".to_owned(), p.shallow_clone())], cfg);
        set_grad(&p, &[1.0, -1.0]);
        a.step();
        let saved: HashMap<String, Tensor> = a
            .state_tensors()
            .into_iter()
            .map(|(k, v)| (k, v.copy()))
            .collect();
        let q = param(&[1.0, 2.0]);
        let mut b = Adam::new([("w".to_owned(), q.shallow_clone())], cfg);
        b.load_state(saved).unwrap();
        assert_eq!(b.num_steps(), 1);
        for ((ka, ta), (kb, tb)) in a.state_tensors().iter().zip(b.state_tensors().iter()) {
            assert_eq!(ka, kb);
            assert!(ta.equal(tb), "{ka}");
        }
        let mut bad = HashMap::new();
        bad.insert(
            "exp_avg.w".to_owned(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        );
        bad.insert(
            "exp_avg.x".to_owned(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        );
        let e = b.load_state(bad).unwrap_err().to_string();
        assert!(e.contains("missing `step`"), "{e}");
        assert!(
            e.contains("`exp_avg.w`: expected shape [2], found [3]"),
            "{e}"
        );
        assert!(e.contains("missing `exp_avg_sq.w`"), "{e}");
        assert!(e.contains("unexpected `exp_avg.x`"), "{e}");
    }

    #[test]
    fn clipping_scales_to_max_norm_and_reports_the_norm() {
        let a = param(&[0.0, 0.0]);
        let b = param(&[0.0]);
        set_grad(&a, &[3.0, 0.0]);
        set_grad(&b, &[4.0]);
        let params = [a.shallow_clone(), b.shallow_clone()];
        let total = clip_grad_norm(&params, 1.0);
        assert!((total - 5.0).abs() < 1e-6);
        let ga: Vec<f32> = Vec::try_from(a.grad()).unwrap();
        let gb: Vec<f32> = Vec::try_from(b.grad()).unwrap();
        assert!((ga[0] - 0.6).abs() < 1e-5 && (gb[0] - 0.8).abs() < 1e-5);
        // Below the limit: unchanged (coefficient clamped to 1).
        let total = clip_grad_norm(&params, 10.0);
        assert!((total - 1.0).abs() < 1e-5);
        let gb: Vec<f32> = Vec::try_from(b.grad()).unwrap();
        assert!((gb[0] - 0.8).abs() < 1e-5);
    }
}
