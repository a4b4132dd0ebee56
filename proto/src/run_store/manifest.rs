//! The checkpoint manifest: the one object whose existence commits a
//! checkpoint, listing each file's name, size and sha256 plus the trainer's
//! metadata; and the checks that decide whether a checkpoint is valid.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::layout;

/// Bumped when a reader of the old format would misread the new one.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name relative to the checkpoint (`student.safetensors`, `optim/a.bin`).
    pub name: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// What the trainer records about a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub epoch: u64,
    /// The world's generation that produced it (see DESIGN: stale
    /// generations cannot commit).
    pub generation: u64,
    /// Hash of the job config, so a resume with a different config is noticed.
    pub config_fingerprint: String,
    pub teacher_fingerprint: String,
    /// Anything else the caller wants to keep (loss, world size, ...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: u64,
    /// The folder under `checkpoints/step-S/` that holds the files.
    pub attempt: String,
    pub created_at: DateTime<Utc>,
    pub files: Vec<FileEntry>,
    pub meta: CheckpointMeta,
}

impl Manifest {
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Where file `name` lives, relative to the run directory.
    pub fn file_path(&self, name: &str) -> String {
        layout::file_rel_path(self.step, &self.attempt, name)
    }

    pub fn file_names(&self) -> Vec<String> {
        self.files.iter().map(|f| f.name.clone()).collect()
    }

    /// Checks that need no storage access: the manifest is one this code
    /// understands and belongs to the folder it was found in.
    pub(crate) fn check_self(&self, expected_step: u64) -> Result<(), String> {
        if self.format_version != MANIFEST_FORMAT_VERSION {
            return Err(format!(
                "manifest format_version {} is not the supported {MANIFEST_FORMAT_VERSION}",
                self.format_version
            ));
        }
        if self.step != expected_step {
            return Err(format!(
                "manifest says step {} but lives in the folder of step {expected_step}",
                self.step
            ));
        }
        if !layout::is_attempt_id(&self.attempt) {
            return Err(format!("manifest attempt {:?} is malformed", self.attempt));
        }
        if self.files.is_empty() {
            return Err("manifest lists no files".to_owned());
        }
        let mut seen = HashSet::new();
        for file in &self.files {
            layout::validate_name(&file.name).map_err(|e| e.to_string())?;
            if !seen.insert(file.name.as_str()) {
                return Err(format!("manifest lists {:?} twice", file.name));
            }
            if !is_sha256_hex(&file.sha256) {
                return Err(format!("file {:?} has a malformed sha256", file.name));
            }
        }
        Ok(())
    }

    /// Checks every listed file against the sizes found in storage, keyed by
    /// path relative to the step folder (`attempt-…/name`).
    pub(crate) fn check_sizes(&self, sizes: &HashMap<String, u64>) -> Result<(), String> {
        for file in &self.files {
            let key = format!("{}/{}", self.attempt, file.name);
            match sizes.get(&key) {
                None => return Err(format!("file {:?} is missing", file.name)),
                Some(&size) if size != file.size => {
                    return Err(format!(
                        "file {:?} has {size} bytes, the manifest says {}",
                        file.name, file.size
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            step: 5,
            attempt: "attempt-0123456789abcdef".to_owned(),
            created_at: Utc::now(),
            files: vec![FileEntry {
                name: "a.bin".to_owned(),
                size: 3,
                sha256: sha256_hex(b"abc"),
            }],
            meta: CheckpointMeta::default(),
        }
    }

    #[test]
    fn sha256_is_the_standard_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn self_checks_catch_malformed_manifests() {
        assert_eq!(manifest().check_self(5), Ok(()));
        assert!(manifest().check_self(6).unwrap_err().contains("step 5"));
        let mut m = manifest();
        m.format_version = 99;
        assert!(m.check_self(5).unwrap_err().contains("format_version"));
        let mut m = manifest();
        m.files.push(m.files[0].clone());
        assert!(m.check_self(5).unwrap_err().contains("twice"));
        let mut m = manifest();
        m.files[0].sha256 = "XYZ".to_owned();
        assert!(m.check_self(5).unwrap_err().contains("sha256"));
        let mut m = manifest();
        m.files[0].name = "../escape".to_owned();
        assert!(m.check_self(5).is_err());
        let mut m = manifest();
        m.files.clear();
        assert!(m.check_self(5).unwrap_err().contains("no files"));
    }

    #[test]
    fn size_checks_report_missing_and_wrong_sizes() {
        let m = manifest();
        let key = "attempt-0123456789abcdef/a.bin".to_owned();
        assert_eq!(m.check_sizes(&HashMap::from([(key.clone(), 3)])), Ok(()));
        let wrong = m.check_sizes(&HashMap::from([(key, 2)])).unwrap_err();
        assert!(wrong.contains("2 bytes"), "{wrong}");
        let missing = m.check_sizes(&HashMap::new()).unwrap_err();
        assert!(missing.contains("missing"), "{missing}");
    }

    #[test]
    fn meta_extra_is_optional_in_json() {
        let json =
            r#"{"epoch":1,"generation":2,"config_fingerprint":"c","teacher_fingerprint":"t"}"#;
        let meta: CheckpointMeta = serde_json::from_str(json).unwrap();
        assert_eq!(meta.extra, serde_json::Value::Null);
        assert_eq!(meta.generation, 2);
    }
}
