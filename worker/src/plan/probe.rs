//! The activation side of the plan, measured: the trainer's own networks
//! (built by `trainer::score_networks` from the config files, random
//! weights) run each pass of the step once on the CPU at the real sample
//! shape and dtypes, at r and 2r rows, and the probe records what each pass
//! keeps for its backward (glibc's heap in use, `memory::heap_in_use`) and
//! its transient peak (the resident set's high-water mark from a trimmed
//! heap). Two points (r and 2r rows, r = 1 by default) give each pass as
//! fixed + rows x per-sample bytes.
//!
//! The passes, as `vsd/step.rs` runs them:
//! - the student's draw with gradients (its graph stays alive through the
//!   score passes and until its backward), and without (the checkpointed
//!   mode draws x0 first without gradients);
//! - step 3's score passes without gradients on the guided batch (2 rows a
//!   sample): as two passes, and as one (`Scores::both`, 4 rows a sample);
//! - the student's backward;
//! - the fake score's loss with gradients and its backward.
//!
//! The student pass runs under the score passes' autocast when
//! [`super::PlanOptions::student_autocast`] is set (precision.student_autocast).

use serde::Serialize;
use swiftbrush_proto::JobConfig;
use tch::{Device, Kind, Tensor};

use super::memory::{Cost, measure};
use super::{PlanError, PlanOptions};
use crate::diffusion::{NoiseSchedule, SchedulerConfig, one_step_x0};
use crate::models::unet_2d_condition_config::OneOrMany;
use crate::pipeline::{DiffusersFolder, UNet};
use crate::torch::precision::AutocastPlan;
use crate::vsd::{
    Conditions, Draws, FakeScore, FakeScoreDraws, ScorePair, Scores, Student, VsdConfig, VsdStep,
    with_generator,
};

/// Bytes as fixed + rows x per_sample, from measurements at r and 2r rows
/// (at r rows only: all of it per sample, which can only overestimate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Linear {
    pub fixed: u64,
    pub per_sample: u64,
}

impl Linear {
    pub fn at(&self, rows: u64) -> u64 {
        self.fixed + rows * self.per_sample
    }

    /// Through the points (r, at1) and (2r, at2).
    pub fn fit(r: u64, at1: u64, at2: Option<u64>) -> Self {
        let r = r.max(1);
        match at2 {
            // One point, or noise made the second smaller: all per sample.
            None => Self::through_origin(r, at1),
            Some(at2) if at2 < at1 => Self::through_origin(r, at1),
            // More than double at twice the rows: through the origin and
            // the second point (no negative fixed part).
            Some(at2) if at2 - at1 > at1 => Self::through_origin(2 * r, at2),
            Some(at2) => {
                let per_sample = (at2 - at1).div_ceil(r);
                Self {
                    fixed: at1.saturating_sub(per_sample * r),
                    per_sample,
                }
            }
        }
    }

    fn through_origin(rows: u64, bytes: u64) -> Self {
        Self {
            fixed: 0,
            per_sample: bytes.div_ceil(rows),
        }
    }
}

/// Every pass's bytes, per student row (a score pass's guided batch has 2
/// or 4 rows a sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PassCosts {
    pub student_no_grad_peak: Linear,
    pub student_forward_peak: Linear,
    pub student_graph: Linear,
    pub student_backward_peak: Linear,
    pub scores_two_passes_peak: Linear,
    pub scores_one_pass_peak: Linear,
    pub fake_forward_peak: Linear,
    pub fake_graph: Linear,
    pub fake_backward_peak: Linear,
    /// The plain step's passes in their order, with no trim between them
    /// (as the trainer runs them): its peak includes what glibc's heap
    /// cannot reuse, which the passes measured one by one do not. The CPU
    /// prediction uses it.
    pub sequence_peak: Linear,
    /// The trainer's own step (`VsdStep::run_on_device`, as the config
    /// runs it: its score passes, autocast and recomputation) from a
    /// trimmed heap. The CPU prediction uses the larger of it and the
    /// composition.
    pub step_peak: Linear,
    /// The same step run first, on the heap as building the networks left
    /// it (nothing freed yet: the state a run's first step meets), less
    /// what it keeps (the gradients, which the resident parts count),
    /// every byte per sample (one point: a process has one fresh heap).
    /// glibc grows a fresh heap past what the same step needs on a heap
    /// already laid out by earlier steps, and a run's peak is its first
    /// steps'. The plain step: once, at the step's larger row count. With
    /// recomputation, whose chunk's graph is a fixed part that one point
    /// cannot separate: twice in one stretch (as `bench vsd-step`'s
    /// warm-up and measured steps) at the planned micro-batch, so it is
    /// exact there only (None past [`FIRST_STEPS_MAX`] chunks). The
    /// points of [`Self::step_peak`], extrapolated from a chunk and two to
    /// the micro-batch, moved with the heap's layout from run to run (the
    /// toy test's recomputing plan: 1240-1453 MiB at 8 rows in six runs,
    /// the bench 1218-1303 MiB); the first steps at the micro-batch itself
    /// far less (docs/ARCHITECTURE.md, "Memory plan").
    pub first_step_peak: Option<Linear>,
}

