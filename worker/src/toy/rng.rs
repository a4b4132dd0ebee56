//! The toy world's random numbers: SplitMix64 fixed in the code, so a seed
//! draws the same images, captions, noise and timesteps on every machine
//! and with every libtorch (which has no per-call generator in tch), and no
//! draw touches libtorch's global generator (tests run in parallel threads).

/// SplitMix64 (Steele, Lea, Flood 2014): 64 bits of state, passes BigCrush,
/// and any seed is a good seed. The generator is the project's one (proto's
/// mix.rs); the committed toy teacher was drawn with exactly it.
#[derive(Debug, Clone)]
pub struct ToyRng {
    bits: SplitMix64,
    /// The second normal of the last Box-Muller pair.
    spare_normal: Option<f64>,
}

pub use swiftbrush_proto::mix::mix64;
use swiftbrush_proto::mix::{GOLDEN_GAMMA, SplitMix64};

impl ToyRng {
    pub fn new(seed: u64) -> Self {
        Self {
            bits: SplitMix64::new(mix64(seed)),
            spare_normal: None,
        }
    }

    /// An independent stream for (seed, a, b): e.g. (seed, step, STREAM_NOISE)
    /// so that a step's draws never depend on the steps before it, which is
    /// what lets a resumed run continue exactly.
    pub fn stream(seed: u64, a: u64, b: u64) -> Self {
        let s = mix64(seed ^ mix64(a.wrapping_add(GOLDEN_GAMMA)) ^ mix64(mix64(b) ^ 0x5EED));
        Self::new(s)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.bits.next_u64()
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n); n must be positive (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        self.bits.below(n)
    }

    /// Standard normal (Box-Muller, both values of each pair used).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        // 1 - u lies in (0, 1], so the log is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        self.spare_normal = Some(radius * angle.sin());
        radius * angle.cos()
    }

    /// `n` standard normals as f32.
    pub fn normals_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| ToyRng::stream(7, 3, 1).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut seen = std::collections::HashSet::new();
        for seed in 0..4 {
            for step in 0..4 {
                for s in 0..3 {
                    assert!(seen.insert(ToyRng::stream(seed, step, s).next_u64()));
                }
            }
        }
    }

    #[test]
    fn moments_look_right() {
        let mut rng = ToyRng::new(1);
        let n = 20_000;
        let u: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
        let mean = u.iter().sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let z: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let m = z.iter().sum::<f64>() / n as f64;
        let v = z.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.03 && (v - 1.0).abs() < 0.05, "{m} {v}");
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[rng.below(3) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
    }
}
