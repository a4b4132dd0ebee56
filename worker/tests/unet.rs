//! UNet2DConditionModel against diffusers: outputs on the tiny reference
//! pipelines (tests/reference/golden_unet.py), variable names against the
//! fixture weights and against diffusers' real SD 1.5 / 2.1-base layouts,
//! autograd, and config errors.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use common::{assert_close, fixtures, golden, max_abs_diff, pipeline};
use swiftbrush_worker::models::layers::without_init;
use swiftbrush_worker::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use swiftbrush_worker::models::{ModelError, read_json_config, weights};
use tch::{Device, Kind, Tensor, nn::VarStore};

const TOLERANCE: f64 = 1e-4;

fn unet_dir(kind: &str) -> PathBuf {
    pipeline(kind).join("unet")
}

fn weights_file(kind: &str) -> PathBuf {
    unet_dir(kind).join("diffusion_pytorch_model.safetensors")
}

/// These tensors are tiny: libtorch's worker threads only contend for the
/// CPU (up to 10x slower when test processes run side by side).
fn single_threaded() {
    tch::set_num_threads(1);
}

/// The fixture UNet, built without initialisation and loaded strictly.
fn load_unet(kind: &str) -> (VarStore, UNet2DConditionModel) {
    single_threaded();
    let cfg: UNet2DConditionConfig = read_json_config(&unet_dir(kind).join("config.json")).unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    let unet = without_init(|| UNet2DConditionModel::new(vs.root(), &cfg)).unwrap();
    weights::load_strict(&mut vs, &[weights_file(kind)]).unwrap();
    (vs, unet)
}

fn matches_diffusers(kind: &str) {
    let (_vs, unet) = load_unet(kind);
    let g = golden(&format!("golden/unet/{kind}.safetensors"));
    let context = &g["encoder_hidden_states"];
    let cases = [
        // One timestep per sample: [999, 37].
        ("per-sample timesteps", "sample", "timesteps", "out"),
        (
            "0-d timestep",
            "sample",
            "scalar_timestep",
            "out_scalar_timestep",
        ),
        // 6x10 latents: not a multiple of the upsampling factor 4.
        ("odd size", "odd_sample", "odd_timesteps", "out_odd"),
    ];
    tch::no_grad(|| {
        for (what, sample, timesteps, expected) in cases {
            let out = unet.forward(&g[sample], &g[timesteps], context);
            let scale = f64::try_from(g[expected].abs().max()).unwrap();
            eprintln!(
                "{kind} {what}: max abs diff {:e} (outputs up to {scale:.2})",
                max_abs_diff(&out, &g[expected])
            );
            assert_close(&format!("{kind}: {what}"), &out, &g[expected], TOLERANCE);
        }
    });
}

#[test]
fn sd1_conv_projection_matches_diffusers() {
    matches_diffusers("sd1");
}

#[test]
fn sd2_linear_projection_head_list_matches_diffusers() {
    matches_diffusers("sd2");
}

#[test]
fn sd2v_matches_diffusers() {
    matches_diffusers("sd2v");
}

#[test]
fn per_sample_timesteps_equal_separate_runs() {
    let (_vs, unet) = load_unet("sd2");
    let g = golden("golden/unet/sd2.safetensors");
    let (sample, context) = (&g["sample"], &g["encoder_hidden_states"]);
    tch::no_grad(|| {
        let batched = unet.forward(sample, &g["timesteps"], context);
        for (i, t) in [999i64, 37].into_iter().enumerate() {
            let i = i as i64;
            let single = unet.forward(
                &sample.narrow(0, i, 1),
                &Tensor::from_slice(&[t]),
                &context.narrow(0, i, 1),
            );
            let d = max_abs_diff(&single, &batched.narrow(0, i, 1));
            assert!(d <= 1e-5, "sample {i}: batched differs from alone by {d:e}");
        }
    });
}

