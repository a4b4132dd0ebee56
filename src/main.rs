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
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, as anyhow's `{:#}` writes them,
/// less every cause whose text the line already holds: many error types
/// write their source into their own message (`"cannot start the job:
/// {0}"`), and the chain would then say each thing twice.
fn describe(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = anyhow::Error::from(Outer::from(Inner)).context("train");
        assert_eq!(
            super::describe(&e),
            "train: cannot start the job: captions.txt: no captions"
        );
        let plain = anyhow::anyhow!("top").context("outer");
        assert_eq!(super::describe(&plain), "outer: top");
    }
}
