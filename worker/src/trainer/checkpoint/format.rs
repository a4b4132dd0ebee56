//! The checkpoint's format: its files, one per [`TensorGroup`] (the
//! student, its EMA, the fake score: LoRA adapters by PEFT name or the
//! full copy by diffusers name, both Adam states), and `state.json`
//! ([`TrainState`]); a [`Snapshot`] of them serialized to host bytes on the
//! training thread, and a committed checkpoint read back ([`Restored`]).

use std::collections::HashMap;
use swiftbrush_proto::JobConfig;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use swiftbrush_proto::run_store::{CheckpointMeta, Manifest, RunStore};
use tch::Tensor;

use super::CheckpointError;
use super::tensor_bytes;

/// The tensor files of a checkpoint, in the order they are written and
/// read: one list for saving and restoring (`trainer/save_restore.rs` says
/// what each holds). The file names are the format's: the fake score's files keep
/// their first names (`lora`) for both forms, so old checkpoints load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorGroup {
    Student,
    Ema,
    FakeScore,
    StudentOptimizer,
    FakeScoreOptimizer,
}

impl TensorGroup {
    pub const ALL: [TensorGroup; 5] = [
        TensorGroup::Student,
        TensorGroup::Ema,
        TensorGroup::FakeScore,
        TensorGroup::StudentOptimizer,
        TensorGroup::FakeScoreOptimizer,
    ];

    pub fn file(self) -> &'static str {
        match self {
            TensorGroup::Student => "student.safetensors",
            TensorGroup::Ema => "ema.safetensors",
            TensorGroup::FakeScore => "lora.safetensors",
            TensorGroup::StudentOptimizer => "optimizer_student.safetensors",
            TensorGroup::FakeScoreOptimizer => "optimizer_lora.safetensors",
        }
    }
}

pub const STATE: &str = "state.json";

/// The resolved job config the checkpoint was trained under, so a resume
/// can name what changed key by key (older checkpoints lack it).
pub const CONFIG: &str = "config.yaml";

/// The loop's own state, saved as `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed: training resumes at this step index.
    pub step: u64,
    /// The epoch and in-epoch caption index the next step starts at.
    pub epoch: u64,
    pub caption_index: u64,
    /// Steps whose updates were skipped because a loss or gradient was not
    /// finite.
    pub num_nonfinite_steps: u64,
    /// Captions cut at 77 tokens so far.
    pub num_truncated_captions: u64,
    /// EMA updates applied (skipped steps do not update it).
    pub ema_updates: i64,
    pub seed: u64,
    pub config_fingerprint: String,
    pub teacher_fingerprint: String,
    /// The teacher folder as given, so `sample --student RUN` finds the
    /// text encoder, tokenizer and VAE.
    pub teacher: String,
    /// fp16 dynamic loss scaling's state (grad_scaler.rs), with
    /// `precision.student_autocast` under fp16 only: absent otherwise, so
    /// other runs' state.json is unchanged, and an older checkpoint without
    /// it starts the scalers afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scalers: Option<crate::trainer::grad_scaler::LossScalers>,
}

/// One checkpoint, serialized, ready to upload.
pub struct Snapshot {
    pub step: u64,
    pub files: Vec<(String, Bytes)>,
    pub meta: CheckpointMeta,
}

impl Snapshot {
    pub fn new(
        state: &TrainState,
        tensors: [(TensorGroup, Vec<(String, Tensor)>); 5],
        config: &JobConfig,
    ) -> Result<Self, CheckpointError> {
        let mut files = Vec::with_capacity(7);
        for (group, named) in tensors {
            files.push((
                group.file().to_owned(),
                Bytes::from(tensor_bytes::to_bytes(&named)?),
            ));
        }
        let json = serde_json::to_vec_pretty(state).map_err(|e| CheckpointError::BadFile {
            step: state.step,
            file: STATE.to_owned(),
            reason: e.to_string(),
        })?;
        files.push((STATE.to_owned(), Bytes::from(json)));
        files.push((CONFIG.to_owned(), Bytes::from(config.to_yaml())));
        Ok(Self {
            step: state.step,
            files,
            meta: CheckpointMeta {
                epoch: state.epoch,
                generation: 0,
                config_fingerprint: state.config_fingerprint.clone(),
                teacher_fingerprint: state.teacher_fingerprint.clone(),
                extra: serde_json::Value::Null,
            },
        })
    }
}

/// A checkpoint read back.
pub struct Restored {
    pub state: TrainState,
    pub tensors: HashMap<String, HashMap<String, Tensor>>,
    /// The config it was trained under; none for a checkpoint written
    /// before configs were kept, or one this build cannot read.
    pub config: Option<JobConfig>,
}

/// Reads every file of a committed checkpoint (sizes and sha256 checked by
/// the store).
pub fn read_checkpoint(store: &RunStore, manifest: &Manifest) -> Result<Restored, CheckpointError> {
    let bad = |file: &str, reason: String| CheckpointError::BadFile {
        step: manifest.step,
        file: file.to_owned(),
        reason,
    };
    let state_bytes = store.read_manifest_file(manifest, STATE)?;
    let state: TrainState =
        serde_json::from_slice(&state_bytes).map_err(|e| bad(STATE, e.to_string()))?;
    let mut tensors = HashMap::new();
    for name in TensorGroup::ALL.map(TensorGroup::file) {
        let bytes = store.read_manifest_file(manifest, name)?;
        let what = format!("checkpoint step {} {name}", manifest.step);
        tensors.insert(name.to_owned(), tensor_bytes::from_bytes(&bytes, &what)?);
    }
    let config = match manifest.file(CONFIG) {
        Some(_) => {
            let bytes = store.read_manifest_file(manifest, CONFIG)?;
            let text = String::from_utf8_lossy(&bytes);
            JobConfig::from_yaml_str(&text, CONFIG)
                .inspect_err(
                    |e| tracing::debug!(error = %e, "the checkpoint's config is not readable"),
                )
                .ok()
        }
        None => None,
    };
    Ok(Restored {
        state,
        tensors,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::grad_scaler::{GradScaler, LossScalers};

    fn state(loss_scalers: Option<LossScalers>) -> TrainState {
        TrainState {
            step: 3,
            epoch: 0,
            caption_index: 6,
            num_nonfinite_steps: 1,
            num_truncated_captions: 0,
            ema_updates: 2,
            seed: 7,
            config_fingerprint: "c".to_owned(),
            teacher_fingerprint: "t".to_owned(),
            teacher: "/t".to_owned(),
            loss_scalers,
        }
    }

    #[test]
    fn loss_scalers_are_kept_only_when_there_are_some() {
        // Without loss scaling state.json is what it was before the field.
        let json = serde_json::to_string(&state(None)).unwrap();
        assert!(!json.contains("loss_scalers"), "{json}");
        // So an older checkpoint's state.json reads back without them.
        assert_eq!(
            serde_json::from_str::<TrainState>(&json).unwrap(),
            state(None)
        );
        let scaled = state(Some(LossScalers {
            student: GradScaler {
                scale: 32768.0,
                growth_tracker: 0,
            },
            fake_score: GradScaler {
                scale: 65536.0,
                growth_tracker: 3,
            },
        }));
        let json = serde_json::to_string(&scaled).unwrap();
        assert_eq!(serde_json::from_str::<TrainState>(&json).unwrap(), scaled);
    }
}
