//! The plan as a table for people and as JSON for machines.

use std::fmt::Write;

use serde::Serialize;

use super::fit::GpuTerms;
use super::probe::{Linear, Probe};
use super::resident::{GatherTransient, Part};

/// A worker's plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub config: String,
    pub teacher: String,
    pub world: u32,
    /// train.global_batch / world: the rows each worker trains a step.
    pub rank_batch: u32,
    /// [C, h, w] of one sample.
    pub sample_shape: [i64; 3],
    pub precision: String,
    pub checkpoint_chunk: u32,
    /// What a worker holds for the whole run, exact.
    pub parts: Vec<Part>,
    pub resident: u64,
    /// The optimizer step's temporaries (after the activations are freed).
    pub optimizer_transient: u64,
    /// `world.shard_state`: the gather of the sharded state for a
    /// checkpoint (between steps); None unsharded.
    pub gather_transient: Option<GatherTransient>,
    /// Measured activations (None with --no-probe).
    pub probe: Option<Probe>,
    /// This CPU's peak as `bench vsd-step` reports it (VmHWM), at the
    /// config's micro-batch.
    pub cpu: Option<CpuPrediction>,
    /// One GPU's peak at the config's micro-batch and checkpointing
    /// (PREDICTED): resident parts, activations and the GPU's terms.
    pub gpu: Option<GpuPrediction>,
    /// What a GPU adds (PREDICTED, unmeasured).
    pub gpu_terms: GpuTerms,
    pub fits: Vec<Fit>,
}

/// The CPU peak of a `bench vsd-step` with this config.
#[derive(Debug, Clone, Serialize)]
pub struct CpuPrediction {
    pub micro_batch: u32,
    /// The program with libtorch loaded (measured in this process).
    pub baseline: u64,
    pub resident: u64,
    pub activations: u64,
    /// baseline + resident + max(activations, optimizer transient, the
    /// sharded gather's transient on a CPU run).
    pub peak: u64,
}

/// One GPU's peak at a micro-batch (PREDICTED).
#[derive(Debug, Clone, Serialize)]
pub struct GpuPrediction {
    pub micro_batch: u32,
    pub peak: u64,
}

/// The largest micro-batch one GPU of `gpu_memory` bytes fits (PREDICTED).
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    pub gpu_memory: u64,
    /// Without gradient checkpointing; None: not even one row.
    pub micro_batch: Option<u32>,
    pub peak: Option<u64>,
    pub micro_batch_checkpointing: Option<u32>,
    pub peak_checkpointing: Option<u64>,
    /// Whether the resident parts and the GPU's fixed terms fit at all.
    pub resident_fits: bool,
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

fn linear(l: &Linear) -> String {
    if l.fixed == 0 {
        format!("{} per sample", mib(l.per_sample))
    } else {
        format!("{} + {} per sample", mib(l.fixed), mib(l.per_sample))
    }
}

impl Plan {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "plan for {} with teacher {}\nworld {} (each worker: {} rows a step), sample {:?}, {}",
            self.config,
            self.teacher,
            self.world,
            self.rank_batch,
            self.sample_shape,
            self.precision
        );
        let _ = writeln!(s, "\nresident per worker (exact, from the config files):");
        for p in &self.parts {
            let _ = writeln!(
                s,
                "  {:<36} {:>14} x {:<4} {:>12}",
                p.name,
                p.elements,
                p.dtype,
                gib(p.bytes)
            );
        }
        let _ = writeln!(s, "  {:<36} {:>34}", "total", gib(self.resident));
        let _ = writeln!(
            s,
            "  optimizer step's transient            {:>34}",
            gib(self.optimizer_transient)
        );
        if let Some(g) = &self.gather_transient {
            let _ = writeln!(
                s,
                "  checkpoint gather (world.shard_state) {:>34}\n    \
                 (one piece on the device; rank 0's host memory: {}, {} on a CPU run)",
                gib(g.device_piece),
                gib(g.host),
                gib(g.cpu)
            );
        }
        if let Some(p) = &self.probe {
            let q = &p.passes;
            let _ = writeln!(
                s,
                "\nactivations (measured on this CPU at {:?} rows; per student row):",
                p.rows
            );
            for (name, l) in [
                ("student draw, no grad (peak)", &q.student_no_grad_peak),
                ("student forward (peak)", &q.student_forward_peak),
                ("student graph kept", &q.student_graph),
                (
                    "student backward (peak over graph)",
                    &q.student_backward_peak,
                ),
                ("score passes, two (peak)", &q.scores_two_passes_peak),
                ("score passes, one (peak)", &q.scores_one_pass_peak),
                ("fake score forward (peak)", &q.fake_forward_peak),
                ("fake score graph kept", &q.fake_graph),
                (
                    "fake score backward (peak over graph)",
                    &q.fake_backward_peak,
                ),
                ("the plain step in order (peak)", &q.sequence_peak),
            ] {
                let _ = writeln!(s, "  {name:<38} {}", linear(l));
            }
            if let Some(l) = &q.first_step_peak {
                let name = "the first step, fresh heap (peak)";
                let _ = writeln!(s, "  {name:<38} {}", linear(l));
            }
        }
        if let Some(c) = &self.cpu {
            let _ = writeln!(
                s,
                "\nthis CPU, micro-batch {}: peak {} (program {} + resident {} + activations {})",
                c.micro_batch,
                gib(c.peak),
                gib(c.baseline),
                gib(c.resident),
                gib(c.activations)
            );
        }
        let g = &self.gpu_terms;
        let _ = writeln!(
            s,
            "\nGPU (PREDICTED: CUDA context {}, workspaces {}, NCCL {}, allocator slack {:.0} % of activations):",
            gib(g.cuda_context),
            gib(g.workspace),
            gib(g.nccl),
            g.allocator_slack * 100.0
        );
        let _ = writeln!(
            s,
            "  {:>10}  {:>26}  {:>26}",
            "memory", "micro-batch (peak)", "checkpointing (peak)"
        );
        for f in &self.fits {
            let col = |m: Option<u32>, p: Option<u64>| match (m, p) {
                (Some(m), Some(p)) => format!("{m} ({})", gib(p)),
                _ if self.probe.is_none() => "not probed".to_owned(),
                _ if !f.resident_fits => "resident does not fit".to_owned(),
                _ => "does not fit".to_owned(),
            };
            let _ = writeln!(
                s,
                "  {:>10}  {:>26}  {:>26}",
                format!("{:.0} GB", f.gpu_memory as f64 / 1e9),
                col(f.micro_batch, f.peak),
                col(f.micro_batch_checkpointing, f.peak_checkpointing)
            );
        }
        s
    }
}