#[test]
fn variable_names_equal_fixture_keys() {
    for kind in ["sd1", "sd2"] {
        let (vs, _unet) = load_unet(kind);
        let file: BTreeMap<String, Vec<i64>> = weights::read_safetensors(&weights_file(kind))
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        let model = shapes(&vs);
        assert_eq!(model.len(), file.len(), "{kind}: tensor count");
        assert_eq!(model, file, "{kind}: names and shapes");
        assert_eq!(num_params(&model), num_params(&file));
    }
}

#[test]
fn forward_and_backward_under_autograd() {
    let (vs, unet) = load_unet("sd1");
    let g = golden("golden/unet/sd1.safetensors");
    let out = unet.forward(&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]);
    assert!(out.requires_grad());
    out.square().mean(Kind::Float).backward();
    let vars = vs.variables();
    for name in [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight",
        "up_blocks.2.attentions.2.transformer_blocks.0.attn1.to_out.0.bias",
        "conv_out.bias",
    ] {
        let grad = vars[name].grad();
        assert!(grad.defined(), "{name}: no gradient");
        let norm = f64::try_from(grad.norm()).unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
    let out =
        tch::no_grad(|| unet.forward(&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]));
    assert!(!out.requires_grad());
}

#[test]
fn malformed_inputs_are_errors_not_panics() {
    let (_vs, unet) = load_unet("sd1");
    let g = golden("golden/unet/sd1.safetensors");
    let (sample, t, ctx) = (&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]);
    tch::no_grad(|| {
        let good = unet.f_forward(sample, t, ctx).unwrap();
        assert!(good.equal(&unet.forward(sample, t, ctx)));
        let cases = [
            (
                "3-D sample",
                sample.get(0),
                t.shallow_clone(),
                ctx.shallow_clone(),
            ),
            (
                "channels",
                sample.narrow(1, 0, 3),
                t.shallow_clone(),
                ctx.shallow_clone(),
            ),
            (
                "context width",
                sample.shallow_clone(),
                t.shallow_clone(),
                ctx.narrow(2, 0, 5),
            ),
            (
                "timesteps",
                sample.shallow_clone(),
                Tensor::from_slice(&[1i64, 2, 3]),
                ctx.shallow_clone(),
            ),
        ];
        for (what, sample, t, ctx) in cases {
            let err = unet.f_forward(&sample, &t, &ctx).err();
            assert!(err.is_some(), "{what}: no error");
            let err = err.unwrap().to_string();
            eprintln!("{what}: {}", err.lines().next().unwrap_or_default());
        }
    });
}

fn shapes(vs: &VarStore) -> BTreeMap<String, Vec<i64>> {
    vs.variables()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect()
}

fn num_params(shapes: &BTreeMap<String, Vec<i64>>) -> i64 {
    shapes.values().map(|s| s.iter().product::<i64>()).sum()
}

/// Resident memory of this process, from /proc (Linux).
fn rss_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Builds a real-size UNet without writing its weights and compares its
/// variables with diffusers' state dict built on the meta device.
fn real_architecture(name: &str, config_file: &str, expected_params: i64) {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("golden/unet/{name}_keys.json"))).unwrap(),
    )
    .unwrap();
    let config_path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/models/configs")
        .join(config_file);
    let config_text = std::fs::read_to_string(&config_path).unwrap();
    assert_eq!(
        reference["config_text"].as_str(),
        Some(config_text.as_str()),
        "{} changed since the fixtures were built: run `make clean-fixtures fixtures`",
        config_path.display()
    );
    let cfg = UNet2DConditionConfig::from_file(&config_path).unwrap();

    let rss_before = rss_bytes();
    let started = Instant::now();
    let vs = VarStore::new(Device::Cpu);
    let unet = without_init(|| UNet2DConditionModel::new(vs.root(), &cfg)).unwrap();
    let elapsed = started.elapsed();
    let grown = rss_bytes().zip(rss_before).map(|(a, b)| a - b);

    let model = shapes(&vs);
    let diffusers: BTreeMap<String, Vec<i64>> =
        serde_json::from_value(reference["tensors"].clone()).unwrap();
    let missing: Vec<_> = diffusers
        .keys()
        .filter(|k| !model.contains_key(*k))
        .collect();
    let extra: Vec<_> = model
        .keys()
        .filter(|k| !diffusers.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(model, diffusers, "{name}: shapes");
    assert_eq!(
        num_params(&model),
        expected_params,
        "{name}: parameter count"
    );
    assert_eq!(reference["num_params"].as_i64(), Some(expected_params));
    assert!(vs.trainable_variables().iter().all(|t| t.requires_grad()));

    let model_bytes = expected_params * 4;
    eprintln!(
        "{name}: {} tensors, {expected_params} parameters ({} MiB fp32) built in {elapsed:?}, \
         resident memory grew by {:?} MiB",
        model.len(),
        model_bytes >> 20,
        grown.map(|g| g >> 20)
    );
    if let Some(grown) = grown {
        // Other tests of this binary may allocate at the same time: the
        // bound only proves the 3.4 GB of weights were never committed.
        assert!(
            grown < model_bytes / 8,
            "{name}: resident memory grew by {grown} bytes"
        );
    }
    drop(unet);
}

