//! `method.fake_score.updates_per_step`: the fake score's further updates per
//! iteration (DMD2's critic/generator ratio). They come after the student's
//! update, so the first student step is unchanged while the adapters move
//! further; their draws are functions of (seed, step, update), so a resumed
//! run still continues bit for bit.

mod common;

use common::tiny_run::{self, equal, snapshot, student, trainer};
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::config::FakeScore;

fn config(run_dir: &str, updates: u32, max_steps: u64) -> JobConfig {
    tiny_run::fake_score_config(run_dir, max_steps, FakeScore::Lora, updates)
}

#[test]
fn extra_fake_score_updates_move_the_adapters_after_the_student_step() {
    tch::set_num_threads(1);
    let mut once = trainer(config("memory://", 1, 2));
    let mut thrice = trainer(config("memory://", 3, 2));
    let before = snapshot(once.fake_score_parameters());
    assert!(
        equal(&before, &thrice.fake_score_parameters()),
        "same initial adapters"
    );

    once.train_step(0).unwrap();
    thrice.train_step(0).unwrap();
    assert!(
        equal(&student(&once), &student(&thrice)),
        "the first student update must not depend on the LoRA updates after it"
    );
    assert!(
        !equal(&once.fake_score_parameters(), &before),
        "one LoRA update moves B"
    );
    assert!(
        !equal(
            &once.fake_score_parameters(),
            &thrice.fake_score_parameters()
        ),
        "two more LoRA updates must move the adapters further"
    );

    // The second student update sees the LoRA teacher the extra updates made.
    once.train_step(1).unwrap();
    thrice.train_step(1).unwrap();
    assert!(!equal(&student(&once), &student(&thrice)));
}

#[test]
fn a_resumed_run_with_extra_fake_score_updates_continues_bit_for_bit() {
    tch::set_num_threads(1);
    let mut straight = trainer(config("memory://lora-updates-straight", 2, 4));
    straight.run().unwrap();

    let dir = "memory://lora-updates-resumed";
    trainer(config(dir, 2, 2)).run().unwrap();
    let mut resumed = trainer(config(dir, 2, 4));
    assert_eq!(
        resumed.state().step,
        2,
        "resumes at the checkpoint of step 2"
    );
    resumed.run().unwrap();

    assert!(equal(&student(&straight), &student(&resumed)));
    assert!(equal(
        &straight.fake_score_parameters(),
        &resumed.fake_score_parameters()
    ));
}

#[test]
fn updates_per_step_out_of_range_names_the_key() {
    let mut cfg = config("memory://", 0, 1);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("method.fake_score.updates_per_step"), "{err}");
    cfg.method.fake_score.updates_per_step = 65;
    assert!(cfg.validate().is_err());
}

/// A step reads from the device once (both losses and both gradient norms,
/// for the vote and the log), and each further fake-score update once more
/// (its loss and norm, for its own vote): on a GPU every read waits for
/// the queued kernels. Before, the finite check alone read once per
/// gradient tensor.
#[test]
fn a_step_reads_the_device_once_and_each_further_update_once_more() {
    use swiftbrush_worker::torch::host_read;
    tch::set_num_threads(1);
    for (updates, per_step) in [(1, 1), (3, 3)] {
        let mut t = trainer(config("memory://", updates, 3));
        t.train_step(0).unwrap();
        let before = host_read::count();
        t.train_step(1).unwrap();
        t.train_step(2).unwrap();
        assert_eq!(
            host_read::count() - before,
            2 * per_step,
            "{updates} fake-score update(s) a step"
        );
    }
}
