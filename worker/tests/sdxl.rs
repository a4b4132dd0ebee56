//! The SDXL teacher against diffusers' StableDiffusionXLPipeline on the
//! tiny SDXL fixture (tests/reference/pipelines_xl.py, golden_sample_xl.py):
//! the parts (both encoders' penultimate states concatenated, the pooled
//! projection, the zero null condition, add_time_ids, one UNet pass with
//! the added conditions) and whole sampling with DDIM and with the folder's
//! EulerDiscreteScheduler, 4 steps, guidance 4.5, given latents.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, fixtures, golden, max_abs_diff, pipeline};
use swiftbrush_worker::models::text_time_embedding::AddedConditions;
use swiftbrush_worker::pipeline::StableDiffusionXL;
use tch::{Device, Kind};

const STEPS: i64 = 4;
const GUIDANCE: f64 = 4.5;

fn load(dir: &Path) -> StableDiffusionXL {
    tch::set_num_threads(1);
    StableDiffusionXL::load(dir, Device::Cpu, Kind::Float).unwrap()
}

fn prompts() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("golden/sample_xl/prompts.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A copy of the fixture whose scheduler is `golden/sample_xl/scheduler_NAME`
/// (components linked, model_index.json naming the scheduler's class).
fn with_scheduler(name: &str, dir: &Path) -> PathBuf {
    let src = pipeline("sdxl");
    let out = dir.join("sdxl");
    std::fs::create_dir_all(out.join("scheduler")).unwrap();
    for c in [
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ] {
        std::os::unix::fs::symlink(src.join(c), out.join(c)).unwrap();
    }
    let config = fixtures().join(format!(
        "golden/sample_xl/scheduler_{name}/scheduler_config.json"
    ));
    let text = std::fs::read_to_string(&config).unwrap();
    let class: serde_json::Value = serde_json::from_str(&text).unwrap();
    std::fs::write(out.join("scheduler/scheduler_config.json"), &text).unwrap();
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
            .unwrap();
    index["scheduler"] = serde_json::json!(["diffusers", class["_class_name"]]);
    std::fs::write(out.join("model_index.json"), index.to_string()).unwrap();
    out
}

#[test]
fn sdxl_parts_match_diffusers() {
    let pipe = load(&pipeline("sdxl"));
    let g = golden("golden/sample_xl/parts.safetensors");
    let cond = pipe.encode_prompts(&prompts()).unwrap();
    assert_close("prompt_embeds", &cond.hidden, &g["prompt_embeds"], 1e-5);
    assert_close("pooled", &cond.pooled, &g["pooled_prompt_embeds"], 1e-5);
    let null = pipe.null_condition(&cond).unwrap();
    assert!(pipe.text.force_zeros_for_empty_prompt);
    assert_eq!(null.hidden, g["negative_prompt_embeds"]);
    assert_eq!(null.pooled, g["negative_pooled_prompt_embeds"]);
    let ids = pipe.add_time_ids(1, 16, 16).unwrap();
    assert_eq!(ids, g["add_time_ids"]);
    let added = AddedConditions {
        text_embeds: cond.pooled.shallow_clone(),
        time_ids: pipe.add_time_ids(2, 16, 16).unwrap(),
    };
    let out = pipe
        .unet
        .model
        .f_forward_added(&g["unet_x"], &g["unet_t"], &cond.hidden, Some(&added))
        .unwrap();
    eprintln!(
        "unet: max abs diff {:e}",
        max_abs_diff(&out, &g["unet_out"])
    );
    assert_close("unet", &out, &g["unet_out"], 1e-4);
    // Without the added conditions an SDXL UNet refuses to run.
    let err = pipe
        .unet
        .model
        .f_forward(&g["unet_x"], &g["unet_t"], &cond.hidden)
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_time"), "{err}");
}

fn images_match(name: &str, dir: &Path) {
    let pipe = load(dir);
    let latents = golden("golden/sample_xl/latents.safetensors")
        .remove("latents")
        .unwrap();
    let expected = &golden(&format!("golden/sample_xl/images_{name}.safetensors"))["images"];
    let images = pipe.sample(&prompts(), &latents, STEPS, GUIDANCE).unwrap();
    assert_eq!(images.size(), [2, 3, 16, 16]);
    eprintln!("{name}: max abs diff {:e}", max_abs_diff(&images, expected));
    assert_close(name, &images, expected, 1e-3);
}

#[test]
fn sdxl_ddim_images_match_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    images_match("ddim", &with_scheduler("ddim", tmp.path()));
}

#[test]
fn sdxl_euler_images_match_diffusers() {
    images_match("euler", &pipeline("sdxl"));
}

#[test]
fn sdxl_refuses_an_unsupported_scheduler_naming_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_scheduler("euler", tmp.path());
    let index = dir.join("model_index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace("EulerDiscreteScheduler", "PNDMScheduler");
    std::fs::write(&index, text).unwrap();
    let err = StableDiffusionXL::load(&dir, Device::Cpu, Kind::Float)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("PNDMScheduler") && err.contains("EulerDiscreteScheduler, DDIMScheduler"),
        "{err}"
    );
}

/// The teacher fingerprint covers both encoders and both tokenizers: a
/// changed value in text_encoder_2's weights or a changed tokenizer_2 file
/// makes another teacher.
#[test]
fn sdxl_fingerprint_covers_the_second_encoder_and_tokenizer() {
    use swiftbrush_worker::pipeline::teacher_fingerprint;
    let src = pipeline("sdxl");
    let tmp = tempfile::tempdir().unwrap();
    let copy = |to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        std::fs::copy(src.join("model_index.json"), to.join("model_index.json")).unwrap();
        for c in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            std::os::unix::fs::symlink(src.join(c), to.join(c)).unwrap();
        }
        for c in ["text_encoder_2", "tokenizer_2"] {
            std::fs::create_dir_all(to.join(c)).unwrap();
            for f in std::fs::read_dir(src.join(c)).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, to.join(c).join(f.file_name().unwrap())).unwrap();
            }
        }
    };
    let original = teacher_fingerprint(&src).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    copy(&a);
    copy(&b);
    assert_eq!(teacher_fingerprint(&a).unwrap(), original);
    let weights = a.join("text_encoder_2/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&weights, bytes).unwrap();
    assert_ne!(teacher_fingerprint(&a).unwrap(), original);
    let config = b.join("tokenizer_2/special_tokens_map.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"!\"", "\"<|endoftext|>\"");
    std::fs::write(&config, text).unwrap();
    assert_ne!(teacher_fingerprint(&b).unwrap(), original);
}
