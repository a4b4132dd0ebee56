//! `swiftbrush plan`: its flags and errors, a folder of config files alone,
//! and its CPU prediction against what `bench vsd-step` measures (peak
//! resident memory, VmHWM) at the toy teacher's shape.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn swiftbrush(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("RUST_LOG", "warn")
        // One libtorch thread for both commands compared (tests run two at
        // a time on small machines).
        .env("OMP_NUM_THREADS", "1")
        .current_dir(root())
        .args(args)
        .output()
        .expect("spawn swiftbrush")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = swiftbrush(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn failure(args: &[&str]) -> String {
    let out = swiftbrush(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The toy step at `resolution` (pixel space: 3 x resolution^2) and batch
/// `batch` (bench/paper_step_toy.yaml's method).
fn toy_config(dir: &Path, resolution: u32, batch: u32) -> PathBuf {
    toy_config_with(dir, resolution, batch, "")
}

/// [`toy_config`] with more `train:` keys (`train` lines, each ending in
/// a newline).
fn toy_config_with(dir: &Path, resolution: u32, batch: u32, train: &str) -> PathBuf {
    let path = dir.join("plan.yaml");
    std::fs::write(
        &path,
        format!(
            "name: plan-toy\nmodel:\n  resolution: {resolution}\nmethod:\n  lora:\n    rank: 64\n    alpha: 108\n\
             train:\n{train}  global_batch: {batch}\n  device: cpu\nworld:\n  min_size: 1\n  max_size: 2\n\
             precision:\n  teacher_dtype: fp32\n  autocast: none\nlogging:\n  tensorboard: false\n"
        ),
    )
    .unwrap();
    path
}

const TOY: &str = "assets/toy-teacher";

#[test]
fn plan_reports_parts_and_fits_and_names_bad_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = toy_config(tmp.path(), 32, 4);
    let cfg = cfg.to_str().unwrap();
    let plan = json(&[
        "plan",
        "--config",
        cfg,
        "--teacher",
        TOY,
        "--gpu-memory",
        "24GB",
        "--gpu-memory",
        "1000MiB",
        "--json",
    ]);
    let parts = plan["parts"].as_array().unwrap();
    let sum: u64 = parts.iter().map(|p| p["bytes"].as_u64().unwrap()).sum();
    assert_eq!(plan["resident"].as_u64(), Some(sum));
    assert_eq!(plan["rank_batch"], 4);
    let fits = plan["fits"].as_array().unwrap();
    assert_eq!(fits[0]["gpu_memory"].as_u64(), Some(24_000_000_000));
    // The toy step fits a 24 GB GPU whole, either way.
    assert_eq!(fits[0]["micro_batch"], 4);
    assert_eq!(fits[0]["micro_batch_checkpointing"], 4);
    // 1000 MiB is less than the GPU's predicted fixed terms.
    assert!(fits[1]["micro_batch"].is_null(), "{}", fits[1]);
    assert_eq!(fits[1]["resident_fits"], false);
    let probe = &plan["probe"]["passes"];
    assert!(probe["student_graph"]["per_sample"].as_u64().unwrap() > 0);
    // The plain step's first step, run on the fresh heap building left (a
    // run's peak, probe.rs), is measured.
    assert!(probe["first_step_peak"]["per_sample"].as_u64().unwrap() > 0);

    // The table says what is predicted.
    let out = swiftbrush(&["plan", "--config", cfg, "--teacher", TOY]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("PREDICTED") && table.contains("141 GB"),
        "{table}"
    );

    let e = failure(&[
        "plan",
        "--config",
        cfg,
        "--teacher",
        TOY,
        "--gpu-memory",
        "80",
    ]);
    assert!(e.contains("--gpu-memory") && e.contains("no unit"), "{e}");
    let e = failure(&["plan", "--config", cfg, "--teacher", TOY, "--world", "3"]);
    assert!(e.contains("train.global_batch"), "{e}");
    let e = failure(&["plan", "--config", cfg, "--teacher", "/nonexistent/teacher"]);
    assert!(e.contains("/nonexistent/teacher"), "{e}");
}

#[test]
fn a_folder_of_config_files_plans_as_the_full_folder_does() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = toy_config(tmp.path(), 32, 4);
    let configs = tmp.path().join("configs-only");
    for file in [
        "model_index.json",
        "unet/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ] {
        let to = configs.join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(root().join(TOY).join(file), to).unwrap();
    }
    for dir in ["tokenizer", "vae"] {
        std::fs::create_dir_all(configs.join(dir)).unwrap();
    }
    let args = |teacher: &str| {
        json(&[
            "plan",
            "--config",
            cfg.to_str().unwrap(),
            "--teacher",
            teacher,
            "--no-probe",
            "--json",
        ])
    };
    let full = args(TOY);
    let bare = args(configs.to_str().unwrap());
    assert_eq!(full["parts"], bare["parts"]);
    assert!(bare["probe"].is_null());
}

/// A few-step student (issue 26) with `train.gradient_checkpointing`: the
/// probe runs the trainer's own recomputing step, backward simulation
/// included (every row at the chain's last step, its costliest), and the
/// plan comes out. The composed columns count the chain's no-grad passes
/// under the draw's and the forward's peaks and leave out its K - 1 noises
/// and x_{t_k} (K float32 samples a row): an approximation.
#[test]
fn a_checkpointed_few_step_student_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = toy_config_with(
        tmp.path(),
        32,
        4,
        "  gradient_checkpointing: true\n  recompute_rows: 2\n",
    );
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    let four = yaml.replacen(
        "method:\n",
        "method:\n  student_timesteps: [999, 749, 499, 249]\n",
        1,
    );
    assert!(four != yaml);
    std::fs::write(&cfg, four).unwrap();
    let plan = json(&[
        "plan",
        "--config",
        cfg.to_str().unwrap(),
        "--teacher",
        TOY,
        "--gpu-memory",
        "24GB",
        "--json",
    ]);
    assert_eq!(plan["checkpoint_chunk"], 2);
    let step = &plan["probe"]["passes"]["step_peak"];
    assert!(step["per_sample"].as_u64().unwrap() > 0, "{step}");
    assert_eq!(plan["fits"][0]["micro_batch_checkpointing"], 4);
}

