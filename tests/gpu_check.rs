//! The GPU check's dry run (scripts/gpu-check --device cpu --quick): every
//! section of the script the GPU machine runs, on tiny shapes on the CPU,
//! so it cannot rot while no GPU is at hand. It uses this build's binary,
//! the worker's vsd test binary (built beside it by `cargo nextest run
//! --workspace`) and the pinned reference packages.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_gpu_check_passes_its_dry_run_on_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/gpu-check"))
        .args([
            "--device",
            "cpu",
            "--quick",
            // The test asks every row to run; the budget (the device
            // tool's 10 minutes on a GPU) only decides which rows a loaded
            // CPU skips, and a skipped row fails this test. nextest ends a
            // hung run after 10 minutes.
            "--budget-s",
            "3600",
            "--bin",
            env!("CARGO_BIN_EXE_swiftbrush"),
        ])
        .arg("--fixtures")
        .arg(common::fixtures())
        .arg("--out")
        .arg(out.path())
        .arg("--work")
        .arg(out.path())
        .output()
        .expect("run scripts/gpu-check (make venv)");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("gpu-report.json")).unwrap())
            .unwrap();
    let checks = report["checks"].as_array().unwrap();
    let status = |name: &str| {
        let row = checks
            .iter()
            .find(|c| c["name"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no check {name:?} in\n{stdout}"));
        row["status"].as_str().unwrap().to_owned()
    };
    // Every section ran and passed; only the GPU count cannot on a CPU.
    for name in [
        "doctor: libtorch",
        "sample --teacher sd1 vs diffusers",
        "sample --teacher sd2 vs diffusers",
        "sample --student four steps: device vs cpu",
        // SDXL (issue 25): the fixture built on the spot, sample and one step.
        "sample --teacher sdxl vs diffusers",
        "sdxl_null0 student_grad. / max",
        "sdxl_null0 lora_grad. / max",
        "sd1_null0 student_grad. / max",
        "sd1_null0 lora_grad. / max",
        "bf16 student_grad. / scale",
        "train 4 steps == 2 + resume to 4",
        "bench allreduce --backend tcp",
        // world.shard_state's collectives and a sharded step (issue 24).
        "bench allreduce --backend tcp (dry run): reduce-scatter",
        "bench allreduce --backend tcp (dry run): all-gather",
        "train --workers 1, world.shard_state optimizer_and_gradients vs none",
        "speed: ratio reference / swiftbrush",
        // precision.tf32 and precision.cudnn_benchmark parse and run.
        "speed: swiftbrush step with tf32 and cudnn_benchmark on",
        // swiftbrush plan beside the measured peak, and the precision and
        // memory matrix's keys (issue 23).
        "plan: predicted peak vs measured",
        "speed: autocast none, checkpointing on",
    ] {
        assert_eq!(status(name), "pass", "{name}\n{stdout}");
    }
    assert_eq!(status("doctor: GPUs"), "not_run", "{stdout}");
    let not_passed: Vec<&str> = checks
        .iter()
        .filter(|c| c["status"] != "pass" && c["name"] != "doctor: GPUs")
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(not_passed.is_empty(), "{not_passed:?}\n{stdout}");
    let md = std::fs::read_to_string(out.path().join("gpu-report.md")).unwrap();
    assert!(
        md.contains("| check | result | value | bound | note |"),
        "{md}"
    );
}
