//! Bakes libtorch's directory into the binary's rpath, so `swiftbrush` runs
//! without LD_LIBRARY_PATH on the machine that built it. torch-sys publishes
//! the directory it linked against (links = "tch" -> DEP_TCH_LIBTORCH_LIB)
//! to its direct dependents. Where that directory is missing (another
//! machine), the loader takes libtorch from LD_LIBRARY_PATH and the worker
//! finds the rest beside it (worker/src/torch/libtorch.rs).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
