//! A teacher's identity: a sha256 over what makes a diffusers folder the
//! model it is, cheap enough to compute at every start of a run on a
//! multi-GB teacher. A checkpoint records it so that resuming against
//! another teacher is noticed.
//!
//! Hashed, in this order (every item prefixed by its relative path and
//! byte length, so no two layouts hash alike): model_index.json; then for
//! each component it lists (sorted by name, null or absent ones skipped)
//! every `.json` and `.txt` file of the component folder in full (configs,
//! tokenizer vocabularies, shard indexes) and each weight file the loader
//! would read (`Component::weight_files`): its size, its safetensors header
//! (names, dtypes, shapes, offsets) and [`NUM_SAMPLES`] evenly spaced
//! [`SAMPLE_BYTES`]-byte windows of its tensor data. A fine-tune of the
//! same architecture shares every header byte but changes essentially every
//! weight, so the samples tell it apart; a change confined to bytes no
//! window covers goes unnoticed (the price of not reading gigabytes).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::folder::{DiffusersFolder, FolderError};

/// Windows of tensor data hashed per weight file.
pub const NUM_SAMPLES: u64 = 16;
/// Bytes per window.
pub const SAMPLE_BYTES: u64 = 64 * 1024;

/// safetensors refuses headers above 100 MB; so do we.
const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a safetensors file: {reason}")]
    NotSafetensors { path: PathBuf, reason: String },
}

/// The sha256 (64 hex digits) of the teacher folder at `dir`, as the
/// module docs describe. Components without weights (tokenizer,
/// scheduler) contribute their text files only.
pub fn teacher_fingerprint(dir: &Path) -> Result<String, FingerprintError> {
    let folder = DiffusersFolder::open(dir)?;
    let mut hasher = Sha256::new();
    hash_whole_file(&mut hasher, dir, &dir.join("model_index.json"))?;
    for name in folder.component_names() {
        let Ok(component) = folder.component(&name) else {
            continue;
        };
        let mut texts = Vec::new();
        let entries = std::fs::read_dir(&component.dir).map_err(|source| FingerprintError::Io {
            path: component.dir.clone(),
            source,
        })?;
        for entry in entries {
            let path = entry
                .map_err(|source| FingerprintError::Io {
                    path: component.dir.clone(),
                    source,
                })?
                .path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if path.is_file() && matches!(ext, "json" | "txt") {
                texts.push(path);
            }
        }
        texts.sort();
        for path in &texts {
            hash_whole_file(&mut hasher, dir, path)?;
        }
        match component.weight_files() {
            Ok(files) => {
                for path in &files {
                    hash_weight_file(&mut hasher, dir, path)?;
                }
            }
            // Tokenizer and scheduler folders hold no weights.
            Err(FolderError::NoWeights { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds `path` relative to `root` (so the folder may move) and a length
/// prefix: no two sequences of items produce the same byte stream.
fn hash_item(hasher: &mut Sha256, root: &Path, path: &Path, tag: &str, bytes: &[u8]) {
    let rel = path.strip_prefix(root).unwrap_or(path).to_string_lossy();
    for part in [tag.as_bytes(), rel.as_bytes(), bytes] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FingerprintError + '_ {
    move |source| FingerprintError::Io {
        path: path.to_owned(),
        source,
    }
}

fn hash_whole_file(hasher: &mut Sha256, root: &Path, path: &Path) -> Result<(), FingerprintError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    hash_item(hasher, root, path, "file", &bytes);
    Ok(())
}

/// Size, header and sampled data windows of one safetensors file.
fn hash_weight_file(hasher: &mut Sha256, root: &Path, path: &Path) -> Result<(), FingerprintError> {
    let not_st = |reason: String| FingerprintError::NotSafetensors {
        path: path.to_owned(),
        reason,
    };
    let mut file = File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| not_st(format!("{size} bytes, too short for a header")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > size {
        return Err(not_st(format!(
            "header length {header_len} does not fit in its {size} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io_err(path))?;
    let data_start = 8 + header_len;
    let data_len = size - data_start;
    // A truncated or padded file is caught here, not at load time only.
    let data_end = data_end(&header).map_err(not_st)?;
    if data_end != data_len {
        return Err(not_st(format!(
            "the header describes {data_end} bytes of tensor data, the file holds {data_len}"
        )));
    }
    hash_item(hasher, root, path, "size", &size.to_le_bytes());
    hash_item(hasher, root, path, "header", &header);

    let window = SAMPLE_BYTES.min(data_len);
    let mut buf = vec![0u8; window as usize];
    for i in 0..NUM_SAMPLES {
        // Evenly spaced, the first at the start and the last at the end.
        let offset = data_start + (data_len - window) * i / (NUM_SAMPLES - 1);
        file.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
        file.read_exact(&mut buf).map_err(io_err(path))?;
        hash_item(hasher, root, path, "data", &buf);
    }
    Ok(())
}

/// The end of the last tensor's bytes, from a safetensors JSON header.
fn data_end(header: &[u8]) -> Result<u64, String> {
    let json: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("bad header: {e}"))?;
    let tensors = json.as_object().ok_or("the header is not a JSON object")?;
    let mut end = 0;
    for (name, info) in tensors {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| o.get(1))
            .and_then(|o| o.as_u64())
            .ok_or_else(|| format!("tensor {name} has no data_offsets"))?;
        end = end.max(offsets);
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder with one unet component whose weights are `data`.
    fn folder(data: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model_index.json"),
            r#"{"unet": ["diffusers", "UNet2DConditionModel"], "vae": [null, null]}"#,
        )
        .unwrap();
        let unet = dir.path().join("unet");
        std::fs::create_dir(&unet).unwrap();
        std::fs::write(unet.join("config.json"), r#"{"in_channels": 4}"#).unwrap();
        let header = format!(
            r#"{{"w":{{"dtype":"U8","shape":[{}],"data_offsets":[0,{}]}}}}"#,
            data.len(),
            data.len()
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(unet.join("diffusion_pytorch_model.safetensors"), bytes).unwrap();
        dir
    }

    #[test]
    fn stable_and_sensitive_to_weights_configs_and_index() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let a = folder(&data);
        let fa = teacher_fingerprint(a.path()).unwrap();
        assert_eq!(fa.len(), 64);
        // Same content elsewhere: same fingerprint.
        assert_eq!(teacher_fingerprint(folder(&data).path()).unwrap(), fa);
        // A fine-tune: same header, other values.
        let tuned: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
        assert_ne!(teacher_fingerprint(folder(&tuned).path()).unwrap(), fa);
        // A config change.
        let b = folder(&data);
        std::fs::write(b.path().join("unet/config.json"), r#"{"in_channels": 3}"#).unwrap();
        assert_ne!(teacher_fingerprint(b.path()).unwrap(), fa);
        // Unrelated files are ignored.
        std::fs::write(a.path().join("unet/README.md"), "notes").unwrap();
        assert_eq!(teacher_fingerprint(a.path()).unwrap(), fa);
        // model_index.json counts.
        let c = folder(&data);
        std::fs::write(
            c.path().join("model_index.json"),
            r#"{"unet": ["diffusers", "UNet2DConditionModel"]}"#,
        )
        .unwrap();
        assert_ne!(teacher_fingerprint(c.path()).unwrap(), fa);
    }

    #[test]
    fn truncated_weights_and_missing_folders_are_errors() {
        let a = folder(&[1, 2, 3]);
        let w = a.path().join("unet/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() - 2]).unwrap();
        let e = teacher_fingerprint(a.path()).unwrap_err().to_string();
        assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
        let e = teacher_fingerprint(&a.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such directory"), "{e}");
    }
}
