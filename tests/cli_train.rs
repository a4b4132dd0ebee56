//! `swiftbrush train` as a user runs it, on the tiny SD1-style fixture:
//! checkpoints, exact resume, a process killed mid-checkpoint, the sample
//! step's pictures, bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn teacher(kind: &str) -> String {
    common::fixtures()
        .join("pipelines")
        .join(kind)
        .display()
        .to_string()
}

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml");

fn train(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    train_with(CONFIG, dir, extra, env)
}

fn train_with(config: &str, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_swiftbrush"));
    cmd.env_clear()
        .env("RUST_LOG", "warn")
        // One libtorch thread: tests run two at a time on small machines.
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir)
        .args(["train", "--config", config, "--teacher", &teacher("sd1")])
        .args(["--captions", "captions.txt"])
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn swiftbrush")
}

const SAMPLE_PROMPTS: [&str; 3] = ["a red circle", "a photo of a cat", "a lighthouse at dusk"];

/// configs/tiny.yaml with the sample step on: pictures every 2 steps.
fn sampling_config(dir: &Path) -> String {
    let tiny = std::fs::read_to_string(CONFIG).unwrap();
    let prompts = SAMPLE_PROMPTS.map(|p| format!("{p:?}")).join(", ");
    let with = tiny.replacen(
        "train:\n",
        &format!("train:\n  sample_every_steps: 2\n  sample_prompts: [{prompts}]\n"),
        1,
    );
    assert!(with != tiny, "configs/tiny.yaml has no train section");
    let path = dir.join("sampling.yaml");
    std::fs::write(&path, with).unwrap();
    path.display().to_string()
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let long = "a very long caption ".repeat(30);
    let mut text = b"a red circle on a white background\na photo of a cat\n\n".to_vec();
    text.extend_from_slice(b"bad \xff utf8\n");
    text.extend_from_slice(format!("{long}\nthe quick brown fox\n").as_bytes());
    std::fs::write(dir.path().join("captions.txt"), text).unwrap();
    dir
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "train failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn checkpoint_file(run: &Path, step: u64, name: &str) -> Vec<u8> {
    let dir = run.join("checkpoints").join(format!("step-{step:08}"));
    let attempt = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("attempt-"))
        .unwrap_or_else(|| panic!("no attempt in {}", dir.display()));
    std::fs::read(attempt.path().join(name)).unwrap()
}

/// The step-4 checkpoint's `name`, damaged as a storage fault would: one
/// byte flipped, or the file cut in half.
fn damage(run: &Path, name: &str, how: &str) {
    let dir = run.join("checkpoints/step-00000004");
    let attempt = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("attempt-"))
        .unwrap();
    let path = attempt.path().join(name);
    let mut bytes = std::fs::read(&path).unwrap();
    match how {
        "flip" => {
            let i = bytes.len() / 2;
            bytes[i] ^= 0x40;
        }
        _ => bytes.truncate(bytes.len() / 2),
    }
    std::fs::write(&path, bytes).unwrap();
}