/// What the probe measured.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// This process's resident set with libtorch loaded and its thread
    /// pool started, before any network was built: the part of a CPU
    /// prediction that is the program itself.
    pub baseline: u64,
    pub passes: PassCosts,
    /// The row counts measured.
    pub rows: Vec<u32>,
}

/// One measurement of every pass at `n` rows.
#[derive(Debug, Clone, Copy)]
struct Sample {
    student_no_grad: Cost,
    student_forward: Cost,
    student_backward: Cost,
    scores_two: Cost,
    scores_one: Cost,
    fake_forward: Cost,
    fake_backward: Cost,
    sequence: Cost,
}

/// The process before any network: libtorch's CPU kernels and thread pool
/// touched once (a matmul and a convolution).
pub fn baseline() -> Result<u64, PlanError> {
    tch::no_grad(|| {
        let a = Tensor::f_randn([256, 256], (Kind::Float, Device::Cpu))?;
        let _ = a.f_matmul(&a)?;
        let x = Tensor::f_randn([1, 4, 16, 16], (Kind::Float, Device::Cpu))?;
        let w = Tensor::f_randn([4, 4, 3, 3], (Kind::Float, Device::Cpu))?;
        let _ = x.f_conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)?;
        Ok::<_, tch::TchError>(())
    })?;
    super::memory::trim();
    Ok(super::memory::resident()?.0)
}

