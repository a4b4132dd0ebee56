//! libtorch's current CUDA device and stream, through the C++ shim
//! (csrc/cuda_stream.cpp): NCCL queues its collectives on the stream libtorch
//! queues its kernels on, so they are ordered with the backward pass and the
//! optimizer without any device-wide synchronisation.

use std::ffi::c_void;

use crate::torch::shim;

/// A `cudaStream_t` owned by libtorch (never destroyed here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawStream(pub *mut c_void);

// SAFETY: a stream handle is a plain identifier the CUDA runtime accepts
// from any thread.
unsafe impl Send for RawStream {}

fn index(device: usize) -> Result<i32, String> {
    i32::try_from(device).map_err(|_| format!("CUDA device index {device} is out of range"))
}

/// Makes `device` the calling thread's current CUDA device.
pub fn set_device(device: usize) -> Result<(), String> {
    let d = index(device)?;
    // SAFETY: `shim::call` provides the error buffer.
    shim::call(|err, len| unsafe { shim::sb_cuda_set_device(d, err, len) })
}

/// libtorch's current stream on `device` for the calling thread.
pub fn current_stream(device: usize) -> Result<RawStream, String> {
    let d = index(device)?;
    let mut stream = std::ptr::null_mut();
    // SAFETY: `stream` is a valid out-pointer.
    shim::call(|err, len| unsafe { shim::sb_cuda_current_stream(d, &mut stream, err, len) })?;
    Ok(RawStream(stream))
}

/// Whether all work queued so far on libtorch's current stream of `device`
/// has finished (a query: never blocks).
pub fn current_stream_idle(device: usize) -> Result<bool, String> {
    let d = index(device)?;
    let mut done = 0i32;
    // SAFETY: `done` is a valid out-pointer.
    shim::call(|err, len| unsafe { shim::sb_cuda_current_stream_query(d, &mut done, err, len) })?;
    Ok(done != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_each_call_is_an_error_not_a_crash() {
        if tch::Cuda::device_count() > 0 {
            eprintln!("skipped: this machine has a CUDA device");
            return;
        }
        crate::torch::device::load_cuda_backend();
        for err in [
            set_device(0).unwrap_err(),
            current_stream(0).map(|_| ()).unwrap_err(),
            current_stream_idle(0).map(|_| ()).unwrap_err(),
        ] {
            // Either the shim has no CUDA part, or libtorch sees no device.
            assert!(
                err.contains("CUDA device 0 requested but libtorch sees 0")
                    || err.contains("no CUDA support"),
                "{err}"
            );
        }
        assert!(set_device(usize::MAX).unwrap_err().contains("out of range"));
    }
}
