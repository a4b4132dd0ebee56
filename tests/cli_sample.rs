//! `swiftbrush sample --teacher`, driven as a user would: the built binary,
//! a clean environment, the fixture pipelines and diffusers' images from
//! tests/reference/golden_sample.py; then broken folders and inputs, each
//! of which must fail with a message naming the problem.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::{Device, Kind, Tensor};

fn sd1() -> PathBuf {
    common::fixtures().join("pipelines/sd1")
}

fn golden(name: &str) -> PathBuf {
    common::fixtures().join("golden/sample/sd1").join(name)
}

fn first_prompt() -> String {
    let text = std::fs::read_to_string(golden("prompts.txt")).unwrap();
    text.lines().next().unwrap().to_owned()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        // No LD_LIBRARY_PATH: libtorch must be found by rpath. One thread:
        // the fixture models are tiny.
        .env_clear()
        .env("OMP_NUM_THREADS", "1")
        .args(args)
        .output()
        .expect("spawn swiftbrush")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", stderr(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `sample` on `teacher` with the first prompt and its latents (unless
/// `extra` brings other latents) and returns stderr, asserting a failure (exit code 1, not a panic's 101).
fn fails(teacher: &Path, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("x.png");
    let prompt = first_prompt();
    let latents = golden("latents0.safetensors");
    let mut args = vec![
        "sample",
        "--teacher",
        s(teacher),
        "--prompt",
        &prompt,
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        s(&png),
    ];
    if !extra.contains(&"--latents") {
        args.extend_from_slice(&["--latents", s(&latents)]);
    }
    args.extend_from_slice(extra);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!png.exists());
    stderr(&out)
}

fn read(path: &Path, key: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no `{key}` in {}", path.display()))
        .1
}

#[test]
fn first_prompt_matches_diffusers_png_and_floats() {
    let tmp = tempfile::tempdir().unwrap();
    let (png, raw) = (tmp.path().join("x.png"), tmp.path().join("x.safetensors"));
    let prompt = first_prompt();
    let stdout = assert_ok(&run(&[
        "sample",
        "--teacher",
        s(&sd1()),
        "--prompt",
        &prompt,
        "--steps",
        "4",
        "--guidance",
        "4.5",
        "--latents",
        s(&golden("latents0.safetensors")),
        "--out",
        s(&png),
        "--raw-out",
        s(&raw),
        "--device",
        "cpu",
    ]));
    assert!(
        stdout.contains(&format!("wrote {}", png.display())),
        "{stdout}"
    );
    assert!(stdout.contains("s per image"), "{stdout}");

    let ours = swiftbrush_worker::image_io::load_png(&png).unwrap();
    let theirs = swiftbrush_worker::image_io::load_png(&golden("first.png")).unwrap();
    assert_eq!(ours.size(), [1, 3, 16, 16]);
    let d = common::tensors::max_abs_diff(&ours, &theirs);
    assert!(d <= 1.0 / 255.0 + 1e-6, "PNG differs by {d}");

    let images = read(&raw, "images");
    assert_eq!(images.kind(), Kind::Float);
    let expected = read(&golden("images.safetensors"), "images").narrow(0, 0, 1);
    let d = common::tensors::max_abs_diff(&images, &expected);
    assert!(d <= 1e-3, "raw images differ by {d}");
}

#[test]
fn prompts_file_gives_a_grid_and_batch_size_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut raws = Vec::new();
    for batch in ["2", "1"] {
        let png = tmp.path().join(format!("grid{batch}.png"));
        let raw = tmp.path().join(format!("grid{batch}.safetensors"));
        assert_ok(&run(&[
            "sample",
            "--teacher",
            s(&sd1()),
            "--prompts",
            s(&golden("prompts.txt")),
            "--steps",
            "4",
            "--latents",
            s(&golden("latents.safetensors")),
            "--out",
            s(&png),
            "--raw-out",
            s(&raw),
            "--batch-size",
            batch,
            "--device",
            "cpu",
        ]));
        let grid = swiftbrush_worker::image_io::load_png(&png).unwrap();
        assert_eq!(grid.size(), [1, 3, 16, 32], "two images side by side");
        raws.push(read(&raw, "images"));
    }
    let expected = read(&golden("images.safetensors"), "images");
    for images in &raws {
        let d = common::tensors::max_abs_diff(images, &expected);
        assert!(d <= 1e-3, "grid images differ by {d}");
    }
}

