//! `swiftbrush coordinator`: the coordinator served from the main binary,
//! with exactly the flags of the libtorch-free `swiftbrush-coordinator`
//! (both come from `swiftbrush_coordinator::cli`).

pub use swiftbrush_coordinator::cli::CoordinatorArgs;

pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    swiftbrush_coordinator::cli::run(args)?;
    Ok(())
}
