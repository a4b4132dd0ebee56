//! Shared by the CLI tests: where the fixtures are, and the reference
//! Python checks.
#![allow(dead_code)]

pub mod tensors;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixtures folder built by `make fixtures` (tests/reference/build_all.py).
pub fn fixtures() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("SWIFTBRUSH_FIXTURES").unwrap_or_else(|_| "target/fixtures/current".into()),
    );
    assert!(
        dir.join("DONE").exists(),
        "fixtures missing at {}: run `make fixtures` (or `make test`)",
        dir.display()
    );
    dir
}

/// A reference pipeline folder: "sd1", "sd2" or "sd2v".
pub fn pipeline(kind: &str) -> PathBuf {
    fixtures().join("pipelines").join(kind)
}

/// Runs `tests/reference/SCRIPT` with the project's pinned packages (the
/// .venv `make test` sets up) and returns its stdout, trimmed; a failure
/// fails the test with the script's stderr.
pub fn reference_python<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/reference").join(script))
        .args(args)
        .output()
        .expect("run the reference python (make venv)");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
