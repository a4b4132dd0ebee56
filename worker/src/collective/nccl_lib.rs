//! Finding and loading libnccl at run time, and the dozen NCCL entry points
//! the worker calls (declarations from nccl.h, which is ABI-stable C).
//!
//! Why not cudarc's loader (shared/DESIGN.md chose cudarc): cudarc 0.19
//! looks for `libnccl.so`, `libnccl.so.13` (the CUDA major), `.12`, ... and
//! never `libnccl.so.2`, the only file the torch wheel ships
//! (`site-packages/nvidia/nccl/lib/`), and it panics instead of returning an
//! error when nothing loads. Loading by path here keeps builds free of CUDA
//! and turns every failure into an error naming what is missing.
//!
//! Where the library comes from, in order:
//! 1. `SWIFTBRUSH_NCCL_LIB`, a path to a libnccl.so.2, if set;
//! 2. the copy libtorch already loaded (libtorch_cuda.so links the wheel's
//!    libnccl.so.2; `device::load_cuda_backend` loads it), so one process
//!    never holds two NCCLs;
//! 3. the wheel's file beside the running libtorch (libtorch.rs: the
//!    directory the loader took it from, rpath or LD_LIBRARY_PATH):
//!    `<libtorch lib>/../../nvidia/nccl/lib/libnccl.so.2`;
//! 4. `libnccl.so.2` on the system's library path.

use std::ffi::{CStr, c_char, c_int, c_void};

use crate::torch::libtorch::dlopen;
use std::sync::OnceLock;

/// `ncclComm_t`.
pub type RawComm = *mut c_void;
/// `ncclResult_t`.
pub type NcclResult = c_int;

pub const NCCL_SUCCESS: NcclResult = 0;
pub const NCCL_IN_PROGRESS: NcclResult = 7;

/// `ncclRedOp_t` values used here.
pub const NCCL_SUM: c_int = 0;
pub const NCCL_MIN: c_int = 3;
pub const NCCL_AVG: c_int = 4;

/// `ncclDataType_t` values used here.
pub const NCCL_INT32: c_int = 2;
pub const NCCL_FLOAT16: c_int = 6;
pub const NCCL_FLOAT32: c_int = 7;
pub const NCCL_FLOAT64: c_int = 8;
pub const NCCL_BFLOAT16: c_int = 9;

pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; UNIQUE_ID_BYTES],
}

/// The oldest NCCL with everything used here (nonblocking communicators,
/// ncclCommGetAsyncError, ncclGetLastError, ncclAvg; groups are older).
pub const MIN_VERSION: c_int = 21400;

/// `ncclConfig_t` as NCCL 2.14 defined it (the first with `blocking`),
/// plus 2.17's `cgaClusterSize` so no byte is padding. NCCL copies
/// min(size, its own size) bytes and resets the fields a config of an
/// older `version` cannot have, so this is valid for every NCCL >= 2.14
/// and leaves all other attributes at their defaults.
#[repr(C)]
pub struct Config {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
}

impl Config {
    /// NCCL_CONFIG_INITIALIZER with `blocking = 0`: no NCCL call waits for
    /// peers, so a rank that never shows up or dies can be timed out and
    /// aborted (see nccl.rs).
    pub fn nonblocking() -> Self {
        Self {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            version: 21400,
            blocking: 0,
            cga_cluster_size: c_int::MIN,
        }
    }
}

const _: () = assert!(std::mem::size_of::<Config>() == 24);
const _: () = assert!(std::mem::size_of::<UniqueId>() == UNIQUE_ID_BYTES);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    #[error(
        "NCCL could not be loaded ({tried}). NCCL comes with the CUDA build of the torch \
         wheel (the nvidia-nccl package in .venv); set SWIFTBRUSH_NCCL_LIB to a \
         libnccl.so.2 to use another, or use world.backend: tcp"
    )]
    NotFound { tried: String },
    #[error("{path} is not a usable NCCL: symbol {symbol} is missing")]
    Symbol { path: String, symbol: &'static str },
    #[error("{path} is NCCL {found}; swiftbrush needs NCCL 2.14 or newer")]
    TooOld { path: String, found: String },
}

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> NcclResult;
type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> NcclResult;
type CommInitRankConfigFn =
    unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int, *mut Config) -> NcclResult;
type CommGetAsyncErrorFn = unsafe extern "C" fn(RawComm, *mut NcclResult) -> NcclResult;
type CommAbortFn = unsafe extern "C" fn(RawComm) -> NcclResult;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawComm,
    *mut c_void,
) -> NcclResult;
/// ncclReduceScatter(sendbuff, recvbuff, recvcount, datatype, op, comm, stream).
type ReduceScatterFn = AllReduceFn;
/// ncclAllGather(sendbuff, recvbuff, sendcount, datatype, comm, stream).
type AllGatherFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    RawComm,
    *mut c_void,
) -> NcclResult;
type GroupFn = unsafe extern "C" fn() -> NcclResult;
type GetErrorStringFn = unsafe extern "C" fn(NcclResult) -> *const c_char;
type GetLastErrorFn = unsafe extern "C" fn(RawComm) -> *const c_char;

