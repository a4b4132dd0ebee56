//! `model.student_init`: the student starts from another UNet folder of
//! the teacher's architecture while the teacher and the fake score stay
//! the teacher's; a resumed run takes the checkpoint's student; a folder
//! whose config differs from the teacher's is refused naming the key.

mod common;

use std::path::Path;

use common::tiny_run::{self, equal, snapshot, student, try_trainer_with};
use swiftbrush_proto::config::FakeScore;
use swiftbrush_worker::trainer::gradient_sync::SingleProcess;
use tch::Tensor;

/// sd1's unet/ with every weight moved by 0.01: weights no copy of the
/// teacher has.
fn shifted_unet(dir: &Path) -> Vec<(String, Tensor)> {
    let src = common::pipeline("sd1").join("unet");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let tensors: Vec<(String, Tensor)> =
        Tensor::read_safetensors(src.join("diffusion_pytorch_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t + 0.01))
            .collect();
    Tensor::write_safetensors(&tensors, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    snapshot(tensors)
}

fn teacher_unet() -> Vec<(String, Tensor)> {
    let file = common::pipeline("sd1").join("unet/diffusion_pytorch_model.safetensors");
    snapshot(Tensor::read_safetensors(file).unwrap())
}

#[test]
fn the_student_starts_from_the_folder_and_the_fake_score_from_the_teacher() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let init = shifted_unet(&tmp.path().join("init"));
    let run_dir = format!("{}/run", tmp.path().display());
    let mut cfg = tiny_run::fake_score_config(&run_dir, 1, FakeScore::Unet, 1);
    cfg.model.student_init = Some(tmp.path().join("init").display().to_string());
    let captions = ["a red circle", "a photo of a cat"];
    let mut t = try_trainer_with(cfg.clone(), &captions, SingleProcess).unwrap();
    assert!(
        equal(&student(&t), &init),
        "the student holds the folder's weights"
    );
    assert!(
        equal(&snapshot(t.fake_score_parameters()), &teacher_unet()),
        "the fake score is the teacher's copy"
    );
    let summary = t.run().unwrap();
    assert_eq!(summary.num_nonfinite_steps, 0, "{summary:?}");
    let trained = student(&t);
    assert!(!equal(&trained, &init));
    // Resuming takes the checkpoint's student, not the folder's weights.
    let resumed = try_trainer_with(cfg, &captions, SingleProcess).unwrap();
    assert_eq!(resumed.state().step, 1);
    assert!(equal(&student(&resumed), &trained));
}

#[test]
fn a_folder_of_another_architecture_is_refused_naming_the_key() {
    tch::set_num_threads(1);
    let mut cfg = tiny_run::config("memory://student-init-mismatch", 1);
    cfg.model.student_init = Some(common::pipeline("sd2").display().to_string());
    let err = try_trainer_with(cfg, &["a cat"], SingleProcess)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("model.student_init") && err.contains("cross_attention_dim: teacher 32 vs 48"),
        "{err}"
    );
    let mut cfg = tiny_run::config("memory://student-init-missing", 1);
    cfg.model.student_init = Some("/no/such/unet".into());
    let err = try_trainer_with(cfg, &["a cat"], SingleProcess)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("no such folder"), "{err}");
}
