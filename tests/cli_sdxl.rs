//! `swiftbrush sample --teacher` and `eval clip-score` on the tiny SDXL
//! fixture (tests/reference/pipelines_xl.py), driven as a user would: the
//! pictures equal diffusers' StableDiffusionXLPipeline with the folder's
//! EulerDiscreteScheduler (tests/reference/golden_sample_xl.py).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::Tensor;

fn sdxl() -> PathBuf {
    common::fixtures().join("pipelines/sdxl")
}

fn golden(name: &str) -> PathBuf {
    common::fixtures().join("golden/sample_xl").join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("OMP_NUM_THREADS", "1")
        .args(args)
        .output()
        .expect("spawn swiftbrush")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(path: &Path, key: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == key)
        .unwrap()
        .1
}

#[test]
fn sdxl_teacher_sample_matches_diffusers_euler() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw.safetensors");
    let png = tmp.path().join("grid.png");
    assert_ok(&run(&[
        "sample",
        "--teacher",
        s(&sdxl()),
        "--prompts",
        s(&golden("prompts.txt")),
        "--steps",
        "4",
        "--guidance",
        "4.5",
        "--latents",
        s(&golden("latents.safetensors")),
        "--out",
        s(&png),
        "--raw-out",
        s(&raw),
        "--device",
        "cpu",
    ]));
    let expected = read(&golden("images_euler.safetensors"), "images");
    let d = common::tensors::max_abs_diff(&read(&raw, "images"), &expected);
    assert!(d <= 1e-3, "SDXL images differ from diffusers' by {d}");
    let grid = swiftbrush_worker::image_io::load_png(&png).unwrap();
    assert_eq!(grid.size(), [1, 3, 16, 32]);
}

#[test]
fn eval_clip_score_runs_on_an_sdxl_teacher() {
    let clip = common::fixtures().join("clip_model");
    let out = assert_ok(&run(&[
        "eval",
        "clip-score",
        "--clip",
        s(&clip),
        "--json",
        "--teacher",
        s(&sdxl()),
        "--prompts",
        s(&golden("prompts.txt")),
        "--steps",
        "2",
        "--device",
        "cpu",
    ]));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let scores = report["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 2);
    assert!(scores.iter().all(|v| v.as_f64().unwrap().is_finite()));
}

fn train(dir: &Path, run_dir: &str, max_steps: &str) {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir)
        .args(["train", "--config", config, "--teacher", s(&sdxl())])
        .args(["--captions", "captions.txt", "--run-dir", run_dir])
        .args(["--max-steps", max_steps])
        .output()
        .unwrap();
    let stdout = assert_ok(&out);
    assert!(stdout.contains("last checkpoint: step"), "{stdout}");
}

fn in_dir(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert_ok(&out)
}

/// configs/tiny.yaml on the SDXL fixture from the command line: 4 steps
/// straight equal 2 + 2 resumed, checkpoint file for file; the export with
/// `--pipeline` carries both encoders and tokenizers, draws what the run
/// draws, and diffusers' stock StableDiffusionXLPipeline call on it
/// (`pipe(prompt, num_inference_steps=1, guidance_scale=0, latents=z)`, the
/// exported LCMScheduler) draws the same one-step picture
/// (tests/reference/check_export.py stock);
/// `eval clip-score` scores the student and `eval fid` embeds the
/// pictures `sample --student` draws.
#[test]
fn sdxl_train_resume_export_and_sample_the_student() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("captions.txt"),
        "a red circle\na photo of a cat\na blue square\nthe quick fox\n",
    )
    .unwrap();
    train(d, "straight", "4");
    train(d, "resumed", "2");
    train(d, "resumed", "4");
    let file = |run: &str, name: &str| {
        let dir = d.join(run).join("checkpoints/step-00000004");
        let attempt = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("attempt-"))
            .unwrap();
        std::fs::read(attempt.path().join(name)).unwrap()
    };
    for name in ["student.safetensors", "ema.safetensors", "lora.safetensors"] {
        assert!(
            file("straight", name) == file("resumed", name),
            "{name} differs between the straight and the resumed run"
        );
    }
    let exported = in_dir(
        d,
        &[
            "export",
            "--student",
            "straight",
            "--out",
            "pipe",
            "--pipeline",
        ],
    );
    for part in ["pipe/text_encoder_2", "pipe/tokenizer_2", "pipe/unet"] {
        assert!(exported.contains(part), "{part} not listed: {exported}");
    }
    let latents = golden("latents.safetensors");
    let prompts = golden("prompts.txt");
    for (student, raw) in [
        ("straight", "run.safetensors"),
        ("pipe", "pipe.safetensors"),
    ] {
        in_dir(
            d,
            &[
                "sample",
                "--student",
                student,
                "--prompts",
                s(&prompts),
                "--latents",
                s(&latents),
                "--raw-out",
                raw,
            ],
        );
    }
    let ours = read(&d.join("run.safetensors"), "images");
    assert_eq!(ours.size(), [2, 3, 16, 16]);
    assert!(ours.equal(&read(&d.join("pipe.safetensors"), "images")));
    // diffusers draws one prompt at a time here: the first prompt's noise.
    let first = d.join("latents0.safetensors");
    let z = read(&latents, "latents").narrow(0, 0, 1);
    Tensor::write_safetensors(&[("latents", &z)], &first).unwrap();
    let prompt = std::fs::read_to_string(&prompts).unwrap();
    let prompt = prompt.lines().next().unwrap();
    common::reference_python(
        "check_export.py",
        &[
            "stock",
            s(&d.join("pipe")),
            prompt,
            "0",
            s(&d.join("diffusers.safetensors")),
            "1",
            s(&first),
        ],
    );
    let reference = read(&d.join("diffusers.safetensors"), "images");
    let diff = common::tensors::max_abs_diff(&ours.narrow(0, 0, 1), &reference);
    assert!(diff <= 1e-3, "the exported student vs diffusers: {diff}");

    let clip = common::fixtures().join("clip_model");
    let report = in_dir(
        d,
        &[
            "eval",
            "clip-score",
            "--clip",
            s(&clip),
            "--json",
            "--student",
            "pipe",
            "--prompts",
            s(&prompts),
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["scores"].as_array().unwrap().len(), 2);
    assert_fid_embeds_the_students_pictures(d, &ours);
}

