//! A diffusers pipeline folder on disk: `model_index.json` names the
//! components, each component folder holds a `config.json` and weights.
//! This module finds files and explains what is missing; it builds no model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::models::weights::{WeightsError, refuse_pickle};

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("{dir} is not a diffusers pipeline folder: {reason}")]
    NotAPipeline { dir: PathBuf, reason: String },
    #[error("{path}: {message}")]
    BadIndex { path: PathBuf, message: String },
    #[error(
        "the pipeline at {dir} has no `{name}` component: {reason} \
         (components found: {found})"
    )]
    MissingComponent {
        dir: PathBuf,
        name: String,
        reason: String,
        found: String,
    },
    #[error("{dir} has no config.json")]
    MissingConfig { dir: PathBuf },
    #[error("no safetensors weights in {dir}: looked for {looked_for}")]
    NoWeights { dir: PathBuf, looked_for: String },
    #[error(transparent)]
    Pickle(#[from] WeightsError),
}

/// An opened pipeline folder and its `model_index.json`.
#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    root: PathBuf,
    class_name: Option<String>,
    /// Component name -> [library, class]; `None` for components the
    /// pipeline was saved without (e.g. `safety_checker: [null, null]`).
    components: BTreeMap<String, Option<(String, String)>>,
    /// The boolean options beside them (`force_zeros_for_empty_prompt`,
    /// `requires_safety_checker`).
    flags: BTreeMap<String, bool>,
}

