//! How the measured passes add up at a step's peak, and the largest
//! micro-batch that fits a memory size. Which tensors are alive when
//! (`vsd/step.rs`, one micro-batch of m rows at a time):
//!
//! - plain: the student's graph (m rows) is alive from its forward through
//!   step 3's score passes to its backward; then the fake score's loss
//!   builds its graph and runs its backward. The activation peak is the
//!   largest of: the student's forward peak; its graph plus the score
//!   passes' transient; its graph plus its backward's transient; the fake
//!   score's forward peak; its graph plus its backward's transient.
//! - gradient checkpointing (train.gradient_checkpointing, chunk c rows):
//!   x0 is drawn without gradients (the no-grad forward's transient at m),
//!   the score passes run on the whole micro-batch with no student graph
//!   alive, then the student forward is re-run with gradients c rows at a
//!   time (graph and backward at c), and the fake score's loss likewise at
//!   c. Alive throughout: the micro-batch's step tensors (x0, x_t, both
//!   scores' eps, the gradient g, the noises: [`STEP_TENSORS`] of the
//!   sample's size).
//!
//! The optimizer step runs after the activations are freed, so the peak
//! over the step is the larger of the activation peak and the optimizer's
//! transient, on top of what is resident.

use serde::Serialize;

use super::probe::PassCosts;

/// Float32 tensors of a micro-batch's shape alive while the checkpointed
/// step runs: x0, x_t, e_real, e_fake, g, eps, eps'.
pub const STEP_TENSORS: u64 = 7;

/// Which form of the step is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepForm {
    /// Step 3 as one pass of 4 rows a sample (`train.score_passes` on the
    /// planned device).
    pub one_score_pass: bool,
    /// None: plain; Some(c): gradient checkpointing, c rows at a time.
    pub checkpoint_chunk: Option<u64>,
    /// Float32 bytes of one sample (C x h x w x 4).
    pub sample_bytes: u64,
}

/// Activation bytes at the step's peak (above what is resident) with a
/// micro-batch of `m` rows.
pub fn activation_peak(p: &PassCosts, m: u64, form: StepForm) -> u64 {
    let scores = if form.one_score_pass {
        p.scores_one_pass_peak
    } else {
        p.scores_two_passes_peak
    };
    match form.checkpoint_chunk {
        None => {
            let graph = p.student_graph.at(m);
            [
                p.student_forward_peak.at(m),
                graph + scores.at(m),
                graph + p.student_backward_peak.at(m),
                p.fake_forward_peak.at(m),
                p.fake_graph.at(m) + p.fake_backward_peak.at(m),
            ]
            .into_iter()
            .max()
            .unwrap_or(0)
        }
        Some(chunk) => {
            let c = chunk.clamp(1, m.max(1));
            let alive = STEP_TENSORS * m * form.sample_bytes;
            alive
                + [
                    p.student_no_grad_peak.at(m),
                    scores.at(m),
                    p.student_forward_peak.at(c),
                    p.student_graph.at(c) + p.student_backward_peak.at(c),
                    p.fake_forward_peak.at(c),
                    p.fake_graph.at(c) + p.fake_backward_peak.at(c),
                ]
                .into_iter()
                .max()
                .unwrap_or(0)
        }
    }
}

/// The device-side terms a GPU adds beyond the tensors, all PREDICTED
/// (nothing here has been measured on a GPU yet; docs/ARCHITECTURE.md,
/// "Memory plan").
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GpuTerms {
    /// The CUDA context with libtorch's kernels (lazy loading) and the
    /// cuBLAS/cuDNN handles.
    pub cuda_context: u64,
    /// cuDNN convolution and cuBLAS workspaces at the peak.
    pub workspace: u64,
    /// NCCL's communicator buffers and the gradient buckets in flight,
    /// when the world has more than one worker.
    pub nccl: u64,
    /// The caching allocator's fragmentation, as a share of the
    /// activation peak.
    pub allocator_slack: f64,
}

const MIB: u64 = 1 << 20;

impl GpuTerms {
    pub fn predicted(world: u32) -> Self {
        Self {
            cuda_context: 1024 * MIB,
            workspace: 512 * MIB,
            // NCCL's per-peer buffers (NCCL_BUFFSIZE 4 MiB x channels) and
            // two 25 MiB gradient buckets (collective/buckets.rs).
            nccl: if world > 1 { 512 * MIB + 50 * MIB } else { 0 },
            allocator_slack: 0.10,
        }
    }

