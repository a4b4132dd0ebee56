//! The run store against every backend: one suite of scenarios
//! (scenarios.rs) run on memory, on local disk and on a real S3 server
//! (moto, started on loopback for the test), plus checks that only make
//! sense for one backend (backend_specific.rs).

mod backend;
mod backend_specific;
mod moto;
mod recording_store;
mod scenarios;

use backend::{LocalBackend, MemoryBackend, S3Backend};

#[test]
fn suite_on_memory() {
    scenarios::run_all(&MemoryBackend::new());
}

#[test]
fn suite_on_local_disk() {
    scenarios::run_all(&LocalBackend::new());
}

#[test]
fn suite_on_s3_moto() {
    // The guard kills the server when this test ends, failed or not.
    let server = moto::MotoServer::start();
    scenarios::run_all(&S3Backend::new(&server));
}
