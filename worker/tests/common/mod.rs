//! Shared by the worker's integration tests: where the fixtures are and how
//! tensors are compared.
#![allow(dead_code)]

pub mod golden_vsd;
#[path = "../../../tests/common/tensors.rs"]
pub mod tensors;
pub mod tiny_run;

#[allow(unused_imports)] // each test binary uses some of them
pub use tensors::{max_abs_diff, max_abs_diff_named, nan_max};

use std::collections::HashMap;
use std::path::PathBuf;

use tch::Tensor;

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

/// Where the reference comparisons run: the CPU, or the device
/// `SWIFTBRUSH_TEST_DEVICE` names (scripts/gpu-check runs the VSD step's
/// comparisons on `cuda:0` this way). Goldens stay on the CPU; results are
/// compared there.
pub fn device() -> tch::Device {
    match std::env::var("SWIFTBRUSH_TEST_DEVICE") {
        Ok(spec) if !spec.is_empty() => swiftbrush_worker::torch::device::parse_device(&spec)
            .unwrap_or_else(|e| panic!("SWIFTBRUSH_TEST_DEVICE: {e}")),
        _ => tch::Device::Cpu,
    }
}

/// One measured value beside its bound, on stderr in the form
/// scripts/gpu-check reads (`cargo test -- --nocapture` shows it too).
pub fn report(check: &str, value: f64, bound: f64) {
    eprintln!(
        "GPU-CHECK {{\"check\": \"{check}\", \"device\": \"{:?}\", \"value\": {}, \"bound\": {bound:e}}}",
        device(),
        if value.is_finite() {
            format!("{value:e}")
        } else {
            "null".to_owned()
        },
    );
}

/// A reference pipeline folder: "sd1", "sd2" or "sd2v".
pub fn pipeline(kind: &str) -> PathBuf {
    fixtures().join("pipelines").join(kind)
}

/// All tensors of a golden safetensors file under the fixtures folder.
pub fn golden(rel: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(rel);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read golden {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Asserts |a - b| <= tol everywhere, printing the worst difference.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
}
