//! `swiftbrush export`: a trained student as a diffusers UNet folder
//! (config.json + diffusion_pytorch_model.safetensors, the EMA weights by
//! default), or with `pipeline` a whole pipeline folder: the student UNet
//! plus the teacher's text encoder(s), tokenizer(s), VAE and scheduler, which
//! diffusers loads with `from_pretrained`.

use std::path::{Path, PathBuf};

use swiftbrush_proto::run_store::{Manifest, ResumeFrom, RunStore, RunStoreError};

use crate::pipeline::DiffusersFolder;
use crate::trainer::checkpoint::{STATE, TensorGroup, TrainState};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] swiftbrush_proto::run_store::RunStoreError),
    #[error(transparent)]
    Folder(#[from] crate::pipeline::FolderError),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// Which student weights to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StudentWeights {
    Ema,
    Raw,
}

/// How a student draws: one pass at `student_timestep`, x0 with the
/// constant `student_alpha_bar` (from the run's config); a few-step
/// student then goes on through `student_timesteps` (shared/SPEC.md
/// "Few-step students"). Written as `swiftbrush.json` into exported
/// pipelines so they sample the same way.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OneStep {
    pub student_timestep: i64,
    pub student_alpha_bar: f64,
    /// Use the schedule's alphas_cumprod[student_timestep] instead.
    #[serde(default)]
    pub alpha_bar_from_schedule: bool,
    /// A few-step student's timesteps, starting at `student_timestep`;
    /// absent or empty: one step (files written before few-step students).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub student_timesteps: Vec<i64>,
}

impl OneStep {
    /// The student's timesteps, t_0 > t_1 > ... ([student_timestep] for
    /// a one-step student).
    pub fn steps(&self) -> Vec<i64> {
        if self.student_timesteps.is_empty() {
            vec![self.student_timestep]
        } else {
            self.student_timesteps.clone()
        }
    }

    /// A few-step student's chain on the pipeline's schedule; None for
    /// one step.
    pub fn chain(
        &self,
        schedule: &crate::diffusion::NoiseSchedule,
    ) -> Result<Option<crate::diffusion::StudentChain>, ExportError> {
        let steps = self.steps();
        if steps.len() < 2 {
            return Ok(None);
        }
        if steps[0] != self.student_timestep {
            return Err(ExportError::Invalid(format!(
                "{ONE_STEP_FILE}: student_timesteps {steps:?} must start at \
                 student_timestep {}",
                self.student_timestep
            )));
        }
        crate::diffusion::StudentChain::new(&steps, self.student_alpha_bar, schedule)
            .map(Some)
            .map_err(|e| ExportError::Invalid(format!("{ONE_STEP_FILE}: {e}")))
    }
}

impl Default for OneStep {
    fn default() -> Self {
        Self {
            student_timestep: 999,
            student_alpha_bar: 0.0047,
            alpha_bar_from_schedule: false,
            student_timesteps: Vec::new(),
        }
    }
}

pub const ONE_STEP_FILE: &str = "swiftbrush.json";

impl OneStep {
    /// From an exported pipeline folder. A pipeline folder without the
    /// file is refused: it is a teacher (or another tool's export), and
    /// drawing one step from an undistilled UNet would go unnoticed.
    pub fn from_export(dir: &Path) -> Result<Self, ExportError> {
        let path = dir.join(ONE_STEP_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ExportError::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ExportError::Invalid(teacher_as_student(dir)))
            }
            Err(e) => Err(io(&path, e)),
        }
    }
}

/// What to pass instead of a folder that is not a student checkpoint.
const STUDENT_PATHS: &str = "a run directory, RUN/checkpoints/step-N \
                             or a folder written by `export --pipeline`";

/// A pipeline folder without swiftbrush.json given as a student.
fn teacher_as_student(dir: &Path) -> String {
    let d = shown(dir);
    let defaults = OneStep::default();
    format!(
        "{d} looks like a teacher pipeline (model_index.json but no {ONE_STEP_FILE}), \
         not a trained student: pass it as --teacher, and as --student {STUDENT_PATHS}. \
         If it is a one-step export by another tool (or by a swiftbrush before \
         {ONE_STEP_FILE}), write {d}/{ONE_STEP_FILE} containing \
         {{\"student_timestep\": {}, \"student_alpha_bar\": {}}} \
         (the timestep and constant alpha-bar its student was trained with; \
         these are SwiftBrush's)",
        defaults.student_timestep, defaults.student_alpha_bar
    )
}

fn shown(dir: &Path) -> String {
    dir.display().to_string().trim_end_matches('/').to_owned()
}