impl DiffusersFolder {
    pub fn open(root: &Path) -> Result<Self, FolderError> {
        if root.is_file() {
            return Err(FolderError::NotAPipeline {
                dir: root.to_owned(),
                reason: "it is a file, not a folder: pass the pipeline folder (the one holding \
                         model_index.json)"
                    .to_owned(),
            });
        }
        if !root.is_dir() {
            return Err(FolderError::NotAPipeline {
                dir: root.to_owned(),
                reason: "no such directory".to_owned(),
            });
        }
        let index_path = root.join("model_index.json");
        let text = std::fs::read_to_string(&index_path).map_err(|e| FolderError::NotAPipeline {
            dir: root.to_owned(),
            reason: format!("cannot read model_index.json ({e})"),
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| FolderError::BadIndex {
                path: index_path.clone(),
                message: e.to_string(),
            })?;
        let obj = json.as_object().ok_or_else(|| FolderError::BadIndex {
            path: index_path.clone(),
            message: "expected a JSON object".to_owned(),
        })?;
        let mut components = BTreeMap::new();
        let mut flags = BTreeMap::new();
        for (key, value) in obj {
            if let Some(flag) = value.as_bool() {
                flags.insert(key.clone(), flag);
            }
            if key.starts_with('_') {
                continue;
            }
            // Components are [library, class] pairs; other keys are options
            // such as `requires_safety_checker`.
            if let Some(pair) = value.as_array().filter(|a| a.len() == 2) {
                let entry = match (pair[0].as_str(), pair[1].as_str()) {
                    (Some(lib), Some(class)) => Some((lib.to_owned(), class.to_owned())),
                    _ => None,
                };
                components.insert(key.clone(), entry);
            }
        }
        Ok(Self {
            root: root.to_owned(),
            class_name: obj
                .get("_class_name")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            components,
            flags,
        })
    }

    /// A boolean option of model_index.json (None where absent).
    pub fn flag(&self, name: &str) -> Option<bool> {
        self.flags.get(name).copied()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pipeline class that saved the folder, e.g. StableDiffusionPipeline.
    pub fn class_name(&self) -> Option<&str> {
        self.class_name.as_deref()
    }

    /// The class model_index.json records for a component.
    pub fn component_class(&self, name: &str) -> Option<&str> {
        self.components
            .get(name)
            .and_then(|c| c.as_ref())
            .map(|(_, class)| class.as_str())
    }

    /// Every component model_index.json lists with a class (not null),
    /// sorted by name, whether or not its folder exists.
    pub fn component_names(&self) -> Vec<String> {
        self.components
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Whether the pipeline has this component (listed, not null, folder
    /// present).
    pub fn has(&self, name: &str) -> bool {
        self.component(name).is_ok()
    }

    /// A component folder, or an error that says why it is not usable.
    pub fn component(&self, name: &str) -> Result<Component, FolderError> {
        let missing = |reason: String| FolderError::MissingComponent {
            dir: self.root.clone(),
            name: name.to_owned(),
            reason,
            found: self.present_components().join(", "),
        };
        match self.components.get(name) {
            None => return Err(missing("model_index.json does not list it".to_owned())),
            Some(None) => return Err(missing("model_index.json sets it to null".to_owned())),
            Some(Some(_)) => {}
        }
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(missing(format!(
                "model_index.json lists it but {} does not exist",
                dir.display()
            )));
        }
        Ok(Component {
            name: name.to_owned(),
            dir,
        })
    }

    fn present_components(&self) -> Vec<String> {
        self.components
            .iter()
            .filter(|(k, v)| v.is_some() && self.root.join(k).is_dir())
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// One component folder (unet/, text_encoder/, vae/, ...).
#[derive(Debug, Clone)]
pub struct Component {
    pub name: String,
    pub dir: PathBuf,
}

/// Weight file stems diffusers and transformers write.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

impl Component {
    pub fn config_path(&self) -> Result<PathBuf, FolderError> {
        let p = self.dir.join("config.json");
        if p.is_file() {
            Ok(p)
        } else {
            Err(FolderError::MissingConfig {
                dir: self.dir.clone(),
            })
        }
    }

    /// The safetensors files holding this component's weights: the full
    /// precision file if present, else the `fp16` variant (converted to the
    /// run's dtype when loaded); sharded checkpoints through their index.
    /// Pickle-only folders are refused with advice to convert.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>, FolderError> {
        let mut looked_for = Vec::new();
        for variant in ["", ".fp16"] {
            for stem in STEMS {
                let single = format!("{stem}{variant}.safetensors");
                let p = self.dir.join(&single);
                if p.is_file() {
                    return Ok(vec![p]);
                }
                let index = format!("{stem}.safetensors.index{variant}.json");
                let p = self.dir.join(&index);
                if p.is_file() {
                    return self.shards(&p);
                }
                looked_for.push(single);
                looked_for.push(index);
            }
        }
        for pickle in [
            "diffusion_pytorch_model.bin",
            "pytorch_model.bin",
            "model.ckpt",
        ] {
            let p = self.dir.join(pickle);
            if p.is_file() {
                refuse_pickle(&p)?;
            }
        }
        Err(FolderError::NoWeights {
            dir: self.dir.clone(),
            looked_for: looked_for.join(", "),
        })
    }

    /// The distinct shard files a `*.safetensors.index.json` maps to.
    fn shards(&self, index: &Path) -> Result<Vec<PathBuf>, FolderError> {
        let bad = |message: String| FolderError::BadIndex {
            path: index.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".to_owned()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        files.sort();
        files.dedup();
        let mut out = Vec::new();
        for f in files {
            let p = self.dir.join(&f);
            if !p.is_file() {
                return Err(bad(format!("shard {f} is listed but missing")));
            }
            out.push(p);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model_index.json"),
            r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [null, null],
               "requires_safety_checker": false}"#,
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("unet")).unwrap();
        dir
    }

    #[test]
    fn finds_components_and_explains_missing_ones() {
        let dir = pipeline_dir();
        let f = DiffusersFolder::open(dir.path()).unwrap();
        assert_eq!(f.class_name(), Some("StableDiffusionPipeline"));
        assert_eq!(f.component_class("unet"), Some("UNet2DConditionModel"));
        assert!(f.has("unet"));
        let e = f.component("vae").unwrap_err().to_string();
        assert!(e.contains("`vae`") && e.contains("does not exist"), "{e}");
        assert!(e.contains("components found: unet"), "{e}");
        let e = f.component("safety_checker").unwrap_err().to_string();
        assert!(e.contains("null"), "{e}");
        let e = f.component("text_encoder").unwrap_err().to_string();
        assert!(e.contains("does not list it"), "{e}");
    }

    #[test]
    fn not_a_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let e = DiffusersFolder::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("model_index.json"), "{e}");
        let e = DiffusersFolder::open(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such directory"), "{e}");
        // Issue 29: the index file itself, or any file, given as the folder.
        std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
        let e = DiffusersFolder::open(&dir.path().join("model_index.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("it is a file, not a folder: pass the pipeline folder (the one holding model_index.json)"),
            "{e}"
        );
        std::fs::write(dir.path().join("model_index.json"), "{oops").unwrap();
        let e = DiffusersFolder::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("model_index.json:"), "{e}");
    }

    #[test]
    fn weight_file_selection() {
        let dir = pipeline_dir();
        let f = DiffusersFolder::open(dir.path()).unwrap();
        let unet = f.component("unet").unwrap();
        let e = unet.config_path().unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        let e = unet.weight_files().unwrap_err().to_string();
        assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");

        // Pickle only: refused with advice.
        let bin = unet.dir.join("diffusion_pytorch_model.bin");
        std::fs::write(&bin, b"x").unwrap();
        let e = unet.weight_files().unwrap_err().to_string();
        assert!(e.contains("never unpickles"), "{e}");

        // fp16 variant used when it is the only safetensors file ...
        let fp16 = unet.dir.join("diffusion_pytorch_model.fp16.safetensors");
        std::fs::write(&fp16, b"x").unwrap();
        assert_eq!(unet.weight_files().unwrap(), vec![fp16]);
        // ... and the full-precision file preferred over it.
        let full = unet.dir.join("diffusion_pytorch_model.safetensors");
        std::fs::write(&full, b"x").unwrap();
        assert_eq!(unet.weight_files().unwrap(), vec![full.clone()]);
        std::fs::remove_file(&full).unwrap();
        std::fs::remove_file(unet.dir.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();

        // Sharded: every shard listed once, a missing shard named.
        std::fs::write(
            unet.dir.join("diffusion_pytorch_model.safetensors.index.json"),
            r#"{"weight_map": {"a": "s-1.safetensors", "b": "s-2.safetensors", "c": "s-1.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(unet.dir.join("s-1.safetensors"), b"x").unwrap();
        let e = unet.weight_files().unwrap_err().to_string();
        assert!(e.contains("s-2.safetensors is listed but missing"), "{e}");
        std::fs::write(unet.dir.join("s-2.safetensors"), b"x").unwrap();
        assert_eq!(unet.weight_files().unwrap().len(), 2);
    }
}
