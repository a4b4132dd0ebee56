//! `model.student_init`: the student's initial weights from another
//! diffusers UNet folder of the teacher's architecture (a fine-tune, a
//! distilled UNet), while the teacher and the fake score stay the
//! teacher's. The student is built from the teacher's config, so a folder
//! whose config differs in any architectural key is refused naming the
//! key (both values), before any weight is read; the weights then load
//! strictly by name and shape (`weights::load_tensors_strict`).

use std::collections::HashMap;
use std::path::Path;

use super::TrainError;
use crate::models::unet_2d_condition::UNet2DConditionConfig;
use crate::models::weights;
use crate::pipeline::{Component, DiffusersFolder, UNet};

/// The config key that names this option in errors.
pub const KEY: &str = "model.student_init";

/// Keys that describe no weight and no arithmetic of the network.
const NOT_ARCHITECTURE: [&str; 1] = ["sample_size"];

/// Overwrites `student`'s weights (float32, a copy of the teacher's) with
/// those of the UNet folder `dir` (or the `unet/` of a pipeline folder).
pub fn init_student(student: &mut UNet, dir: &str) -> Result<(), TrainError> {
    let invalid = |message: String| TrainError::Invalid(format!("{KEY} = {dir}: {message}"));
    let path = Path::new(dir);
    let component = if path.join("model_index.json").is_file() {
        DiffusersFolder::open(path)?.component("unet")?
    } else if path.is_dir() {
        Component {
            name: "unet".into(),
            dir: path.to_owned(),
        }
    } else {
        return Err(invalid(
            "no such folder (a diffusers UNet folder is expected)".into(),
        ));
    };
    let config = UNet2DConditionConfig::from_file(&component.config_path()?)?;
    let differences = architecture_differences(&student.config, &config);
    if !differences.is_empty() {
        return Err(invalid(format!(
            "its UNet config differs from the teacher's: {} (the student is built with the \
             teacher's architecture)",
            differences.join(", ")
        )));
    }
    let files = component.weight_files()?;
    let mut tensors = HashMap::new();
    for f in &files {
        tensors.extend(weights::read_safetensors(f).map_err(crate::models::ModelError::from)?);
    }
    weights::load_tensors_strict(&mut student.vs, tensors, &files)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(())
}

/// `key: teacher value vs folder value` for every architectural key whose
/// value differs (diffusers' defaults filled in for absent keys).
pub fn architecture_differences(
    teacher: &UNet2DConditionConfig,
    other: &UNet2DConditionConfig,
) -> Vec<String> {
    let as_map = |c: &UNet2DConditionConfig| match serde_json::to_value(c) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (a, b) = (as_map(teacher), as_map(other));
    a.iter()
        .filter(|(k, _)| !NOT_ARCHITECTURE.contains(&k.as_str()))
        .filter_map(|(k, v)| {
            let w = b.get(k).unwrap_or(&serde_json::Value::Null);
            (v != w).then(|| format!("{k}: teacher {v} vs {w}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_the_key_and_ignore_sample_size() {
        let teacher = UNet2DConditionConfig::sd_v1_5();
        let mut other = teacher.clone();
        other.sample_size = None;
        assert!(architecture_differences(&teacher, &other).is_empty());
        other.cross_attention_dim = crate::models::unet_2d_condition::OneOrMany::One(1024);
        let d = architecture_differences(&teacher, &other);
        assert_eq!(d, ["cross_attention_dim: teacher 768 vs 1024"]);
    }
}
