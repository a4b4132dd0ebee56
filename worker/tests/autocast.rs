//! The teacher under CPU autocast against torch.autocast
//! (tests/reference/golden_autocast.py): the UNet under the precision guard
//! matches PyTorch's bf16 and fp16 autocast outputs (one SwiftBrush step
//! with autocast teacher passes is in vsd.rs, with the other step
//! comparisons). Each comparison also checks that autocast changed the
//! result measurably, so a guard that did nothing could not pass. The
//! trainer takes the autocast from `precision` in the job config.

mod common;

use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::{Autocast, Dtype};
use swiftbrush_worker::diffusion::Denoiser;
use swiftbrush_worker::pipeline::{DiffusersFolder, UNet};
use swiftbrush_worker::torch::precision::{AutocastPlan, HalfDtype, autocast_kind};
use swiftbrush_worker::trainer::caption_feed::LocalCaptionFeed;
use swiftbrush_worker::trainer::gradient_sync::SingleProcess;
use swiftbrush_worker::trainer::{Resume, SoloTrainer, TrainError};
use tch::{Device, Kind};

fn unet(kind: &str) -> UNet {
    let folder = DiffusersFolder::open(&common::pipeline(kind)).unwrap();
    UNet::load(&folder, Device::Cpu).unwrap()
}

/// The Rust UNet under autocast `dtype` is at least `ratio` times closer to
/// torch's autocast output than torch's autocast output is to float32.
fn check_unet(kind: &str, dtype: HalfDtype, ratio: f64) {
    tch::set_num_threads(1);
    let g = common::golden(&format!("golden/autocast/unet_{kind}.safetensors"));
    let model = unet(kind);
    let (x, t, c) = (&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]);
    let plan = AutocastPlan::new(Device::Cpu, dtype).unwrap();
    let got = {
        let _autocast = plan.enter();
        model.predict(x, t, c).unwrap()
    };
    assert_eq!(autocast_kind(Device::Cpu), None, "guard left autocast on");
    assert_eq!(got.kind(), Kind::Float);
    let want = &g[&format!("out_{}", dtype.name())];
    let fp32 = &g["out_fp32"];
    let diff = common::max_abs_diff(&got, want);
    let effect = common::max_abs_diff(want, fp32);
    eprintln!(
        "{kind} {}: vs torch autocast {diff:e}, autocast effect {effect:e}",
        dtype.name()
    );
    assert!(
        effect > 1e-3,
        "{kind} {}: autocast changed the reference by only {effect:e}",
        dtype.name()
    );
    assert!(
        diff * ratio <= effect,
        "{kind} {}: Rust vs torch autocast differ by {diff:e}, autocast vs fp32 by {effect:e}",
        dtype.name()
    );
    // Without the guard the same model gives the float32 answer.
    common::assert_close(
        &format!("{kind} fp32"),
        &model.predict(x, t, c).unwrap(),
        fp32,
        1e-4,
    );
}

#[test]
fn unet_under_bf16_autocast_matches_torch_autocast_sd1() {
    check_unet("sd1", HalfDtype::Bf16, 20.0);
}

#[test]
fn unet_under_fp16_autocast_matches_torch_autocast_sd1() {
    check_unet("sd1", HalfDtype::Fp16, 20.0);
}

#[test]
fn unet_under_bf16_autocast_matches_torch_autocast_v_prediction() {
    check_unet("sd2v", HalfDtype::Bf16, 20.0);
}

fn tiny_config(teacher_dtype: Dtype, autocast: Autocast) -> JobConfig {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tiny.yaml");
    let mut cfg = JobConfig::from_yaml_file(std::path::Path::new(path)).unwrap();
    cfg.model.teacher = Some(common::pipeline("sd1").display().to_string());
    cfg.train.max_steps = 2;
    cfg.checkpoint.run_dir = "memory://autocast".to_owned();
    cfg.checkpoint.every_steps = 100;
    cfg.precision.teacher_dtype = teacher_dtype;
    cfg.precision.autocast = autocast;
    cfg
}

fn build(cfg: JobConfig) -> Result<SoloTrainer, TrainError> {
    let captions = vec!["a red circle".to_owned(), "a photo of a cat".to_owned()];
    let feed = LocalCaptionFeed::from_captions(captions, (2, 0, true), 0, 1).unwrap();
    SoloTrainer::build(cfg, Device::Cpu, feed, SingleProcess, Resume::Auto)
}

#[test]
fn trainer_applies_precision_autocast_from_the_config() {
    tch::set_num_threads(1);
    let first_step = |teacher_dtype, autocast| {
        let mut trainer = build(tiny_config(teacher_dtype, autocast)).unwrap();
        let losses = trainer.train_step(0).unwrap().losses;
        assert!(
            losses.all_finite(),
            "{teacher_dtype:?} {autocast:?}: {losses:?}"
        );
        assert_eq!(
            autocast_kind(Device::Cpu),
            None,
            "the step left autocast on"
        );
        losses
    };
    // A float32 teacher under bf16 autocast gives another LoRA loss than
    // without: the config's autocast reached the teacher passes. (At step 0
    // the adapters' B is zero, so both teachers agree exactly and the VSD
    // loss is zero either way.)
    let with = first_step(Dtype::Fp32, Autocast::Bf16);
    let without = first_step(Dtype::Fp32, Autocast::None);
    assert!(
        (with.fake_score - without.fake_score).abs() > 1e-6,
        "{with:?} vs {without:?}"
    );
    // A bf16 teacher runs with autocast (the defaults of configs/sd21-base)
    // and without (inputs cast to the stored dtype).
    first_step(Dtype::Bf16, Autocast::Bf16);
    first_step(Dtype::Bf16, Autocast::None);
}

/// `precision.student_autocast` reaches the student's pass: the student's
/// draw, and so the fake score's loss on it, changes; off (the default) the
/// step is the teacher-only one.
#[test]
fn trainer_applies_student_autocast_from_the_config() {
    tch::set_num_threads(1);
    let first_step = |student_autocast: bool| {
        let mut cfg = tiny_config(Dtype::Fp32, Autocast::Bf16);
        cfg.precision.student_autocast = student_autocast;
        let mut trainer = build(cfg).unwrap();
        let losses = trainer.train_step(0).unwrap().losses;
        assert!(losses.all_finite(), "{losses:?}");
        assert_eq!(
            autocast_kind(Device::Cpu),
            None,
            "the step left autocast on"
        );
        // bf16 needs no loss scaling.
        assert_eq!(trainer.state().loss_scalers, None);
        losses
    };
    let (on, off) = (first_step(true), first_step(false));
    assert!(
        (on.fake_score - off.fake_score).abs() > 1e-6,
        "{on:?} vs {off:?}"
    );
}

#[test]
fn trainer_refuses_a_teacher_stored_in_the_other_half_dtype() {
    let err = match build(tiny_config(Dtype::Bf16, Autocast::Fp16)) {
        Ok(_) => panic!("a bf16 teacher under fp16 autocast was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("precision.autocast fp16") && err.contains("precision.teacher_dtype bf16"),
        "{err}"
    );
}
