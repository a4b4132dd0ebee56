//! `swiftbrush plan`: a worker's memory before launch. Resident parts are
//! exact element counts from the teacher folder's config.json files
//! (`resident.rs`); activations are measured by running each pass of the
//! step once on the CPU at the real shape (`probe.rs`, `memory.rs`); the
//! step's peak is composed from them by which tensors are alive when, with
//! and without gradient checkpointing, and the largest micro-batch that
//! fits each memory size is searched (`fit.rs`); `report.rs` prints it.
//!
//! Options that other work adds to the config arrive as [`PlanOptions`]
//! fields (the caller wires them to their keys).

pub mod fit;
pub mod memory;
pub mod probe;
pub mod report;
pub mod resident;

use std::path::Path;

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::FakeScore;

use crate::pipeline::DiffusersFolder;
pub use fit::{GpuTerms, StepForm, activation_peak, largest_micro_batch, parse_memory};
pub use report::{CpuPrediction, Fit, GpuPrediction, Plan};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Folder(#[from] crate::pipeline::FolderError),
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    #[error(transparent)]
    UNet(#[from] crate::pipeline::UNetError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Schedule(#[from] crate::diffusion::ScheduleError),
    #[error(transparent)]
    Train(#[from] crate::trainer::TrainError),
    #[error("the probe's torch call failed: {0}")]
    Torch(#[from] tch::TchError),
    #[error("the probe cannot read this process's memory (Linux /proc and glibc needed): {0}")]
    Memory(#[from] std::io::Error),
}

/// What a plan is made for.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Workers in the world: each trains train.global_batch / world rows.
    pub world: u32,
    /// GPU memory sizes to fit, bytes.
    pub gpu_memory: Vec<u64>,
    /// precision.student_autocast: the student's passes under the score
    /// passes' autocast (false: float32, today's step).
    pub student_autocast: bool,
    /// train.gradient_checkpointing as configured: which of the two
    /// columns the CPU prediction uses (both are always planned).
    pub gradient_checkpointing: bool,
    /// Rows the checkpointed student forward re-runs at a time.
    pub checkpoint_chunk: u32,
    /// Rows r the probe measures at (r, and 2r with two points): nearer
    /// the planned micro-batch extrapolates less.
    pub probe_rows: u32,
    /// 2: at r and 2r rows (fixed and per-sample parts); 1: at r only (all
    /// per sample, an overestimate; half the probe's memory).
    pub probe_points: u32,
    /// Skip the probe (resident parts only).
    pub probe: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            world: 1,
            gpu_memory: Vec::new(),
            student_autocast: false,
            gradient_checkpointing: false,
            checkpoint_chunk: 1,
            probe_rows: 1,
            probe_points: 2,
            probe: true,
        }
    }
}

/// The plan for `cfg` (its model.teacher folder; config files suffice).
pub fn plan(cfg: &JobConfig, opts: &PlanOptions) -> Result<Plan, PlanError> {
    // The program itself, before anything is built.
    let baseline = if opts.probe {
        Some(probe::baseline()?)
    } else {
        None
    };
    let teacher = cfg.model.teacher.clone().ok_or_else(|| {
        PlanError::Invalid("model.teacher is not set (pass --teacher DIR)".to_owned())
    })?;
    let folder = DiffusersFolder::open(Path::new(&teacher))?;
    if opts.world == 0 || !cfg.train.global_batch.is_multiple_of(opts.world) {
        return Err(PlanError::Invalid(format!(
            "--world {}: train.global_batch = {} is not divisible by it",
            opts.world, cfg.train.global_batch
        )));
    }
    if opts.checkpoint_chunk == 0 {
        return Err(PlanError::Invalid(
            "--checkpoint-chunk must be at least 1".to_owned(),
        ));
    }
    let rank_batch = cfg.train.global_batch / opts.world;
    let counts = resident::count(cfg, &folder)?;
    let shape = crate::trainer::sample_shape(cfg, &folder, counts.unet_config.in_channels)?;
    let parts = resident::parts(cfg, &counts, opts.world);
    let resident_bytes: u64 = parts.iter().map(|p| p.bytes).sum();
    let optimizer = resident::optimizer_transient(cfg, &counts);
    let gather = resident::gather_transient(cfg, &counts, opts.world);
    // The sharded gather comes between steps, as the optimizer's transient
    // after the activations: both compete in the same max (0 unsharded).
    let between_steps =
        |cpu: bool| optimizer.max(gather.map_or(0, |g| if cpu { g.cpu } else { g.device_piece }));
    let sample_bytes = 4 * (shape[0] * shape[1] * shape[2]) as u64;
    // The step's own inputs: text conditions and the draws.
    let (text_rows, text_width) = text_shape(&folder)?;
    let inputs = |m: u64| m * (text_rows * text_width * 4 + 3 * sample_bytes);

    // The micro-batch the CPU prediction is for.
    let micro = u64::from(cfg.train.micro_batch.unwrap_or(rank_batch).min(rank_batch));
    let probe = match baseline {
        Some(b) => Some(probe::run(
            cfg,
            &folder,
            &counts.unet_config,
            shape,
            opts,
            micro,
            b,
        )?),
        None => None,
    };
    let chunk = u64::from(opts.checkpoint_chunk);
    let form = |cuda: bool, ckpt: bool| StepForm {
        one_score_pass: cfg.train.score_passes.one_pass(cuda)
            && cfg.method.fake_score.kind == FakeScore::Lora,
        checkpoint_chunk: ckpt.then_some(chunk),
        sample_bytes,
    };
    let step_peak = |m: u64, f: StepForm| -> Option<(u64, u64)> {
        let p = probe.as_ref()?;
        let act = activation_peak(&p.passes, m, f) + inputs(m);
        Some((act, act.max(between_steps(false))))
    };

    let cpu = probe.as_ref().and_then(|p| {
        let m = micro;
        let (mut act, _) = step_peak(m, form(false, opts.gradient_checkpointing))?;
        // The plain step's passes run in order show what the heap cannot
        // reuse between passes (glibc); the trainer's own step, measured
        // as the config runs it (checkpointing included), what the
        // composition leaves out.
        if !opts.gradient_checkpointing {
            act = act.max(p.passes.sequence_peak.at(m) + inputs(m));
        }
        act = act.max(p.passes.step_peak.at(m) + inputs(m));
        // A run's peak is its first steps', on a fresh heap (probe.rs).
        if let Some(first) = p.passes.first_step_peak {
            act = act.max(first.at(m) + inputs(m));
        }
        let above = act.max(between_steps(true));
        Some(CpuPrediction {
            micro_batch: m as u32,
            baseline: p.baseline,
            resident: resident_bytes,
            activations: act,
            peak: p.baseline + resident_bytes + above,
        })
    });
    let gpu = GpuTerms::predicted(opts.world);
    // The GPU peak at the config's micro-batch and checkpointing (what the
    // GPU check's measured peak is compared with).
    let gpu_peak = probe.as_ref().and_then(|_| {
        let m = u64::from(cfg.train.micro_batch.unwrap_or(rank_batch).min(rank_batch));
        let (act, above) = step_peak(m, form(true, opts.gradient_checkpointing))?;
        Some(GpuPrediction {
            micro_batch: m as u32,
            peak: resident_bytes + above + gpu.total(act),
        })
    });
    let fits = opts
        .gpu_memory
        .iter()
        .map(|&budget| {
            let search = |ckpt: bool| {
                probe.as_ref()?;
                let peak = |m: u64| {
                    let (act, above) = step_peak(m, form(true, ckpt)).unwrap_or((0, 0));
                    resident_bytes + above + gpu.total(act)
                };
                let m = largest_micro_batch(rank_batch, budget, peak);
                Some((m, m.map(|m| peak(u64::from(m)))))
            };
            let (plain, ckpt) = (search(false), search(true));
            Fit {
                gpu_memory: budget,
                micro_batch: plain.and_then(|p| p.0),
                peak: plain.and_then(|p| p.1),
                micro_batch_checkpointing: ckpt.and_then(|p| p.0),
                peak_checkpointing: ckpt.and_then(|p| p.1),
                resident_fits: resident_bytes + gpu.total(0) <= budget,
            }
        })
        .collect();
    Ok(Plan {
        config: cfg.name.clone(),
        teacher,
        world: opts.world,
        rank_batch,
        sample_shape: shape,
        precision: format!(
            "teacher {}, autocast {:?}, student {}",
            cfg.precision.teacher_dtype.name(),
            cfg.precision.autocast,
            if opts.student_autocast {
                "under autocast"
            } else {
                "fp32"
            }
        )
        .to_lowercase(),
        checkpoint_chunk: opts.checkpoint_chunk,
        parts,
        resident: resident_bytes,
        optimizer_transient: optimizer,
        gather_transient: gather,
        probe,
        cpu,
        gpu: gpu_peak,
        gpu_terms: gpu,
        fits,
    })
}

/// A condition's rows and width: 77 tokens of the text encoder's width;
/// SDXL's two encoders' widths together, with its two extra rows
/// (pipeline/xl_condition.rs).
fn text_shape(folder: &DiffusersFolder) -> Result<(u64, u64), PlanError> {
    let width = |name: &str| -> Result<u64, PlanError> {
        let cfg = crate::models::clip::CLIPTextConfig::from_file(
            &folder.component(name)?.config_path()?,
        )?;
        Ok(cfg.hidden_size as u64)
    };
    if crate::pipeline::is_sdxl_folder(folder) {
        let rows = 77 + crate::pipeline::xl_condition::EXTRA_ROWS as u64;
        Ok((rows, width("text_encoder")? + width("text_encoder_2")?))
    } else {
        Ok((77, width("text_encoder")?))
    }
}
