//! CLIP text encoder against transformers (golden_clip.py), and the whole
//! CLIPModel with its image processor, what CLIP score uses
//! (golden_clip_score.py).

mod common;

use std::collections::BTreeMap;

use serde::Deserialize;
use swiftbrush_worker::eval::clip_model::CLIPModel;
use swiftbrush_worker::eval::{ClipImageProcessor, ClipScorer};
use swiftbrush_worker::models::clip::{
    CLIPTextConfig, CLIPTextModel, count_params, load_text_encoder, load_text_encoder_weights,
};
use swiftbrush_worker::models::tokenizer::ClipTokenizer;
use tch::{Device, Kind, Tensor, nn};

fn score_prompts() -> Vec<String> {
    let path = common::fixtures().join("golden/clip_score/prompts.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The golden pictures, uint8 [N,H,W,3], as [N,3,H,W] floats in [0,1].
fn pictures(g: &std::collections::HashMap<String, Tensor>) -> Tensor {
    g["images"].permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0
}

#[test]
fn clip_model_embeddings_match_transformers() {
    tch::set_num_threads(1);
    let dir = common::fixtures().join("clip_model");
    let (_vs, model) = CLIPModel::load(&dir, Device::Cpu).unwrap();
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    for case in ["up", "down"] {
        let g = common::golden(&format!("golden/clip_score/{case}.safetensors"));
        let ids = tok
            .encode_batch(&score_prompts(), Device::Cpu)
            .unwrap()
            .input_ids;
        assert!(ids.equal(&g["input_ids"]), "{case}: token ids differ");
        let text = model.text_embeds(&ids).unwrap();
        common::assert_close(
            &format!("{case} text embeds"),
            &text,
            &g["text_embeds"],
            1e-5,
        );
        let image = model.image_embeds(&g["pixel_values"]).unwrap();
        common::assert_close(
            &format!("{case} image embeds"),
            &image,
            &g["image_embeds"],
            1e-5,
        );
    }
}

/// CLIPImageProcessor (PIL's bicubic on 8-bit pixels) up- and downsampling:
/// PIL's fixed-point arithmetic leaves a few pixels a level or two apart
/// (0.5 % of them in these pictures), and the scores agree within 1e-3.
#[test]
fn clip_scores_match_transformers_from_the_pictures() {
    tch::set_num_threads(1);
    let dir = common::fixtures().join("clip_model");
    let processor = ClipImageProcessor::from_file(&dir.join("preprocessor_config.json")).unwrap();
    assert_eq!(processor.size.shortest_edge, 30);
    let scorer = ClipScorer::load(&dir, Device::Cpu).unwrap();
    for case in ["up", "down"] {
        let g = common::golden(&format!("golden/clip_score/{case}.safetensors"));
        let pixels = processor.pixel_values(&pictures(&g)).unwrap();
        // One 8-bit level, in normalised units: 1 / 255 / the smallest std.
        let level = 1.0 / 255.0 / 0.2613;
        let d = common::max_abs_diff(&pixels, &g["pixel_values"]);
        assert!(
            d <= 2.01 * level,
            "{case}: pixel values differ by {d} (a level is {level})"
        );
        let mean = (&pixels - &g["pixel_values"])
            .abs()
            .mean(Kind::Double)
            .double_value(&[]);
        assert!(mean <= 0.05 * level, "{case}: mean pixel difference {mean}");
        let scores = scorer.scores(&pictures(&g), &score_prompts()).unwrap();
        common::assert_close(&format!("{case} scores"), &scores, &g["scores"], 1e-3);
    }
    // A folder without a CLIP model names what is missing.
    let err = ClipScorer::load(&common::pipeline("sd1"), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") || err.contains("model.safetensors"),
        "{err}"
    );
}

fn prompts() -> Vec<String> {
    let path = common::fixtures().join("golden/clip/prompts.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn last_hidden_state_matches_transformers() {
    for kind in ["sd1", "sd2", "sd2v"] {
        let dir = common::pipeline(kind);
        let golden = common::golden(&format!("golden/clip/{kind}.safetensors"));
        let tok = ClipTokenizer::from_dir(&dir.join("tokenizer")).unwrap();
        let batch = tok.encode_batch(&prompts(), Device::Cpu).unwrap();
        assert!(
            batch.input_ids.equal(&golden["input_ids"]),
            "{kind}: token ids differ from diffusers'"
        );
        assert_eq!(batch.num_truncated(), 1, "{kind}");

        let (_vs, model, _cfg) = load_text_encoder(&dir.join("text_encoder"), Device::Cpu).unwrap();
        let hidden = tch::no_grad(|| model.forward(&golden["input_ids"]));
        common::assert_close(kind, &hidden, &golden["last_hidden_state"], 1e-5);
    }
}

#[test]
fn legacy_prefixed_layout_with_position_ids_loads_to_the_same_model() {
    let dir = common::pipeline("sd1").join("text_encoder");
    let cfg = CLIPTextConfig::from_file(&dir.join("config.json")).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = CLIPTextModel::new(vs.root(), &cfg).unwrap();
    let legacy = common::fixtures().join("golden/clip/sd1_legacy/model.safetensors");
    load_text_encoder_weights(&mut vs, &[legacy]).unwrap();
    let golden = common::golden("golden/clip/sd1.safetensors");
    let hidden = tch::no_grad(|| model.forward(&golden["input_ids"]));
    common::assert_close("sd1 legacy", &hidden, &golden["last_hidden_state"], 1e-5);
}

#[test]
fn weights_of_another_architecture_are_refused_with_every_name() {
    let cfg = CLIPTextConfig::from_file(&common::pipeline("sd1").join("text_encoder/config.json"))
        .unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _model = CLIPTextModel::new(vs.root(), &cfg).unwrap();
    let sd2 = common::pipeline("sd2").join("text_encoder/model.safetensors");
    let err = load_text_encoder_weights(&mut vs, &[sd2])
        .unwrap_err()
        .to_string();
    assert!(err.contains("wrong shapes"), "{err}");
    assert!(
        err.contains("text_model.final_layer_norm.weight: model expects [32], file has [48]"),
        "{err}"
    );
}

#[test]
fn an_unknown_activation_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"hidden_act": "swish", "hidden_size": 64}"#).unwrap();
    let err = CLIPTextConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("hidden_act") && err.contains("swish"),
        "{err}"
    );
}

