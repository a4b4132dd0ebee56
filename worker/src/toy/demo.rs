//! `swiftbrush toy demo` (what `make demo` runs): the toy world end to end.
//! 1. the teacher: the committed one copied into OUT/teacher (or, without
//!    one, trained there); 2. the 54 captions as OUT/captions.txt; 3. the
//!    distillation, by running `swiftbrush train` itself as a child process
//!    (the real command, nothing special-cased) into OUT/student, and with
//!    a few-step config a K-step student into OUT/student-few-step; 4. the
//!    comparison: OUT/compare.png, OUT/report.md, OUT/report.json.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tch::Device;

use super::ToyError;
use super::compare::{self, CompareOptions, Comparison};
use super::eval::ToyModel;
use super::progress::ProgressMode;
use super::shapes::Caption;
use super::teacher::{TeacherSettings, train_teacher};

/// The parts of a teacher folder (its checkpoints/ stay behind).
const TEACHER_PARTS: [&str; 5] = [
    "model_index.json",
    "unet",
    "text_encoder",
    "tokenizer",
    "scheduler",
];

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// The distillation's job config (configs/toy.yaml).
    pub config: PathBuf,
    /// A few-step student's job config (configs/toy-few-step.yaml), distilled
    /// into OUT/student-few-step after the one-step student and compared
    /// beside it; None: the one-step student alone.
    pub few_step_config: Option<PathBuf>,
    /// A trained toy teacher to copy; trained into OUT/teacher when absent.
    pub teacher_source: Option<PathBuf>,
    /// The `swiftbrush` binary that runs `train` (this one).
    pub exe: PathBuf,
    /// Extra arguments for `swiftbrush train` (tests shorten the run).
    pub train_args: Vec<String>,
    pub compare: CompareOptions,
    pub device: Device,
}

#[derive(Debug)]
pub struct DemoOutcome {
    pub comparison: Comparison,
    pub written: Vec<PathBuf>,
}

pub fn run_demo(opts: &DemoOptions) -> Result<DemoOutcome, ToyError> {
    std::fs::create_dir_all(&opts.out).map_err(ToyError::io(&opts.out))?;
    let teacher = opts.out.join("teacher");
    prepare_teacher(opts.teacher_source.as_deref(), &teacher, opts.device)?;

    let captions = opts.out.join("captions.txt");
    let text: String = Caption::all().iter().map(|c| c.text() + "\n").collect();
    std::fs::write(&captions, text).map_err(ToyError::io(&captions))?;

    let student = opts.out.join("student");
    let distill_seconds = distill(opts, &opts.config, &teacher, &captions, &student)?;
    let few_step = match &opts.few_step_config {
        Some(config) => {
            let dir = opts.out.join("student-few-step");
            Some((distill(opts, config, &teacher, &captions, &dir)?, dir))
        }
        None => None,
    };

    let student_model = ToyModel::Student {
        path: student.display().to_string(),
        teacher: Some(teacher.clone()),
    };
    let step = crate::export::StudentCheckpoint::open(&student.display().to_string())
        .map_err(|e| ToyError::Sample(e.to_string()))?
        .manifest
        .step;
    let few_step_model = few_step.as_ref().map(|(_, dir)| ToyModel::Student {
        path: dir.display().to_string(),
        teacher: Some(teacher.clone()),
    });
    tracing::info!("sampling and judging teacher and students");
    let (mut comparison, drawn) = compare::compare(
        &ToyModel::Teacher(teacher),
        &student_model,
        few_step_model.as_ref(),
        &opts.compare,
        opts.device,
    )?;
    comparison.distill_seconds = Some(distill_seconds);
    comparison.distill_steps = Some(step);
    comparison.few_step_distill_seconds = few_step.map(|(secs, _)| secs);
    let written = compare::write_outputs(&opts.out, &comparison, &drawn, &opts.compare)?;
    Ok(DemoOutcome {
        comparison,
        written,
    })
}

/// A fresh student in `dir` (the demo shows a whole distillation) by
/// `swiftbrush train --config config` as a child process; returns its
/// wall time in seconds.
fn distill(
    opts: &DemoOptions,
    config: &Path,
    teacher: &Path,
    captions: &Path,
    dir: &Path,
) -> Result<f64, ToyError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(ToyError::io(dir))?;
    }
    let started = Instant::now();
    let mut cmd = Command::new(&opts.exe);
    cmd.arg("train")
        .arg("--config")
        .arg(config)
        .arg("--teacher")
        .arg(teacher)
        .arg("--captions")
        .arg(captions)
        .arg("--run-dir")
        .arg(dir)
        .args(&opts.train_args);
    tracing::info!(command = ?cmd, "distilling the toy teacher");
    let status = cmd.status().map_err(ToyError::io(&opts.exe))?;
    if !status.success() {
        return Err(ToyError::Sample(format!(
            "`swiftbrush train` failed ({status}); its messages are above"
        )));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// OUT/teacher: a copy of `source` (kept when already equal), or a newly
/// trained teacher when there is no source.
fn prepare_teacher(source: Option<&Path>, dst: &Path, device: Device) -> Result<(), ToyError> {
    match source {
        Some(src) => {
            if !src.join("model_index.json").is_file() {
                return Err(ToyError::Sample(format!(
                    "{}: not a toy teacher folder (no model_index.json)",
                    src.display()
                )));
            }
            for part in TEACHER_PARTS {
                copy_tree(&src.join(part), &dst.join(part))?;
            }
            tracing::info!(from = %src.display(), to = %dst.display(), "toy teacher copied");
            Ok(())
        }
        None if dst.join("unet").join("config.json").is_file()
            && dst.join("checkpoints").is_dir() =>
        {
            // A teacher trained here before: continue (a no-op when done).
            tracing::info!(dir = %dst.display(), "resuming the toy teacher trained here");
            train_teacher(
                &TeacherSettings::default(),
                dst,
                true,
                device,
                ProgressMode::Auto,
            )?;
            Ok(())
        }
        None => {
            tracing::warn!(
                dir = %dst.display(),
                "no trained toy teacher given: training one (this takes about an hour on 2 CPU cores)"
            );
            train_teacher(
                &TeacherSettings::default(),
                dst,
                false,
                device,
                ProgressMode::Auto,
            )?;
            Ok(())
        }
    }
}

/// Copies a file or a folder (recursively), replacing what is there.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), ToyError> {
    let meta = std::fs::metadata(src).map_err(ToyError::io(src))?;
    if meta.is_dir() {
        std::fs::create_dir_all(dst).map_err(ToyError::io(dst))?;
        for entry in std::fs::read_dir(src).map_err(ToyError::io(src))? {
            let entry = entry.map_err(ToyError::io(src))?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(ToyError::io(parent))?;
        }
        std::fs::copy(src, dst).map_err(ToyError::io(src))?;
        Ok(())
    }
}
