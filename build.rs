//! Bakes libtorch's directory into the binary's rpath, so `swiftbrush` runs
//! without LD_LIBRARY_PATH. torch-sys publishes the directory it linked
//! against (links = "tch" -> DEP_TCH_LIBTORCH_LIB) to its direct dependents.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // device.rs loads libtorch_cuda.so from here (see there why).
        println!("cargo:rustc-env=SWIFTBRUSH_LIBTORCH_LIB={dir}");
    }
}
