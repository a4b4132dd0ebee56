//! The coordinator as its own binary, without libtorch: for CPU nodes that
//! only coordinate (and the small container image). `swiftbrush
//! coordinator` in the main CLI takes the same flags
//! (`swiftbrush_coordinator::cli`) and runs the same server.

use clap::Parser;
use swiftbrush_coordinator::cli::CoordinatorArgs;

#[derive(Debug, Parser)]
#[command(
    name = "swiftbrush-coordinator",
    version,
    about = "Coordinate a distributed SwiftBrush job: worlds, captions, health, checkpoints"
)]
struct Cli {
    #[command(flatten)]
    args: CoordinatorArgs,
}

fn main() -> anyhow::Result<()> {
    let Cli { args } = Cli::parse();
    init_logging(args.log_json);
    swiftbrush_coordinator::cli::run(args)?;
    Ok(())
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
