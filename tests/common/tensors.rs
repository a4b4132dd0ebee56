//! Comparing tensors in tests, shared by the CLI tests and the worker's
//! (worker/tests/common includes this file): maxima that keep a NaN.
//! `f64::max` and a `fold(0.0, f64::max)` drop NaN, so a NaN anywhere would
//! read as a perfect match.

use tch::{Device, Kind, Tensor};

/// The largest of `values` (0 for none), NaN if any is NaN.
pub fn nan_max(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().fold(0.0, |worst, v| {
        if worst.is_nan() || v.is_nan() {
            f64::NAN
        } else {
            worst.max(v)
        }
    })
}

/// max |a - b| over every entry, in float64 on the CPU (either may live on
/// a GPU); NaN when either holds a NaN (libtorch's max propagates it).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let host = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    (host(a) - host(b)).abs().max().double_value(&[])
}

/// [`max_abs_diff`] over two lists of named tensors with the same names.
pub fn max_abs_diff_named(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len(), "tensor count");
    nan_max(a.iter().zip(b).map(|((na, ta), (nb, tb))| {
        assert_eq!(na, nb);
        max_abs_diff(ta, tb)
    }))
}

/// ||a - b|| / ||b - start|| over lists of named tensors (same names, same
/// order): how far apart two runs ended, relative to how far the reference
/// `b` moved from `start`. Adam turns rounding noise in a near-zero gradient
/// into an lr-sized move of that one weight, so an elementwise maximum is
/// the wrong measure of two trainings' agreement; this norm is not.
pub fn relative_to_move(
    a: &[(String, Tensor)],
    b: &[(String, Tensor)],
    start: &[(String, Tensor)],
) -> f64 {
    let norm = |x: &[(String, Tensor)], y: &[(String, Tensor)]| -> f64 {
        assert_eq!(x.len(), y.len(), "tensor count");
        x.iter()
            .zip(y)
            .map(|((nx, tx), (ny, ty))| {
                assert_eq!(nx, ny);
                (tx.to_kind(Kind::Double) - ty.to_kind(Kind::Double))
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[])
            })
            .sum::<f64>()
            .sqrt()
    };
    let moved = norm(b, start);
    assert!(moved > 0.0, "the reference did not move");
    norm(a, b) / moved
}
