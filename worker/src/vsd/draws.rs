//! Every random draw of a SwiftBrush iteration, and what makes them
//! reproducible: a step's draws are a function of (seed, step, sample
//! index) alone, drawn for the whole global batch on the CPU from
//! libtorch's generator under one process-wide lock, then cut to this
//! rank's rows. So they do not depend on the device or the world size, and
//! a resumed run needs no generator state. On CUDA the rows go to the device
//! from pinned memory without blocking the host ([`to_device`]).

use tch::{Kind, TchError, Tensor};

use swiftbrush_proto::config::MethodConfig;

/// Every random draw of one step (per rank).
#[derive(Debug)]
pub struct Draws {
    /// Student input noise [B,C,h,w].
    pub z: Tensor,
    /// VSD timesteps [B], int64 in [min_timestep, max_timestep].
    pub t: Tensor,
    /// VSD noise [B,C,h,w].
    pub eps: Tensor,
    /// The first fake-score update's draws (SPEC step 6).
    pub fake: FakeScoreDraws,
    /// This iteration's guidance scale for both scores, drawn when
    /// `method.guidance_scale_range` is set (else `VsdConfig`'s).
    pub guidance_scale: Option<f64>,
    /// A few-step student's backward simulation (None for one step).
    pub chain: Option<ChainDraws>,
}

/// The draws of a few-step student's backward simulation (shared/SPEC.md
/// "Few-step students"), from a stream of the step's own
/// ([`CHAIN_STREAM`]), so every other draw is the one-step run's.
#[derive(Debug)]
pub struct ChainDraws {
    /// Each sample's step index k [B], int64 uniform in 0..K: the student
    /// is trained at t_k on the input its own chain reaches there.
    pub k: Tensor,
    /// The chain's re-noising noise eps_j [B,C,h,w] for j = 0..K-1.
    pub eps: Vec<Tensor>,
}

impl ChainDraws {
    /// Rows `start..start + len` (one micro-batch).
    pub fn rows(&self, start: i64, len: i64) -> ChainDraws {
        ChainDraws {
            k: self.k.narrow(0, start, len),
            eps: self.eps.iter().map(|e| e.narrow(0, start, len)).collect(),
        }
    }
}

/// The seed stream of a step's backward-simulation draws: above every
/// fake-score update's stream (1..=u32::MAX).
const CHAIN_STREAM: u64 = 1 << 40;

/// The draws of one fake-score update (SPEC step 6): the first of an
/// iteration comes with [`Draws`]; each further one
/// (`method.fake_score.updates_per_step` > 1) draws its own from
/// (seed, step, update), on the same terms as [`Draws::sample`].
#[derive(Debug)]
pub struct FakeScoreDraws {
    /// Timesteps t' [B], int64 in [0, 999].
    pub t: Tensor,
    /// Noise eps' [B,C,h,w].
    pub eps: Tensor,
    /// Text dropout: the null condition for the whole batch.
    pub null_condition: bool,
}

/// What one step's draws are drawn from, besides their key and shape: the
/// method's ranges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawSpec {
    /// VSD timesteps, both ends included.
    pub timesteps: (i64, i64),
    pub null_condition_prob: f64,
    /// SNOOPI's per-iteration guidance scale, uniform in [lo, hi].
    pub guidance_range: Option<(f64, f64)>,
    /// The student's number of steps K (1: SwiftBrush, no chain draws).
    pub student_steps: usize,
}

impl DrawSpec {
    /// The spec of step `step` of a run of `max_steps`: the VSD timesteps'
    /// upper bound anneals linearly from `max_timestep` to
    /// `max_timestep_final` when that is set (rounded to the nearest step;
    /// a function of the step, so a resumed run draws the same).
    pub fn at_step(m: &MethodConfig, step: u64, max_steps: u64) -> Self {
        let (lo, hi) = (i64::from(m.min_timestep), i64::from(m.max_timestep));
        let hi = match m.max_timestep_final {
            Some(last) if max_steps > 0 => {
                let done = (step.min(max_steps) as f64) / (max_steps as f64);
                (hi as f64 + (f64::from(last) - hi as f64) * done).round() as i64
            }
            _ => hi,
        };
        Self {
            timesteps: (lo, hi.max(lo)),
            null_condition_prob: m.null_condition_prob,
            guidance_range: m.guidance_scale_range.map(|[a, b]| (a, b)),
            student_steps: m.student_steps().len(),
        }
    }
}