/// Why a local folder given as a student checkpoint (a run directory or
/// RUN/checkpoints/step-N) is something else: an exported pipeline, a
/// teacher pipeline or a UNet folder. None: it may be a run.
fn not_a_run(dir: &Path) -> Option<String> {
    let d = shown(dir);
    if dir.join("model_index.json").is_file() {
        if dir.join(ONE_STEP_FILE).is_file() {
            return Some(format!(
                "{d} is a pipeline written by `export --pipeline`: it is already an \
                 export (draw from it with `sample --student {d}`); export reads the \
                 run directory it came from or RUN/checkpoints/step-N"
            ));
        }
        return Some(teacher_as_student(dir));
    }
    let unet_weights = ["safetensors", "bin"]
        .iter()
        .any(|ext| dir.join(format!("diffusion_pytorch_model.{ext}")).is_file());
    if dir.join("config.json").is_file() && unet_weights {
        return Some(format!(
            "{d} is a UNet folder (config.json and diffusion_pytorch_model weights, \
             as `export` without --pipeline writes), not a run: pass the run directory \
             it came from or RUN/checkpoints/step-N, or write a whole pipeline with \
             `export --pipeline` and pass that folder"
        ));
    }
    None
}

/// A checkpoint chosen from a user's path: a run directory (its newest
/// valid checkpoint) or `RUN/checkpoints/step-N`.
pub struct StudentCheckpoint {
    pub store: RunStore,
    pub manifest: Manifest,
    pub state: TrainState,
    /// The run's config.yaml, read and parsed once on first use (None: a
    /// run written without one): the one-step settings, the LoRA spec and
    /// the text encoder dtype all come from it.
    run_config: std::sync::OnceLock<Option<swiftbrush_proto::JobConfig>>,
}

impl StudentCheckpoint {
    pub fn open(path: &str) -> Result<Self, ExportError> {
        let trimmed = path.trim_end_matches('/');
        let (run, from) = match split_step(trimmed) {
            Some((run, step)) => (run, ResumeFrom::Step(step)),
            None => (trimmed.to_owned(), ResumeFrom::Latest),
        };
        // Reading must not create anything: a mistyped local path is an
        // error, not a new empty run directory.
        let local = !run.contains("://") || run.starts_with("file://");
        let local_path = run.strip_prefix("file://").unwrap_or(&run);
        if local && !Path::new(local_path).is_dir() {
            return Err(ExportError::Invalid(format!(
                "{run}: no such run directory (expected {STUDENT_PATHS})"
            )));
        }
        if local && let Some(what) = not_a_run(Path::new(trimmed)) {
            return Err(ExportError::Invalid(what));
        }
        let store = RunStore::open(&run)?;
        let manifest = store.resolve(from).map_err(|e| match e {
            RunStoreError::NoCheckpoint { run } => ExportError::Invalid(no_checkpoint(&run)),
            e => e.into(),
        })?;
        let bytes = store.read_manifest_file(&manifest, STATE)?;
        let state: TrainState = serde_json::from_slice(&bytes).map_err(|e| {
            ExportError::Invalid(format!(
                "{run}: checkpoint step {} {STATE}: {e}",
                manifest.step
            ))
        })?;
        Ok(Self {
            store,
            manifest,
            state,
            run_config: std::sync::OnceLock::new(),
        })
    }

    /// The student weights as a safetensors blob with diffusers' names.
    pub fn weights(&self, which: StudentWeights) -> Result<bytes::Bytes, ExportError> {
        let name = match which {
            StudentWeights::Ema => TensorGroup::Ema.file(),
            StudentWeights::Raw => TensorGroup::Student.file(),
        };
        Ok(self.store.read_manifest_file(&self.manifest, name)?)
    }

    /// The one-step settings of the run (its resolved config.yaml).
    pub fn one_step(&self) -> Result<OneStep, ExportError> {
        let Some(cfg) = self.run_config()? else {
            return Ok(OneStep::default());
        };
        Ok(OneStep {
            student_timestep: i64::from(cfg.method.student_timestep),
            student_alpha_bar: cfg.method.student_alpha_bar,
            alpha_bar_from_schedule: cfg.method.student_alpha_bar_from_schedule,
            student_timesteps: match &cfg.method.student_timesteps {
                Some(steps) if steps.len() > 1 => steps.iter().map(|&t| i64::from(t)).collect(),
                _ => Vec::new(),
            },
        })
    }

