//! The Rust side of the C++ shim (worker/csrc/shim.h, compiled by
//! worker/build.rs): the extern declarations, kept in step with the header,
//! and the one way to call a shim function that can fail. Safe wrappers live
//! with their users: `precision` (autocast) and `collective::cuda` (stream).

use std::ffi::{CStr, c_char, c_void};

/// libtorch's c10::DeviceType numbering (csrc/autocast.cpp asserts it).
pub const DEVICE_CPU: i32 = 0;
pub const DEVICE_CUDA: i32 = 1;
/// libtorch's c10::ScalarType numbering (csrc/autocast.cpp asserts it).
pub const SCALAR_HALF: i32 = 5;
pub const SCALAR_FLOAT: i32 = 6;
pub const SCALAR_BFLOAT16: i32 = 15;

/// `sb_autocast_state`: what entering autocast replaced.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AutocastState {
    pub enabled: i32,
    pub dtype: i32,
    pub cache_enabled: i32,
}

unsafe extern "C" {
    pub fn sb_autocast_enter(
        device_type: i32,
        dtype: i32,
        prev: *mut AutocastState,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    pub fn sb_autocast_exit(
        device_type: i32,
        prev: *const AutocastState,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    pub safe fn sb_autocast_is_enabled(device_type: i32) -> i32;
    pub safe fn sb_autocast_dtype(device_type: i32) -> i32;

    pub fn sb_set_allow_tf32(allow: i32, err: *mut c_char, err_len: usize) -> i32;
    pub safe fn sb_allow_tf32() -> i32;
    pub fn sb_set_benchmark_cudnn(enabled: i32, err: *mut c_char, err_len: usize) -> i32;
    pub safe fn sb_benchmark_cudnn() -> i32;

    pub fn sb_foreach_adam_step(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avg: *const *mut c_void,
        exp_avg_sq: *const *mut c_void,
        n: usize,
        one_minus_beta1: f64,
        beta2: f64,
        one_minus_beta2: f64,
        bias2_sqrt: f64,
        eps: f64,
        step_size: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    pub fn sb_foreach_norm(
        tensors: *const *mut c_void,
        n: usize,
        norms: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    pub fn sb_foreach_mul_scalar_(
        tensors: *const *mut c_void,
        n: usize,
        scalar: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    pub fn sb_foreach_ema_update(
        shadow: *const *mut c_void,
        params: *const *mut c_void,
        n: usize,
        one_minus_decay: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    pub fn sb_cuda_set_device(device: i32, err: *mut c_char, err_len: usize) -> i32;
    pub fn sb_cuda_current_stream(
        device: i32,
        stream: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    pub fn sb_cuda_current_stream_query(
        device: i32,
        done: *mut i32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;

}

/// Calls a shim function that reports failure as a non-zero return and a
/// message in the buffer it is given; the message becomes the error.
pub fn call(f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), String> {
    let mut buf = [0 as c_char; 512];
    let rc = f(buf.as_mut_ptr(), buf.len());
    if rc == 0 {
        return Ok(());
    }
    // The shim always NUL-terminates within the buffer (snprintf); a last
    // NUL guards against a message that was not written at all.
    buf[buf.len() - 1] = 0;
    // SAFETY: NUL-terminated within `buf`, which outlives the borrow.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    Err(if msg.is_empty() {
        format!("shim call failed with code {rc}")
    } else {
        msg.into_owned()
    })
}
