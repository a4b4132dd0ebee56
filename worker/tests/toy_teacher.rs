//! The toy teacher end to end on a tiny setting: `train_teacher` writes a
//! diffusers folder that our loaders and diffusers/transformers load alike
//! (same outputs within 1e-4), and a resumed run is bit-identical to an
//! uninterrupted one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use swiftbrush_worker::models::clip::load_text_encoder;
use swiftbrush_worker::models::tokenizer::ClipTokenizer;
use swiftbrush_worker::pipeline::{DiffusersFolder, UNet};
use swiftbrush_worker::toy::eval::{SampleOptions, ToyModel, evaluate};
use swiftbrush_worker::toy::progress::ProgressMode;
use swiftbrush_worker::toy::vocab::ToyVocab;
use swiftbrush_worker::toy::{Caption, TeacherSettings, train_teacher};
use tch::{Device, Kind, Tensor};

fn tiny(steps: u64) -> TeacherSettings {
    TeacherSettings {
        steps,
        batch_size: 2,
        seed: 5,
        warmup_steps: 2,
        checkpoint_every: 2,
        ..TeacherSettings::default()
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("worker/ has a parent")
        .to_owned()
}

fn python() -> PathBuf {
    let p = std::env::var("SWIFTBRUSH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} missing: run `make venv` (or set SWIFTBRUSH_PYTHON)",
        p.display()
    );
    p
}

fn read(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

#[test]
fn teacher_folder_loads_here_and_in_diffusers_with_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("teacher");
    let outcome = train_teacher(&tiny(3), &out, false, Device::Cpu, ProgressMode::Quiet).unwrap();
    assert_eq!((outcome.start_step, outcome.steps), (0, 3));
    assert!(outcome.recent_loss.unwrap().is_finite());
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // Our loaders.
    let folder = DiffusersFolder::open(&out).unwrap();
    assert!(!folder.has("vae"));
    let unet = UNet::load(&folder, Device::Cpu).unwrap();
    let (_vs, text, cfg) = load_text_encoder(&out.join("text_encoder"), Device::Cpu).unwrap();
    let tokenizer = ClipTokenizer::from_dir(&out.join("tokenizer")).unwrap();
    let vocab = ToyVocab::toy();
    assert_eq!(cfg.vocab_size as usize, vocab.len());

    // Inputs, and our outputs on them.
    let g = |seed: i64, shape: &[i64]| {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    };
    let sample = g(1, &[2, 3, 32, 32]);
    let timestep = Tensor::from_slice(&[17i64, 940]);
    let ehs = g(2, &[2, 77, 64]);
    let prompts = [Caption::all()[7].text(), String::new()];
    let input_ids = tokenizer
        .encode_batch(&prompts, Device::Cpu)
        .unwrap()
        .input_ids;
    let ours_unet = tch::no_grad(|| unet.model.forward(&sample, &timestep, &ehs));
    let ours_text = tch::no_grad(|| text.forward(&input_ids));

    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("sample", sample),
            ("timestep", timestep),
            ("encoder_hidden_states", ehs),
            ("input_ids", input_ids),
        ],
        &inputs,
    )
    .unwrap();
    let outputs = dir.path().join("outputs.safetensors");
    let script = repo_root().join("tests/reference/toy_diffusers_check.py");
    let run = Command::new(python())
        .arg(&script)
        .arg(&out)
        .arg(&inputs)
        .arg(&outputs)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    let theirs = read(&outputs);
    common::assert_close("unet", &ours_unet, &theirs["unet_out"], 1e-4);
    common::assert_close("text encoder", &ours_text, &theirs["text_hidden"], 1e-4);
    // Embeddings differ between captions (the encoder is not degenerate).
    let d = common::max_abs_diff(&ours_text.get(0), &ours_text.get(1));
    assert!(d > 0.1, "{d}");

    // transformers' CLIPTokenizer gives our ids, which are the vocabulary's.
    let mut texts: Vec<String> = Caption::all().iter().map(Caption::text).collect();
    texts.push(String::new());
    let ids = &theirs["caption_ids"];
    for (i, text) in texts.iter().enumerate() {
        let want = vocab.expected_ids(text, 77).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(ids.get(i as i64)).unwrap(),
            want,
            "{text:?}"
        );
        assert_eq!(tokenizer.encode(text).unwrap(), want, "{text:?}");
    }
    // The scheduler is SD's (abar_999 = 0.004660).
    let abar = &theirs["alphas_cumprod"];
    assert!((abar.double_value(&[999]) - 0.004660).abs() < 1e-5);

    // The evaluator runs on the folder (an untrained teacher draws nothing
    // right; this checks the plumbing and the counts).
    let opts = SampleOptions {
        samples_per_caption: 1,
        num_inference_steps: 2,
        guidance_scale: 4.0,
        seed: 0,
    };
    let (_, report) = evaluate(&ToyModel::Teacher(out.clone()), &opts, Device::Cpu).unwrap();
    assert_eq!(report.num_images, 54);
    assert_eq!(report.per_caption.len(), 54);
}

#[test]
fn resumed_run_is_bitwise_equal_to_a_straight_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    train_teacher(&tiny(4), &a, false, Device::Cpu, ProgressMode::Quiet).unwrap();
    train_teacher(&tiny(2), &b, false, Device::Cpu, ProgressMode::Quiet).unwrap();

    // Without --resume a folder with checkpoints is refused.
    let e = train_teacher(&tiny(4), &b, false, Device::Cpu, ProgressMode::Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
    // Changed settings are refused on resume.
    let other = TeacherSettings {
        lr: 1e-4,
        ..tiny(4)
    };
    let e = train_teacher(&other, &b, true, Device::Cpu, ProgressMode::Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other settings"), "{e}");

    let halfway = read(&b.join("unet/diffusion_pytorch_model.safetensors"));
    let resumed = train_teacher(&tiny(4), &b, true, Device::Cpu, ProgressMode::Quiet).unwrap();
    assert_eq!(resumed.start_step, 2);

    let wa = read(&a.join("unet/diffusion_pytorch_model.safetensors"));
    let wb = read(&b.join("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(wa.len(), wb.len());
    let mut moved = false;
    for (name, ta) in &wa {
        assert!(ta.equal(&wb[name]), "{name} differs after resume");
        moved |= !ta.equal(&halfway[name]);
    }
    assert!(moved, "the resumed half changed nothing");
    // The raw (non-EMA) weights and Adam's state match too.
    let store =
        |p: &Path| swiftbrush_proto::run_store::RunStore::open(p.to_str().unwrap()).unwrap();
    for name in ["unet.safetensors", "adam.safetensors", "ema.safetensors"] {
        let x = store(&a).read_file(4, name).unwrap();
        let y = store(&b).read_file(4, name).unwrap();
        assert!(x == y, "checkpoint file {name} differs");
    }
}
