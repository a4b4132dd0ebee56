//! The committed toy teacher (assets/toy-teacher, what `make demo` uses) is
//! this code's teacher: every file but the UNet weights is byte-for-byte
//! what `swiftbrush toy teacher` writes with the default settings (the
//! frozen text encoder is a function of the seed), and the UNet weights
//! have exactly the names and shapes of `toy_unet_config()`. Its quality is
//! a benchmark (`swiftbrush toy eval`), recorded in docs/TOYWORLD.md ("Runs").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use swiftbrush_worker::toy::progress::ProgressMode;
use swiftbrush_worker::toy::teacher::{TeacherSettings, train_teacher};
use tch::{Device, Tensor};

fn asset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/toy-teacher")
}

fn shapes(path: &Path) -> BTreeMap<String, Vec<i64>> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .map(|(name, t)| (name, t.size()))
        .collect()
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn committed_teacher_is_what_toy_teacher_writes() {
    let committed = asset();
    assert!(
        committed.join("model_index.json").is_file(),
        "{} is missing: `make demo` copies it",
        committed.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("teacher");
    // One step of the default run: the same folder layout, configs,
    // tokenizer and (seeded, frozen) text encoder as the full run's.
    let settings = TeacherSettings {
        steps: 1,
        batch_size: 2,
        ..TeacherSettings::default()
    };
    train_teacher(&settings, &fresh, false, Device::Cpu, ProgressMode::Quiet).unwrap();

    for file in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
    ] {
        assert!(
            bytes(&committed.join(file)) == bytes(&fresh.join(file)),
            "{file} of the committed teacher differs from what `toy teacher` writes"
        );
    }
    let weights = "unet/diffusion_pytorch_model.safetensors";
    assert_eq!(
        shapes(&committed.join(weights)),
        shapes(&fresh.join(weights))
    );
    assert!(
        !committed.join("checkpoints").exists(),
        "commit the pipeline, not the training checkpoints"
    );
}