/// Builds the networks from `folder`'s configs and measures every pass at
/// `opts.probe_rows` rows (and with `opts.probe_points` 2, twice as many)
/// of shape `shape`, after
/// one unmeasured round (which also allocates the gradients, resident from
/// a run's first step on). `micro_batch` is the CPU prediction's: the
/// recomputing step's first steps run at it.
pub fn run(
    cfg: &JobConfig,
    folder: &DiffusersFolder,
    unet_config: &crate::models::unet_2d_condition::UNet2DConditionConfig,
    shape: [i64; 3],
    opts: &PlanOptions,
    micro_batch: u64,
    baseline: u64,
) -> Result<Probe, PlanError> {
    let device = Device::Cpu;
    let root = folder.root().display().to_string();
    let (scores, student) = with_generator(|| {
        let teacher = UNet::from_config(unet_config, device)?;
        Ok::<_, PlanError>(crate::trainer::score_networks(cfg, teacher, &root)?)
    })?;
    let sched = SchedulerConfig::from_file(
        &folder
            .component("scheduler")?
            .dir
            .join("scheduler_config.json"),
    )?;
    let schedule = NoiseSchedule::new(&sched, device)?;
    let vsd = crate::trainer::vsd_config(cfg, &schedule, device)?;
    let student_autocast = if opts.student_autocast {
        Some(vsd.teacher_autocast.ok_or_else(|| {
            PlanError::Invalid(
                "precision.student_autocast needs precision.autocast (bf16 or fp16)".to_owned(),
            )
        })?)
    } else {
        None
    };
    let width = match &unet_config.cross_attention_dim {
        OneOrMany::One(w) => *w,
        OneOrMany::Many(ws) => ws.first().copied().unwrap_or(1),
    };
    // An SDXL condition carries its pooled row and time-ids row
    // (pipeline/xl_condition.rs).
    let rows = match unet_config.text_time() {
        Ok(Some(_)) => 77 + crate::pipeline::xl_condition::EXTRA_ROWS,
        _ => 77,
    };
    let nets = Nets {
        student: &student,
        scores: &scores,
        schedule: &schedule,
        vsd: &vsd,
        student_autocast,
        shape,
        width,
        rows,
    };
    let r = i64::from(opts.probe_rows.max(1));
    // The step with recomputation keeps a chunk's graph whatever the
    // batch: measured below a chunk it would grow as the plain step does,
    // so it is measured at a chunk (and two) at least.
    let step_rows = vsd.recompute_rows.map_or(r, |c| r.max(i64::from(c)));
    let first_rows = if opts.probe_points >= 2 {
        2 * step_rows
    } else {
        step_rows
    };
    // First, before anything else runs: the heap is the one building the
    // networks left, as the trainer's first step finds it.
    let first = match vsd.recompute_rows {
        None => Some((nets.step(first_rows)?, first_rows)),
        // The recomputing step at the planned micro-batch itself, run
        // twice in one measured stretch as `bench vsd-step` runs its
        // warm-up step and its measured one, with no trim between (the
        // second step, on the heap the first laid out, is the run's peak).
        // Its chunk's graph is a fixed part that one point cannot
        // separate, so it is measured at the rows it is used at, not
        // extrapolated; up to [`FIRST_STEPS_MAX`] times the step's first
        // point (a larger micro-batch keeps the line through the points).
        Some(_) => {
            let m = micro_batch.max(1) as i64;
            if m <= FIRST_STEPS_MAX * step_rows {
                let (r, cost) = measure(|| {
                    nets.run_step(m)?;
                    nets.run_step(m)
                })?;
                r?;
                Some((cost, m))
            } else {
                None
            }
        }
    };
    nets.sample(r)?;
    // The program after its first step: libtorch's kernel caches (oneDNN's
    // JIT-compiled primitives for these shapes) are the program's, not any
    // tensor's. What the networks' tensors hold is taken out.
    super::memory::trim();
    let tensors = tensor_bytes(&student_tensors(&student)) + tensor_bytes(&scores_tensors(&scores));
    let baseline = super::memory::resident()?
        .0
        .saturating_sub(tensors)
        .max(baseline);
    let one = nets.sample(r)?;
    let two = if opts.probe_points >= 2 {
        Some(nets.sample(2 * r)?)
    } else {
        None
    };
    let fit = |f: fn(&Sample) -> u64| Linear::fit(r as u64, f(&one), two.as_ref().map(f));
    let step_one = nets.step(step_rows)?;
    let step_two = if opts.probe_points >= 2 {
        Some(nets.step(2 * step_rows)?)
    } else {
        None
    };
    Ok(Probe {
        baseline,
        passes: PassCosts {
            student_no_grad_peak: fit(|s| s.student_no_grad.peak),
            student_forward_peak: fit(|s| s.student_forward.peak),
            student_graph: fit(|s| s.student_forward.kept),
            student_backward_peak: fit(|s| s.student_backward.peak),
            scores_two_passes_peak: fit(|s| s.scores_two.peak),
            scores_one_pass_peak: fit(|s| s.scores_one.peak),
            fake_forward_peak: fit(|s| s.fake_forward.peak),
            fake_graph: fit(|s| s.fake_forward.kept),
            fake_backward_peak: fit(|s| s.fake_backward.peak),
            sequence_peak: fit(|s| s.sequence.peak),
            step_peak: Linear::fit(step_rows as u64, step_one.peak, step_two.map(|c| c.peak)),
            first_step_peak: first
                .map(|(c, rows)| Linear::fit(rows as u64, c.peak.saturating_sub(c.kept), None)),
        },
        rows: if two.is_some() {
            vec![r as u32, 2 * r as u32]
        } else {
            vec![r as u32]
        },
    })
}

/// The largest micro-batch, in chunks and `--probe-rows` (times the
/// recomputing step's first point), at which the probe runs the
/// recomputing step's first steps: two steps at the micro-batch cost what
/// `bench vsd-step` costs there, and a plan made for GPUs (SD 1.5's 64
/// rows a step) would spend hours on the CPU for a figure only the CPU
/// prediction uses.
pub const FIRST_STEPS_MAX: i64 = 4;

/// Bytes of the tensors and of their gradients.
fn tensor_bytes(ts: &[Tensor]) -> u64 {
    let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    ts.iter()
        .map(|t| {
            let g = t.grad();
            bytes(t) + if g.defined() { bytes(&g) } else { 0 }
        })
        .sum()
}

/// Every tensor of the score networks: the teacher's weights, the fake
/// score's (adapters or DMD2's copy).
fn scores_tensors(scores: &ScorePair) -> Vec<Tensor> {
    match scores {
        ScorePair::Lora(t) => t
            .unet
            .vs
            .variables()
            .into_values()
            .chain(t.lora.named_parameters().into_iter().map(|(_, p)| p))
            .collect(),
        ScorePair::Unet(f) => f
            .teacher
            .vs
            .variables()
            .into_values()
            .chain(f.fake.vs.variables().into_values())
            .collect(),
    }
}

