//! The assembled teacher pipeline against diffusers' StableDiffusionPipeline
//! (tests/reference/golden_sample.py: DDIM, 4 steps, guidance 4.5, given
//! latents), and what the pipeline promises around it: no guidance at
//! scale <= 1, batching that does not change images, the null condition,
//! pixel-space folders, components that do not fit, the fingerprint.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, fixtures, golden, max_abs_diff, pipeline};
use swiftbrush_worker::diffusion::draw_latents;
use swiftbrush_worker::pipeline::{StableDiffusion, teacher_fingerprint};
use tch::{Device, Kind, Tensor};

const STEPS: i64 = 4;
const GUIDANCE: f64 = 4.5;

fn load(dir: &Path) -> StableDiffusion {
    // Tiny tensors: libtorch's worker threads would only contend for the CPU.
    tch::set_num_threads(1);
    StableDiffusion::load(dir, Device::Cpu, Kind::Float).unwrap()
}

fn prompts(kind: &str) -> Vec<String> {
    let path = fixtures().join(format!("golden/sample/{kind}/prompts.txt"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn latents(kind: &str) -> Tensor {
    golden(&format!("golden/sample/{kind}/latents.safetensors"))
        .remove("latents")
        .unwrap()
}

fn matches_diffusers(kind: &str) {
    let pipe = load(&pipeline(kind));
    let expected = &golden(&format!("golden/sample/{kind}/images.safetensors"))["images"];
    let images = pipe
        .sample_ddim(&prompts(kind), &latents(kind), STEPS, GUIDANCE)
        .unwrap();
    assert_eq!(images.size(), [2, 3, 16, 16]);
    assert_eq!(images.kind(), Kind::Float);
    eprintln!("{kind}: max abs diff {:e}", max_abs_diff(&images, expected));
    assert_close(kind, &images, expected, 1e-3);
}

#[test]
fn sd1_images_match_diffusers() {
    matches_diffusers("sd1");
}

#[test]
fn sd2_images_match_diffusers() {
    matches_diffusers("sd2");
}

#[test]
fn sd2v_v_prediction_images_match_diffusers() {
    matches_diffusers("sd2v");
}

#[test]
fn guidance_at_most_one_is_off_and_batching_changes_nothing() {
    let pipe = load(&pipeline("sd1"));
    let (p, z) = (prompts("sd1"), latents("sd1"));
    // diffusers runs a single unguided batch for any scale <= 1.
    let one = pipe.sample_ddim(&p, &z, STEPS, 1.0).unwrap();
    let half = pipe.sample_ddim(&p, &z, STEPS, 0.5).unwrap();
    assert!(one.equal(&half), "scales 1.0 and 0.5 must both be unguided");
    let guided = pipe.sample_ddim(&p, &z, STEPS, GUIDANCE).unwrap();
    assert!(max_abs_diff(&one, &guided) > 1e-3);
    // Prompt by prompt equals the batch of two.
    let first = pipe
        .sample_ddim(&p[..1], &z.narrow(0, 0, 1), STEPS, GUIDANCE)
        .unwrap();
    assert_close("batch of one", &first, &guided.narrow(0, 0, 1), 1e-5);
}

#[test]
fn null_condition_is_the_empty_prompt() {
    let pipe = load(&pipeline("sd2"));
    let e = pipe.encode_with_null(&["a cat", "a dog"]).unwrap();
    let empty = pipe.encode_prompts(&[""]).unwrap();
    assert_eq!(e.cond.size(), [2, 77, 48]);
    assert_eq!(e.uncond.size(), [2, 77, 48]);
    assert_close("uncond", &e.uncond.get(1), &empty.get(0), 1e-6);
    assert_close(
        "cond",
        &e.cond,
        &pipe.encode_prompts(&["a cat", "a dog"]).unwrap(),
        1e-6,
    );
}

#[test]
fn sizes_come_from_the_unet_and_vae_configs() {
    let pipe = load(&pipeline("sd1"));
    assert_eq!(pipe.vae_scale_factor(), 2);
    assert_eq!(pipe.default_size(), Some((16, 16)));
    assert_eq!(pipe.latent_shape(3, 24, 32).unwrap(), [3, 4, 12, 16]);
    let e = pipe.latent_shape(1, 15, 16).unwrap_err().to_string();
    assert!(e.contains("multiples of 2"), "{e}");
    let bad = Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu));
    let e = pipe
        .sample_ddim(&["x"], &bad, STEPS, GUIDANCE)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[1, 4, h, w]") && e.contains("[1, 3, 8, 8]"),
        "{e}"
    );
}

