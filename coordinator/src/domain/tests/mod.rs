//! Synchronous tests of the core's transitions: a fake clock (`Sim::now`),
//! factory helpers, and the invariant check after every transition.

mod cancel;
mod commits;
mod failures;
mod formation;
mod random_walk;
mod refusals;
mod sim;
