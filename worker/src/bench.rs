//! `swiftbrush bench vsd-step`: how fast the training step runs on this
//! machine (median step time, images/s, peak host memory). Timings live
//! here, never in pass/fail tests.

use std::time::Instant;

use serde::Serialize;
use swiftbrush_proto::JobConfig;

use crate::torch::math_mode;
use crate::torch::precision;
use crate::trainer::caption_feed::LocalCaptionFeed;
use crate::trainer::gradient_sync::SingleProcess;
use crate::trainer::{Resume, SoloTrainer, TrainError, device_of};

#[derive(Debug, Clone, Serialize)]
pub struct VsdBenchReport {
    pub device: String,
    /// Dtypes of each part of the step (precision::describe).
    pub precision: String,
    /// TF32 and cuDNN benchmark mode as the trainer set them on CUDA
    /// (precision.tf32, precision.cudnn_benchmark; math_mode.rs); on the
    /// CPU they change nothing and say so.
    pub math_mode: String,
    /// How step 3 ran the teacher and the LoRA teacher
    /// (`train.score_passes` as resolved on this device): "one pass" or
    /// "two passes".
    pub score_passes: String,
    /// What the backward keeps (`train.gradient_checkpointing`): "kept"
    /// or "recomputed, N rows at a time".
    pub activations: String,
    pub images_per_step: u64,
    pub steps: u64,
    pub median_step_s: f64,
    pub mean_step_s: f64,
    pub images_per_s: f64,
    /// The process's CPU time (user + system, all threads) per timed step,
    /// median, s: on a machine whose cores other work shares, a steadier
    /// measure of a step's work than its wall time.
    pub median_step_cpu_s: Option<f64>,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_host_mib: Option<f64>,
    /// CUDA: the most device memory in use as the driver counts it (total
    /// minus free), sampled after each timed step, MiB; None on the CPU.
    pub peak_gpu_mib: Option<f64>,
    /// How CPU tensors take memory from malloc (host_memory.rs).
    pub host_malloc: String,
}

impl VsdBenchReport {
    pub fn table(&self) -> String {
        format!(
            "device            {}\nprecision         {}\nmath mode         {}\nscore passes      {}\nactivations       {}\nimages per step   {}\nsteps timed       {}\nmedian step       {:.4} s\nmean step         {:.4} s\nimages/s          {:.2}\nmedian step CPU   {}\npeak host memory  {}\npeak GPU memory   {}\nhost memory       {}\n",
            self.device,
            self.precision,
            self.math_mode,
            self.score_passes,
            self.activations,
            self.images_per_step,
            self.steps,
            self.median_step_s,
            self.mean_step_s,
            self.images_per_s,
            self.median_step_cpu_s
                .map_or("n/a".to_owned(), |s| format!("{s:.4} s")),
            self.peak_host_mib
                .map_or("n/a".to_owned(), |m| format!("{m:.0} MiB")),
            self.peak_gpu_mib.map_or("n/a".to_owned(), |m| format!(
                "{m:.0} MiB (in use per the driver, after each step)"
            )),
            self.host_malloc,
        )
    }
}

/// Builds the trainer as `train` would (with an in-memory run directory and
/// fixed captions), runs one untimed warm-up step, then `steps` timed ones.
pub fn bench_vsd_step(mut cfg: JobConfig, steps: u64) -> Result<VsdBenchReport, TrainError> {
    cfg.checkpoint.run_dir = "memory://".to_owned();
    let device = device_of(&cfg)?;
    // The trainer builds its autocast from the same config and device.
    let autocast = precision::teacher_autocast(&cfg.precision, device)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let precision = precision::describe(&cfg.precision, autocast.as_ref());
    let score_passes = format!(
        "{} ({:?})",
        if cfg.train.score_passes.one_pass(device.is_cuda()) {
            "one pass"
        } else {
            "two passes"
        },
        cfg.train.score_passes
    )
    .to_lowercase();
    let activations = if cfg.train.gradient_checkpointing {
        match cfg.train.recompute_rows {
            1 => "recomputed, 1 row at a time".to_owned(),
            n => format!("recomputed, {n} rows at a time"),
        }
    } else {
        "kept".to_owned()
    };
    let captions: Vec<String> = [
        "a photo of an astronaut riding a horse on mars",
        "a red circle on a white background",
        "an oil painting of a lighthouse at dusk, dramatic light",
        "a bowl of fruit on a wooden table",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let feed = LocalCaptionFeed::from_captions(
        captions,
        (u64::from(cfg.train.global_batch), cfg.train.seed, true),
        0,
        1,
    )?;
    let mut trainer = SoloTrainer::build(cfg, device, feed, SingleProcess, Resume::Auto)?;
    // What the trainer set (precision.tf32, precision.cudnn_benchmark), read
    // back from libtorch.
    let math_mode = if device.is_cuda() {
        math_mode::current().describe()
    } else {
        "TF32 and cuDNN benchmark change nothing on the CPU".to_owned()
    };
    trainer.train_step(0)?;
    let mut times = Vec::with_capacity(steps as usize);
    let mut cpu_times = Vec::with_capacity(steps as usize);
    let mut peak_gpu: Option<u64> = None;
    for step in 1..=steps {
        let t0 = Instant::now();
        let cpu0 = process_cpu_s();
        trainer.train_step(step)?;
        if device.is_cuda() {
            tch::Cuda::synchronize(device_index(device));
        }
        times.push(t0.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu0, process_cpu_s()) {
            cpu_times.push(b - a);
        }
        if device.is_cuda() {
            peak_gpu = peak_gpu.max(crate::torch::cuda_driver::memory_in_use_bytes());
        }
    }
    let median_s = median(&times).unwrap_or(f64::NAN);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let images = trainer.images_per_step();
    Ok(VsdBenchReport {
        device: format!("{device:?}"),
        precision,
        math_mode,
        score_passes,
        activations,
        images_per_step: images,
        steps,
        median_step_s: median_s,
        mean_step_s: mean,
        images_per_s: images as f64 / median_s,
        median_step_cpu_s: median(&cpu_times),
        peak_host_mib: peak_rss_mib(None),
        peak_gpu_mib: peak_gpu.map(|b| b as f64 / (1u64 << 20) as f64),
        host_malloc: crate::torch::host_memory::describe(crate::torch::host_memory::state()),
    })
}

/// The middle value (the upper of the two middle ones), None for none.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

/// This process's CPU time so far (user + system, every thread), s.
fn process_cpu_s() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given and reads nothing.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(s(usage.ru_utime) + s(usage.ru_stime))
}

fn device_index(device: tch::Device) -> i64 {
    match device {
        tch::Device::Cuda(i) => i as i64,
        _ => 0,
    }
}

/// Peak resident memory (VmHWM from /proc/PID/status, Linux) of process
/// `pid`, or of this one, in MiB.
pub fn peak_rss_mib(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or("/proc/self/status".to_owned(), |p| {
        format!("/proc/{p}/status")
    });
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