/// `eval fid` on the exported SDXL student, from the golden latents:
/// its saved statistics are those of the FID Inception's features of the
/// pictures `sample --student` drew from the same latents (`drawn`).
fn assert_fid_embeds_the_students_pictures(d: &Path, drawn: &Tensor) {
    use swiftbrush_worker::eval::{FeatureStats, FidNetwork, fid::read_stats};
    let inception = common::fixtures().join("fid/inception.safetensors");
    let stats = d.join("fid.safetensors");
    let report = in_dir(
        d,
        &[
            "eval",
            "fid",
            "--inception",
            s(&inception),
            "--json",
            "--student",
            "pipe",
            "--prompts",
            s(&golden("prompts.txt")),
            "--latents",
            s(&golden("latents.safetensors")),
            "--save-stats",
            s(&stats),
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["num_images"], 2, "{report}");
    tch::set_num_threads(1);
    let network = FidNetwork::load(&inception, tch::Device::Cpu).unwrap();
    let mut want = FeatureStats::new(2048);
    want.add(&network.features(drawn).unwrap()).unwrap();
    let (mu_want, sigma_want) = want.mean_and_cov().unwrap();
    let (mu, sigma) = read_stats(&stats).unwrap();
    for (name, got, want) in [("mu", &mu, &mu_want), ("sigma", &sigma, &sigma_want)] {
        let scale = want.abs().max().double_value(&[]);
        let diff = common::tensors::max_abs_diff(got, want) / scale;
        eprintln!("eval fid's {name} vs the drawn pictures': {diff:e} of its largest entry");
        // Measured 1.9e-5 (mu) and 6.0e-5 (sigma): float32 rounding
        // between the two processes' Inception passes, not bit for bit;
        // the pictures mirrored move mu by 0.42.
        assert!(
            diff <= 1e-3,
            "eval fid's {name} differs from the sampled pictures' by {diff:e} of its largest entry"
        );
    }
}

/// `doctor --teacher` and `config check` name the architecture they find.
#[test]
fn doctor_and_config_check_name_the_architecture() {
    let sd1 = common::fixtures().join("pipelines/sd1");
    let out = assert_ok(&run(&["doctor", "--teacher", s(&sdxl())]));
    assert!(
        out.contains("Stable Diffusion XL (StableDiffusionXLPipeline"),
        "{out}"
    );
    let out = assert_ok(&run(&["doctor", "--json", "--teacher", s(&sd1)]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let found = json["teacher"]["architecture"].as_str().unwrap();
    assert!(found.starts_with("Stable Diffusion 1.x/2.x"), "{found}");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml");
    let out = run(&["config", "check", config, "--teacher", s(&sdxl())]);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("Stable Diffusion XL"), "{log}");
}

/// A two-step SDXL student (`method.student_timesteps: [999, 499]`): its
/// export's LCMScheduler makes diffusers' stock call
/// `StableDiffusionXLPipeline.from_pretrained(export)(prompt,
/// num_inference_steps=2, guidance_scale=0, generator=manual_seed(3))` draw
/// the picture `sample --student --seed 3` draws (measured: max difference
/// 0 on the CPU; bound 1e-4).
#[test]
fn a_few_step_sdxl_student_s_export_draws_like_diffusers_stock_call() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("captions.txt"), "a red circle\na photo of a cat\n").unwrap();
    let tiny =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml")).unwrap();
    assert!(
        tiny.contains("\nmethod:\n"),
        "configs/tiny.yaml has a method section"
    );
    let config = d.join("two-step.yaml");
    std::fs::write(
        &config,
        tiny.replace(
            "\nmethod:\n",
            "\nmethod:\n  student_timesteps: [999, 499]\n",
        ),
    )
    .unwrap();
    in_dir(
        d,
        &[
            "train",
            "--config",
            s(&config),
            "--teacher",
            s(&sdxl()),
            "--captions",
            "captions.txt",
            "--run-dir",
            "run",
            "--max-steps",
            "1",
        ],
    );
    in_dir(
        d,
        &["export", "--student", "run", "--out", "pipe", "--pipeline"],
    );
    let prompt = "a photo of a cat";
    std::fs::write(d.join("prompt.txt"), format!("{prompt}\n")).unwrap();
    in_dir(
        d,
        &[
            "sample",
            "--student",
            "pipe",
            "--prompts",
            "prompt.txt",
            "--seed",
            "3",
            "--height",
            "16",
            "--width",
            "16",
            "--raw-out",
            "ours.safetensors",
        ],
    );
    let printed = common::reference_python(
        "check_export.py",
        &[
            "stock",
            s(&d.join("pipe")),
            prompt,
            "3",
            s(&d.join("diffusers.safetensors")),
            "2",
        ],
    );
    assert!(printed.contains("[999, 499]"), "{printed}");
    let ours = read(&d.join("ours.safetensors"), "images");
    let theirs = read(&d.join("diffusers.safetensors"), "images");
    assert_eq!(ours.size(), theirs.size());
    let diff = common::tensors::max_abs_diff(&ours, &theirs);
    assert!(
        diff <= 1e-4,
        "the two-step export vs diffusers' stock call: {diff}"
    );
}
