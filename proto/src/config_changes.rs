//! Which differences between two job configs change what a run computes.
//! A resumed run compares the config it resumes with against the one its
//! checkpoint was written under: extending `train.max_steps`, moving the
//! checkpoint cadence or the log format changes no step's arithmetic and
//! deserves no warning, while a new guidance scale or learning rate does,
//! named key by key with both values.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::JobConfig;

/// One key whose value changed, as dotted path and JSON-ish values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.old, self.new)
    }
}

/// Keys (and sections, as prefixes) that change no step's arithmetic:
/// the name, where things are read and written, how often things happen
/// beside training, how the world is run (a step's captions and draws do
/// not depend on the world size), and the per-device memory and speed
/// choices (cuDNN's benchmark mode picks among algorithms for the same
/// convolutions; `precision.tf32` is not among them: it changes the
/// arithmetic on CUDA). The teacher's folder is left out too: the teacher
/// itself is checked by its fingerprint, so a moved folder is no change.
const NOT_TRAINING_MATH: [&str; 13] = [
    "name",
    "model.teacher",
    "train.device",
    "train.micro_batch",
    "train.gradient_checkpointing",
    "train.recompute_rows",
    "train.score_passes",
    "train.sample_every_steps",
    "train.sample_prompts",
    "precision.cudnn_benchmark",
    "world",
    "checkpoint",
    "logging",
];

impl JobConfig {
    /// The keys whose change from `old` changes what training computes,
    /// each with its old and new value, in key order. `train.max_steps`
    /// counts only while `method.max_timestep_final` anneals over it (in
    /// either config): otherwise a longer run trains the same steps first.
    pub fn training_changes_from(&self, old: &JobConfig) -> Vec<ConfigChange> {
        let anneals =
            self.method.max_timestep_final.is_some() || old.method.max_timestep_final.is_some();
        let (old, new) = (leaves(old), leaves(self));
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        keys.into_iter()
            .filter(|key| counts(key, anneals))
            .filter_map(|key| {
                let (o, n) = (old.get(key), new.get(key));
                (o != n).then(|| ConfigChange {
                    key: key.clone(),
                    old: o.map_or_else(|| "unset".to_owned(), Value::to_string),
                    new: n.map_or_else(|| "unset".to_owned(), Value::to_string),
                })
            })
            .collect()
    }
}

fn counts(key: &str, anneals: bool) -> bool {
    if key == "train.max_steps" {
        return anneals;
    }
    !NOT_TRAINING_MATH
        .iter()
        .any(|skip| key == *skip || key.starts_with(&format!("{skip}.")))
}

/// Every leaf value of the config by dotted key path; lists are leaves.
fn leaves(config: &JobConfig) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    // A config of plain structs serializes to JSON without failure.
    let value = serde_json::to_value(config).unwrap_or(Value::Null);
    flatten(String::new(), value, &mut out);
    out
}

fn flatten(prefix: String, value: Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let path = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(path, value, out);
            }
        }
        leaf => {
            out.insert(prefix, leaf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> JobConfig {
        let yaml = format!("name: a\nmodel:\n  teacher: /t\n{extra}");
        JobConfig::from_yaml_str(&yaml, "test").unwrap()
    }

    #[test]
    fn bookkeeping_keys_are_no_change() {
        let old = config("train:\n  max_steps: 4\n");
        let new = config(
            "train:\n  max_steps: 8\n  micro_batch: 1\n  device: cpu\n\
             checkpoint:\n  every_steps: 3\n  run_dir: elsewhere\n\
             logging:\n  format: json\nworld:\n  max_size: 2\n",
        );
        assert_eq!(new.training_changes_from(&old), vec![]);
        let mut moved = new.clone();
        moved.name = "b".to_owned();
        moved.model.teacher = Some("/moved".to_owned());
        assert_eq!(moved.training_changes_from(&new), vec![]);
    }

    #[test]
    fn a_math_change_is_named_with_both_values() {
        let old = config("");
        let new = config("method:\n  guidance_scale: 7.5\n  lora:\n    rank: 8\n");
        let changes: Vec<String> = new
            .training_changes_from(&old)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            changes,
            vec![
                "method.guidance_scale: 4.5 -> 7.5",
                "method.lora.rank: 64 -> 8"
            ]
        );
        // Unset and set optionals read as such.
        let anneal = config("method:\n  max_timestep_final: 500\n");
        let change = &anneal.training_changes_from(&old)[0];
        assert_eq!(
            (
                change.key.as_str(),
                change.old.as_str(),
                change.new.as_str()
            ),
            ("method.max_timestep_final", "null", "500")
        );
    }

    #[test]
    fn max_steps_counts_only_while_the_timestep_anneals_over_it() {
        let anneal = "method:\n  max_timestep_final: 500\n";
        let old = config(&format!("{anneal}train:\n  max_steps: 4\n"));
        let new = config(&format!("{anneal}train:\n  max_steps: 8\n"));
        let changes = new.training_changes_from(&old);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].to_string(), "train.max_steps: 4 -> 8");
    }
}
