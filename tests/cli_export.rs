//! `swiftbrush export`: what it writes loads in diffusers and peft, as a
//! user of those libraries would load it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn swiftbrush(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("RUST_LOG", "warn")
        // One libtorch thread: tests run two at a time on small machines.
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("spawn swiftbrush");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// tests/reference/check_export.py: diffusers and peft load what was written.
fn check(args: &[&str]) -> String {
    common::reference_python("check_export.py", args)
}

fn trained_run() -> tempfile::TempDir {
    trained_run_of(None)
}

/// Two steps of configs/tiny.yaml, with `method.student_timesteps` when
/// given.
fn trained_run_of(student_timesteps: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.txt"), "a red circle\na photo of a cat\n").unwrap();
    let teacher = common::fixtures()
        .join("pipelines/sd1")
        .display()
        .to_string();
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml");
    let config = match student_timesteps {
        None => tiny.to_owned(),
        Some(steps) => {
            let text = std::fs::read_to_string(tiny).unwrap();
            let with = text.replacen(
                "method:\n",
                &format!("method:\n  student_timesteps: {steps}\n"),
                1,
            );
            assert!(with != text, "configs/tiny.yaml has no method section");
            let path = dir.path().join("steps.yaml");
            std::fs::write(&path, with).unwrap();
            path.display().to_string()
        }
    };
    swiftbrush(
        dir.path(),
        &[
            "train",
            "--config",
            &config,
            "--teacher",
            &teacher,
            "--captions",
            "c.txt",
            "--run-dir",
            "run",
            "--max-steps",
            "2",
        ],
    );
    dir
}

fn attempt_file(run: &Path, step: u64, name: &str) -> PathBuf {
    let dir = run.join("checkpoints").join(format!("step-{step:08}"));
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("attempt-"))
        .unwrap()
        .path()
        .join(name)
}