/// The CPU prediction (program + resident + the composed activation peak)
/// within 15 % of bench vsd-step's measured peak, at micro-batch 8 and 2.
/// At 64 px the activations are about half of the peak at micro-batch 8,
/// so a pass left out of the composition shows (the student's graph left
/// out of the score passes' peak: -19 %).
#[test]
fn plan_predicts_the_bench_peak_on_this_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = toy_config(tmp.path(), 64, 8);
    check_prediction(cfg.to_str().unwrap(), &["8", "2"]);
}

/// The same with `train.gradient_checkpointing` (2 rows recomputed at a
/// time): the probe runs the trainer's own recomputing step first, twice,
/// at the micro-batch (probe.rs, `first_step_peak`); the line through a
/// chunk and two, extrapolated to 8 rows, moved 1240-1453 MiB between runs
/// against the bench's 1218-1303 (+19.9 % seen), and single runs of this
/// test failed.
#[test]
fn plan_predicts_the_checkpointed_bench_peak_on_this_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = toy_config_with(
        tmp.path(),
        128,
        8,
        "  gradient_checkpointing: true\n  recompute_rows: 2\n",
    );
    let plans = check_prediction(cfg.to_str().unwrap(), &["8"]);
    // Measured at the micro-batch itself: 8 rows, every byte per row.
    let first = &plans[0]["probe"]["passes"]["first_step_peak"];
    assert_eq!(first["fixed"].as_u64(), Some(0), "{first}");
    assert!(first["per_sample"].as_u64().unwrap() > 0, "{first}");
}

/// Checks each micro-batch's prediction and returns the plans.
fn check_prediction(cfg: &str, micro_batches: &[&str]) -> Vec<serde_json::Value> {
    let mut plans = Vec::new();
    for &micro in micro_batches {
        let bench = json(&[
            "bench",
            "vsd-step",
            "--config",
            cfg,
            "--teacher",
            TOY,
            "--steps",
            "1",
            "--micro-batch",
            micro,
            "--json",
        ]);
        let measured = bench["peak_host_mib"].as_f64().unwrap();
        let plan = json(&[
            "plan",
            "--config",
            cfg,
            "--teacher",
            TOY,
            "--micro-batch",
            micro,
            "--json",
        ]);
        let predicted = plan["cpu"]["peak"].as_f64().unwrap() / (1u64 << 20) as f64;
        let error = (predicted - measured).abs() / measured;
        eprintln!(
            "micro-batch {micro}: predicted {predicted:.0} MiB, measured {measured:.0} MiB ({:+.1} %)",
            (predicted / measured - 1.0) * 100.0
        );
        assert!(
            error <= 0.15,
            "micro-batch {micro}: predicted {predicted:.0} MiB, bench measured {measured:.0} MiB"
        );
        plans.push(plan);
    }
    plans
}
