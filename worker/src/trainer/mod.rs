//! The training loop and what it is built from: caption feeds, gradient
//! synchronisation, checkpoint sinks and step controls behind traits, so a
//! single process and a distributed rank differ only in the `WorldParts`
//! they plug in.
//!
//! | file | owns |
//! |---|---|
//! | `run.rs` | [`Trainer`] and its loop with named steps; [`Networks`] |
//! | `load.rs` | building a trainer from the config and the teacher folder |
//! | `persist.rs` | the checkpoint's tensor groups, restore, snapshot, preemption |
//! | `checkpointer.rs` | checkpoint cadence, the uploader, committed/written steps |
//! | `checkpoint.rs` | the checkpoint's files, the upload thread, the sinks |
//! | `optimizers.rs` | both Adams behind the step vote |
//! | `metrics.rs` | rank 0's progress and TensorBoard file per world |
//! | `world.rs` | what a world plugs in ([`WorldParts`]), [`World`], controls |
//! | `solo.rs` | [`SoloTrainer`]: one process alone (tests, bench) |
//! | `samples.rs` | the sample step's pictures |

pub mod caption_audit;
pub mod caption_feed;
pub mod checkpoint;
mod checkpointer;
mod error;
pub mod events;
pub mod gradient_sync;
mod load;
mod metrics;
mod optimizers;
mod persist;
pub mod progress;
pub mod run;
mod samples;
mod solo;
pub mod tensor_bytes;
pub mod text;
pub mod world;

pub use error::TrainError;
pub use load::device_of;
pub use optimizers::Optimizers;
pub use run::{Networks, Resume, StepDone, TrainSummary, Trainer};
pub use solo::SoloTrainer;
use text::TextConditioner;
pub use world::{Directive, Phase, RunToEnd, StepControl, StepReport, World, WorldEnd, WorldParts};