/// The loaded library: its entry points, resolved once.
pub struct NcclLib {
    pub path: String,
    /// NCCL_VERSION_CODE, e.g. 22907 for 2.29.7.
    pub version: c_int,
    pub get_unique_id: GetUniqueIdFn,
    pub comm_init_rank_config: CommInitRankConfigFn,
    pub comm_get_async_error: CommGetAsyncErrorFn,
    pub comm_abort: CommAbortFn,
    pub all_reduce: AllReduceFn,
    /// The all-reduce's two halves (world.shard_state).
    pub reduce_scatter: ReduceScatterFn,
    pub all_gather: AllGatherFn,
    /// ncclGroupStart / ncclGroupEnd: the collectives queued between them
    /// are launched together, and on a nonblocking communicator the group
    /// is waited for once (ncclGroupEnd returns ncclInProgress).
    pub group_start: GroupFn,
    pub group_end: GroupFn,
    get_error_string: GetErrorStringFn,
    get_last_error: GetLastErrorFn,
}

impl std::fmt::Debug for NcclLib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclLib({} {})", self.path, version_string(self.version))
    }
}

/// "2.29.7" from 22907 (and 2.8.4 from 2804: NCCL changed the encoding at 2.9).
pub fn version_string(code: c_int) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}

impl NcclLib {
    /// Loads the library at `path` (a file path, or a bare soname for the
    /// system's search) and resolves every entry point.
    pub fn open(path: &str) -> Result<Self, LoadError> {
        let handle = dlopen(path, libc::RTLD_NOW | libc::RTLD_LOCAL).map_err(|reason| {
            LoadError::NotFound {
                tried: format!("{path}: {reason}"),
            }
        })?;
        Self::resolve(path, handle)
    }

    fn resolve(path: &str, handle: *mut c_void) -> Result<Self, LoadError> {
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the handle is open; the name is NUL-terminated.
                let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
                if p.is_null() {
                    return Err(LoadError::Symbol {
                        path: path.to_owned(),
                        symbol: $name,
                    });
                }
                // SAFETY: the symbol is NCCL's C function of this signature
                // (nccl.h); the handle stays open for the process's life.
                unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
            }};
        }
        let get_version: GetVersionFn = sym!("ncclGetVersion", GetVersionFn);
        let lib = Self {
            path: path.to_owned(),
            version: 0,
            get_unique_id: sym!("ncclGetUniqueId", GetUniqueIdFn),
            comm_init_rank_config: sym!("ncclCommInitRankConfig", CommInitRankConfigFn),
            comm_get_async_error: sym!("ncclCommGetAsyncError", CommGetAsyncErrorFn),
            comm_abort: sym!("ncclCommAbort", CommAbortFn),
            all_reduce: sym!("ncclAllReduce", AllReduceFn),
            reduce_scatter: sym!("ncclReduceScatter", ReduceScatterFn),
            all_gather: sym!("ncclAllGather", AllGatherFn),
            group_start: sym!("ncclGroupStart", GroupFn),
            group_end: sym!("ncclGroupEnd", GroupFn),
            get_error_string: sym!("ncclGetErrorString", GetErrorStringFn),
            get_last_error: sym!("ncclGetLastError", GetLastErrorFn),
        };
        let mut version: c_int = 0;
        // SAFETY: a valid out-pointer.
        let rc = unsafe { get_version(&mut version) };
        if rc != NCCL_SUCCESS || version < MIN_VERSION {
            return Err(LoadError::TooOld {
                path: path.to_owned(),
                found: if rc == NCCL_SUCCESS {
                    version_string(version)
                } else {
                    format!("unknown (ncclGetVersion returned {rc})")
                },
            });
        }
        Ok(Self { version, ..lib })
    }

    /// What went wrong: NCCL's name for `code` and its last error message
    /// for `comm` (may be null).
    pub fn describe(&self, code: NcclResult, comm: RawComm) -> String {
        // SAFETY: both return static or comm-owned NUL-terminated strings
        // (or null), copied here at once.
        let text = |p: *const c_char| {
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        let name = text(unsafe { (self.get_error_string)(code) })
            .unwrap_or_else(|| format!("error {code}"));
        match text(unsafe { (self.get_last_error)(comm) }) {
            Some(last) if !last.trim().is_empty() => format!("{name}: {}", last.trim()),
            _ => name,
        }
    }
}

