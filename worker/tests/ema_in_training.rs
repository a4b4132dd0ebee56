//! The trainer's EMA of the student (`method.ema`): a disabled one holds no
//! copy (the EMA weights are then the student's own, bit for bit, as the
//! sample step and checkpoints use them).

mod common;

use common::tiny_run::{self, student, trainer};

/// `method.ema.enabled: false` keeps no copy of the student (the EMA
/// weights are then the student's own); enabled, the copy trails it.
#[test]
fn a_disabled_ema_keeps_no_copy_of_the_student() {
    tch::set_num_threads(1);
    let mut cfg = tiny_run::config("memory://", 1);
    cfg.method.ema.enabled = false;
    let mut off = trainer(cfg);
    off.train_step(0).unwrap();
    assert!(off.ema().is_none(), "a disabled EMA holds a student copy");
    assert_eq!(off.state().ema_updates, 0);

    let mut on = trainer(tiny_run::config("memory://", 1));
    on.train_step(0).unwrap();
    let ema = on.ema().expect("an enabled EMA");
    assert_eq!(ema.num_updates(), 1);
    assert_eq!(ema.tensors().len(), student(&on).len());
}
