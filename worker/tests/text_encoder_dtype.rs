//! `precision.text_encoder_dtype`: the trainer's text conditions with the
//! encoder(s) held in bf16 or fp16 against diffusers' encode_prompt with the
//! encoders cast the same way (tests/reference/golden_text_dtype.py), on
//! the tiny sd1 and SDXL fixtures.

mod common;

use swiftbrush_proto::config::Dtype;
use swiftbrush_worker::pipeline::{AnyPipeline, DiffusersFolder, xl_condition};
use swiftbrush_worker::sample::{SampleModel, load_model_described};
use swiftbrush_worker::trainer::text::TextConditioner;
use tch::{Device, Kind, Tensor};

fn prompts() -> Vec<String> {
    let path = common::fixtures().join("golden/text_dtype/prompts.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn conditions(pipeline: &str, kind: Kind) -> (Tensor, Tensor) {
    let folder = DiffusersFolder::open(&common::pipeline(pipeline)).unwrap();
    let text = TextConditioner::load(&folder, Device::Cpu, 16, kind).unwrap();
    let cond = text.encode(&prompts()).unwrap().cond;
    (cond, text.uncond().shallow_clone())
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The packed SDXL condition's parts: hidden states, pooled, time ids.
fn parts(pipeline: &str, cond: &Tensor, pooled_dim: i64) -> Vec<(&'static str, Tensor)> {
    if pipeline == "sd1" {
        return vec![("hidden", cond.shallow_clone())];
    }
    let (hidden, added) = xl_condition::unpack(cond, pooled_dim).unwrap();
    vec![
        ("hidden", hidden),
        ("pooled", added.text_embeds),
        ("time_ids", added.time_ids),
    ]
}

#[test]
fn half_precision_text_encoders_match_diffusers_cast_the_same_way() {
    tch::set_num_threads(1);
    for pipeline in ["sd1", "sdxl"] {
        let (full, full_uncond) = conditions(pipeline, Kind::Float);
        for (name, kind) in [("bf16", Kind::BFloat16), ("fp16", Kind::Half)] {
            let golden =
                common::golden(&format!("golden/text_dtype/{pipeline}_{name}.safetensors"));
            let pooled_dim = golden.get("pooled").map_or(0, |p| p.size()[1]);
            let (cond, uncond) = conditions(pipeline, kind);
            let what = format!("{pipeline} {name}");
            // The conditions leave in float32, whatever the encoders hold.
            assert_eq!(cond.kind(), Kind::Float, "{what}");
            assert_eq!(uncond.kind(), Kind::Float, "{what}");
            assert_eq!(cond.size(), full.size(), "{what}");
            assert_eq!(uncond.size(), full_uncond.size(), "{what}");
            for ((part, ours), (_, ours_fp32)) in parts(pipeline, &cond, pooled_dim)
                .into_iter()
                .zip(parts(pipeline, &full, pooled_dim))
            {
                if part == "time_ids" {
                    assert!(ours.equal(&ours_fp32), "{what}: time ids moved");
                    continue;
                }
                let reference = &golden[part];
                // Against diffusers in the same dtype (bitwise on this CPU
                // today: 0 measured), and the distance the dtype itself
                // makes (our float32 encoder, which worker/tests/clip.rs
                // and sdxl.rs hold to 1e-5): 3.5e-3 to 4.9e-2 measured.
                let err = max_abs(&ours, reference);
                let effect = max_abs(&ours_fp32, reference);
                let scale = reference.abs().max().double_value(&[]);
                eprintln!("{what} {part}: err {err:e} effect {effect:e} scale {scale:e}");
                assert!(
                    err <= 1e-6 * scale,
                    "{what} {part}: {err:e} from diffusers'"
                );
                assert!(
                    effect > 100.0 * err.max(1e-7),
                    "{what} {part}: effect {effect:e}"
                );
            }
        }
    }
}

/// The trainer takes the key: its conditions are the ones the half encoder
/// gives, not float32's, and it trains a step.
#[test]
fn the_trainer_encodes_captions_in_the_configured_dtype() {
    tch::set_num_threads(1);
    let mut cfg = common::tiny_run::config("memory://", 2);
    cfg.precision.text_encoder_dtype = Dtype::Bf16;
    let mut trainer = common::tiny_run::trainer(cfg);
    let (half, _) = conditions("sd1", Kind::BFloat16);
    let (full, _) = conditions("sd1", Kind::Float);
    let ours = trainer.text().encode(&prompts()).unwrap().cond;
    assert!(ours.equal(&half), "the trainer's conditions are not bf16's");
    assert!(!ours.equal(&full));
    let before = common::tiny_run::student(&trainer);
    trainer.run().unwrap();
    assert!(!common::tiny_run::equal(
        &before,
        &common::tiny_run::student(&trainer)
    ));
}

/// `sample --student` of such a run encodes its prompts as the run's own
/// samples were encoded: with the run's text encoder dtype (under the
/// default `--dtype fp32`), handed on in float32; SD and SDXL.
#[test]
fn sample_student_encodes_as_the_run_did() {
    tch::set_num_threads(1);
    for pipeline in ["sd1", "sdxl"] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let mut cfg = common::tiny_run::config(run.to_str().unwrap(), 1);
        cfg.model.teacher = Some(common::pipeline(pipeline).display().to_string());
        cfg.precision.text_encoder_dtype = Dtype::Bf16;
        let mut trainer = common::tiny_run::trainer(cfg);
        trainer.run().unwrap();
        let ours = trainer.text().encode(&prompts()).unwrap().cond;
        let model = SampleModel::Student {
            path: run.display().to_string(),
            teacher: None,
        };
        let (pipe, _, _) = load_model_described(&model, Device::Cpu, Kind::Float).unwrap();
        let (drawn, ours) = match pipe {
            AnyPipeline::Sd(sd) => (vec![sd.encode_prompts(&prompts()).unwrap()], vec![ours]),
            AnyPipeline::Xl(xl) => {
                let c = xl.encode_prompts(&prompts()).unwrap();
                let (hidden, added) = xl_condition::unpack(&ours, c.pooled.size()[1]).unwrap();
                (vec![c.hidden, c.pooled], vec![hidden, added.text_embeds])
            }
        };
        for (d, o) in drawn.iter().zip(&ours) {
            assert_eq!(d.kind(), Kind::Float, "{pipeline}");
            assert!(
                d.equal(o),
                "{pipeline}: sample --student's conditions are not the run's"
            );
        }
    }
}
