//! Shared by the CLI tests: where the fixtures are.
#![allow(dead_code)]

use std::path::PathBuf;

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
