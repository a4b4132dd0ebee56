//! The one user-facing binary. Thin on purpose: it parses the command line,
//! sets up logging and calls into the crates that do the work.

mod cli;
mod logging;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before any tensor exists: how CPU tensors take memory from malloc
    // (worker/src/torch/host_memory.rs).
    swiftbrush_worker::torch::host_memory::tune();
    let args = cli::Cli::parse();
    logging::init(args.log_format(), args.default_log_filter());
    if args.uses_torch() {
        // Before anything can touch CUDA: a CUDA call (tch::manual_seed
        // seeds every device) before the backend is loaded disables CUDA
        // for the whole process.
        swiftbrush_worker::torch::device::load_cuda_backend();
    }
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once (swiftbrush_proto::error_line).
            eprintln!("error: {}", swiftbrush_proto::error_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot start the job: {0}")]
        Job(#[from] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("captions.txt: no captions")]
    struct Inner;

    /// anyhow's context is a cause like any other: the line main prints.
    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = anyhow::Error::from(Outer::from(Inner)).context("train");
        assert_eq!(
            swiftbrush_proto::error_line(e.as_ref()),
            "train: cannot start the job: captions.txt: no captions"
        );
        let plain = anyhow::anyhow!("top").context("outer");
        assert_eq!(swiftbrush_proto::error_line(plain.as_ref()), "outer: top");
    }
}
