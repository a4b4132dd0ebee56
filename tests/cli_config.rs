//! `swiftbrush config check` and the binary's start-up, driven as a user
//! would: the built binary, a clean environment, files on disk.

use std::path::Path;
use std::process::{Command, Output};

fn swiftbrush() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_swiftbrush"));
    // No LD_LIBRARY_PATH, no cargo variables: libtorch must be found by rpath.
    cmd.env_clear();
    cmd
}

fn run(args: &[&str]) -> Output {
    swiftbrush().args(args).output().expect("spawn swiftbrush")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn help_runs_without_any_environment() {
    let out = run(&["--help"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("config"), "{text}");
}

#[test]
fn doctor_finds_libtorch_by_rpath() {
    let out = run(&["doctor"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("libtorch: /"), "{text}");
    assert!(text.contains("cpu threads:"), "{text}");
}

#[test]
fn check_prints_the_resolved_config() {
    let preset = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/sd21-base.yaml");
    let out = run(&["config", "check", preset, "--teacher", "/models/sd21"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("teacher: /models/sd21"), "{text}");
    assert!(text.contains("guidance_scale: 4.5"), "{text}");
    // Defaults the preset leaves out are written too.
    assert!(text.contains("heartbeat_timeout_ms: 10000"), "{text}");
}

#[test]
fn bad_config_exits_nonzero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "model:\n  teacher: /t\nmethod:\n  gudance_scale: 2\n",
            "did you mean `guidance_scale`?",
        ),
        (
            "model:\n  teacher: /t\ntrain:\n  global_batch: seven\n",
            "train.global_batch: invalid type",
        ),
        (
            "model:\n  teacher: /t\nmethod:\n  lora:\n    rank: 0\n",
            "method.lora.rank = 0",
        ),
        ("model:\n  resolution: 512\n", "model.teacher is missing"),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let f = write(dir.path(), &format!("c{i}.yaml"), yaml);
        let out = run(&["config", "check", &f]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{yaml}: {err}");
        assert!(err.contains(want), "{yaml}: want {want:?} in {err}");
        assert!(out.stdout.is_empty(), "nothing printed on error");
    }
}

#[test]
fn missing_file_is_named() {
    let out = run(&["config", "check", "/nonexistent/job.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("/nonexistent/job.yaml"), "{err}");
}

#[test]
fn json_logs_are_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "ok.yaml", "model:\n  teacher: /t\n");
    let out = swiftbrush()
        .args(["--log-format", "json", "config", "check", &f])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("config is valid"))
        .expect(&err);
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(line.contains("\"level\":\"INFO\""), "{line}");
    assert!(line.contains("\"fingerprint\":\""), "{line}");

    // RUST_LOG controls the level.
    let quiet = swiftbrush()
        .args(["--log-format", "json", "config", "check", &f])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("config is valid"));
}