#[test]
fn bfloat16_pipeline_runs_with_the_vae_in_float32() {
    tch::set_num_threads(1);
    let pipe = StableDiffusion::load(&pipeline("sd1"), Device::Cpu, Kind::BFloat16).unwrap();
    let vae = pipe.vae.as_ref().unwrap();
    assert_eq!(
        vae.kind(),
        Kind::Float,
        "force_upcast keeps the VAE in fp32"
    );
    let images = pipe
        .sample_ddim(&prompts("sd1"), &latents("sd1"), STEPS, GUIDANCE)
        .unwrap();
    let expected = &golden("golden/sample/sd1/images.safetensors")["images"];
    let d = max_abs_diff(&images, expected);
    eprintln!("sd1 bf16: max abs diff {d:e}");
    assert!(d < 0.1, "bf16 images far from fp32 ones: {d}");
}

/// Copies a directory tree (the fixture pipelines are a few hundred KB).
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

fn edit_index(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("model_index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(index.as_object_mut().unwrap());
    std::fs::write(&path, index.to_string()).unwrap();
}

#[test]
fn a_pipeline_without_vae_decodes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("pixels");
    copy_tree(&pipeline("sd1"), &dir);
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    edit_index(&dir, |index| {
        index.remove("vae");
    });
    let pipe = load(&dir);
    assert!(pipe.vae.is_none());
    assert_eq!(pipe.vae_scale_factor(), 1);
    assert_eq!(pipe.default_size(), Some((8, 8)));
    // Not randn: the seeded-noise test below owns the global generator.
    let z = Tensor::linspace(-3.0, 3.0, 2 * 4 * 8 * 8, (Kind::Float, Device::Cpu))
        .reshape([2, 4, 8, 8]);
    let decoded = pipe.decode(&z).unwrap();
    assert_close("pixels", &decoded, &(z / 2.0 + 0.5).clamp(0.0, 1.0), 0.0);
    let images = pipe
        .sample_ddim(&prompts("sd1"), &latents("sd1"), 2, GUIDANCE)
        .unwrap();
    assert_eq!(images.size(), [2, 4, 8, 8]);
}

#[test]
fn components_that_do_not_fit_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mixed");
    copy_tree(&pipeline("sd2"), &dir);
    // sd1's text encoder is 32 wide; sd2's UNet attends to 48.
    std::fs::remove_dir_all(dir.join("text_encoder")).unwrap();
    copy_tree(
        &pipeline("sd1").join("text_encoder"),
        &dir.join("text_encoder"),
    );
    tch::set_num_threads(1);
    let err = StableDiffusion::load(&dir, Device::Cpu, Kind::Float)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("hidden_size is 32") && err.contains("cross_attention_dim is [48]"),
        "{err}"
    );
}

#[test]
fn fingerprint_is_stable_and_tells_teachers_apart() {
    let sd1 = teacher_fingerprint(&pipeline("sd1")).unwrap();
    assert_eq!(sd1.len(), 64);
    assert_eq!(load(&pipeline("sd1")).fingerprint().unwrap(), sd1);
    assert_eq!(teacher_fingerprint(&pipeline("sd1")).unwrap(), sd1);
    let sd2 = teacher_fingerprint(&pipeline("sd2")).unwrap();
    let sd2v = teacher_fingerprint(&pipeline("sd2v")).unwrap();
    assert!(sd1 != sd2 && sd2 != sd2v && sd1 != sd2v);
    // The folder may move.
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&pipeline("sd1"), &tmp.path().join("elsewhere"));
    assert_eq!(
        teacher_fingerprint(&tmp.path().join("elsewhere")).unwrap(),
        sd1
    );
}

#[test]
fn seeded_noise_equals_torch_manual_seed() {
    // torch.manual_seed(3); torch.randn((2, 4, 8, 8)), which is also what
    // diffusers draws with generator=torch.Generator("cpu").manual_seed(3).
    // The only test in this binary that uses the global generator.
    let z = draw_latents(3, &[2, 4, 8, 8]).unwrap().flatten(0, -1);
    let n = z.size()[0];
    let got: Vec<f64> = [0, 1, 2, 3, n - 2, n - 1]
        .iter()
        .map(|&i| z.double_value(&[i]))
        .collect();
    let torch = [
        -0.07664429396390915,
        0.35988152027130127,
        -0.7820168137550354,
        0.07152773439884186,
        0.5046390295028687,
        -0.42529651522636414,
    ];
    for (g, t) in got.iter().zip(torch) {
        assert!((g - t).abs() < 1e-7, "{got:?} vs {torch:?}");
    }
    assert!((z.sum(Kind::Double).double_value(&[]) - 9.226503372192383).abs() < 1e-4);
}
