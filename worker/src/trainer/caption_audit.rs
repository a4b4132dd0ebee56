//! The caption audit: one JSON line per trained step and rank with the
//! caption ids it trained on, so a test (or an operator) can prove that the
//! committed history used every caption exactly once per epoch, however
//! often worlds broke and re-formed; and the sha256 of the weights that
//! train (student and fake score) after the step, equal on every rank of
//! a world (replicas are bitwise identical).
//! Each worker appends to its own file in the audit folder, a line when a
//! step completes. Hashing costs a pass over the weights per step: an option
//! for tests and investigations, off by default.
//!
//! A world that breaks loses the steps after its newest committed
//! checkpoint, and the next world trains them again; so for each step, the
//! newest generation that trained it is the one whose training lives on in
//! the final student ([`committed_history`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("caption audit {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("caption audit {path}, line {line}: {reason}")]
    Format {
        path: String,
        line: usize,
        reason: String,
    },
}

/// One rank's captions of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub generation: u64,
    pub rank: u64,
    pub world_size: u64,
    pub step: u64,
    pub caption_ids: Vec<u64>,
    /// The student's and the adapters' weights after the step (their
    /// safetensors bytes, names sorted).
    pub weights_sha256: String,
}

/// An open audit file.
#[derive(Debug)]
pub struct CaptionAudit {
    file: File,
    path: PathBuf,
}

impl CaptionAudit {
    /// Appends to `dir/<name>.jsonl` (the folder is created).
    pub fn open(dir: &Path, name: &str) -> Result<Self, AuditError> {
        let path = dir.join(format!("{name}.jsonl"));
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        Ok(Self { file, path })
    }

    /// Writes one line in one call, so that a process killed mid-run leaves
    /// whole lines (a torn last line is skipped by the reader).
    pub fn record(&mut self, entry: &AuditEntry) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        self.file.write_all(&line).map_err(|source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        })
    }
}

/// Every entry of every `.jsonl` file in `dir`. A line that does not parse
/// is an error, except the last line of a file (a writer killed mid-line).
pub fn read_audit_dir(dir: &Path) -> Result<Vec<AuditEntry>, AuditError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| AuditError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut entries = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<AuditEntry>(line) {
                Ok(entry) => entries.push(entry),
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
                Err(e) => {
                    return Err(AuditError::Format {
                        path: path.display().to_string(),
                        line: i + 1,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(entries)
}

/// The global batch of every step of the committed history: for each step,
/// the entries of the newest generation that trained it, in rank order,
/// concatenated. An error names a step whose ranks are incomplete, disagree
/// about the world size, or ended the step with different weights.
pub fn committed_history(entries: &[AuditEntry]) -> Result<BTreeMap<u64, Vec<u64>>, String> {
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
    for e in entries {
        let g = newest.entry(e.step).or_insert(e.generation);
        *g = (*g).max(e.generation);
    }
    let mut history = BTreeMap::new();
    for (&step, &generation) in &newest {
        let mut ranks: Vec<&AuditEntry> = entries
            .iter()
            .filter(|e| e.step == step && e.generation == generation)
            .collect();
        ranks.sort_by_key(|e| e.rank);
        ranks.dedup_by_key(|e| e.rank);
        let world_size = ranks.first().map_or(0, |e| e.world_size);
        let complete = ranks.len() as u64 == world_size
            && ranks
                .iter()
                .enumerate()
                .all(|(r, e)| e.rank == r as u64 && e.world_size == world_size);
        if !complete {
            return Err(format!(
                "step {step} of generation {generation}: ranks {:?} of a world of {world_size}",
                ranks.iter().map(|e| e.rank).collect::<Vec<_>>()
            ));
        }
        if ranks
            .iter()
            .any(|e| e.weights_sha256 != ranks[0].weights_sha256)
        {
            return Err(format!(
                "step {step} of generation {generation}: the ranks' weights differ"
            ));
        }
        let ids: Vec<u64> = ranks
            .iter()
            .flat_map(|e| e.caption_ids.iter().copied())
            .collect();
        history.insert(step, ids);
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(generation: u64, rank: u64, world_size: u64, step: u64, ids: &[u64]) -> AuditEntry {
        AuditEntry {
            generation,
            rank,
            world_size,
            step,
            caption_ids: ids.to_vec(),
            weights_sha256: format!("{generation}-{step}"),
        }
    }

    #[test]
    fn the_newest_generation_of_each_step_is_the_committed_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = CaptionAudit::open(dir.path(), "worker-a").unwrap();
        let mut b = CaptionAudit::open(dir.path(), "worker-b").unwrap();
        // Generation 1 (two ranks) trains steps 0 and 1; it breaks, and
        // generation 2 (one rank) trains step 1 again, then step 2.
        a.record(&entry(1, 0, 2, 0, &[0])).unwrap();
        b.record(&entry(1, 1, 2, 0, &[1])).unwrap();
        a.record(&entry(1, 0, 2, 1, &[2])).unwrap();
        b.record(&entry(1, 1, 2, 1, &[3])).unwrap();
        a.record(&entry(2, 0, 1, 1, &[2, 3])).unwrap();
        a.record(&entry(2, 0, 1, 2, &[4, 5])).unwrap();
        drop((a, b));
        // A torn last line (a writer killed mid-line) is skipped.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("worker-b.jsonl"))
            .unwrap();
        f.write_all(b"{\"generation\": 1, \"ra").unwrap();

        let entries = read_audit_dir(dir.path()).unwrap();
        assert_eq!(entries.len(), 6);
        let history = committed_history(&entries).unwrap();
        assert_eq!(
            history.into_iter().collect::<Vec<_>>(),
            vec![(0, vec![0, 1]), (1, vec![2, 3]), (2, vec![4, 5])]
        );

        // A step whose newest generation lacks a rank is reported.
        let e = committed_history(&entries[..1]).unwrap_err();
        assert!(e.contains("step 0 of generation 1"), "{e}");
        // So are replicas that diverged.
        let mut diverged = vec![entry(1, 0, 2, 0, &[0]), entry(1, 1, 2, 0, &[1])];
        diverged[1].weights_sha256 = "other".to_owned();
        let e = committed_history(&diverged).unwrap_err();
        assert!(e.contains("weights differ"), "{e}");
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.jsonl"), "nonsense\n{}\n").unwrap();
        let e = read_audit_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("w.jsonl, line 1"), "{e}");
    }
}