#[test]
fn sd15_architecture_has_diffusers_names_and_counts() {
    real_architecture("sd15", "sd15_unet.json", 859_520_964);
}

#[test]
fn sd21_base_architecture_has_diffusers_names_and_counts() {
    real_architecture("sd21_base", "sd21_base_unet.json", 865_910_724);
}

#[test]
fn presets_equal_the_config_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/models/configs");
    let sd15 = UNet2DConditionConfig::from_file(&dir.join("sd15_unet.json")).unwrap();
    assert_eq!(sd15, UNet2DConditionConfig::sd_v1_5());
    let sd21 = UNet2DConditionConfig::from_file(&dir.join("sd21_base_unet.json")).unwrap();
    assert_eq!(sd21, UNet2DConditionConfig::sd_v2_1_base());
}

#[test]
fn unknown_block_type_is_a_config_error_naming_key_and_value() {
    let text = std::fs::read_to_string(unet_dir("sd1").join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["down_block_types"][1] = "FancyDownBlock2D".into();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, json.to_string()).unwrap();

    // The schema accepts any block name; building refuses it.
    let cfg: UNet2DConditionConfig = read_json_config(&path).unwrap();
    let vs = VarStore::new(Device::Cpu);
    match UNet2DConditionModel::new(vs.root(), &cfg) {
        Err(ModelError::Config { message, .. }) => {
            assert!(
                message.contains("down_block_types[1]") && message.contains("FancyDownBlock2D"),
                "{message}"
            );
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    assert!(
        vs.variables().is_empty(),
        "nothing is built from a bad config"
    );

    let err = UNet2DConditionConfig::from_file(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("FancyDownBlock2D"),
        "{err}"
    );
}

#[test]
fn runs_in_bfloat16_close_to_float32() {
    let (mut vs, unet) = load_unet("sd2");
    vs.bfloat16();
    let g = golden("golden/unet/sd2.safetensors");
    let bf16 = |t: &Tensor| t.to_kind(Kind::BFloat16);
    let out = tch::no_grad(|| {
        unet.forward(
            &bf16(&g["sample"]),
            &g["timesteps"],
            &bf16(&g["encoder_hidden_states"]),
        )
    });
    assert_eq!(out.kind(), Kind::BFloat16);
    let d = max_abs_diff(&out, &g["out"]);
    eprintln!("sd2 bfloat16: max abs diff {d:e} from float32 diffusers");
    assert!(d < 0.1, "bfloat16 output differs by {d}");
}

#[test]
fn default_initialisation_gives_a_usable_model() {
    let cfg: UNet2DConditionConfig =
        read_json_config(&unet_dir("sd1").join("config.json")).unwrap();
    single_threaded();
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &cfg).unwrap();
    let vars = vs.variables();
    let ones = &vars["down_blocks.0.resnets.0.norm1.weight"];
    assert_eq!(f64::try_from(ones.min()).unwrap(), 1.0);
    let g = golden("golden/unet/sd1.safetensors");
    let out =
        tch::no_grad(|| unet.forward(&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]));
    let max = f64::try_from(out.abs().max()).unwrap();
    assert!(max.is_finite() && max > 0.0, "output magnitude {max}");
}
