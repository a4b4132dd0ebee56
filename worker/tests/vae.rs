//! AutoencoderKL against diffusers: decode and encode on the tiny reference
//! pipelines (tests/reference/golden_vae.py), variable names against
//! diffusers' real SD VAE layout, legacy attention key names, config errors.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use common::{assert_close, fixtures, golden, max_abs_diff, pipeline};
use swiftbrush_worker::models::layers::without_init;
use swiftbrush_worker::models::vae::{
    AutoencoderKL, AutoencoderKLConfig, rename_deprecated_attention_keys,
};
use swiftbrush_worker::models::{ModelError, read_json_config, weights};
use tch::{Device, Tensor, nn::VarStore};

const TOLERANCE: f64 = 1e-4;

fn vae_dir(kind: &str) -> PathBuf {
    pipeline(kind).join("vae")
}

fn weights_file(kind: &str) -> PathBuf {
    vae_dir(kind).join("diffusion_pytorch_model.safetensors")
}

fn build(kind: &str) -> (VarStore, AutoencoderKL) {
    // Tiny tensors: libtorch's worker threads would only contend for the CPU.
    tch::set_num_threads(1);
    let cfg = AutoencoderKLConfig::from_file(&vae_dir(kind).join("config.json")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let vae = without_init(|| AutoencoderKL::new(vs.root(), &cfg)).unwrap();
    (vs, vae)
}

fn load_vae(kind: &str) -> (VarStore, AutoencoderKL) {
    let (mut vs, vae) = build(kind);
    weights::load_strict(&mut vs, &[weights_file(kind)]).unwrap();
    (vs, vae)
}

fn check(kind: &str, what: &str, actual: &Tensor, expected: &Tensor) {
    eprintln!(
        "{kind} {what}: max abs diff {:e}",
        max_abs_diff(actual, expected)
    );
    assert_close(&format!("{kind}: {what}"), actual, expected, TOLERANCE);
}

fn matches_diffusers(kind: &str) {
    let (_vs, vae) = load_vae(kind);
    assert_eq!(vae.scaling_factor(), 0.18215);
    let g = golden(&format!("golden/vae/{kind}.safetensors"));
    tch::no_grad(|| {
        check(
            kind,
            "decode",
            &vae.f_decode(&g["latents"]).unwrap(),
            &g["decoded"],
        );
        let posterior = vae.f_encode(&g["image"]).unwrap();
        check(kind, "encode mean", &posterior.mean, &g["mean"]);
        check(kind, "encode logvar", &posterior.logvar, &g["logvar"]);
    });
}

#[test]
fn malformed_inputs_are_errors_not_panics() {
    let (_vs, vae) = load_vae("sd1");
    let g = golden("golden/vae/sd1.safetensors");
    tch::no_grad(|| {
        assert!(vae.f_decode(&g["latents"].narrow(1, 0, 3)).is_err());
        assert!(vae.f_encode(&g["image"].narrow(1, 0, 2)).is_err());
    });
}

#[test]
fn sd1_one_layer_per_block_matches_diffusers() {
    matches_diffusers("sd1");
}

#[test]
fn sd2_two_layers_per_block_matches_diffusers() {
    matches_diffusers("sd2");
}

#[test]
fn sd2v_matches_diffusers() {
    matches_diffusers("sd2v");
}

fn shapes(vs: &VarStore) -> BTreeMap<String, Vec<i64>> {
    vs.variables()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect()
}

#[test]
fn variable_names_equal_fixture_keys() {
    let (vs, _vae) = build("sd2");
    let file: BTreeMap<String, Vec<i64>> = weights::read_safetensors(&weights_file("sd2"))
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect();
    assert_eq!(shapes(&vs), file);
}

#[test]
fn legacy_attention_names_load_after_renaming() {
    let (mut vs, _vae) = build("sd1");
    let legacy: HashMap<String, Tensor> = weights::read_safetensors(&weights_file("sd1"))
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let k = k
                .replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_k.", "attentions.0.key.")
                .replace("attentions.0.to_v.", "attentions.0.value.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
            (k, t)
        })
        .collect();
    assert!(legacy.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    let files = [weights_file("sd1")];
    let unconverted = legacy
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let strict = weights::load_tensors_strict(&mut vs, unconverted, &files);
    assert!(strict.is_err(), "old names must not load unconverted");
    weights::load_tensors_strict(&mut vs, rename_deprecated_attention_keys(legacy), &files)
        .unwrap();
}

#[test]
fn sd_vae_architecture_has_diffusers_names_and_counts() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/vae/sd_vae_keys.json")).unwrap(),
    )
    .unwrap();
    let config_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/models/configs/sd_vae.json");
    assert_eq!(
        reference["config_text"].as_str(),
        Some(std::fs::read_to_string(&config_path).unwrap().as_str()),
        "{} changed since the fixtures were built: run `make clean-fixtures fixtures`",
        config_path.display()
    );
    let cfg = AutoencoderKLConfig::from_file(&config_path).unwrap();
    assert_eq!(cfg, AutoencoderKLConfig::sd());

    let started = Instant::now();
    let vs = VarStore::new(Device::Cpu);
    let _vae = without_init(|| AutoencoderKL::new(vs.root(), &cfg)).unwrap();
    let elapsed = started.elapsed();
    let diffusers: BTreeMap<String, Vec<i64>> =
        serde_json::from_value(reference["tensors"].clone()).unwrap();
    let model = shapes(&vs);
    assert_eq!(model, diffusers);
    let num_params: i64 = model.values().map(|s| s.iter().product::<i64>()).sum();
    assert_eq!(num_params, 83_653_863);
    assert_eq!(reference["num_params"].as_i64(), Some(num_params));
    eprintln!(
        "sd vae: {} tensors, {num_params} parameters, built in {elapsed:?}",
        model.len()
    );
}

#[test]
fn unknown_block_type_is_a_config_error_naming_key_and_value() {
    let mut cfg: AutoencoderKLConfig =
        read_json_config(&vae_dir("sd1").join("config.json")).unwrap();
    cfg.up_block_types[1] = "AttnUpDecoderBlock2D".into();
    let vs = VarStore::new(Device::Cpu);
    match AutoencoderKL::new(vs.root(), &cfg) {
        Err(ModelError::Config { message, .. }) => assert!(
            message.contains("up_block_types[1]") && message.contains("AttnUpDecoderBlock2D"),
            "{message}"
        ),
        other => panic!("expected a config error, got {other:?}"),
    }
}