/// The student's own tensors: a full student's UNet, or a LoRA
/// student's adapters (its base is the scores').
fn student_tensors(student: &Student) -> Vec<Tensor> {
    student
        .named_parameters()
        .into_iter()
        .map(|(_, t)| t)
        .collect()
}

struct Nets<'a> {
    student: &'a Student,
    scores: &'a ScorePair,
    schedule: &'a NoiseSchedule,
    vsd: &'a VsdConfig,
    student_autocast: Option<AutocastPlan>,
    shape: [i64; 3],
    width: i64,
    /// Rows of a condition: 77 tokens (and SDXL's two extra rows).
    rows: i64,
}

impl Nets<'_> {
    /// The trainer's own step (`VsdStep::run_on_device`, as the config
    /// runs it) on fresh draws of `n` rows, measured from a trimmed heap.
    fn step(&self, n: i64) -> Result<Cost, PlanError> {
        let (r, cost) = measure(|| self.run_step(n))?;
        r?;
        Ok(cost)
    }

    /// The trainer's own step on fresh draws of `n` rows, unmeasured.
    fn run_step(&self, n: i64) -> Result<(), PlanError> {
        let opts = (Kind::Float, Device::Cpu);
        let [c, h, w] = self.shape;
        let t = Tensor::f_randint_low(20, 981, [n], (Kind::Int64, Device::Cpu))?;
        let draws = Draws {
            z: Tensor::f_randn([n, c, h, w], opts)?,
            t: t.shallow_clone(),
            eps: Tensor::f_randn([n, c, h, w], opts)?,
            fake: FakeScoreDraws {
                t,
                eps: Tensor::f_randn([n, c, h, w], opts)?,
                null_condition: false,
            },
            guidance_scale: None,
            // A few-step student's backward simulation at its costliest:
            // every sample runs the whole chain before its last step.
            chain: match &self.vsd.few_step {
                Some(chain) => Some(crate::vsd::ChainDraws {
                    k: Tensor::f_full([n], chain.len() as i64 - 1, (Kind::Int64, Device::Cpu))?,
                    eps: (1..chain.len())
                        .map(|_| Tensor::f_randn([n, c, h, w], opts))
                        .collect::<Result<_, _>>()?,
                }),
                None => None,
            },
        };
        let text = Conditions {
            cond: Tensor::f_randn([n, self.rows, self.width], opts)?,
            uncond: Tensor::f_randn([1, self.rows, self.width], opts)?,
        };
        let vsd_step = VsdStep {
            student: self.student.net(self.scores),
            scores: self.scores,
            schedule: self.schedule,
            config: self.vsd,
            loss_scales: None,
        };
        vsd_step
            .run_on_device(&text, &draws, None)
            .map(drop)
            .map_err(|e| PlanError::Invalid(format!("the probe's step failed: {e}")))
    }

    fn sample(&self, n: i64) -> Result<Sample, PlanError> {
        let opts = (Kind::Float, Device::Cpu);
        let [c, h, w] = self.shape;
        let z = Tensor::f_randn([n, c, h, w], opts)?;
        let cond = Tensor::f_randn([n, self.rows, self.width], opts)?;
        let uncond = Tensor::f_randn([1, self.rows, self.width], opts)?;
        let t = Tensor::f_randint_low(20, 981, [n], (Kind::Int64, Device::Cpu))?;
        let one_step = self.vsd.one_step(self.schedule.prediction_type());
        let draw = || {
            let _ac = self.student_autocast.as_ref().map(|a| a.enter());
            one_step_x0(&self.student.net(self.scores), &z, &cond, &one_step)
        };
        let (x0, student_no_grad) = measure(|| tch::no_grad(draw).map(drop))?;
        x0?;
        let (x0, student_forward) = measure(draw)?;
        let x0 = x0?;

        // Step 3 on the guided batch while the student's graph is alive.
        let x = x0.f_detach()?;
        let x2 = Tensor::f_cat(&[&x, &x], 0)?;
        let t2 = Tensor::f_cat(&[&t, &t], 0)?;
        let c2 = Tensor::f_cat(&[&uncond.f_expand([n, -1, -1], false)?, &cond], 0)?;
        let teacher_ac = || self.vsd.teacher_autocast.as_ref().map(|a| a.enter());
        let (r, scores_two) = measure(|| {
            tch::no_grad(|| {
                let _ac = teacher_ac();
                let real = self.scores.real(&x2, &t2, &c2)?.f_to_kind(Kind::Float)?;
                let fake = match self.scores.form() {
                    FakeScore::Lora => self.scores.fake(&x2, &t2, &c2)?,
                    FakeScore::Unet => self.scores.fake(&x, &t, &cond)?,
                };
                Ok::<_, tch::TchError>((real, fake.f_to_kind(Kind::Float)?))
            })
        })?;
        drop(r?);
        let (r, scores_one) = measure(|| {
            tch::no_grad(|| {
                let _ac = teacher_ac();
                let (real, fake) = self.scores.both(&x2, &t2, &c2)?;
                Ok::<_, tch::TchError>((real.f_to_kind(Kind::Float)?, fake.f_to_kind(Kind::Float)?))
            })
        })?;
        drop(r?);

        let (r, student_backward) = measure(|| x0.f_square()?.f_mean(Kind::Float)?.f_backward())?;
        r?;
        drop(x0);

        // Step 6: the fake score's loss with gradients, then its backward.
        let (loss, fake_forward) = measure(|| {
            let out = {
                let _ac = teacher_ac();
                self.scores.fake(&x, &t, &cond)?.f_to_kind(Kind::Float)?
            };
            out.f_sub(&z)?.f_square()?.f_mean(Kind::Float)
        })?;
        let loss = loss?;
        let (r, fake_backward) = measure(|| loss.f_backward())?;
        r?;
        drop(loss);

        // All of it again in order, as one stretch.
        let (r, sequence) = measure(|| {
            let x0 = draw()?;
            let x = x0.f_detach()?;
            let x2 = Tensor::f_cat(&[&x, &x], 0)?;
            let eps = tch::no_grad(|| {
                let _ac = teacher_ac();
                if self.vsd.one_score_pass && self.scores.form() == FakeScore::Lora {
                    let (real, fake) = self.scores.both(&x2, &t2, &c2)?;
                    real.f_to_kind(Kind::Float)?
                        .f_sub(&fake.f_to_kind(Kind::Float)?)
                } else {
                    let real = self.scores.real(&x2, &t2, &c2)?.f_to_kind(Kind::Float)?;
                    let fake = match self.scores.form() {
                        FakeScore::Lora => self.scores.fake(&x2, &t2, &c2)?,
                        FakeScore::Unet => self.scores.fake(&x, &t, &cond)?,
                    };
                    let _ = fake.f_to_kind(Kind::Float)?;
                    Ok(real)
                }
            })?;
            let g = eps.f_narrow(0, 0, n)?;
            x0.f_sub(&g)?
                .f_square()?
                .f_mean(Kind::Float)?
                .f_backward()?;
            drop(x0);
            let out = {
                let _ac = teacher_ac();
                self.scores.fake(&x, &t, &cond)?.f_to_kind(Kind::Float)?
            };
            out.f_sub(&z)?.f_square()?.f_mean(Kind::Float)?.f_backward()
        })?;
        r?;

        Ok(Sample {
            sequence,
            student_no_grad,
            student_forward,
            student_backward,
            scores_two,
            scores_one,
            fake_forward,
            fake_backward,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Linear;

    #[test]
    fn two_points_split_into_fixed_and_per_sample() {
        let l = Linear::fit(1, 300, Some(500));
        assert_eq!(
            l,
            Linear {
                fixed: 100,
                per_sample: 200
            }
        );
        assert_eq!(l.at(4), 900);
        // At 4 and 8 rows.
        assert_eq!(
            Linear::fit(4, 500, Some(900)),
            Linear {
                fixed: 100,
                per_sample: 100
            }
        );
        // One point: all per sample.
        assert_eq!(
            Linear::fit(1, 300, None),
            Linear {
                fixed: 0,
                per_sample: 300
            }
        );
        assert_eq!(
            Linear::fit(2, 301, None),
            Linear {
                fixed: 0,
                per_sample: 151
            }
        );
        // More than double at twice the rows: no negative fixed part.
        assert_eq!(
            Linear::fit(1, 100, Some(300)),
            Linear {
                fixed: 0,
                per_sample: 150
            }
        );
        // Noise (the second smaller): the first, per sample.
        assert_eq!(
            Linear::fit(1, 300, Some(290)),
            Linear {
                fixed: 0,
                per_sample: 300
            }
        );
    }
}