#[derive(Deserialize)]
struct ParamLayout {
    config_text: String,
    num_params: i64,
    unprefixed: BTreeMap<String, Vec<i64>>,
    prefixed: BTreeMap<String, Vec<i64>>,
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The real SD 1.5 / SD 2.1-base encoders, built without weights: the
/// parameter count, every name and shape as transformers has them, and
/// (variables being uninitialised) next to no resident memory.
#[test]
fn real_architectures_have_transformers_names_and_sizes() {
    let cases = [
        ("sd15", CLIPTextConfig::sd_v1_5(), 123_060_480i64),
        ("sd21", CLIPTextConfig::sd_v2_1_base(), 340_387_840i64),
    ];
    let shipped = [
        include_str!("../src/models/configs/sd15_text_encoder.json"),
        include_str!("../src/models/configs/sd21_text_encoder.json"),
    ];
    for ((name, cfg, want), shipped) in cases.into_iter().zip(shipped) {
        let path = common::fixtures().join(format!("golden/clip/params_{name}.json"));
        let layout: ParamLayout =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            layout.config_text, shipped,
            "{name}: fixtures were built from another config file; rebuild them \
             (rm -rf target/fixtures && make fixtures)"
        );
        assert_eq!(layout.num_params, want, "{name}: transformers' count");
        assert_eq!(cfg.num_params(), want, "{name}: CLIPTextConfig::num_params");

        let before = resident_bytes();
        let started = std::time::Instant::now();
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = CLIPTextModel::new(vs.root(), &cfg).unwrap();
        let grown = resident_bytes().saturating_sub(before);
        eprintln!(
            "{name}: built {want} parameters in {:?}, resident memory +{} KiB",
            started.elapsed(),
            grown >> 10
        );
        assert_eq!(count_params(&vs), want, "{name}");
        assert!(
            grown < 64 << 20,
            "{name}: building grew resident memory by {} MiB",
            grown >> 20
        );

        let ours: BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.size()))
            .collect();
        assert_eq!(
            ours, layout.prefixed,
            "{name}: names/shapes vs the prefixed layout"
        );
        let unprefixed: BTreeMap<String, Vec<i64>> = ours
            .iter()
            .map(|(k, v)| (k.trim_start_matches("text_model.").to_owned(), v.clone()))
            .collect();
        assert_eq!(
            unprefixed, layout.unprefixed,
            "{name}: vs transformers 5's CLIPTextModel"
        );
    }
}

#[test]
fn shipped_configs_parse_with_the_values_that_matter() {
    let sd15 = CLIPTextConfig::sd_v1_5();
    assert_eq!(
        (
            sd15.hidden_size,
            sd15.num_hidden_layers,
            sd15.hidden_act.as_str()
        ),
        (768, 12, "quick_gelu")
    );
    let sd21 = CLIPTextConfig::sd_v2_1_base();
    assert_eq!(
        (
            sd21.hidden_size,
            sd21.num_hidden_layers,
            sd21.hidden_act.as_str()
        ),
        (1024, 23, "gelu")
    );
    let fixture =
        CLIPTextConfig::from_file(&common::pipeline("sd2").join("text_encoder/config.json"))
            .unwrap();
    assert_eq!((fixture.hidden_size, fixture.intermediate_size), (48, 189));
    // An input longer than the position table is an error, not a panic.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = CLIPTextModel::new(vs.root(), &fixture).unwrap();
    load_text_encoder_weights(
        &mut vs,
        &[common::pipeline("sd2").join("text_encoder/model.safetensors")],
    )
    .unwrap();
    let too_long = Tensor::zeros([1, 78], (tch::Kind::Int64, Device::Cpu));
    assert!(model.f_forward(&too_long).is_err());
}