#[test]
fn seeded_noise_is_reproducible_and_sized_by_the_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = sd1();
    let sample = |seed: &str, name: &str, extra: &[&str]| {
        let raw = tmp.path().join(name);
        let mut args = vec![
            "sample",
            "--teacher",
            s(&teacher),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--seed",
            seed,
            "--raw-out",
            s(&raw),
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let stdout = assert_ok(&run(&args));
        assert!(
            !stdout.contains("sample.png"),
            "--raw-out alone writes no PNG"
        );
        read(&raw, "images")
    };
    let a = sample("3", "a.safetensors", &[]);
    // sample_size 8 times the VAE's scale factor 2.
    assert_eq!(a.size(), [1, 3, 16, 16]);
    assert!(a.equal(&sample("3", "b.safetensors", &[])));
    assert!(!a.equal(&sample("4", "c.safetensors", &[])));
    let wide = sample("3", "d.safetensors", &["--width", "24"]);
    assert_eq!(wide.size(), [1, 3, 16, 24]);
}

/// A copy of the sd1 fixture pipeline to break.
fn broken_copy(tmp: &tempfile::TempDir) -> PathBuf {
    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tmp.path().join("teacher");
    copy_tree(&sd1(), &dir);
    dir
}

fn unet_weights(dir: &Path) -> PathBuf {
    dir.join("unet/diffusion_pytorch_model.safetensors")
}

/// Rewrites the UNet's weights through `edit` (name -> tensor or drop).
fn rewrite_unet(dir: &Path, edit: impl Fn(&str, Tensor) -> Option<Tensor>) {
    let path = unet_weights(dir);
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .filter_map(|(k, t)| edit(&k, t).map(|t| (k, t)))
        .collect();
    Tensor::write_safetensors(&tensors, &path).unwrap();
}

#[test]
fn missing_vae_folder_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken_copy(&tmp);
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let e = fails(&dir, &[]);
    assert!(
        e.contains("no `vae` component") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn missing_and_misshaped_tensors_are_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken_copy(&tmp);
    rewrite_unet(&dir, |k, t| (k != "conv_out.bias").then_some(t));
    let e = fails(&dir, &[]);
    assert!(e.contains("`unet`"), "{e}");
    assert!(
        e.contains("missing tensors (1)") && e.contains("conv_out.bias [4]"),
        "{e}"
    );

    let tmp2 = tempfile::tempdir().unwrap();
    let dir2 = broken_copy(&tmp2);
    rewrite_unet(&dir2, |k, t| {
        Some(if k == "conv_in.weight" {
            Tensor::zeros([32, 3, 3, 3], (Kind::Float, Device::Cpu))
        } else {
            t
        })
    });
    let e = fails(&dir2, &[]);
    assert!(
        e.contains("wrong shapes (1)")
            && e.contains("conv_in.weight: model expects [32, 4, 3, 3], file has [32, 3, 3, 3]"),
        "{e}"
    );
}

#[test]
fn unknown_block_type_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken_copy(&tmp);
    let config = dir.join("unet/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("\"DownBlock2D\"", "\"FancyDownBlock2D\"", 1),
    )
    .unwrap();
    let e = fails(&dir, &[]);
    assert!(
        e.contains("unet/config.json")
            && e.contains("down_block_types[2] = \"FancyDownBlock2D\" is not supported"),
        "{e}"
    );
}

#[test]
fn truncated_weights_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken_copy(&tmp);
    let vae = dir.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&vae).unwrap();
    std::fs::write(&vae, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&dir, &[]);
    assert!(
        e.contains("`vae`")
            && e.contains("vae/diffusion_pytorch_model.safetensors")
            && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn pickle_only_weights_get_advice_to_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken_copy(&tmp);
    std::fs::remove_file(dir.join("text_encoder/model.safetensors")).unwrap();
    std::fs::write(dir.join("text_encoder/pytorch_model.bin"), b"pickle").unwrap();
    let e = fails(&dir, &[]);
    assert!(
        e.contains("pytorch_model.bin")
            && e.contains("never unpickles")
            && e.contains("safe_serialization=True"),
        "{e}"
    );
}

