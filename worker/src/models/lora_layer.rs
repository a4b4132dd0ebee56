//! The LoRA adapter layer: the low-rank update scale * B(A(x)) that a
//! [`Linear`](super::layers::Linear) or [`Conv2d`](super::layers::Conv2d)
//! adds to its output when it carries an adapter ([`LoraAdapter`], PEFT's
//! LoRA layer), and the switch shared by every adapter of one model that
//! turns them off, or on for some rows of a batch only ([`LoraSwitch`]).
//!
//! Which layers get adapters, the adapters' variables and their PEFT names
//! are `crate::lora`'s (`attach_lora`), above the models.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tch::Tensor;

/// Which rows of a batch the adapters of one model apply to, shared by
/// every adapter of the model: all rows unless a guard is alive. The
/// frozen teacher's pass holds [`LoraSwitch::off`] (`vsd::TeacherUNet`'s
/// `Scores::real`); the step's one pass of both scores holds
/// [`LoraSwitch::rows_from`] (the teacher's rows first, the LoRA
/// teacher's after). The guards drop back to all rows, so no caller can
/// forget to turn the adapters back on.
#[derive(Debug, Clone)]
pub struct LoraSwitch(Arc<AtomicI64>);

/// The first row adapted while the adapters are off: no batch has it.
const NO_ROW: i64 = i64::MAX;

impl LoraSwitch {
    /// A new switch, the adapters on for every row.
    pub(crate) fn new() -> Self {
        Self(Arc::new(AtomicI64::new(0)))
    }

    /// The adapters are off until the guard drops (also on panic).
    pub fn off(&self) -> AdaptersOff<'_> {
        self.0.store(NO_ROW, Ordering::Relaxed);
        AdaptersOff(self)
    }

    /// Until the guard drops, the adapters apply to rows `first..` of each
    /// batch only: rows before it are the frozen teacher's.
    pub fn rows_from(&self, first: i64) -> AdaptersOff<'_> {
        self.0.store(first.max(0), Ordering::Relaxed);
        AdaptersOff(self)
    }

    /// The first row the adapters apply to (0: every row; past the batch:
    /// none).
    pub fn first_row(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// While alive, the adapters of one model are off (or on some rows only).
#[must_use = "the adapters are back on as soon as the guard drops"]
pub struct AdaptersOff<'a>(&'a LoraSwitch);

impl Drop for AdaptersOff<'_> {
    fn drop(&mut self) {
        self.0.0.store(0, Ordering::Relaxed);
    }
}

/// One layer's low-rank update: scale * B(A(x)).
#[derive(Debug)]
pub struct LoraAdapter {
    /// Linear: [rank, in_features]; conv: [rank, in, k, k].
    pub a: Tensor,
    /// Linear: [out_features, rank]; conv: [out, rank, 1, 1].
    pub b: Tensor,
    pub scale: f64,
    /// Some((stride, padding)) of the base conv for a conv adapter.
    conv: Option<(i64, i64)>,
    switch: LoraSwitch,
}

impl LoraAdapter {
    /// An adapter on a [`Linear`](super::layers::Linear): `a` [rank,
    /// in_features], `b` [out_features, rank], switched by `switch`.
    pub fn linear(a: Tensor, b: Tensor, scale: f64, switch: &LoraSwitch) -> Self {
        Self {
            a,
            b,
            scale,
            conv: None,
            switch: switch.clone(),
        }
    }

    /// An adapter on a [`Conv2d`](super::layers::Conv2d) with the base's
    /// `stride` and `padding`: `a` [rank, in, k, k], `b` [out, rank, 1, 1],
    /// switched by `switch`.
    pub fn conv(
        a: Tensor,
        b: Tensor,
        scale: f64,
        (stride, padding): (i64, i64),
        switch: &LoraSwitch,
    ) -> Self {
        Self {
            a,
            b,
            scale,
            conv: Some((stride, padding)),
            switch: switch.clone(),
        }
    }

    /// The base layer's output `y` for input `x` with the update added on
    /// the rows the switch says (PEFT's `result + lora_B(lora_A(x)) *
    /// scaling`, in the base output's dtype). With the adapters on some
    /// rows only, the update is computed on those rows alone.
    pub fn apply(&self, x: &Tensor, y: Tensor) -> Result<Tensor, tch::TchError> {
        let n = x.size()[0];
        let first = self.switch.first_row();
        if first >= n {
            return Ok(y);
        }
        if first == 0 {
            let delta = self.delta(x)?.f_to_kind(y.f_kind()?)?;
            return y.f_add(&delta);
        }
        let delta = self
            .delta(&x.f_narrow(0, first, n - first)?)?
            .f_to_kind(y.f_kind()?)?;
        // y is this layer's fresh output; its adapted rows take the update
        // in place (a view: under autograd, CopySlices).
        let _ = y.f_narrow(0, first, n - first)?.f_add_(&delta)?;
        Ok(y)
    }

    /// scale * B(A(x)) in the adapters' dtype.
    fn delta(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let x = x.f_to_kind(self.a.f_kind()?)?;
        let delta = match self.conv {
            None => x
                .f_linear::<&Tensor>(&self.a, None)?
                .f_linear::<&Tensor>(&self.b, None)?,
            Some((stride, padding)) => x
                .f_conv2d::<&Tensor>(
                    &self.a,
                    None,
                    [stride, stride],
                    [padding, padding],
                    [1, 1],
                    1,
                )?
                .f_conv2d::<&Tensor>(&self.b, None, [1, 1], [0, 0], [1, 1], 1)?,
        };
        delta.f_mul_scalar(self.scale)
    }
}
