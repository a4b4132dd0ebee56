//! The one user-facing binary. Thin on purpose: it parses the command line,
//! sets up logging and calls into the crates that do the work.

mod cli;
mod logging;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before any tensor exists: how CPU tensors take memory from malloc
    // (worker/src/host_memory.rs).
    swiftbrush_worker::host_memory::tune();
    let args = cli::Cli::parse();
    logging::init(args.log_format(), args.default_log_filter());
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole anyhow chain on one line per cause.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