#[test]
fn latents_of_the_wrong_shape_are_refused() {
    // Two samples for one prompt: refused before the teacher is loaded.
    let e = fails(&sd1(), &["--latents", s(&golden("latents.safetensors"))]);
    assert!(
        e.contains("latents.safetensors") && e.contains("2 sample(s) but 1 prompt(s)"),
        "{e}"
    );
    // Three channels for a UNet with four.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("l.safetensors");
    let z = Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("latents", &z)], &path).unwrap();
    let e = fails(&sd1(), &["--latents", s(&path)]);
    assert!(
        e.contains("[1, 4, h, w]") && e.contains("[1, 3, 8, 8]"),
        "{e}"
    );
    // Sizes that disagree with --height.
    let e = fails(&sd1(), &["--height", "32"]);
    assert!(e.contains("16x16 images") && e.contains("32x16"), "{e}");
}

#[test]
fn missing_teacher_and_student_requests_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let e = fails(&tmp.path().join("nope"), &[]);
    assert!(e.contains("nope") && e.contains("no such directory"), "{e}");

    // A student path that is neither a run nor an exported pipeline.
    let out = run(&["sample", "--student", "/no/such/run", "--prompt", "a cat"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/no/such/run"), "{}", stderr(&out));

    // One of --teacher and --student is required.
    let out = run(&["sample", "--prompt", "a cat"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// `eval clip-score` scores exactly the pictures `sample` draws with the
/// same flags, picture by picture, in batches of any size; a missing CLIP
/// folder or an unwritable scores file fails before any drawing.
#[test]
fn eval_clip_score_scores_what_sample_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = common::fixtures().join("clip_model");
    let prompts = golden("prompts.txt");
    let raw = tmp.path().join("raw.safetensors");
    let teacher = sd1();
    let draw = [
        "--teacher",
        s(&teacher),
        "--prompts",
        s(&prompts),
        "--steps",
        "3",
        "--seed",
        "5",
        "--device",
        "cpu",
    ];
    let mut args = vec!["sample", "--raw-out", s(&raw)];
    args.extend(draw);
    assert_ok(&run(&args));
    let scores_out = tmp.path().join("scores.jsonl");
    let mut args = vec!["eval", "clip-score", "--clip", s(&clip), "--json"];
    args.extend(draw);
    args.extend(["--batch-size", "1", "--scores-out", s(&scores_out)]);
    let report: serde_json::Value = serde_json::from_str(&assert_ok(&run(&args))).unwrap();

    let texts: Vec<String> = std::fs::read_to_string(&prompts)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let scorer = swiftbrush_worker::eval::ClipScorer::load(&clip, Device::Cpu).unwrap();
    let want: Vec<f32> =
        Vec::try_from(&scorer.scores(&read(&raw, "images"), &texts).unwrap()).unwrap();
    let got: Vec<f64> = report["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), texts.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - f64::from(*w)).abs() <= 1e-5, "score {g} vs {w}");
    }
    let mean = got.iter().sum::<f64>() / got.len() as f64;
    assert!((report["clip_score"].as_f64().unwrap() - mean).abs() < 1e-12);
    let lines = std::fs::read_to_string(&scores_out).unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["prompt"], texts[0].as_str());
    assert_eq!(lines.lines().count(), texts.len());

    let mut args = vec!["eval", "clip-score", "--clip", "/no/such/clip"];
    args.extend(draw);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("CLIP model /no/such/clip"),
        "{}",
        stderr(&out)
    );
    let mut args = vec![
        "eval",
        "clip-score",
        "--clip",
        s(&clip),
        "--scores-out",
        "/no/such/dir/s.jsonl",
    ];
    args.extend(draw);
    let out = run(&args);
    assert!(
        stderr(&out).contains("cannot write /no/such/dir/s.jsonl"),
        "{}",
        stderr(&out)
    );
}

/// `eval fid`: a model's saved statistics are at distance 0 from the same
/// draws and the distance to other statistics is what the library computes
/// from both files; bad requests fail before drawing, naming the problem.
#[test]
fn eval_fid_compares_statistics_of_what_sample_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = common::fixtures();
    let inception = fixtures.join("fid/inception.safetensors");
    let teacher = sd1();
    let prompts = golden("prompts.txt");
    let saved = tmp.path().join("teacher.safetensors");
    let fid = |extra: &[&str]| {
        let mut args = vec!["eval", "fid", "--inception", s(&inception), "--json"];
        args.extend(["--teacher", s(&teacher), "--prompts", s(&prompts)]);
        args.extend(["--steps", "2", "--device", "cpu"]);
        args.extend(extra);
        run(&args)
    };
    let report =
        |out: &Output| -> serde_json::Value { serde_json::from_str(&assert_ok(out)).unwrap() };
    let first = report(&fid(&["--save-stats", s(&saved)]));
    assert_eq!(first["num_images"], 2);
    assert!(first["fid"].is_null(), "no reference given: {first}");
    let same = report(&fid(&["--reference-stats", s(&saved)]));
    let d = same["fid"].as_f64().unwrap();
    assert!(d.abs() <= 1e-3, "the same draws are at FID {d}");
    let npz = fixtures.join("fid/stats_a.npz");
    let other = report(&fid(&["--reference-stats", s(&npz), "--seed", "3"]));
    let d = other["fid"].as_f64().unwrap();
    let again = tmp.path().join("seed3.safetensors");
    report(&fid(&["--save-stats", s(&again), "--seed", "3"]));
    use swiftbrush_worker::eval::fid::read_stats;
    let (mu1, s1) = read_stats(&again).unwrap();
    let (mu2, s2) = read_stats(&npz).unwrap();
    let want = swiftbrush_worker::eval::frechet_distance(&mu1, &s1, &mu2, &s2).unwrap();
    // Eigen-decompositions on other thread counts: not bit for bit.
    assert!(d > 1.0 && (d - want).abs() <= 1e-6 * want, "{d} vs {want}");

    let fails = |args: &[&str], needle: &str| {
        let out = fid(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    };
    fails(&[], "--reference-stats FILE");
    let mut missing = vec!["eval", "fid", "--inception", "/no/such.safetensors"];
    missing.extend(["--teacher", s(&teacher), "--prompts", s(&prompts)]);
    missing.extend(["--save-stats", s(&saved)]);
    let out = run(&missing);
    assert!(
        stderr(&out).contains("FID Inception weights /no/such.safetensors"),
        "{}",
        stderr(&out)
    );
    let mut pickle = vec!["eval", "fid", "--inception", "pt_inception.pth"];
    pickle.extend(["--teacher", s(&teacher), "--prompts", s(&prompts)]);
    pickle.extend(["--save-stats", s(&saved)]);
    let out = run(&pickle);
    assert!(stderr(&out).contains("convert"), "{}", stderr(&out));
    let bad = fixtures.join("fid/golden.safetensors");
    fails(&["--reference-stats", s(&bad)], "no `mu` array");
    let mut one = vec![
        "eval",
        "fid",
        "--inception",
        s(&inception),
        "--teacher",
        s(&teacher),
    ];
    one.extend(["--prompt", "a cat", "--save-stats", s(&saved)]);
    let out = run(&one);
    assert!(
        stderr(&out).contains("at least 2 pictures"),
        "{}",
        stderr(&out)
    );
}

/// Issue 29: a `--student` that is not a student names what the folder is
/// and what to pass instead, for `sample`, `export` and `eval` alike; a
/// run without a checkpoint says "no checkpoint" (not "to resume from").
#[test]
fn student_paths_that_are_not_students_say_what_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = sd1();
    let unet = teacher.join("unet");
    let empty = tmp.path().join("run");
    std::fs::create_dir(&empty).unwrap();
    let sample = |student: &Path| {
        let out = run(&["sample", "--student", s(student), "--prompt", "a cat"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        stderr(&out)
    };
    let export = |student: &Path| {
        let dest = tmp.path().join("out");
        let out = run(&["export", "--student", s(student), "--out", s(&dest)]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(!dest.exists(), "nothing is written");
        stderr(&out)
    };

    // A teacher pipeline: no swiftbrush.json. Drawing one step from its
    // undistilled UNet is refused, with the way out.
    for e in [sample(&teacher), export(&teacher)] {
        assert!(e.contains(s(&teacher)), "{e}");
        assert!(e.contains("looks like a teacher"), "{e}");
        assert!(e.contains("--teacher"), "{e}");
        assert!(e.contains("export --pipeline"), "{e}");
        assert!(e.contains("swiftbrush.json"), "{e}");
        assert!(e.contains("\"student_timestep\""), "{e}");
    }
    // A UNet folder (what `export` without --pipeline writes).
    for e in [sample(&unet), export(&unet)] {
        assert!(e.contains("is a UNet folder"), "{e}");
        assert!(e.contains("RUN/checkpoints/step-N"), "{e}");
        assert!(e.contains("export --pipeline"), "{e}");
    }
    // A folder with no checkpoint.
    for e in [sample(&empty), export(&empty)] {
        assert!(e.contains("no checkpoint"), "{e}");
        assert!(!e.contains("resume"), "{e}");
    }
    // eval draws as sample does: the same refusal.
    let clip = common::fixtures().join("clip_model");
    let out = run(&[
        "eval",
        "clip-score",
        "--clip",
        s(&clip),
        "--student",
        s(&teacher),
        "--prompt",
        "a cat",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("looks like a teacher"),
        "{}",
        stderr(&out)
    );
}

/// Issue 29: --guidance does nothing for a student: refused. Issue 26:
/// --steps picks a few-step student's steps, at least 1 (checked before
/// loading; more than it was trained for after, in cli_export.rs).
#[test]
fn ddim_flags_with_a_student_are_refused() {
    for flag in [["--guidance", "7.5"], ["--steps", "0"]] {
        let mut args = vec!["sample", "--student", "/no/such/run", "--prompt", "a cat"];
        args.extend(flag);
        let out = run(&args);
        assert_ne!(out.status.code(), Some(0));
        let e = stderr(&out);
        assert!(e.contains(flag[0]) && e.contains("student"), "{e}");
        assert!(!e.contains("/no/such/run"), "refused before loading: {e}");
    }
    // With --teacher too (a student run may take --teacher).
    let teacher = sd1();
    let mut args = vec!["eval", "clip-score", "--clip", "/no/such/clip"];
    args.extend(["--student", "/no/such/run", "--teacher", s(&teacher)]);
    args.extend(["--prompt", "a cat", "--guidance", "3"]);
    let e = stderr(&run(&args));
    assert!(
        e.contains("--guidance") && e.contains("without guidance"),
        "{e}"
    );
}

/// Issue 29: a text encoder alone given as --clip is named in one line; a
/// missing weights file is a path and "not found", not debug text.
#[test]
fn clip_folders_that_are_not_clip_models_are_named() {
    let teacher = sd1();
    let clip_score = |clip: &Path| {
        let out = run(&[
            "eval",
            "clip-score",
            "--clip",
            s(clip),
            "--teacher",
            s(&teacher),
            "--prompt",
            "a cat",
            "--steps",
            "1",
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        stderr(&out)
    };
    let e = clip_score(&teacher.join("text_encoder"));
    assert!(e.contains("CLIPTextModel folder"), "{e}");
    assert!(e.contains("full CLIPModel"), "{e}");
    assert!(e.lines().count() <= 3, "{e}");

    // Sharded weights whose shard is missing.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("clip");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(common::fixtures().join("clip_model")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "model.safetensors" {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"logit_scale": "model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    let e = clip_score(&dir);
    let shard = dir.join("model-00001-of-00001.safetensors");
    assert!(
        e.contains(&format!("{}: not found", shard.display())),
        "{e}"
    );
    assert!(!e.contains("IoError") && !e.contains("Os {"), "{e}");
}
