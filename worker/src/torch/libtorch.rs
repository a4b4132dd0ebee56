//! Where the running libtorch lives, as the dynamic loader found it.
//!
//! The binaries carry the build machine's libtorch directory in their rpath,
//! so on that machine they start with nothing set. Elsewhere (a GPU machine
//! with its own PyTorch wheel, a container) that directory is missing and the
//! loader takes libtorch from `LD_LIBRARY_PATH` instead. Everything else that
//! comes with libtorch and is loaded by hand (the CUDA backend
//! `libtorch_cuda.so`, the wheel's libnccl) must then come from the same
//! directory, never from the build machine's path: mixing two libtorch
//! builds in one process crashes. So the directory is read back from the
//! loader (the path it opened `libtorch_cpu.so` from), and the build-time
//! path is only a fallback for a libtorch that is not a shared library.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// libtorch's lib directory on the build machine, baked in by build.rs.
const BUILT_LIB_DIR: Option<&str> = option_env!("SWIFTBRUSH_BUILT_LIBTORCH_LIB");

/// The library every libtorch build has and every binary here links.
const CORE_LIBRARY: &str = "libtorch_cpu.so";

/// How the directory was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The directory the loader opened libtorch_cpu.so from (rpath or
    /// LD_LIBRARY_PATH).
    Loaded,
    /// Not loaded as a shared library: the build machine's directory.
    Build,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LibDir {
    pub path: PathBuf,
    pub source: Source,
}

/// libtorch's lib directory for this process (computed once).
pub fn lib_dir() -> Option<&'static LibDir> {
    static DIR: OnceLock<Option<LibDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        loaded_library_dir(CORE_LIBRARY)
            .map(|path| LibDir {
                path,
                source: Source::Loaded,
            })
            .or_else(|| {
                BUILT_LIB_DIR.map(|p| LibDir {
                    path: PathBuf::from(p),
                    source: Source::Build,
                })
            })
    })
    .as_ref()
}

/// The torch version of the wheel that libtorch belongs to (its
/// `torch/version.py`, next to `torch/lib`), e.g. "2.11.0+cu130"; None for a
/// libtorch outside a wheel.
pub fn wheel_version(lib_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(lib_dir.parent()?.join("version.py")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("__version__")?.trim_start();
        let value = rest.strip_prefix('=')?.trim();
        Some(value.trim_matches(['\'', '"']).to_owned())
    })
}

/// The directory of the loaded shared object whose file name is `name`, as
/// the loader opened it (rpath and LD_LIBRARY_PATH give absolute or
/// relative paths; relative ones are made absolute against the current
/// directory, which the loader resolved them against).
pub fn loaded_library_dir(name: &str) -> Option<PathBuf> {
    let path = loaded_objects()
        .into_iter()
        .find(|p| p.file_name().is_some_and(|f| f == name))?;
    let dir = path.parent()?.to_path_buf();
    if dir.is_absolute() {
        Some(dir)
    } else {
        std::env::current_dir().ok().map(|cwd| cwd.join(dir))
    }
}

/// `dlopen(path, flags)`, or the loader's message. Handles are never closed:
/// what is loaded by hand here (libtorch's CUDA backend, libnccl, the CUDA
/// driver) must stay for the life of the process.
pub(crate) fn dlopen(
    path: impl AsRef<std::ffi::OsStr>,
    flags: libc::c_int,
) -> Result<*mut libc::c_void, String> {
    let c = std::ffi::CString::new(path.as_ref().as_encoded_bytes())
        .map_err(|_| "the path contains a NUL byte".to_owned())?;
    // SAFETY: a NUL-terminated path.
    let handle = unsafe { libc::dlopen(c.as_ptr(), flags) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local message or null.
        let msg = unsafe { libc::dlerror() };
        return Err(if msg.is_null() {
            "not loadable".to_owned()
        } else {
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        });
    }
    Ok(handle)
}

/// Paths of every shared object in the process, in load order.
fn loaded_objects() -> Vec<PathBuf> {
    unsafe extern "C" fn collect(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid info for the duration of the
        // call, and `data` is the Vec passed below.
        let (info, out) = unsafe { (&*info, &mut *data.cast::<Vec<PathBuf>>()) };
        if !info.dlpi_name.is_null() {
            // SAFETY: a NUL-terminated string owned by the loader.
            let name = unsafe { CStr::from_ptr(info.dlpi_name) };
            if !name.is_empty() {
                out.push(PathBuf::from(name.to_string_lossy().into_owned()));
            }
        }
        0
    }
    let mut out: Vec<PathBuf> = Vec::new();
    // SAFETY: the callback only reads the loader's entries and appends to
    // `out`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(collect), (&mut out as *mut Vec<PathBuf>).cast()) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaded_libtorch_is_found_where_the_loader_opened_it() {
        let dir = lib_dir().expect("this test binary links libtorch");
        assert_eq!(dir.source, Source::Loaded);
        assert!(dir.path.join(CORE_LIBRARY).exists(), "{dir:?}");
        // The test binary runs where it was built: the same directory.
        let built = Path::new(BUILT_LIB_DIR.unwrap()).canonicalize().unwrap();
        assert_eq!(dir.path.canonicalize().unwrap(), built);
    }

    #[test]
    fn the_wheel_version_is_read_from_version_py() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("lib")).unwrap();
        std::fs::write(
            tmp.path().join("version.py"),
            "from typing import Optional\n__version__ = '2.11.0+cu130'\ngit_version = 'abc'\n",
        )
        .unwrap();
        assert_eq!(
            wheel_version(&tmp.path().join("lib")).as_deref(),
            Some("2.11.0+cu130")
        );
        assert_eq!(wheel_version(&tmp.path().join("nowhere/lib")), None);
    }

    #[test]
    fn an_unloaded_library_has_no_directory() {
        assert_eq!(loaded_library_dir("libnot-a-real-library.so"), None);
    }
}