/// Draws happen under one lock: libtorch's generator is process-global, and
/// two trainers in one process (local mode, tests) must not interleave seed
/// and draw.
static DRAW_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` holding the draw lock, for code that draws from libtorch's
/// global generator (a model's initial weights, the adapters' A matrices)
/// while another trainer of this process may be seeding it. Inside, seed
/// with `tch::manual_seed` directly (the lock is not reentrant).
pub fn with_generator<T>(f: impl FnOnce() -> T) -> T {
    let _guard = DRAW_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    f()
}

impl Draws {
    /// Draws the whole global batch from a generator seeded by (seed, step)
    /// on the CPU, then keeps this rank's rows. The null-condition flag and
    /// the guidance scale are one draw per iteration, shared by all ranks;
    /// the guidance scale is drawn last and only when asked for, so the
    /// other draws do not depend on whether it is.
    pub fn sample(
        key: DrawKey,
        latent_shape: &[i64],
        slice: RankSlice,
        spec: &DrawSpec,
        device: tch::Device,
    ) -> Result<Self, TchError> {
        with_generator(|| {
            tch::manual_seed(key.seed_value(0));
            let (shape, mine) = slice.rows(latent_shape, device);
            let global = shape[0];
            let z = Tensor::f_randn(&shape, FLOAT)?;
            let t = Tensor::f_randint_low(spec.timesteps.0, spec.timesteps.1 + 1, [global], INT)?;
            let eps = Tensor::f_randn(&shape, FLOAT)?;
            let fake_t = Tensor::f_randint_low(0, 1000, [global], INT)?;
            let fake_eps = Tensor::f_randn(&shape, FLOAT)?;
            let null_condition = uniform()? < spec.null_condition_prob;
            let guidance_scale = match spec.guidance_range {
                Some((lo, hi)) => Some(lo + (hi - lo) * uniform()?),
                None => None,
            };
            let chain = if spec.student_steps > 1 {
                tch::manual_seed(key.seed_value(CHAIN_STREAM));
                let k = Tensor::f_randint_low(0, spec.student_steps as i64, [global], INT)?;
                let eps = (1..spec.student_steps)
                    .map(|_| Tensor::f_randn(&shape, FLOAT).and_then(&mine))
                    .collect::<Result<Vec<_>, _>>()?;
                Some(ChainDraws { k: mine(k)?, eps })
            } else {
                None
            };
            Ok(Self {
                chain,
                z: mine(z)?,
                t: mine(t)?,
                eps: mine(eps)?,
                fake: FakeScoreDraws {
                    t: mine(fake_t)?,
                    eps: mine(fake_eps)?,
                    null_condition,
                },
                guidance_scale,
            })
        })
    }

    /// Rows `start..start + len` of every per-sample draw (one micro-batch);
    /// the per-iteration draws are shared.
    pub fn rows(&self, start: i64, len: i64) -> Draws {
        Draws {
            z: self.z.narrow(0, start, len),
            t: self.t.narrow(0, start, len),
            eps: self.eps.narrow(0, start, len),
            fake: self.fake.rows(start, len),
            guidance_scale: self.guidance_scale,
            chain: self.chain.as_ref().map(|c| c.rows(start, len)),
        }
    }
}

impl FakeScoreDraws {
    /// Rows `start..start + len` (one micro-batch); the null flag is shared.
    pub fn rows(&self, start: i64, len: i64) -> FakeScoreDraws {
        FakeScoreDraws {
            t: self.t.narrow(0, start, len),
            eps: self.eps.narrow(0, start, len),
            null_condition: self.null_condition,
        }
    }

    /// The draws of fake-score update `update` >= 1 of an iteration: the
    /// whole global batch from a generator seeded by (seed, step, update),
    /// then this rank's rows (independent of the device and the world size).
    pub fn sample_extra(
        key: DrawKey,
        update: u32,
        latent_shape: &[i64],
        slice: RankSlice,
        null_condition_prob: f64,
        device: tch::Device,
    ) -> Result<Self, TchError> {
        with_generator(|| {
            tch::manual_seed(key.seed_value(u64::from(update)));
            let (shape, mine) = slice.rows(latent_shape, device);
            let t = Tensor::f_randint_low(0, 1000, [shape[0]], INT)?;
            let eps = Tensor::f_randn(&shape, FLOAT)?;
            let null_condition = uniform()? < null_condition_prob;
            Ok(Self {
                t: mine(t)?,
                eps: mine(eps)?,
                null_condition,
            })
        })
    }
}

const FLOAT: (Kind, tch::Device) = (Kind::Float, tch::Device::Cpu);
const INT: (Kind, tch::Device) = (Kind::Int64, tch::Device::Cpu);

/// One uniform [0, 1) draw from the seeded generator.
fn uniform() -> Result<f64, TchError> {
    Tensor::f_rand([1], FLOAT)?.f_double_value(&[0])
}

/// Which rows of the global batch this rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankSlice {
    pub rank: u64,
    pub world_size: u64,
}

impl RankSlice {
    pub const SINGLE: RankSlice = RankSlice {
        rank: 0,
        world_size: 1,
    };

    /// For draws made for the whole global batch: the global shape (this
    /// rank's `latent_shape` with the batch times the world size), and the
    /// cut that keeps this rank's rows, moved to `device`.
    fn rows(
        self,
        latent_shape: &[i64],
        device: tch::Device,
    ) -> (Vec<i64>, impl Fn(Tensor) -> Result<Tensor, TchError>) {
        let per_rank = latent_shape[0];
        let mut shape = latent_shape.to_vec();
        shape[0] = per_rank * self.world_size as i64;
        let start = self.rank as i64 * per_rank;
        let mine =
            move |x: Tensor| to_device(x.f_narrow(0, start, per_rank)?.f_contiguous()?, device);
        (shape, mine)
    }
}

/// Copies a draw made on the CPU to `device`: the same values bit for bit
/// (a copy), on every device.
///
/// On CUDA the copy starts from pinned (page-locked) memory and does not
/// block (issue 30, item 9): from pageable memory a host-to-device copy is
/// synchronous, so each step's first draw waited for everything queued
/// before it on the stream, the previous step's optimizer included; now
/// it is queued behind that work and the host goes on preparing the step.
///
/// The pinned source is dropped when this returns, possibly before the
/// copy has run. That is safe: `pin_memory` takes its buffer from
/// libtorch's CachingHostAllocator, and a non-blocking copy from such a
/// buffer records an event on the copy's stream (ATen's copy_ calls
/// CachingHostAllocator_recordEvent), so the allocator hands the block out
/// again only after that event, i.e. after the copy, has completed. The
/// destination is an ordinary tensor on the current stream, so every later
/// use of it (the step's kernels, on the same stream) runs after the copy.
///
/// On the CPU (and any other device) nothing changes: a plain copy.
fn to_device(x: Tensor, device: tch::Device) -> Result<Tensor, TchError> {
    if device.is_cuda() {
        x.f_pin_memory(device)?
            .f_to_device_(device, x.kind(), true, false)
    } else {
        x.f_to_device(device)
    }
}

/// What seeds one step's draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrawKey {
    pub seed: u64,
    pub step: u64,
}

impl DrawKey {
    /// The libtorch seed (63 bits: it takes an i64) of stream `stream` of
    /// this step: 0 for the step's main draws, u >= 1 for fake-score update
    /// u. Seed, step and stream meet only through proto's mixer
    /// (`mix::derive`), so no two (seed, step) pairs share noise.
    fn seed_value(self, stream: u64) -> i64 {
        (swiftbrush_proto::mix::derive(self.seed, &[self.step, stream]) >> 1) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: DrawSpec = DrawSpec {
        timesteps: (20, 980),
        null_condition_prob: 0.1,
        guidance_range: None,
        student_steps: 1,
    };

    fn draw(seed: u64, step: u64, shape: &[i64], slice: RankSlice) -> Draws {
        draw_with(seed, step, shape, slice, &SPEC)
    }

    fn draw_with(seed: u64, step: u64, shape: &[i64], slice: RankSlice, spec: &DrawSpec) -> Draws {
        Draws::sample(DrawKey { seed, step }, shape, slice, spec, tch::Device::Cpu).unwrap()
    }

    #[test]
    fn a_seed_sweep_never_reuses_another_seeds_noise() {
        // With the seed and the step XORed (before the fix), seed 1 at step
        // k drew seed 0's noise at step k ^ 1.
        let shape = [1, 1, 2, 2];
        let mut seen: Vec<Tensor> = Vec::new();
        for seed in 0..4 {
            for step in 0..8 {
                let z = draw(seed, step, &shape, RankSlice::SINGLE).z;
                assert!(
                    !seen.iter().any(|other| other.equal(&z)),
                    "seed {seed} step {step} repeats another pair's noise"
                );
                seen.push(z);
            }
        }
        // The fake score's extra updates are streams of their own too.
        let main = draw(0, 3, &shape, RankSlice::SINGLE).fake.eps;
        let extra = FakeScoreDraws::sample_extra(
            DrawKey { seed: 0, step: 3 },
            1,
            &shape,
            RankSlice::SINGLE,
            0.1,
            tch::Device::Cpu,
        )
        .unwrap()
        .eps;
        assert!(!main.equal(&extra));
    }

    #[test]
    fn a_guidance_range_draws_one_scale_per_iteration_for_every_rank() {
        let spec = DrawSpec {
            guidance_range: Some((2.0, 6.0)),
            ..SPEC
        };
        let shape = [2, 4, 8, 8];
        let plain = draw(1, 5, &shape, RankSlice::SINGLE);
        let ranged = draw_with(1, 5, &shape, RankSlice::SINGLE, &spec);
        assert_eq!(plain.guidance_scale, None);
        // Drawn last: every other draw is the same as without the range.
        assert!(plain.z.equal(&ranged.z) && plain.fake.eps.equal(&ranged.fake.eps));
        assert_eq!(plain.fake.null_condition, ranged.fake.null_condition);

        let half = |rank| RankSlice {
            rank,
            world_size: 2,
        };
        let r1 = draw_with(1, 5, &[1, 4, 8, 8], half(1), &spec);
        assert_eq!(r1.guidance_scale, ranged.guidance_scale, "shared by ranks");

        let scales: Vec<f64> = (0..200)
            .map(|s| draw_with(1, s, &[1, 1, 1, 1], RankSlice::SINGLE, &spec))
            .map(|d| d.guidance_scale.unwrap())
            .collect();
        assert!(scales.iter().all(|g| (2.0..=6.0).contains(g)), "{scales:?}");
        let mean = scales.iter().sum::<f64>() / scales.len() as f64;
        assert!((3.7..4.3).contains(&mean), "mean {mean}");
        assert!(scales.iter().any(|&g| g < 2.5) && scales.iter().any(|&g| g > 5.5));
    }

    #[test]
    fn a_few_step_students_chain_draws_leave_every_other_draw_unchanged() {
        let spec = DrawSpec {
            student_steps: 4,
            ..SPEC
        };
        let shape = [2, 4, 8, 8];
        let one = draw(1, 5, &shape, RankSlice::SINGLE);
        let four = draw_with(1, 5, &shape, RankSlice::SINGLE, &spec);
        assert!(one.chain.is_none());
        assert!(one.z.equal(&four.z) && one.t.equal(&four.t) && one.eps.equal(&four.eps));
        assert!(one.fake.eps.equal(&four.fake.eps) && one.fake.t.equal(&four.fake.t));
        let chain = four.chain.as_ref().unwrap();
        assert_eq!(chain.eps.len(), 3);
        assert!(!chain.eps[0].equal(&chain.eps[1]) && !chain.eps[0].equal(&four.z));
        // A function of (seed, step, sample index): two ranks hold the rows.
        let half = |rank| {
            let slice = RankSlice {
                rank,
                world_size: 2,
            };
            draw_with(1, 5, &[1, 4, 8, 8], slice, &spec).chain.unwrap()
        };
        let (r0, r1) = (half(0), half(1));
        assert!(Tensor::cat(&[&r0.k, &r1.k], 0).equal(&chain.k));
        assert!(Tensor::cat(&[&r0.eps[2], &r1.eps[2]], 0).equal(&chain.eps[2]));
        // Step indices cover 0..K.
        let ks: Vec<i64> = (0..50)
            .flat_map(|s| {
                let d = draw_with(2, s, &[4, 1, 1, 1], RankSlice::SINGLE, &spec);
                Vec::<i64>::try_from(d.chain.unwrap().k).unwrap()
            })
            .collect();
        assert!((0..4).all(|k| ks.contains(&k)) && ks.iter().all(|k| (0..4).contains(k)));
    }

    #[test]
    fn the_upper_timestep_anneals_linearly_over_the_run() {
        let mut m = MethodConfig::default();
        assert_eq!(DrawSpec::at_step(&m, 500, 1000).timesteps, (20, 980));
        m.max_timestep_final = Some(500);
        let hi = |step| DrawSpec::at_step(&m, step, 1000).timesteps.1;
        assert_eq!((hi(0), hi(250), hi(500), hi(1000)), (980, 860, 740, 500));
        assert_eq!(hi(5000), 500, "past max_steps it stays at the end");
        for s in 0..20 {
            let spec = DrawSpec::at_step(&m, 1000, 1000);
            let d = draw_with(1, s, &[8, 1, 1, 1], RankSlice::SINGLE, &spec);
            assert!(d.t.max().int64_value(&[]) <= 500);
        }
    }

    #[test]
    fn draws_are_a_function_of_seed_step_and_sample_index() {
        let shape = [2, 4, 8, 8];
        let a = draw(1, 5, &shape, RankSlice::SINGLE);
        let b = draw(1, 5, &shape, RankSlice::SINGLE);
        assert!(a.z.equal(&b.z) && a.t.equal(&b.t) && a.fake.eps.equal(&b.fake.eps));
        assert_eq!(a.fake.null_condition, b.fake.null_condition);
        assert!(!a.z.equal(&draw(1, 6, &shape, RankSlice::SINGLE).z));
        assert!(!a.z.equal(&draw(2, 5, &shape, RankSlice::SINGLE).z));

        // Two ranks of one sample each hold exactly the rows of one rank
        // with both samples: the world size does not change any draw.
        let r0 = draw(
            1,
            5,
            &[1, 4, 8, 8],
            RankSlice {
                rank: 0,
                world_size: 2,
            },
        );
        let r1 = draw(
            1,
            5,
            &[1, 4, 8, 8],
            RankSlice {
                rank: 1,
                world_size: 2,
            },
        );
        assert!(Tensor::cat(&[&r0.z, &r1.z], 0).equal(&a.z));
        assert!(Tensor::cat(&[&r0.fake.t, &r1.fake.t], 0).equal(&a.fake.t));
        assert!(Tensor::cat(&[&r0.eps, &r1.eps], 0).equal(&a.eps));
        assert_eq!(r0.fake.null_condition, a.fake.null_condition);
        assert_eq!(r1.fake.null_condition, a.fake.null_condition);

        // Timesteps stay in their ranges.
        for s in 0..50 {
            let d = draw(1, s, &[8, 1, 1, 1], RankSlice::SINGLE);
            let (lo, hi) = (d.t.min().int64_value(&[]), d.t.max().int64_value(&[]));
            assert!((20..=980).contains(&lo) && (20..=980).contains(&hi));
            assert!(d.fake.t.max().int64_value(&[]) <= 999);
        }
    }

    #[test]
    fn null_condition_frequency_follows_probability() {
        let n = (0..400)
            .filter(|&s| {
                draw(3, s, &[1, 1, 1, 1], RankSlice::SINGLE)
                    .fake
                    .null_condition
            })
            .count();
        assert!((20..=60).contains(&n), "{n} of 400");
    }
}
