//! Two jobs, both against the libtorch torch-sys linked (it publishes its
//! directory to direct dependents: links = "tch" -> DEP_TCH_LIBTORCH_LIB):
//!
//! - bakes libtorch's directory into the rpath, so the worker's test
//!   binaries run without LD_LIBRARY_PATH;
//! - compiles the C++ shim in csrc/ (autocast with a dtype; libtorch's
//!   current CUDA stream; TF32), which tch 0.24 does not expose. The CUDA part is
//!   compiled only when libc10_cuda.so sits next to libtorch (a CUDA wheel);
//!   a CPU-only wheel gets functions that report CUDA as missing.
use std::path::Path;

const SHIM_FILES: [&str; 5] = [
    "csrc/shim.h",
    "csrc/autocast.cpp",
    "csrc/cuda_stream.cpp",
    "csrc/math_mode.cpp",
    "csrc/foreach.cpp",
];

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    for f in SHIM_FILES {
        println!("cargo:rerun-if-changed={f}");
    }
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!(
            "DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not report where libtorch is, \
             so the C++ shim (worker/csrc) cannot be compiled"
        );
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    // Only a fallback: libtorch.rs reads the directory libtorch was really
    // loaded from, which is this one only on the build machine.
    println!("cargo:rustc-env=SWIFTBRUSH_BUILT_LIBTORCH_LIB={dir}");
    compile_shim(Path::new(&dir));
}

fn compile_shim(lib_dir: &Path) {
    let include = lib_dir
        .parent()
        .map(|p| p.join("include"))
        .unwrap_or_default();
    if !include.join("ATen").join("autocast_mode.h").exists() {
        panic!(
            "libtorch headers not found at {} (expected ATen/autocast_mode.h next to {}); \
             the worker's C++ shim needs the headers of the libtorch it links",
            include.display(),
            lib_dir.display()
        );
    }
    // The ABI libtorch was built with; torch-sys reads the same variable
    // (.cargo/config.toml sets it for the pip wheel, which uses the new ABI).
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    let with_cuda = lib_dir.join("libc10_cuda.so").exists();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        // libtorch's headers are not warning-clean; ours should be.
        .flag("-isystem")
        .flag(include.display().to_string())
        .flag("-Wall")
        .flag("-Wextra")
        .file("csrc/autocast.cpp")
        .file("csrc/cuda_stream.cpp")
        .file("csrc/math_mode.cpp")
        .file("csrc/foreach.cpp");
    if with_cuda {
        build.define("SWIFTBRUSH_WITH_CUDA", None);
    }
    build.compile("swiftbrush_shim");
    if with_cuda {
        // After the shim on the link line, so --as-needed keeps it.
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}