    /// A LoRA student's adapters (rank, alpha, targets: the run's
    /// config.yaml, `method.student.lora`), whose tensors the checkpoint's
    /// student and EMA files hold by PEFT name; None for a full student
    /// (or a run without its config.yaml, written before LoRA students).
    pub fn student_lora(&self) -> Result<Option<crate::lora::LoraSpec>, ExportError> {
        Ok(self.run_config()?.and_then(|cfg| {
            cfg.method
                .student
                .lora_adapters()
                .map(|l| crate::lora::LoraSpec::from(&l))
        }))
    }

    /// The dtype the run's text encoder(s) were held in
    /// (`precision.text_encoder_dtype`; fp32 for a run without a config).
    pub fn text_encoder_dtype(&self) -> Result<swiftbrush_proto::config::Dtype, ExportError> {
        Ok(self
            .run_config()?
            .map_or(swiftbrush_proto::config::Dtype::Fp32, |cfg| {
                cfg.precision.text_encoder_dtype
            }))
    }

    /// The run's resolved config.yaml; None for a run written without one.
    fn run_config(&self) -> Result<Option<&swiftbrush_proto::JobConfig>, ExportError> {
        if let Some(cfg) = self.run_config.get() {
            return Ok(cfg.as_ref());
        }
        let cfg = match self.store.get_run_file("config.yaml")? {
            None => None,
            Some(text) => Some(
                swiftbrush_proto::JobConfig::from_yaml_str(
                    &String::from_utf8_lossy(&text),
                    "run config.yaml",
                )
                .map_err(|e| ExportError::Invalid(e.to_string()))?,
            ),
        };
        Ok(self.run_config.get_or_init(|| cfg).as_ref())
    }

    /// A LoRA student's adapters (or their EMA) by PEFT name, as the
    /// checkpoint holds them.
    pub fn student_adapters(
        &self,
        which: StudentWeights,
    ) -> Result<std::collections::HashMap<String, tch::Tensor>, ExportError> {
        let bytes = self.weights(which)?;
        crate::trainer::checkpoint::tensor_bytes::from_bytes(&bytes, "the student's adapters")
            .map_err(|e| ExportError::Invalid(e.to_string()))
    }

    /// The teacher folder recorded in the run, unless overridden.
    pub fn teacher(&self, teacher: Option<&Path>) -> Result<DiffusersFolder, ExportError> {
        let dir = teacher
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&self.state.teacher));
        DiffusersFolder::open(&dir).map_err(|e| {
            ExportError::Invalid(format!(
                "{e} (the run recorded teacher {}; pass --teacher DIR if it moved)",
                self.state.teacher
            ))
        })
    }
}

/// A run (or any folder) with no valid checkpoint, given as a student.
pub fn no_checkpoint(run: &str) -> String {
    format!(
        "{run}: no checkpoint: training writes one every train.checkpoint_every steps \
         and at train.max_steps (is it the run directory?); pass {STUDENT_PATHS}"
    )
}

/// `RUN/checkpoints/step-00000042` -> (RUN, 42).
fn split_step(path: &str) -> Option<(String, u64)> {
    let (parent, last) = path.rsplit_once('/')?;
    let step = last.strip_prefix("step-")?.parse().ok()?;
    let run = parent.strip_suffix("/checkpoints")?;
    Some((run.to_owned(), step))
}

