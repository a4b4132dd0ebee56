//! The toy world's commands as a user runs them: a toy teacher trained for a
//! few steps, the demo end to end on it (distillation through `swiftbrush
//! train`, the comparison picture and report) and `toy eval --student`.
//! The quality run itself is `make demo`, not a test.

use std::path::Path;
use std::process::{Command, Output};

const TOY_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/toy.yaml");
const TOY_FEW_STEP_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/toy-few-step.yaml");

fn swiftbrush(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("RUST_LOG", "warn")
        // One libtorch thread: tests run two at a time on small machines.
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("spawn swiftbrush")
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[1..4], b"PNG", "{} is not a PNG", path.display());
    // The IHDR chunk: width and height, big-endian, at bytes 16..24.
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn demo_runs_end_to_end_on_a_briefly_trained_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&swiftbrush(
        dir,
        &[
            "toy",
            "teacher",
            "--out",
            "teacher",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--checkpoint-every",
            "2",
            "--device",
            "cpu",
        ],
    ));

    let stdout = ok(&swiftbrush(
        dir,
        &[
            "toy",
            "demo",
            "--out",
            "demo",
            "--config",
            TOY_CONFIG,
            "--few-step-config",
            TOY_FEW_STEP_CONFIG,
            "--teacher",
            "teacher",
            "--samples-per-caption",
            "1",
            "--teacher-steps",
            "2",
            "--device",
            "cpu",
            "--",
            "--max-steps",
            "2",
            "--checkpoint-every",
            "2",
        ],
    ));
    let demo = dir.join("demo");
    assert!(stdout.contains("compare.png"), "{stdout}");
    assert!(stdout.contains("one-step speed-up"), "{stdout}");

    // The teacher was copied (without its checkpoints), the student trained
    // through `swiftbrush train` into a run directory.
    for part in [
        "model_index.json",
        "unet/config.json",
        "tokenizer",
        "scheduler",
    ] {
        assert!(demo.join("teacher").join(part).exists(), "teacher/{part}");
    }
    assert!(!demo.join("teacher/checkpoints").exists());
    for student in ["student", "student-few-step"] {
        let manifest = demo
            .join(student)
            .join("checkpoints/step-00000002/manifest.json");
        assert!(manifest.is_file(), "{student}");
    }
    assert!(stdout.contains("4-step student all-three"), "{stdout}");
    let captions = std::fs::read_to_string(demo.join("captions.txt")).unwrap();
    assert_eq!(captions.lines().count(), 54);
    assert_eq!(
        captions.lines().next(),
        Some("a red circle on a white background")
    );

    // configs/toy.yaml's sample step (pixel space: no VAE) after the last
    // step: six prompts, 32 px each, a grid of 3 x 2.
    assert_eq!(
        png_size(&demo.join("student/samples/step-00000002.png")),
        (96, 64)
    );

    // The picture: 18 caption rows of 96 px; one teacher, one student and
    // one four-step student sample per row (96 px each) with 24 px gaps.
    assert_eq!(png_size(&demo.join("compare.png")), (336, 18 * 96));

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(demo.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["distill_steps"], 2);
    assert!(report["distill_seconds"].as_f64().unwrap() > 0.0);
    for side in ["teacher", "student", "few_step"] {
        assert_eq!(report[side]["report"]["num_images"], 54, "{side}");
        assert!(
            report[side]["report"]["seconds_per_image"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }
    assert_eq!(report["student"]["steps"], 1);
    assert_eq!(report["few_step"]["steps"], 4);
    assert!(report["few_step_distill_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(report["bars"].as_array().unwrap().len(), 8);
    let md = std::fs::read_to_string(demo.join("report.md")).unwrap();
    for needle in [
        "| all three correct |",
        "| seconds per image |",
        "| 4-step student |",
        "| squares (all three) |",
        "Distillation took",
        "faster per image",
        "![teacher",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }

    // The student alone, judged by `toy eval --student`.
    let json = ok(&swiftbrush(
        dir,
        &[
            "toy",
            "eval",
            "--student",
            "demo/student",
            "--samples-per-caption",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    ));
    let eval: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(eval["num_images"], 54);
    assert_eq!(eval["per_caption"].as_array().unwrap().len(), 54);
    // Same seed, same noise, same student: the demo's numbers.
    assert_eq!(
        eval["all_three_accuracy"],
        report["student"]["report"]["all_three_accuracy"]
    );
    // The four-step student too (it draws its whole chain): the pictures
    // the demo judged, so the same report.
    let json = ok(&swiftbrush(
        dir,
        &[
            "toy",
            "eval",
            "--student",
            "demo/student-few-step",
            "--samples-per-caption",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    ));
    let eval: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        eval["per_caption"],
        report["few_step"]["report"]["per_caption"]
    );
}

#[test]
fn toy_commands_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = swiftbrush(dir, &["toy", "eval", "--samples-per-caption", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--teacher") && err.contains("--student"),
        "{err}"
    );

    let out = swiftbrush(
        dir,
        &["toy", "demo", "--out", "d", "--teacher", "no-such-teacher"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-teacher"), "{err}");

    let out = swiftbrush(dir, &["toy", "eval", "--student", "no-such-run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-run"), "{err}");
}

#[test]
fn the_toy_config_is_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let out = swiftbrush(tmp.path(), &["config", "check", TOY_CONFIG]);
    let yaml = ok(&out);
    assert!(yaml.contains("resolution: 32"), "{yaml}");
}
