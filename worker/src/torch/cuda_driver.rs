//! The GPUs the NVIDIA driver sees: name and total memory, for `doctor` and
//! for the device memory a worker reports when it registers.
//!
//! tch exposes only a device count. The CUDA driver API (libcuda.so.1, which
//! every NVIDIA driver installs) has a small, stable C ABI, so it is loaded
//! by name at run time: builds need no CUDA, and a machine without a driver
//! gets an error saying so instead of a failed start.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

/// One GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gpu {
    pub index: usize,
    pub name: String,
    pub total_memory_bytes: u64,
}

/// What the driver reported, or why it could not be asked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DriverReport {
    /// e.g. "13.0" (cuDriverGetVersion).
    pub driver_cuda_version: String,
    pub gpus: Vec<Gpu>,
}

type CuResult = c_int;
const CUDA_SUCCESS: CuResult = 0;
/// CUDA_ERROR_NO_DEVICE: a driver, but no GPU.
const CUDA_ERROR_NO_DEVICE: CuResult = 100;

/// The driver's GPUs (asked once per process).
pub fn report() -> Result<&'static DriverReport, String> {
    static REPORT: OnceLock<Result<DriverReport, String>> = OnceLock::new();
    REPORT.get_or_init(query).as_ref().map_err(Clone::clone)
}

/// Total memory of CUDA device `index`, if the driver reports it.
pub fn total_memory_bytes(index: usize) -> Option<u64> {
    report()
        .ok()?
        .gpus
        .iter()
        .find(|g| g.index == index)
        .map(|g| g.total_memory_bytes)
}

/// The driver library, opened once (an error says why it is missing).
fn libcuda() -> Result<*mut c_void, String> {
    // The handle as an address: raw pointers are not Sync.
    static HANDLE: OnceLock<Result<usize, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            crate::torch::libtorch::dlopen("libcuda.so.1", libc::RTLD_NOW)
                .map(|h| h as usize)
                .map_err(|_| "libcuda.so.1 not found: no NVIDIA driver on this machine".to_owned())
        })
        .clone()
        .map(|h| h as *mut c_void)
}

/// Device memory in use on the calling thread's current CUDA context's
/// device (total minus free, as the driver counts it: every process's
/// allocations, the caching allocator's reserve, the context itself).
/// None without a driver or a current context.
pub fn memory_in_use_bytes() -> Option<u64> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult;
    static FN: OnceLock<Option<MemGetInfo>> = OnceLock::new();
    let get = (*FN.get_or_init(|| {
        let handle = libcuda().ok()?;
        // SAFETY: the handle is open; the symbol has this signature (cuda.h).
        let p = unsafe { libc::dlsym(handle, c"cuMemGetInfo_v2".as_ptr()) };
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, MemGetInfo>(p) })
    }))?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: valid out-pointers.
    (unsafe { get(&mut free, &mut total) } == CUDA_SUCCESS).then(|| (total - free) as u64)
}

fn query() -> Result<DriverReport, String> {
    let handle = libcuda()?;
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            // SAFETY: the handle is open; the name is NUL-terminated.
            let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
            if p.is_null() {
                return Err(format!("libcuda.so.1 has no {}", $name));
            }
            // SAFETY: the driver API's function of this signature (cuda.h).
            unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
        }};
    }
    let init = sym!("cuInit", unsafe extern "C" fn(u32) -> CuResult);
    let driver_version = sym!(
        "cuDriverGetVersion",
        unsafe extern "C" fn(*mut c_int) -> CuResult
    );
    let count = sym!(
        "cuDeviceGetCount",
        unsafe extern "C" fn(*mut c_int) -> CuResult
    );
    let get = sym!(
        "cuDeviceGet",
        unsafe extern "C" fn(*mut c_int, c_int) -> CuResult
    );
    let name = sym!(
        "cuDeviceGetName",
        unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult
    );
    let total_mem = sym!(
        "cuDeviceTotalMem_v2",
        unsafe extern "C" fn(*mut usize, c_int) -> CuResult
    );
    let check = |what: &str, rc: CuResult| {
        if rc == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(format!("{what} failed with CUDA error {rc}"))
        }
    };
    let mut version = 0;
    // SAFETY: valid out-pointers throughout; the driver API is thread-safe.
    check("cuDriverGetVersion", unsafe {
        driver_version(&mut version)
    })?;
    let driver_cuda_version = format!("{}.{}", version / 1000, version % 1000 / 10);
    match unsafe { init(0) } {
        CUDA_SUCCESS => {}
        CUDA_ERROR_NO_DEVICE => {
            return Ok(DriverReport {
                driver_cuda_version,
                gpus: Vec::new(),
            });
        }
        rc => return Err(format!("cuInit failed with CUDA error {rc}")),
    }
    let mut n = 0;
    check("cuDeviceGetCount", unsafe { count(&mut n) })?;
    let mut gpus = Vec::new();
    for index in 0..n {
        let mut device = 0;
        check("cuDeviceGet", unsafe { get(&mut device, index) })?;
        let mut buf = [0 as c_char; 256];
        check("cuDeviceGetName", unsafe {
            name(buf.as_mut_ptr(), buf.len() as c_int, device)
        })?;
        let mut bytes = 0usize;
        check("cuDeviceTotalMem", unsafe { total_mem(&mut bytes, device) })?;
        gpus.push(Gpu {
            index: index as usize,
            // SAFETY: the driver wrote a NUL-terminated name into `buf`.
            name: unsafe { CStr::from_ptr(buf.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
            total_memory_bytes: bytes as u64,
        });
    }
    Ok(DriverReport {
        driver_cuda_version,
        gpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_agrees_with_libtorch_or_says_why_not() {
        crate::torch::device::load_cuda_backend();
        match report() {
            Ok(r) => {
                assert_eq!(r.gpus.len() as i64, tch::Cuda::device_count(), "{r:?}");
                for g in &r.gpus {
                    assert!(g.total_memory_bytes > 0 && !g.name.is_empty(), "{g:?}");
                }
            }
            Err(e) => {
                assert_eq!(tch::Cuda::device_count(), 0);
                assert!(e.contains("libcuda.so.1"), "{e}");
                assert_eq!(total_memory_bytes(0), None);
            }
        }
    }
}
