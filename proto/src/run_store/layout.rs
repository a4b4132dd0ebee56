//! Object names under a run directory: where checkpoints, manifests, the
//! LATEST pointer and run files live, and which names callers may use.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use object_store::path::Path;

use super::error::{Result, RunStoreError};

pub(crate) const CHECKPOINTS_DIR: &str = "checkpoints";
pub(crate) const MANIFEST_FILE: &str = "manifest.json";
pub(crate) const LATEST_FILE: &str = "LATEST";
const STEP_PREFIX: &str = "step-";
const ATTEMPT_PREFIX: &str = "attempt-";
/// Steps are zero-padded so that a plain listing sorts like the numbers do
/// for any run shorter than 10^8 steps; parsing accepts longer numbers.
const STEP_DIGITS: usize = 8;

pub(crate) fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:0STEP_DIGITS$}")
}

/// The step of a `step-XXXXXXXX` folder name; `None` for anything else,
/// including non-canonical spellings that would alias another step.
pub(crate) fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.len() < STEP_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: u64 = digits.parse().ok()?;
    (step_dir_name(step) == name).then_some(step)
}

pub(crate) fn checkpoints_dir() -> Path {
    Path::from(CHECKPOINTS_DIR)
}

pub(crate) fn latest_path() -> Path {
    Path::from_iter([CHECKPOINTS_DIR, LATEST_FILE])
}

pub(crate) fn step_dir(step: u64) -> Path {
    Path::from_iter([CHECKPOINTS_DIR.to_owned(), step_dir_name(step)])
}

pub(crate) fn manifest_path(step: u64) -> Path {
    step_dir(step).join(MANIFEST_FILE)
}

/// Path of a checkpoint file relative to the run directory, as text (for
/// manifests, messages and tools).
pub(crate) fn file_rel_path(step: u64, attempt: &str, name: &str) -> String {
    format!("{CHECKPOINTS_DIR}/{}/{attempt}/{name}", step_dir_name(step))
}

/// `name` has been checked by [`validate_name`], so splitting on `/` gives
/// exactly the segments the caller meant.
pub(crate) fn file_path(step: u64, attempt: &str, name: &str) -> Path {
    Path::from(file_rel_path(step, attempt, name))
}

/// A fresh attempt folder name. Uniqueness, not secrecy, matters: two writers
/// of the same step (two processes, or two threads) must never share a
/// folder, so mix a per-process random key, the pid, the clock and a counter.
pub(crate) fn new_attempt_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    format!("{ATTEMPT_PREFIX}{:016x}", hasher.finish())
}

pub(crate) fn is_attempt_id(name: &str) -> bool {
    name.strip_prefix(ATTEMPT_PREFIX)
        .is_some_and(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Names of checkpoint files and run files: `/`-separated segments of
/// `[A-Za-z0-9._-]`, no empty, `.` or `..` segment. Plain names map to the
/// same object key on every backend (no percent-encoding surprises) and can
/// never escape the folder they are put in.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason: &str| RunStoreError::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(invalid("the name is empty"));
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return Err(invalid(
                "empty path segment (leading, trailing or double '/')",
            ));
        }
        if segment == "." || segment == ".." {
            return Err(invalid("'.' and '..' segments are not allowed"));
        }
        if segment.len() > 255 {
            return Err(invalid("a path segment is longer than 255 bytes"));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(invalid(&format!(
                "character {c:?} is not allowed; use letters, digits, '.', '_', '-' and '/'"
            )));
        }
    }
    Ok(())
}

/// Run files live beside `checkpoints/`, never inside it: the checkpoint
/// namespace belongs to the commit protocol.
pub(crate) fn validate_run_file_name(name: &str) -> Result<()> {
    validate_name(name)?;
    let first = name.split('/').next().unwrap_or_default();
    if first == CHECKPOINTS_DIR {
        return Err(RunStoreError::InvalidName {
            name: name.to_owned(),
            reason: format!("{CHECKPOINTS_DIR}/ is reserved for checkpoints"),
        });
    }
    if first == super::lease::LEASE_DIR {
        return Err(RunStoreError::InvalidName {
            name: name.to_owned(),
            reason: format!(
                "{}/ is reserved for the run directory's lease",
                super::lease::LEASE_DIR
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dir_names_round_trip_and_reject_aliases() {
        assert_eq!(step_dir_name(42), "step-00000042");
        assert_eq!(parse_step_dir("step-00000042"), Some(42));
        assert_eq!(parse_step_dir("step-123456789"), Some(123_456_789));
        assert_eq!(parse_step_dir("step-0000000042"), None, "alias of step 42");
        assert_eq!(parse_step_dir("step-42"), None);
        assert_eq!(parse_step_dir("step-0000004x"), None);
        assert_eq!(parse_step_dir("LATEST"), None);
    }

    #[test]
    fn attempt_ids_are_unique_and_recognised() {
        let a = new_attempt_id();
        let b = new_attempt_id();
        assert_ne!(a, b);
        assert!(is_attempt_id(&a), "{a}");
        assert!(!is_attempt_id("attempt-xyz"));
        assert!(!is_attempt_id("student.safetensors"));
    }

    #[test]
    fn names_are_checked() {
        for ok in [
            "student.safetensors",
            "optim/adam-0.safetensors",
            "state.json",
        ] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/abs", "a//b", "a/", "../x", "a/./b", "sp ace", "é", "a\\b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(validate_run_file_name("config.yaml").is_ok());
        let err = validate_run_file_name("checkpoints/LATEST").unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
    }

    #[test]
    fn paths_nest_under_the_step_folder() {
        assert_eq!(
            manifest_path(7).as_ref(),
            "checkpoints/step-00000007/manifest.json"
        );
        assert_eq!(
            file_path(7, "attempt-00000000000000ff", "optim/a.bin").as_ref(),
            "checkpoints/step-00000007/attempt-00000000000000ff/optim/a.bin"
        );
        assert_eq!(latest_path().as_ref(), "checkpoints/LATEST");
    }
}