/// A corrupt newest checkpoint does not brick the run: the same `train`
/// command resumes from the newest checkpoint that verifies, warns loudly
/// naming the bad one, and moves it aside (kept, never deleted; retention
/// and resume no longer see it); `--resume` of the older good one works.
#[test]
fn a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it() {
    for (how, resume) in [("flip", None), ("truncate", None), ("flip", Some("2"))] {
        let dir = setup();
        let d = dir.path();
        ok(&train(d, &["--run-dir", "run", "--max-steps", "4"], &[]));
        let good = checkpoint_file(&d.join("run"), 4, "student.safetensors");
        damage(&d.join("run"), "student.safetensors", how);
        let mut args = vec!["--run-dir", "run", "--max-steps", "4"];
        if let Some(step) = resume {
            args.extend(["--resume", step]);
        }
        let out = train(d, &args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = ok(&out);
        assert!(
            stdout.contains("trained steps 2..4"),
            "{how}: {stdout}\n{stderr}"
        );
        assert!(
            stderr.contains("CHECKPOINT 4 IS CORRUPT") && stderr.contains("student.safetensors"),
            "{how}: {stderr}"
        );
        // Set aside, not deleted (and no empty folder left behind); the
        // retrained step 4 is the same student.
        let aside: Vec<_> = std::fs::read_dir(d.join("run/corrupt"))
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(aside.len(), 1, "{how}");
        assert!(
            aside[0]
                .file_name()
                .to_string_lossy()
                .starts_with("step-00000004.")
        );
        assert!(aside[0].path().join("manifest.json").exists(), "{how}");
        assert!(
            checkpoint_file(&d.join("run"), 4, "student.safetensors") == good,
            "{how}: the retrained step 4 differs from the original"
        );
    }
}

#[test]
fn resume_continues_bitwise_and_survives_a_kill_mid_checkpoint() {
    let dir = setup();
    let d = dir.path();
    // Uninterrupted: 4 steps, checkpoints at 2 and 4.
    let first = train(d, &["--run-dir", "straight", "--max-steps", "4"], &[]);
    let out = ok(&first);
    assert!(out.contains("trained steps 0..4"), "{out}");
    // Blank and invalid UTF-8 lines are skipped and counted.
    let log = String::from_utf8_lossy(&first.stderr);
    assert!(log.contains("skipped 1 blank, 1 invalid UTF-8"), "{log}");
    assert!(out.contains("last checkpoint: step 4"), "{out}");
    // The long caption was truncated and counted (it is trained on twice in
    // 4 steps of 2 over 4 captions).
    assert!(out.contains("captions truncated to 77 tokens: 2"), "{out}");

    // Interrupted: 2 steps, then a run that is killed while writing the
    // step-4 checkpoint (after 2 of its files), then a resume. These runs
    // also draw sample pictures every 2 steps, which must change nothing.
    let sampling = sampling_config(d);
    ok(&train_with(
        &sampling,
        d,
        &["--run-dir", "resumed", "--max-steps", "2"],
        &[],
    ));
    let killed = train_with(
        &sampling,
        d,
        &["--run-dir", "resumed", "--max-steps", "4"],
        &[("SWIFTBRUSH_FAULT_CHECKPOINT", "4:2")],
    );
    assert!(!killed.status.success(), "the fault injection did not fire");
    let out = ok(&train_with(
        &sampling,
        d,
        &["--run-dir", "resumed", "--max-steps", "4"],
        &[],
    ));
    // The partial step-4 checkpoint was ignored: training resumed at 2.
    assert!(out.contains("trained steps 2..4"), "{out}");

    for name in [
        "student.safetensors",
        "ema.safetensors",
        "lora.safetensors",
        "optimizer_student.safetensors",
    ] {
        let a = checkpoint_file(&d.join("straight"), 4, name);
        let b = checkpoint_file(&d.join("resumed"), 4, name);
        assert!(
            a == b,
            "{name} differs between the straight and the resumed run"
        );
    }
    // The student moved away from the teacher.
    let s2 = checkpoint_file(&d.join("straight"), 2, "student.safetensors");
    let s4 = checkpoint_file(&d.join("straight"), 4, "student.safetensors");
    assert!(s2 != s4);

    // The sample step's pictures: after steps 2 and 4, and the step-4 one is
    // what `sample` draws from that checkpoint with the run's seed.
    assert!(
        !d.join("straight/samples").exists(),
        "sampling is off by default"
    );
    let picture = |step: u64| {
        let path = d.join(format!("resumed/samples/step-{step:08}.png"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let (p2, p4) = (picture(2), picture(4));
    assert!(
        p2 != p4,
        "the student's pictures did not change from step 2 to 4"
    );
    // The same pictures in TensorBoard, beside the losses, as its own loader
    // reads them (the crashed first process may not have flushed step 2's).
    let digest = |png: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(png))
    };
    let board = tensorboard_files(&d.join("resumed"));
    let mut shown = Vec::new();
    for file in board["files"].as_array().unwrap() {
        for image in file["images"]["samples"].as_array().into_iter().flatten() {
            let step = image[0].as_u64().unwrap();
            assert_eq!(
                image[3].as_str().unwrap(),
                digest(&picture(step)),
                "TensorBoard's picture of step {step} is not samples/step-{step:08}.png"
            );
            // Three 16 px pictures on a 2x2 grid.
            assert_eq!((image[1].as_u64(), image[2].as_u64()), (Some(32), Some(32)));
            shown.push(step);
        }
    }
    assert!(
        shown.contains(&4),
        "no step-4 picture in TensorBoard: {board}"
    );
    std::fs::write(d.join("prompts.txt"), SAMPLE_PROMPTS.join("\n")).unwrap();
    let sampled = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("OMP_NUM_THREADS", "1")
        .current_dir(d)
        .args(["sample", "--student", "resumed/checkpoints/step-00000004"])
        .args([
            "--prompts",
            "prompts.txt",
            "--seed",
            "0",
            "--batch-size",
            "8",
        ])
        .args(["--height", "16", "--width", "16", "--out", "s4.png"])
        .output()
        .unwrap();
    assert!(
        sampled.status.success(),
        "{}",
        String::from_utf8_lossy(&sampled.stderr)
    );
    assert!(
        std::fs::read(d.join("s4.png")).unwrap() == p4,
        "samples/step-00000004.png differs from `sample --student` of that checkpoint"
    );

    // A run already at max_steps trains nothing more.
    let out = ok(&train(
        d,
        &["--run-dir", "straight", "--max-steps", "4"],
        &[],
    ));
    assert!(out.contains("trained steps 4..4"), "{out}");
}

#[test]
fn checkpoint_from_another_teacher_is_refused() {
    let dir = setup();
    let d = dir.path();
    ok(&train(d, &["--run-dir", "run", "--max-steps", "2"], &[]));
    let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .current_dir(d)
        .args(["train", "--config", CONFIG, "--teacher", &teacher("sd2")])
        .args([
            "--captions",
            "captions.txt",
            "--run-dir",
            "run",
            "--max-steps",
            "4",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Refused when the worker asks to join: the job's teacher is the
    // checkpoint's (the trainer's own check at restore backs it up).
    assert!(
        err.contains("has another teacher than the job")
            || err.contains("distilled from another teacher"),
        "{err}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = setup();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
            .env_clear()
            .env("OMP_NUM_THREADS", "1")
            .current_dir(d)
            .arg("train")
            .args(["--config", CONFIG])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let sd1 = teacher("sd1");
    let e = run(&[
        "--teacher",
        "/no/such/teacher",
        "--captions",
        "captions.txt",
    ]);
    assert!(
        e.contains("/no/such/teacher") && e.contains("no such directory"),
        "{e}"
    );

    // Issue 29: the index file (or any file) passed as the teacher.
    let index = format!("{sd1}/model_index.json");
    let e = run(&["--teacher", &index, "--captions", "captions.txt"]);
    assert!(
        e.contains("it is a file, not a folder: pass the pipeline folder (the one holding model_index.json)"),
        "{e}"
    );
    assert!(
        !e.contains("coordinator"),
        "named before anything starts: {e}"
    );

    std::fs::write(d.join("blank.txt"), "\n   \n\n").unwrap();
    let e = run(&[
        "--teacher",
        &sd1,
        "--captions",
        "blank.txt",
        "--run-dir",
        "r1",
    ]);
    assert!(e.contains("blank.txt: no captions"), "{e}");
    // Said once: the chain used to repeat each error that wrote its
    // source into its own message.
    assert_eq!(e.matches("no captions").count(), 1, "{e}");
    std::fs::write(d.join("empty.txt"), "").unwrap();
    let e = run(&[
        "--teacher",
        &sd1,
        "--captions",
        "empty.txt",
        "--run-dir",
        "r1",
    ]);
    assert!(e.contains("empty.txt: no captions"), "{e}");
    assert_eq!(e.matches("no captions").count(), 1, "{e}");
    let e = run(&[
        "--teacher",
        &sd1,
        "--captions",
        "missing.txt",
        "--run-dir",
        "r1",
    ]);
    assert!(e.contains("missing.txt"), "{e}");
    assert_eq!(e.matches("missing.txt").count(), 1, "{e}");
    let e = run(&["--teacher", &sd1, "--run-dir", "r1"]);
    assert!(e.contains("--captions"), "{e}");

    // A run directory under a regular file cannot be created.
    std::fs::write(d.join("afile"), "x").unwrap();
    let e = run(&[
        "--teacher",
        &sd1,
        "--captions",
        "captions.txt",
        "--run-dir",
        "afile/run",
    ]);
    assert!(e.contains("afile/run"), "{e}");

    let e = run(&[
        "--teacher",
        &sd1,
        "--captions",
        "captions.txt",
        "--resume",
        "7",
    ]);
    assert!(e.contains('7'), "{e}");
}

/// Issue 28: a caption file with one 10 MB line (5 million words) between
/// normal ones. The step that drew it used to die on every resume (its
/// caption reply outgrew the transport's 8 MiB limit); the line is now cut
/// at ingest, counted, and the job completes.
#[test]
fn a_ten_megabyte_caption_line_is_cut_and_the_job_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let huge = "word ".repeat(2_000_000);
    let text = format!("a red circle on a white background\n{huge}\na photo of a cat\n");
    std::fs::write(d.join("captions.txt"), text).unwrap();
    // 3 steps of 2 over 3 captions: every caption is drawn.
    let out = train(d, &["--run-dir", "run", "--max-steps", "3"], &[]);
    let stdout = ok(&out);
    assert!(stdout.contains("trained steps 0..3"), "{stdout}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("cut 1 longer than 4096 bytes"), "{log}");
}

/// Issue 28: README's own example (`--max-steps 4`, then the same command
/// with `--max-steps 8`) used to warn that the job config changed. Only
/// what changes the training math is compared now, and a real change is
/// named key by key with its old and new value.
#[test]
fn extending_a_run_is_no_config_change_and_a_real_one_is_named() {
    let dir = setup();
    let d = dir.path();
    ok(&train(d, &["--run-dir", "run", "--max-steps", "2"], &[]));
    let longer = train(d, &["--run-dir", "run", "--max-steps", "4"], &[]);
    ok(&longer);
    let log = String::from_utf8_lossy(&longer.stderr);
    assert!(!log.contains("config changed"), "{log}");
    let tiny = std::fs::read_to_string(CONFIG).unwrap();
    let guided = tiny.replacen("method:\n", "method:\n  guidance_scale: 7.5\n", 1);
    assert_ne!(guided, tiny);
    let path = d.join("guided.yaml");
    std::fs::write(&path, guided).unwrap();
    let changed = train_with(
        path.to_str().unwrap(),
        d,
        &["--run-dir", "run", "--max-steps", "6"],
        &[],
    );
    ok(&changed);
    let log = String::from_utf8_lossy(&changed.stderr);
    assert!(log.contains("config changed"), "{log}");
    assert!(log.contains("method.guidance_scale: 4.5 -> 7.5"), "{log}");
    assert!(!log.contains("train.max_steps"), "{log}");
}

/// Issue 28: `method.lora.rank: 100000` on the tiny fixture trained
/// silently with 6.5 GB of memory (21 s a step). A rank above what a
/// targeted layer can use is refused, naming the layer and its limit.
#[test]
fn a_lora_rank_above_a_layers_size_is_refused_naming_the_layer() {
    let dir = setup();
    let d = dir.path();
    let tiny = std::fs::read_to_string(CONFIG).unwrap();
    let huge = tiny.replacen("    rank: 4\n", "    rank: 100000\n", 1);
    assert_ne!(huge, tiny);
    let path = d.join("huge.yaml");
    std::fs::write(&path, huge).unwrap();
    let out = train_with(
        path.to_str().unwrap(),
        d,
        &["--run-dir", "run", "--max-steps", "1"],
        &[],
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("method.lora.rank = 100000 is larger than") && e.contains(".to_q allows"),
        "{e}"
    );
    assert!(e.contains("use a rank of at most"), "{e}");
    assert!(!d.join("run/checkpoints").exists(), "nothing was trained");
}

/// Runs tests/reference/check_tensorboard.py (TensorBoard's own loader,
/// which checks every record's CRCs) on a run directory.
fn tensorboard_files(run: &Path) -> serde_json::Value {
    serde_json::from_str(&common::reference_python("check_tensorboard.py", &[run])).unwrap()
}

/// The trainer's TensorBoard files: every step's losses and rates, as
/// TensorBoard reads them; a resumed run adds a file with its own steps;
/// `logging.tensorboard: false` writes none.
#[test]
fn tensorboard_reads_every_steps_losses() {
    let dir = setup();
    let d = dir.path();
    let out = ok(&train(d, &["--run-dir", "run", "--max-steps", "3"], &[]));
    let files = tensorboard_files(&d.join("run"));
    let files = files["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0]["version"], "brain.Event:2");
    let scalars = &files[0]["scalars"];
    for tag in [
        "loss/vsd",
        "loss/lora",
        "perf/images_per_s",
        "perf/step_ms",
        "perf/allreduce_ms",
    ] {
        let steps: Vec<u64> = scalars[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {scalars}"))
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3], "{tag}");
    }
    // The last step's losses are the ones `train` prints (6 digits there,
    // float32 in the file).
    let last = |tag: &str| scalars[tag][2][1].as_f64().unwrap();
    let printed = out
        .lines()
        .find_map(|l| l.strip_prefix("last losses: "))
        .unwrap_or_else(|| panic!("{out}"));
    let value = |name: &str| -> f64 {
        printed
            .split(", ")
            .find_map(|p| p.strip_prefix(&format!("{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    // To the printed precision: vsd 7 significant digits ({:.6e}), fake score 6
    // decimals ({:.6}), plus float32's rounding in the file.
    for (tag, name, printed) in [
        ("loss/vsd", "vsd", 5e-7),
        ("loss/fake_score", "fake score", 5e-7),
        // The old tag, kept for one release.
        ("loss/lora", "fake score", 5e-7),
    ] {
        let (got, want) = (last(tag), value(name));
        let bound = if name == "vsd" {
            printed * want.abs()
        } else {
            printed
        } + 1e-7 * want.abs();
        assert!((got - want).abs() <= bound, "{tag}: {got} vs {want}");
    }

    // Resumed: a second file with steps 4 and 5.
    ok(&train(d, &["--run-dir", "run", "--max-steps", "5"], &[]));
    let files = tensorboard_files(&d.join("run"));
    let files = files["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    let mut steps: Vec<u64> = files
        .iter()
        .flat_map(|f| f["scalars"]["loss/vsd"].as_array().unwrap().clone())
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    steps.sort();
    assert_eq!(steps, [1, 2, 3, 4, 5]);

    let tiny = std::fs::read_to_string(CONFIG).unwrap();
    let off = tiny.replacen("logging:\n", "logging:\n  tensorboard: false\n", 1);
    assert!(off != tiny, "configs/tiny.yaml has no logging section");
    std::fs::write(d.join("off.yaml"), off).unwrap();
    let config = d.join("off.yaml").display().to_string();
    ok(&train_with(
        &config,
        d,
        &["--run-dir", "quiet", "--max-steps", "1"],
        &[],
    ));
    assert!(d.join("quiet/checkpoints").exists());
    assert!(!d.join("quiet/tensorboard").exists());
}

/// `eval clip-score --all-checkpoints`: every valid checkpoint of a run,
/// oldest first, each scored as `eval` scores that checkpoint alone.
#[test]
fn eval_scores_every_checkpoint_of_a_run() {
    let dir = setup();
    let d = dir.path();
    ok(&train(d, &["--run-dir", "run", "--max-steps", "4"], &[]));
    std::fs::write(d.join("p.txt"), "a red circle\na photo of a cat\n").unwrap();
    let clip = common::fixtures().join("clip_model").display().to_string();
    let eval = |student: &str, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
            .env_clear()
            .env("OMP_NUM_THREADS", "1")
            .current_dir(d)
            .args(["eval", "clip-score", "--clip", &clip, "--student", student])
            .args([
                "--prompts",
                "p.txt",
                "--height",
                "16",
                "--width",
                "16",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&ok(&out)).unwrap()
    };
    let all = eval("run", &["--all-checkpoints"]);
    let all = all.as_array().unwrap();
    let steps: Vec<u64> = all.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(
        steps,
        [2, 4],
        "configs/tiny.yaml keeps the last 2 of every 2 steps"
    );
    for e in all {
        let step = e["step"].as_u64().unwrap();
        let one = eval(&format!("run/checkpoints/step-{step:08}"), &[]);
        assert_eq!(one["scores"], e["scores"], "step {step}");
    }
    assert_ne!(all[0]["scores"], all[1]["scores"]);

    let out = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .current_dir(d)
        .args([
            "eval",
            "clip-score",
            "--clip",
            &clip,
            "--teacher",
            &teacher("sd1"),
        ])
        .args(["--prompts", "p.txt", "--all-checkpoints"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--student RUN"),
        "{err}"
    );
}

/// Fault: two jobs on one run directory. A second `train` on a run
/// directory a live one is writing is refused at once, naming the holder;
/// with `--take-over` it gets in, and the first stops at its next lease
/// renewal with that error and a non-zero exit.
#[test]
fn a_second_train_is_refused_and_take_over_stops_the_first() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let dir = setup();
    let d = dir.path();
    let mut first = Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .current_dir(d)
        .args(["train", "--config", CONFIG, "--teacher", &teacher("sd1")])
        .args(["--captions", "captions.txt", "--run-dir", "run"])
        // Runs until stopped, committing nothing; renews every second.
        .args(["--max-steps", "1000000", "--checkpoint-every", "1000000"])
        .args(["--lease-ttl", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn swiftbrush");
    let first_pid = first.id();
    let lease = d.join("run/lease");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&lease).map_or(0, |e| e.count()) == 0 {
        if let Ok(Some(status)) = first.try_wait() {
            let out = first.wait_with_output().unwrap();
            panic!(
                "the first train ended ({status}) before holding its run directory: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "the first train never took its lease"
        );
        // Polling another process's files: it gives no other signal.
        std::thread::sleep(Duration::from_millis(50));
    }

    let started = Instant::now();
    let refused = train(d, &["--run-dir", "run", "--max-steps", "2"], &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success(),
        "a second job was let in: {stderr}"
    );
    for part in [
        "is in use by another job",
        "swiftbrush train on host",
        &format!("pid {first_pid}"),
        "since",
        "lease expires at",
        "--take-over",
    ] {
        assert!(stderr.contains(part), "{stderr:?} lacks {part:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused only after {:?}",
        started.elapsed()
    );
    assert!(first.try_wait().unwrap().is_none(), "the first job goes on");

    let taker = train(
        d,
        &["--run-dir", "run", "--max-steps", "2", "--take-over"],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = first.kill();
            let out = first.wait_with_output().unwrap();
            panic!(
                "the first train did not stop after the take-over: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = first.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the first job must fail: {stderr}");
    assert!(
        stderr.contains("this job's lease on it was taken over by swiftbrush train on host"),
        "{stderr}"
    );
    let stdout = ok(&taker);
    assert!(stdout.contains("trained steps 0..2"), "{stdout}");
    // The taker released the run directory: a next job gets in.
    ok(&train(d, &["--run-dir", "run", "--max-steps", "2"], &[]));
}

/// configs/tiny.yaml with `method.student_timesteps` set to `steps`
/// (and the sample step's pictures when `sampling`).
fn few_step_config(dir: &Path, steps: &str, sampling: bool) -> String {
    let base = if sampling {
        std::fs::read_to_string(sampling_config(dir)).unwrap()
    } else {
        std::fs::read_to_string(CONFIG).unwrap()
    };
    let with = base.replacen(
        "method:\n",
        &format!("method:\n  student_timesteps: {steps}\n"),
        1,
    );
    assert!(with != base, "configs/tiny.yaml has no method section");
    let path = dir.join(format!("steps-{}-{sampling}.yaml", steps.len()));
    std::fs::write(&path, with).unwrap();
    path.display().to_string()
}

/// Issue 26: a four-step student trains by backward simulation and resumes
/// bit for bit (its chain draws are a function of seed and step), its
/// sample step draws what `sample --student` draws, and it trains
/// something else than the one-step student, whose explicit
/// `student_timesteps: [999]` is today's run bit for bit. The resumed
/// run's second leg trains with `train.gradient_checkpointing` (one chunk
/// of `recompute_rows` = 4 covers the batch of 2: the plain step's
/// arithmetic, worker/tests/gradient_checkpointing.rs), so the trainer
/// runs a checkpointed four-step student to the same bits.
#[test]
fn a_four_step_student_resumes_bitwise_and_samples_its_chain() {
    let dir = setup();
    let d = dir.path();
    let four = few_step_config(d, "[999, 749, 499, 249]", false);
    let four_sampling = few_step_config(d, "[999, 749, 499, 249]", true);
    let base = std::fs::read_to_string(&four_sampling).unwrap();
    let checkpointing = base.replacen("train:\n", "train:\n  gradient_checkpointing: true\n", 1);
    assert!(
        checkpointing != base,
        "configs/tiny.yaml has no train section"
    );
    let four_checkpointing = d.join("steps-4-checkpointing.yaml");
    std::fs::write(&four_checkpointing, checkpointing).unwrap();
    let four_checkpointing = four_checkpointing.display().to_string();
    ok(&train_with(
        &four,
        d,
        &["--run-dir", "straight", "--max-steps", "4"],
        &[],
    ));
    ok(&train_with(
        &four_sampling,
        d,
        &["--run-dir", "resumed", "--max-steps", "2"],
        &[],
    ));
    let out = ok(&train_with(
        &four_checkpointing,
        d,
        &["--run-dir", "resumed", "--max-steps", "4"],
        &[],
    ));
    assert!(out.contains("trained steps 2..4"), "{out}");
    for name in [
        "student.safetensors",
        "ema.safetensors",
        "lora.safetensors",
        "optimizer_student.safetensors",
    ] {
        let a = checkpoint_file(&d.join("straight"), 4, name);
        let b = checkpoint_file(&d.join("resumed"), 4, name);
        assert!(
            a == b,
            "{name} differs between the straight and the resumed run"
        );
    }
    // One step: the default and an explicit [999] are the same run; the
    // four-step student's differs from both.
    let one = few_step_config(d, "[999]", false);
    ok(&train(
        d,
        &["--run-dir", "default", "--max-steps", "2"],
        &[],
    ));
    ok(&train_with(
        &one,
        d,
        &["--run-dir", "one", "--max-steps", "2"],
        &[],
    ));
    let student = |run: &str| checkpoint_file(&d.join(run), 2, "student.safetensors");
    assert!(
        student("default") == student("one"),
        "[999] is not the one-step run"
    );
    assert!(
        student("straight") != student("one"),
        "four steps trained as one"
    );

    // The step-4 picture is `sample --student`'s, chain noise included.
    std::fs::write(d.join("prompts.txt"), SAMPLE_PROMPTS.join("\n")).unwrap();
    let sample = |steps: Option<&str>, png: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_swiftbrush"));
        cmd.env_clear()
            .env("OMP_NUM_THREADS", "1")
            .current_dir(d)
            .args(["sample", "--student", "resumed/checkpoints/step-00000004"])
            .args([
                "--prompts",
                "prompts.txt",
                "--seed",
                "0",
                "--batch-size",
                "8",
            ])
            .args(["--height", "16", "--width", "16", "--out", png]);
        if let Some(s) = steps {
            cmd.args(["--steps", s]);
        }
        cmd.output().unwrap()
    };
    let sampled = sample(None, "s4.png");
    assert!(
        sampled.status.success(),
        "{}",
        String::from_utf8_lossy(&sampled.stderr)
    );
    let p4 = std::fs::read(d.join("resumed/samples/step-00000004.png")).unwrap();
    assert!(
        std::fs::read(d.join("s4.png")).unwrap() == p4,
        "samples/step-00000004.png differs from `sample --student` of that checkpoint"
    );
    // Fewer steps draw another picture; more than it was trained for is refused.
    assert!(sample(Some("2"), "s2.png").status.success());
    assert!(std::fs::read(d.join("s2.png")).unwrap() != p4);
    let refused = sample(Some("5"), "s5.png");
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && e.contains("trained for 4 step(s)"),
        "{e}"
    );
}