#[test]
fn exported_unet_and_pipeline_load_in_diffusers_and_adapters_in_peft() {
    let dir = trained_run();
    let d = dir.path();
    let out = swiftbrush(d, &["export", "--student", "run", "--out", "unet_only"]);
    assert!(out.contains("exported step 2"), "{out}");
    let report = check(&["unet", &d.join("unet_only").display().to_string()]);
    assert!(
        report.contains("\"missing\": []") && report.contains("\"unexpected\": []"),
        "{report}"
    );
    // The export is the EMA weights, byte for byte.
    let exported = std::fs::read(d.join("unet_only/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(exported == std::fs::read(attempt_file(&d.join("run"), 2, "ema.safetensors")).unwrap());

    // A chosen checkpoint and the raw student weights.
    swiftbrush(
        d,
        &[
            "export",
            "--student",
            "run/checkpoints/step-00000002",
            "--weights",
            "student",
            "--out",
            "raw",
            "--pipeline",
        ],
    );
    let raw = std::fs::read(d.join("raw/unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(raw == std::fs::read(attempt_file(&d.join("run"), 2, "student.safetensors")).unwrap());
    for part in [
        "model_index.json",
        "text_encoder",
        "tokenizer",
        "vae",
        "scheduler",
    ] {
        assert!(
            d.join("raw").join(part).exists(),
            "{part} missing from the pipeline export"
        );
    }

    // The LoRA adapters load into peft with no missing or unexpected keys.
    let lora = attempt_file(&d.join("run"), 2, "lora.safetensors");
    let report = check(&[
        "peft",
        &d.join("raw/unet").display().to_string(),
        &lora.display().to_string(),
        "4",
        "8",
        "to_q,to_v",
    ]);
    assert_eq!(report, r#"{"missing": [], "unexpected": []}"#);
}

#[test]
fn export_of_a_run_without_checkpoints_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty_run")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .current_dir(dir.path())
        .args(["export", "--student", "empty_run", "--out", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty_run"), "{err}");
    // Issue 29: not the training wording.
    assert!(err.contains("no checkpoint"), "{err}");
    assert!(!err.contains("resume"), "{err}");
}

#[test]
fn bench_vsd_step_reports_json() {
    let teacher = common::fixtures()
        .join("pipelines/sd1")
        .display()
        .to_string();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml");
    let dir = tempfile::tempdir().unwrap();
    // One timed step of `bench vsd-step --json` with `extra` flags.
    let bench = |extra: &[&str]| -> serde_json::Value {
        let args = [
            &[
                "bench",
                "vsd-step",
                "--config",
                config,
                "--teacher",
                &teacher,
                "--steps",
                "1",
                "--json",
            ][..],
            extra,
        ]
        .concat();
        let out = swiftbrush(dir.path(), &args);
        serde_json::from_str(&out).expect(&out)
    };
    let report = bench(&[]);
    assert_eq!(report["steps"], 1);
    assert_eq!(report["images_per_step"], 2);
    assert!(report["median_step_s"].as_f64().unwrap() > 0.0);
    // configs/tiny.yaml: a float32 teacher, no autocast.
    assert_eq!(
        report["precision"],
        "teacher fp32 (autocast none), student fp32, schedule and losses fp32"
    );
    assert_eq!(
        report["math_mode"],
        "TF32 and cuDNN benchmark change nothing on the CPU"
    );
    // train.score_passes: auto runs two passes on the CPU.
    assert_eq!(report["score_passes"], "two passes (auto)");
    assert!(
        report["host_malloc"]
            .as_str()
            .unwrap()
            .starts_with("glibc malloc tuned"),
        "{report:#}"
    );
    assert_eq!(report["activations"], "kept");
    assert!(report["median_step_cpu_s"].as_f64().unwrap() > 0.0);
    // --gradient-checkpointing and --recompute-rows reach the step's config.
    let report = bench(&["--gradient-checkpointing", "--recompute-rows", "1"]);
    assert_eq!(report["activations"], "recomputed, 1 row at a time");
}

#[test]
fn bench_allreduce_reports_json_and_names_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["bench", "allreduce", "--world", "3", "--size-mb", "0.5"];
    let out = swiftbrush(
        dir.path(),
        &[&args[..], &["--iters", "2", "--json"]].concat(),
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(report["backend"], "tcp");
    assert_eq!(report["world_size"], 3);
    assert_eq!(report["bytes"], 500_000);
    let (alg, bus) = (
        report["algbw_gb_s"].as_f64().unwrap(),
        report["busbw_gb_s"].as_f64().unwrap(),
    );
    assert!(alg > 0.0);
    assert!(
        (bus - alg * 4.0 / 3.0).abs() <= 1e-9 * bus,
        "busbw = algbw 2(W-1)/W"
    );

    // This build has no GPU: said, not a crash.
    let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .args(["bench", "allreduce", "--backend", "nccl", "--world", "2"])
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs 2 CUDA devices"), "{err}");
}

#[test]
fn student_samples_in_one_step_like_diffusers_from_a_run_and_an_export() {
    let dir = trained_run();
    let d = dir.path();
    let latents = common::fixtures().join("golden/sample/sd1/latents0.safetensors");
    let latents = latents.display().to_string();
    let prompt = "a red circle on a white background";
    // From the run directory (its newest checkpoint's EMA weights).
    let out = swiftbrush(
        d,
        &[
            "sample",
            "--student",
            "run",
            "--prompt",
            prompt,
            "--latents",
            &latents,
            "--out",
            "run.png",
            "--raw-out",
            "run.safetensors",
        ],
    );
    assert!(out.contains("wrote run.png"), "{out}");
    // Issue 29: it says what it loaded (not "teacher loaded").
    assert!(
        out.contains("student run (checkpoint step 2, EMA weights) loaded in"),
        "{out}"
    );
    assert!(!out.contains("teacher loaded"), "{out}");
    // From the exported pipeline folder; every component written is listed.
    let exported = swiftbrush(
        d,
        &["export", "--student", "run", "--out", "pipe", "--pipeline"],
    );
    for part in [
        "pipe/unet",
        "pipe/text_encoder",
        "pipe/tokenizer",
        "pipe/vae",
        "pipe/scheduler",
        "pipe/model_index.json",
        "pipe/swiftbrush.json",
    ] {
        assert!(exported.contains(part), "{part} not listed: {exported}");
    }
    let one_step: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("pipe/swiftbrush.json")).unwrap()).unwrap();
    assert_eq!(one_step["student_timestep"], 999, "{one_step}");
    assert_eq!(one_step["student_alpha_bar"], 0.0047, "{one_step}");
    let out = swiftbrush(
        d,
        &[
            "sample",
            "--student",
            "pipe",
            "--prompt",
            prompt,
            "--latents",
            &latents,
            "--raw-out",
            "pipe.safetensors",
        ],
    );
    assert!(
        out.contains("student pipe (exported pipeline, swiftbrush.json) loaded in"),
        "{out}"
    );
    // An export is not a run: export names what it is and what to pass.
    let again = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .current_dir(d)
        .args(["export", "--student", "pipe", "--out", "again"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{err}");
    assert!(err.contains("already an export"), "{err}");
    assert!(err.contains("run directory"), "{err}");
    // `export --dtype fp16`: the EMA weights rounded to fp16, bit for bit;
    // diffusers loads the folder and draws what `sample --student` draws
    // from it.
    swiftbrush(
        d,
        &[
            "export",
            "--student",
            "run",
            "--out",
            "half",
            "--pipeline",
            "--dtype",
            "fp16",
        ],
    );
    let unet = |dir: &str| {
        let path = d.join(dir).join("unet/diffusion_pytorch_model.safetensors");
        let mut named = tch::Tensor::read_safetensors(path).unwrap();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    };
    let (full, half) = (unet("pipe"), unet("half"));
    assert_eq!(full.len(), half.len());
    for ((n, f), (m, h)) in full.iter().zip(&half) {
        assert_eq!(n, m);
        assert_eq!(h.kind(), tch::Kind::Half, "{n}");
        assert!(h.equal(&f.to_kind(tch::Kind::Half)), "{n}");
    }
    swiftbrush(
        d,
        &[
            "sample",
            "--student",
            "half",
            "--prompt",
            prompt,
            "--latents",
            &latents,
            "--raw-out",
            "half.safetensors",
        ],
    );
    // diffusers on the exported folders (float32 and fp16, one process),
    // same latents, SPEC's one-step formula.
    let dirs = format!("{},{}", d.join("pipe").display(), d.join("half").display());
    let outs = format!(
        "{},{}",
        d.join("diffusers.safetensors").display(),
        d.join("diffusers_half.safetensors").display()
    );
    check(&["pipeline", &dirs, prompt, &latents, &outs, "0.0047"]);
    let read = |name: &str| {
        let mut t = tch::Tensor::read_safetensors(d.join(name)).unwrap();
        t.remove(0).1
    };
    let (ours, exported, reference) = (
        read("run.safetensors"),
        read("pipe.safetensors"),
        read("diffusers.safetensors"),
    );
    assert_eq!(ours.size(), vec![1, 3, 16, 16]);
    let diff = |a: &tch::Tensor, b: &tch::Tensor| (a - b).abs().max().double_value(&[]);
    assert!(
        diff(&ours, &reference) <= 1e-3,
        "vs diffusers: {}",
        diff(&ours, &reference)
    );
    assert_eq!(diff(&ours, &exported), 0.0);
    let (ours_half, reference_half) =
        (read("half.safetensors"), read("diffusers_half.safetensors"));
    let rounded = diff(&ours, &ours_half);
    eprintln!(
        "fp16 export: moves our picture {rounded:e}, diffusers' from ours {:e}",
        diff(&ours_half, &reference_half)
    );
    // Measured: 0 (bit for bit), against 6.5e-4 that the rounding moves it.
    assert!(diff(&ours_half, &reference_half) <= 1e-5);
    assert!(rounded > 1e-5, "the fp16 export draws the float32 picture");
    // Issue 26: diffusers' stock pipeline draws it with a plain call on the
    // exported LCMScheduler (num_inference_steps=1, guidance_scale=0).
    let stock = check(&[
        "stock",
        &d.join("pipe").display().to_string(),
        prompt,
        "0",
        &d.join("stock.safetensors").display().to_string(),
        "1",
        &latents,
    ]);
    assert!(stock.contains(r#""timesteps": [999]"#), "{stock}");
    let stock = read("stock.safetensors");
    let gap = diff(&ours, &stock);
    eprintln!("stock one step: {gap:e} (bound {STOCK_BOUND:e})");
    assert!(gap <= STOCK_BOUND, "diffusers' stock call: {gap:e}");
}

/// How far diffusers' stock pipeline (LCMScheduler as exported) may draw
/// from ours, on [0, 1] pictures: measured 0 (bit for bit) on the sd1
/// fixture, one CPU thread each. The first step's A (0.0047) read as the
/// schedule's 0.004660, i.e. the export without its moved beta_999, moves
/// the four-step picture by 1.2e-3; another seed's picture is 1.0 away.
const STOCK_BOUND: f64 = 1e-4;

/// Issue 26: a four-step student samples its chain from the run and from
/// its export alike, and diffusers' stock pipeline draws the same picture
/// from the same seed with a plain call (`num_inference_steps=4`, or its
/// timesteps), within STOCK_BOUND.
#[test]
fn a_four_step_student_exports_for_diffusers_stock_pipeline() {
    let dir = trained_run_of(Some("[999, 749, 499, 249]"));
    let d = dir.path();
    let prompt = "a red circle on a white background";
    let sample = |student: &str, seed: &str, out: &str| {
        swiftbrush(
            d,
            &[
                "sample",
                "--student",
                student,
                "--prompt",
                prompt,
                "--seed",
                seed,
                "--raw-out",
                out,
            ],
        )
    };
    sample("run", "3", "run.safetensors");
    swiftbrush(
        d,
        &["export", "--student", "run", "--out", "pipe", "--pipeline"],
    );
    let json = |path: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join(path)).unwrap()).unwrap()
    };
    let one_step = json("pipe/swiftbrush.json");
    assert_eq!(
        one_step["student_timesteps"],
        serde_json::json!([999, 749, 499, 249])
    );
    let scheduler = json("pipe/scheduler/scheduler_config.json");
    assert_eq!(scheduler["_class_name"], "LCMScheduler", "{scheduler}");
    assert_eq!(scheduler["original_inference_steps"], 4, "{scheduler}");
    assert_eq!(
        json("pipe/model_index.json")["scheduler"][1],
        "LCMScheduler"
    );
    sample("pipe", "3", "pipe.safetensors");
    sample("run", "4", "seed4.safetensors");

    let read = |name: &str| {
        let mut t = tch::Tensor::read_safetensors(d.join(name)).unwrap();
        t.remove(0).1
    };
    let diff = |a: &tch::Tensor, b: &tch::Tensor| (a - b).abs().max().double_value(&[]);
    let ours = read("run.safetensors");
    assert_eq!(diff(&ours, &read("pipe.safetensors")), 0.0);
    assert!(
        diff(&ours, &read("seed4.safetensors")) > 0.1,
        "the seed draws nothing"
    );
    let pipe = d.join("pipe").display().to_string();
    for (steps, name) in [
        ("4", "stock.safetensors"),
        ("999,749,499,249", "listed.safetensors"),
    ] {
        let out = d.join(name).display().to_string();
        let said = check(&["stock", &pipe, prompt, "3", &out, steps]);
        assert!(
            said.contains(r#""timesteps": [999, 749, 499, 249]"#),
            "{said}"
        );
        let gap = diff(&ours, &read(name));
        eprintln!("stock four steps ({steps}): {gap:e} (bound {STOCK_BOUND:e})");
        assert!(
            gap <= STOCK_BOUND,
            "diffusers' stock call with {steps}: {gap:e}"
        );
    }
    // `eval clip-score` draws the student as `sample` does: all four steps
    // by default (the score of run.safetensors), one with --steps 1.
    let clip = common::fixtures().join("clip_model");
    let score = |steps: &[&str]| {
        let mut args = vec!["eval", "clip-score", "--clip", clip.to_str().unwrap()];
        args.extend([
            "--student",
            "run",
            "--prompt",
            prompt,
            "--seed",
            "3",
            "--json",
        ]);
        args.extend(steps);
        let report: serde_json::Value = serde_json::from_str(&swiftbrush(d, &args)).unwrap();
        report["clip_score"].as_f64().unwrap()
    };
    let scorer = swiftbrush_worker::eval::ClipScorer::load(&clip, tch::Device::Cpu).unwrap();
    let want = scorer
        .scores(&ours, &[prompt.to_owned()])
        .unwrap()
        .double_value(&[0]);
    let (four, one) = (score(&[]), score(&["--steps", "1"]));
    assert!((four - want).abs() <= 1e-5, "clip-score {four} vs {want}");
    assert!(
        (one - want).abs() > 1e-4,
        "--steps 1 scored the four-step picture"
    );
}

/// `bench coordinator` drives a real coordinator process with real gRPC
/// workers: every heartbeat due is sent and answered, and the report's
/// numbers are the coordinator's (timings themselves are not judged here).
#[test]
fn bench_coordinator_heartbeats_a_real_coordinator_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = swiftbrush(
        dir.path(),
        &[
            "bench",
            "coordinator",
            "--workers",
            "20",
            "--seconds",
            "1",
            "--connections",
            "2",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(report["workers"], 20);
    assert_eq!(report["heartbeats_due"], 20, "one a second each");
    assert_eq!(
        report["heartbeats_sent"], report["heartbeats_due"],
        "{report}"
    );
    assert_eq!(report["heartbeat_errors"], 0);
    // CPU time comes in clock ticks (10 ms): 20 heartbeats may cost none.
    let cpu = report["coordinator_cpu_s"].as_f64().unwrap();
    assert!(cpu >= 0.0, "{report}");
    let per = report["coordinator_cpu_us_per_heartbeat"].as_f64().unwrap();
    assert!(
        (per - cpu * 1e6 / 20.0).abs() <= 1e-6 * per.max(1.0),
        "{report}"
    );
    assert!(report["coordinator_peak_mib"].as_f64().unwrap() > 1.0);
    assert!(report["job_status_calls"].as_u64().unwrap() > 0);
    assert!(
        report["heartbeat_p99_ms"].as_f64().unwrap()
            >= report["heartbeat_p50_ms"].as_f64().unwrap()
    );
}