    /// Everything these terms add to a peak whose activations are
    /// `activations` bytes.
    pub fn total(&self, activations: u64) -> u64 {
        self.cuda_context
            + self.workspace
            + self.nccl
            + (activations as f64 * self.allocator_slack).ceil() as u64
    }
}

/// The largest micro-batch in 1..=batch whose predicted peak `peak(m)` is
/// at most `budget`; None when not even one row fits. `peak` must not
/// decrease with m (every term is fixed + m x non-negative).
pub fn largest_micro_batch(batch: u32, budget: u64, peak: impl Fn(u64) -> u64) -> Option<u32> {
    (1..=batch).rev().find(|&m| peak(u64::from(m)) <= budget)
}

/// "80GiB", "80GB", "80000MiB", "24 GB", "1.5TiB" -> bytes (decimal units
/// are powers of 1000, binary ones of 1024).
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a size such as 80GiB, 80GB or 80000MiB"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "" => {
            return Err(format!(
                "{text:?} has no unit: write 80GiB, 80GB or 80000MiB"
            ));
        }
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    if value <= 0.0 || !value.is_finite() {
        return Err(format!("{text:?}: the size must be positive"));
    }
    Ok((value * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::super::probe::Linear;
    use super::*;

    fn lin(fixed: u64, per_sample: u64) -> Linear {
        Linear { fixed, per_sample }
    }

    fn costs() -> PassCosts {
        PassCosts {
            student_no_grad_peak: lin(0, 10),
            student_forward_peak: lin(0, 120),
            student_graph: lin(0, 100),
            student_backward_peak: lin(0, 30),
            scores_two_passes_peak: lin(5, 40),
            scores_one_pass_peak: lin(5, 70),
            fake_forward_peak: lin(0, 90),
            fake_graph: lin(0, 80),
            fake_backward_peak: lin(0, 20),
            // Not part of the composition (the CPU prediction's alone).
            sequence_peak: lin(0, 1000),
            step_peak: lin(0, 1000),
            first_step_peak: Some(lin(0, 1000)),
        }
    }

    const PLAIN: StepForm = StepForm {
        one_score_pass: false,
        checkpoint_chunk: None,
        sample_bytes: 1,
    };

    #[test]
    fn the_plain_peak_is_the_student_graph_under_the_score_passes() {
        // graph 100m + scores 5 + 40m = 5 + 140m beats forward 120m,
        // graph + backward 130m, fake 100m.
        assert_eq!(activation_peak(&costs(), 4, PLAIN), 5 + 140 * 4);
        let one = StepForm {
            one_score_pass: true,
            ..PLAIN
        };
        assert_eq!(activation_peak(&costs(), 4, one), 5 + 170 * 4);
    }

    #[test]
    fn checkpointing_keeps_only_a_chunk_of_graph() {
        let ckpt = StepForm {
            checkpoint_chunk: Some(1),
            ..PLAIN
        };
        // m = 8: max(no-grad 80, scores 5 + 320, forward(1) 120,
        // graph + backward(1) 130, fake 90, 100) + 7 x 8 alive.
        assert_eq!(activation_peak(&costs(), 8, ckpt), 325 + 56);
        // A chunk larger than the micro-batch is the micro-batch.
        let big = StepForm {
            checkpoint_chunk: Some(64),
            ..PLAIN
        };
        assert_eq!(activation_peak(&costs(), 2, big), 2 * 130 + 14);
    }

    #[test]
    fn the_largest_micro_batch_is_the_last_that_fits() {
        let peak = |m: u64| 1000 + 100 * m;
        assert_eq!(largest_micro_batch(16, 1000 + 100 * 5, peak), Some(5));
        assert_eq!(largest_micro_batch(16, 1000 + 100 * 5 - 1, peak), Some(4));
        assert_eq!(largest_micro_batch(4, 1_000_000, peak), Some(4));
        assert_eq!(largest_micro_batch(16, 1099, peak), None);
    }

    #[test]
    fn memory_sizes_parse_in_both_unit_systems() {
        assert_eq!(parse_memory("80GiB"), Ok(80 << 30));
        assert_eq!(parse_memory("80GB"), Ok(80_000_000_000));
        assert_eq!(parse_memory("80000MiB"), Ok(80_000 << 20));
        assert_eq!(parse_memory(" 24 gb "), Ok(24_000_000_000));
        assert_eq!(parse_memory("1.5TiB"), Ok(3 << 39));
        assert!(parse_memory("80").unwrap_err().contains("no unit"));
        assert!(parse_memory("80GX").unwrap_err().contains("unknown unit"));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("0GB").is_err());
    }
}
