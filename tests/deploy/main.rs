//! The deployment files under deploy/ as a cluster would read them. The
//! image cannot be built here (no Docker engine), so the Dockerfile's
//! structure is checked: stages, pinned versions, the libtorch paths the
//! binary's rpath needs, USER, ENTRYPOINT, and that everything it copies
//! exists. The Kubernetes overlay is rendered by the real kustomize
//! (`kustomize` or `kubectl kustomize`) and its wiring checked: secrets and
//! config maps that pods use exist, ports agree between Service, probes and
//! the coordinator's flags, workers per pod agree with the GPUs and the
//! job's world size, images agree. The Slurm script's directives and its
//! refusals are checked here; tests/deploy_e2e.rs (with the worker) runs it.
//!
//! One test binary, a module per launcher.

mod docker;
mod k8s;
mod node;
mod slurm;

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

fn read(path: impl AsRef<Path>) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The user the images run as (and the pods' runAsUser).
const IMAGE_UID: u32 = 10001;