/// Writes the export; returns what it wrote, the UNet folder first.
///
/// A LoRA student's UNet is the teacher's with its adapters folded in
/// (`merge`, `export --merge`); without `merge` it is refused (its
/// weights are adapters: `export --lora` writes them as a LoRA file).
/// `dtype` (`export --dtype`) casts the UNet's floating tensors; None
/// writes them as they are (float32; merged: the teacher's dtype).
pub fn export(
    ckpt: &StudentCheckpoint,
    which: StudentWeights,
    out: &Path,
    pipeline: bool,
    merge: bool,
    teacher: Option<&Path>,
    dtype: Option<swiftbrush_proto::config::Dtype>,
) -> Result<Vec<PathBuf>, ExportError> {
    let lora = ckpt.student_lora()?;
    match (&lora, merge) {
        (Some(_), false) => {
            return Err(ExportError::Invalid(format!(
                "checkpoint step {} is a LoRA student (method.student.kind: lora): its weights \
                 are adapters, not a UNet; a LoRA student exports as adapters (--lora) or \
                 merged (--merge)",
                ckpt.manifest.step
            )));
        }
        (None, true) => {
            return Err(ExportError::Invalid(format!(
                "--merge folds a LoRA student's adapters into the teacher's UNet, and \
                 checkpoint step {} is a full student (method.student.kind: full), a UNet \
                 already: export it without --merge",
                ckpt.manifest.step
            )));
        }
        _ => {}
    }
    let folder = ckpt.teacher(teacher)?;
    let unet_src = folder.component("unet")?;
    // Read before anything is written: a bad run config leaves no half export.
    let one_step = if pipeline {
        Some(ckpt.one_step()?)
    } else {
        None
    };
    let weights: bytes::Bytes = match &lora {
        None => ckpt.weights(which)?,
        Some(spec) => {
            crate::export_lora::merged_unet_bytes(&ckpt.student_adapters(which)?, spec, &folder)?
                .into()
        }
    };
    // Cast before anything is written: a tensor fp16 cannot hold leaves
    // no half export.
    let weights = match dtype {
        None => weights,
        Some(dtype) => crate::export_dtype::cast_bytes(
            &weights,
            crate::torch::precision::kind_of(dtype),
            "the student's UNet weights",
        )?
        .into(),
    };
    let unet_dir = if pipeline {
        out.join("unet")
    } else {
        out.to_owned()
    };
    create_dir(&unet_dir)?;
    copy(&unet_src.config_path()?, &unet_dir.join("config.json"))?;
    write(
        &unet_dir.join("diffusion_pytorch_model.safetensors"),
        &weights,
    )?;
    let mut written = vec![unet_dir];
    if let Some(one_step) = one_step {
        // An SDXL teacher's second encoder and tokenizer too.
        for name in [
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
            "vae",
            "scheduler",
        ] {
            if let Ok(c) = folder.component(name) {
                copy_dir(&c.dir, &out.join(name))?;
                written.push(out.join(name));
            }
        }
        // The student's own scheduler: diffusers' stock pipeline then draws
        // its picture with a plain call (export_scheduler.rs).
        if let Ok(c) = folder.component("scheduler") {
            let path = out.join("scheduler").join("scheduler_config.json");
            let teacher = std::fs::read(c.dir.join("scheduler_config.json"))
                .map_err(|e| io(&c.dir.join("scheduler_config.json"), e))?;
            let teacher: serde_json::Value = serde_json::from_slice(&teacher)
                .map_err(|e| ExportError::Invalid(format!("{}: {e}", c.dir.display())))?;
            let config = crate::export_scheduler::student_scheduler_config(&teacher, &one_step)?;
            let json = serde_json::to_vec_pretty(&config)
                .map_err(|e| ExportError::Invalid(format!("{}: {e}", path.display())))?;
            write(&path, &json)?;
        }
        // model_index.json names the scheduler's class: diffusers loads
        // that one, so it must say LCMScheduler too.
        let index = out.join("model_index.json");
        let source = folder.root().join("model_index.json");
        let bytes = std::fs::read(&source).map_err(|e| io(&source, e))?;
        let mut model_index: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ExportError::Invalid(format!("{}: {e}", source.display())))?;
        if let Some(entry) = model_index.get_mut("scheduler") {
            *entry = serde_json::json!(["diffusers", "LCMScheduler"]);
        }
        let json = serde_json::to_vec_pretty(&model_index)
            .map_err(|e| ExportError::Invalid(format!("{}: {e}", index.display())))?;
        write(&index, &json)?;
        written.push(index);
        // How the folder draws (`sample --student` refuses a pipeline
        // folder without it: that is a teacher).
        let path = out.join(ONE_STEP_FILE);
        let json = serde_json::to_vec_pretty(&one_step)
            .map_err(|e| ExportError::Invalid(format!("{}: {e}", path.display())))?;
        write(&path, &json)?;
        written.push(path);
    }
    Ok(written)
}

fn io(path: &Path, e: std::io::Error) -> ExportError {
    ExportError::Io {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

pub(crate) fn create_dir(p: &Path) -> Result<(), ExportError> {
    std::fs::create_dir_all(p).map_err(|e| io(p, e))
}

/// Written to a temporary name first, so an interrupted export never
/// leaves a truncated weights file under the final name.
pub(crate) fn write(p: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let tmp = p.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, p).map_err(|e| io(p, e))
}

pub(crate) fn copy(from: &Path, to: &Path) -> Result<(), ExportError> {
    std::fs::copy(from, to).map(|_| ()).map_err(|e| io(from, e))
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), ExportError> {
    create_dir(to)?;
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()))?;
        } else {
            copy(&path, &to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_step;

    #[test]
    fn checkpoint_paths() {
        assert_eq!(
            split_step("runs/a/checkpoints/step-00000042"),
            Some(("runs/a".to_owned(), 42))
        );
        assert_eq!(
            split_step("s3://b/run/checkpoints/step-7"),
            Some(("s3://b/run".to_owned(), 7))
        );
        assert_eq!(split_step("runs/a"), None);
    }
}
