//! `method.student.kind: lora` through the binary, on the tiny SD1-style
//! fixture: train, resume bit for bit (student and EMA adapters, fake
//! score, optimizer states), the sample step's picture equal to `sample
//! --student` of the same checkpoint, the checkpoint's adapters under PEFT
//! names, and `export` refusing to write a UNet of adapters.

mod common;

use std::path::Path;
use std::process::{Command, Output};

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml");

fn swiftbrush(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swiftbrush"))
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("spawn swiftbrush")
}

fn ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// configs/tiny.yaml with a LoRA student (attention and convolution
/// targets) and the sample step every 2 steps.
fn lora_config(dir: &Path) -> String {
    student_config(
        dir,
        "lora.yaml",
        "    kind: lora\n    lora:\n      rank: 4\n      alpha: 4\n      \
         target_modules: [to_q, to_v, conv1]\n",
    )
}

/// configs/tiny.yaml with the sample step on and `method.student` keys
/// `student` (besides lr) in file `name`.
fn student_config(dir: &Path, name: &str, student: &str) -> String {
    let tiny = std::fs::read_to_string(CONFIG).unwrap();
    let with = tiny
        .replacen(
            "method:\n",
            &format!("method:\n  student:\n    lr: 0.001\n{student}"),
            1,
        )
        .replacen(
            "train:\n",
            "train:\n  sample_every_steps: 2\n  sample_prompts: [\"a red circle\", \"a cat\"]\n",
            1,
        );
    assert!(with.contains("lr: 0.001") && with.contains("sample_every_steps"));
    let path = dir.join(name);
    std::fs::write(&path, with).unwrap();
    path.display().to_string()
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

#[test]
fn a_lora_student_trains_resumes_bit_for_bit_samples_and_refuses_a_unet_export() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("captions.txt"), "a red circle\na photo of a cat\n").unwrap();
    let config = lora_config(d);
    let teacher = common::fixtures()
        .join("pipelines/sd1")
        .display()
        .to_string();
    let train = |run: &str, steps: &str| {
        swiftbrush(
            d,
            &[
                "train",
                "--config",
                &config,
                "--teacher",
                &teacher,
                "--captions",
                "captions.txt",
                "--run-dir",
                run,
                "--max-steps",
                steps,
            ],
        )
    };
    ok("train straight", &train("straight", "4"));
    ok("train to 2", &train("resumed", "2"));
    ok("resume to 4", &train("resumed", "4"));
    for name in [
        "student.safetensors",
        "ema.safetensors",
        "lora.safetensors",
        "optimizer_student.safetensors",
        "optimizer_lora.safetensors",
    ] {
        assert!(
            checkpoint_file(&d.join("straight"), 4, name)
                == checkpoint_file(&d.join("resumed"), 4, name),
            "{name} differs between the straight and the resumed run"
        );
    }
    // The checkpoint's adapters: PEFT names without prefix, float32.
    let student = checkpoint_file(&d.join("resumed"), 4, "student.safetensors");
    let n = u64::from_le_bytes(student[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&student[8..8 + n]).into_owned();
    assert!(
        header.contains("\"down_blocks.0.resnets.0.conv1.lora_A.weight\"")
            && header.contains(
                "\"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight\""
            )
            && header.contains("\"F32\"")
            && !header.contains("\"conv_in.weight\""),
        "student.safetensors holds no adapters by PEFT name: {header}"
    );

    // sample --student: the teacher's base with the EMA adapters draws the
    // training's own picture of that step.
    std::fs::write(d.join("prompts.txt"), "a red circle\na cat\n").unwrap();
    let sampled = swiftbrush(
        d,
        &[
            "sample",
            "--student",
            "resumed/checkpoints/step-00000004",
            "--prompts",
            "prompts.txt",
            "--seed",
            "0",
            "--batch-size",
            "8",
            "--height",
            "16",
            "--width",
            "16",
            "--out",
            "s4.png",
        ],
    );
    ok("sample --student", &sampled);
    assert!(
        std::fs::read(d.join("s4.png")).unwrap()
            == std::fs::read(d.join("resumed/samples/step-00000004.png")).unwrap(),
        "sample --student differs from the training's picture of step 4"
    );

    let export = swiftbrush(d, &["export", "--student", "resumed", "--out", "exported"]);
    assert!(
        !export.status.success(),
        "a LoRA student exported as a UNet"
    );
    let err = String::from_utf8_lossy(&export.stderr);
    assert!(
        err.contains("a LoRA student exports as adapters (--lora) or merged (--merge)"),
        "{err}"
    );
    assert!(
        !d.join("exported/diffusion_pytorch_model.safetensors")
            .exists()
    );
    // Its adapters are a LoRA already: nothing to extract.
    let extract = swiftbrush(
        d,
        &[
            "export",
            "--student",
            "resumed",
            "--out",
            "extracted",
            "--extract-lora",
            "4",
        ],
    );
    let err = String::from_utf8_lossy(&extract.stderr);
    assert!(
        !extract.status.success() && err.contains("it is a LoRA already"),
        "{err}"
    );
    assert!(!d.join("extracted").exists());
}

/// `swiftbrush plan` counts a LoRA student as its adapters with their
/// gradients, Adam moments and EMA: no student UNet, so the resident bytes
/// fall by five float32 UNets less five adapter sets.
#[test]
fn plan_counts_a_lora_student_as_adapters_on_the_shared_base() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lora = lora_config(d);
    let teacher = common::fixtures()
        .join("pipelines/sd1")
        .display()
        .to_string();
    let plan = |config: &str| -> serde_json::Value {
        let out = swiftbrush(
            d,
            &[
                "plan",
                "--config",
                config,
                "--teacher",
                &teacher,
                "--no-probe",
                "--json",
            ],
        );
        ok("plan", &out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let full = plan(&student_config(d, "full.yaml", ""));
    let lora = plan(&lora);
    let bytes = |p: &serde_json::Value, name: &str| -> Option<u64> {
        p["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .map(|x| x["bytes"].as_u64().unwrap())
    };
    let unet = bytes(&full, "teacher UNet").unwrap();
    assert_eq!(
        bytes(&lora, "teacher UNet"),
        Some(unet),
        "one base, as the teacher's"
    );
    assert_eq!(bytes(&full, "student"), Some(unet));
    assert_eq!(
        bytes(&lora, "student"),
        None,
        "a LoRA student has no UNet of its own"
    );
    let adapters = bytes(&lora, "student LoRA adapters").unwrap();
    assert!(adapters > 0 && adapters < unet / 4, "{adapters} of {unet}");
    let resident = |p: &serde_json::Value| p["resident"].as_u64().unwrap();
    assert_eq!(resident(&full) - resident(&lora), 5 * unet - 5 * adapters);
}
