//! A short, stable identity for a teacher folder, so a run refuses to
//! resume a checkpoint distilled from another teacher. It hashes the
//! configs and each weight file's size and safetensors header (names,
//! dtypes, shapes, offsets) plus its first bytes of data: cheap even for
//! multi-GB files, and different for any retrained or re-shaped model.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::folder::{DiffusersFolder, FolderError};

/// Bytes read from the start of each weight file (header + some data).
const HEAD_BYTES: u64 = 1 << 20;

const COMPONENTS: [&str; 5] = ["unet", "text_encoder", "tokenizer", "scheduler", "vae"];

pub fn teacher_fingerprint(folder: &DiffusersFolder) -> Result<String, FolderError> {
    let mut h = Sha256::new();
    hash_file(&mut h, &folder.root().join("model_index.json"), u64::MAX)?;
    for name in COMPONENTS {
        let Ok(component) = folder.component(name) else {
            continue;
        };
        h.update(name.as_bytes());
        let mut files: Vec<_> = std::fs::read_dir(&component.dir)
            .map_err(|e| io_error(&component.dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            let limit = if f.extension().is_some_and(|e| e == "safetensors") {
                HEAD_BYTES
            } else {
                u64::MAX
            };
            hash_file(&mut h, &f, limit)?;
        }
    }
    Ok(h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn hash_file(h: &mut Sha256, path: &Path, limit: u64) -> Result<(), FolderError> {
    let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let size = file.metadata().map_err(|e| io_error(path, e))?.len();
    h.update(
        path.file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default(),
    );
    h.update(size.to_le_bytes());
    let mut buf = Vec::new();
    file.take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| io_error(path, e))?;
    h.update(&buf);
    Ok(())
}

fn io_error(path: &Path, e: std::io::Error) -> FolderError {
    FolderError::NotAPipeline {
        dir: path.to_owned(),
        reason: e.to_string(),
    }
}
