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
