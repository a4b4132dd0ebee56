//! The LoRA adapter layer: the low-rank update scale * B(A(x)) that a
//! [`Linear`](super::layers::Linear) or [`Conv2d`](super::layers::Conv2d)
//! adds to its output when it carries an adapter ([`LoraAdapter`], PEFT's
//! LoRA layer), and the switch shared by every adapter of one model that
//! selects which set of them a pass runs with (none, or one, on every row
//! or some rows of a batch only: [`LoraSwitch`], peft's `set_adapter`).
//!
//! Which layers get adapters, the adapters' variables and their PEFT names
//! are `crate::lora`'s (`attach_lora`), above the models.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use tch::Tensor;

/// Which adapter set of one model a pass runs with, and on which rows of
/// its batch; shared by every adapter of the model. A model may carry
/// several sets (a LoRA student's and the fake score's on one base): each
/// has an id from [`LoraSwitch::next_set`], and a pass runs with at most
/// one of them. Passes name their set through a guard
/// ([`LoraSwitch::only`], [`LoraSwitch::off`]) that puts the previous
/// selection back when it drops, so no caller can leave a set on for the
/// next pass. Without any guard alive the model runs with its first set
/// (id 0) on every row: a model with one set, as `attach_lora` makes it,
/// is the adapted model.
#[derive(Debug, Clone)]
pub struct LoraSwitch(Arc<Selection>);

#[derive(Debug)]
struct Selection {
    /// The set the pass runs with; [`NO_SET`]: none (the base alone).
    set: AtomicI64,
    /// The first row of each batch that set applies to.
    first_row: AtomicI64,
    /// The id the next attached set gets.
    next: AtomicU32,
}

/// No set is on.
const NO_SET: i64 = -1;

/// An adapter set's id on its model's switch.
pub type AdapterSetId = u32;

impl LoraSwitch {
    /// A new switch, its first set on for every row.
    pub(crate) fn new() -> Self {
        Self(Arc::new(Selection {
            set: AtomicI64::new(0),
            first_row: AtomicI64::new(0),
            next: AtomicU32::new(0),
        }))
    }

    /// The id for a new adapter set on this switch's model.
    pub(crate) fn next_set(&self) -> AdapterSetId {
        self.0.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Every adapter of the model is off until the guard drops (also on
    /// panic): the base model alone (the frozen teacher).
    pub fn off(&self) -> AdaptersOff<'_> {
        self.select(NO_SET, 0)
    }

    /// Until the guard drops, the pass runs with set `set` on every row.
    pub fn only(&self, set: AdapterSetId) -> AdaptersOff<'_> {
        self.select(i64::from(set), 0)
    }

    /// Until the guard drops, set `set` applies to rows `first..` of each
    /// batch only: rows before it are the base model's (the frozen
    /// teacher's).
    pub fn rows_from(&self, set: AdapterSetId, first: i64) -> AdaptersOff<'_> {
        self.select(i64::from(set), first.max(0))
    }

    fn select(&self, set: i64, first_row: i64) -> AdaptersOff<'_> {
        let previous = (self.set(), self.first_row());
        self.0.set.store(set, Ordering::Relaxed);
        self.0.first_row.store(first_row, Ordering::Relaxed);
        AdaptersOff {
            switch: self,
            previous,
        }
    }

    fn set(&self) -> i64 {
        self.0.set.load(Ordering::Relaxed)
    }

    /// The first row the selected set applies to (0: every row).
    pub fn first_row(&self) -> i64 {
        self.0.first_row.load(Ordering::Relaxed)
    }

    /// The first row set `set` applies to in the current pass: past any
    /// batch when another set (or none) is selected.
    fn first_row_of(&self, set: AdapterSetId) -> i64 {
        if self.set() == i64::from(set) {
            self.first_row()
        } else {
            i64::MAX
        }
    }
}

/// While alive, one set of a model's adapters is selected (or none, or one
/// on some rows only); dropping it restores the selection before it.
#[must_use = "the selection ends as soon as the guard drops"]
pub struct AdaptersOff<'a> {
    switch: &'a LoraSwitch,
    previous: (i64, i64),
}

impl Drop for AdaptersOff<'_> {
    fn drop(&mut self) {
        let (set, first_row) = self.previous;
        self.switch.0.set.store(set, Ordering::Relaxed);
        self.switch.0.first_row.store(first_row, Ordering::Relaxed);
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
    /// This adapter's set on `switch`.
    set: AdapterSetId,
}

impl LoraAdapter {
    /// An adapter on a [`Linear`](super::layers::Linear): `a` [rank,
    /// in_features], `b` [out_features, rank], switched by `switch`.
    pub fn linear(
        a: Tensor,
        b: Tensor,
        scale: f64,
        (switch, set): (&LoraSwitch, AdapterSetId),
    ) -> Self {
        Self {
            a,
            b,
            scale,
            conv: None,
            switch: switch.clone(),
            set,
        }
    }

    /// An adapter on a [`Conv2d`](super::layers::Conv2d) with the base's
    /// `stride` and `padding`: `a` [rank, in, k, k], `b` [out, rank, 1, 1],
    /// set `set` of `switch`.
    pub fn conv(
        a: Tensor,
        b: Tensor,
        scale: f64,
        (stride, padding): (i64, i64),
        (switch, set): (&LoraSwitch, AdapterSetId),
    ) -> Self {
        Self {
            a,
            b,
            scale,
            conv: Some((stride, padding)),
            switch: switch.clone(),
            set,
        }
    }

    /// The base layer's output `y` for input `x` with the update added on
    /// the rows the switch says while its set is selected (PEFT's `result + lora_B(lora_A(x)) *
    /// scaling`, in the base output's dtype). With the adapters on some
    /// rows only, the update is computed on those rows alone.
    pub fn apply(&self, x: &Tensor, y: Tensor) -> Result<Tensor, tch::TchError> {
        let n = x.size()[0];
        let first = self.switch.first_row_of(self.set);
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