// SAFETY: only function pointers and a path; NCCL's entry points may be
// called from any thread.
unsafe impl Send for NcclLib {}
unsafe impl Sync for NcclLib {}

/// The wheel's libnccl beside the running libtorch (the nvidia-nccl
/// package installs it under `site-packages/nvidia/nccl/lib`, two levels up
/// from `site-packages/torch/lib`).
pub fn wheel_path() -> Option<String> {
    let lib = &crate::torch::libtorch::lib_dir()?.path;
    Some(format!(
        "{}/../../nvidia/nccl/lib/libnccl.so.2",
        lib.display()
    ))
}

/// The process's NCCL, loaded on first use (see the module docs for the
/// order); the outcome, success or error, is kept.
pub fn library() -> Result<&'static NcclLib, LoadError> {
    static LIB: OnceLock<Result<NcclLib, LoadError>> = OnceLock::new();
    LIB.get_or_init(|| {
        let explicit = std::env::var("SWIFTBRUSH_NCCL_LIB")
            .ok()
            .filter(|p| !p.is_empty());
        load_first(explicit.as_deref())
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Tries the candidates in order; an explicit path is the only one tried.
fn load_first(explicit: Option<&str>) -> Result<NcclLib, LoadError> {
    if let Some(path) = explicit {
        return NcclLib::open(path).map_err(|e| match e {
            LoadError::NotFound { tried } => LoadError::NotFound {
                tried: format!("SWIFTBRUSH_NCCL_LIB={tried}"),
            },
            other => other,
        });
    }
    crate::torch::device::load_cuda_backend();
    // Already in the process (libtorch_cuda.so depends on it): reuse it.
    if let Ok(handle) = dlopen("libnccl.so.2", libc::RTLD_NOW | libc::RTLD_NOLOAD) {
        let path = crate::torch::libtorch::loaded_library_dir("libnccl.so.2").map_or_else(
            || "libnccl.so.2 (loaded by libtorch)".to_owned(),
            |dir| format!("{}/libnccl.so.2 (loaded by libtorch)", dir.display()),
        );
        return NcclLib::resolve(&path, handle);
    }
    let mut tried = Vec::new();
    for path in wheel_path().into_iter().chain(["libnccl.so.2".to_owned()]) {
        match NcclLib::open(&path) {
            Ok(lib) => return Ok(lib),
            Err(LoadError::NotFound { tried: t }) => tried.push(t),
            Err(other) => return Err(other),
        }
    }
    Err(LoadError::NotFound {
        tried: tried.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ncclInvalidUsage`.
    const NCCL_INVALID_USAGE: NcclResult = 5;

    #[test]
    fn versions_read_as_nccl_writes_them() {
        assert_eq!(version_string(22907), "2.29.7");
        assert_eq!(version_string(21400), "2.14.0");
        assert_eq!(version_string(2804), "2.8.4");
    }

    #[test]
    fn a_missing_library_names_the_path_and_the_remedy() {
        let err = NcclLib::open("/nonexistent/libnccl.so.2").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/libnccl.so.2"), "{msg}");
        assert!(
            msg.contains("SWIFTBRUSH_NCCL_LIB") && msg.contains("tcp"),
            "{msg}"
        );
        let err = load_first(Some("/nonexistent/libnccl.so.2")).unwrap_err();
        assert!(
            err.to_string()
                .contains("SWIFTBRUSH_NCCL_LIB=/nonexistent/libnccl.so.2"),
            "{err}"
        );
    }

    #[test]
    fn a_library_that_is_not_nccl_is_refused_by_symbol() {
        // libc is loadable everywhere and has no NCCL entry points.
        let err = NcclLib::open("libc.so.6").unwrap_err();
        assert_eq!(
            err,
            LoadError::Symbol {
                path: "libc.so.6".to_owned(),
                symbol: "ncclGetVersion"
            }
        );
    }

    #[test]
    fn the_wheels_nccl_has_the_group_calls_and_they_pair() {
        // The pinned wheel ships libnccl.so.2, and it loads without a GPU.
        let lib = library().expect("the torch wheel's libnccl");
        // A group with nothing in it needs no device and no communicator.
        // SAFETY: NCCL's C entry points; the group is thread-local state.
        let (start, end) = unsafe { ((lib.group_start)(), (lib.group_end)()) };
        assert_eq!((start, end), (NCCL_SUCCESS, NCCL_SUCCESS), "{lib:?}");
        // An end without a start is refused: these are the real group calls.
        // SAFETY: as above.
        let unpaired = unsafe { (lib.group_end)() };
        assert_eq!(unpaired, NCCL_INVALID_USAGE, "{lib:?}");
    }

    #[test]
    fn config_is_nccl_config_initializer_with_blocking_off() {
        let c = Config::nonblocking();
        assert_eq!(c.size, 24);
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.blocking, 0);
    }
}
