//! The training step's device-to-host reads. On a GPU each read waits for every
//! kernel queued before it, so a step reads once: both losses and both
//! gradient norms (the finite check) in one transfer, before the vote.
//! Counted per thread (a trainer runs on one), so a test can hold the step
//! to it.

use std::cell::Cell;

use tch::{Device, Kind, TchError, Tensor};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// The 0-dim `values` (any device, any float kind) as float64 on the host,
/// in one transfer.
pub fn read(values: &[&Tensor]) -> Result<Vec<f64>, TchError> {
    READS.with(|r| r.set(r.get() + 1));
    let device = values.first().map_or(Device::Cpu, |t| t.device());
    let parts: Vec<Tensor> = values
        .iter()
        .map(|t| {
            t.f_to_kind(Kind::Double)?
                .f_to_device(device)?
                .f_reshape([1])
        })
        .collect::<Result<_, _>>()?;
    let host = Tensor::f_cat(&parts, 0)?.f_to_device(Device::Cpu)?;
    Vec::<f64>::try_from(&host)
}

/// Reads so far on this thread.
pub fn count() -> u64 {
    READS.with(Cell::get)
}
