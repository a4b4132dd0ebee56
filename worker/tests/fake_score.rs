//! `method.fake_score: unet`: DMD2's fake score, a full trainable copy of
//! the teacher instead of LoRA adapters, through the real trainer: every
//! weight of the copy trains, the teacher stays as loaded, and a resumed
//! run continues bit for bit (the copy and its optimizer are checkpointed).
//! The step itself is checked against the reference in vsd.rs.

mod common;

use common::tiny_run::{self, equal, snapshot, student, trainer};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::FakeScore;
use swiftbrush_worker::trainer::gradient_sync::SingleProcess;

fn config(run_dir: &str, fake: FakeScore, max_steps: u64) -> JobConfig {
    tiny_run::fake_score_config(run_dir, max_steps, fake, 1)
}

#[test]
fn a_full_unet_fake_score_trains_every_weight_of_its_copy() {
    tch::set_num_threads(1);
    let mut full = trainer(config("memory://", FakeScore::Unet, 2));
    let lora = trainer(config("memory://", FakeScore::Lora, 2));

    // The copy starts as the teacher (so as the student), under the
    // teacher's diffusers names.
    let before = snapshot(full.fake_score_parameters());
    let student_before = student(&full);
    assert!(
        equal(&before, &student_before),
        "the fake score starts as a copy of the teacher"
    );
    assert!(lora.fake_score_parameters()[0].0.contains(".lora_A."));

    // Even at step 0 the student has a gradient: the teacher is scored with
    // guidance, the copy (DMD2) on the caption alone.
    full.train_step(0).unwrap();
    let after = snapshot(full.fake_score_parameters());
    let moved = before
        .iter()
        .zip(&after)
        .filter(|((_, a), (_, b))| !a.equal(b))
        .count();
    assert!(
        moved * 10 >= before.len() * 9,
        "{moved} of {} fake-score tensors moved in one update",
        before.len()
    );
    assert!(
        !equal(&student_before, &student(&full)),
        "the student's first update follows the guided teacher against the copy"
    );
}

#[test]
fn a_resumed_run_with_a_full_unet_fake_score_continues_bit_for_bit() {
    tch::set_num_threads(1);
    let mut straight = trainer(config("memory://full-fake-straight", FakeScore::Unet, 4));
    straight.run().unwrap();

    let dir = "memory://full-fake-resumed";
    trainer(config(dir, FakeScore::Unet, 2)).run().unwrap();
    let mut resumed = trainer(config(dir, FakeScore::Unet, 4));
    assert_eq!(
        resumed.state().step,
        2,
        "resumes at the checkpoint of step 2"
    );
    resumed.run().unwrap();

    assert!(equal(&student(&straight), &student(&resumed)));
    assert!(equal(
        &snapshot(straight.fake_score_parameters()),
        &snapshot(resumed.fake_score_parameters())
    ));
}

#[test]
fn a_lora_checkpoint_does_not_load_into_a_full_unet_fake_score() {
    tch::set_num_threads(1);
    let dir = "memory://full-fake-mismatch";
    trainer(config(dir, FakeScore::Lora, 1)).run().unwrap();
    let err =
        tiny_run::try_trainer_with(config(dir, FakeScore::Unet, 2), &["a cat"], SingleProcess)
            .err()
            .expect("a LoRA checkpoint resumed as a full fake score must fail")
            .to_string();
    assert!(err.contains("lora.safetensors"), "{err}");
    assert!(err.contains("missing"), "{err}");
}
