//! The training loop and what it is built from: caption feeds, gradient
//! synchronisation, checkpoint sinks and step controls behind traits, so a
//! single process and a distributed rank differ only in the `WorldParts`
//! they plug in.

pub mod caption_audit;
pub mod caption_feed;
pub mod checkpoint;
mod error;
pub mod events;
pub mod gradient_sync;
mod load;
mod persist;
pub mod progress;
pub mod run;
mod samples;
pub mod tensor_bytes;
pub mod text;
pub mod world;

pub use error::TrainError;
pub use load::device_of;
pub use run::{Resume, StepDone, TrainSummary, Trainer};
use text::TextConditioner;
pub use world::{Directive, Phase, RunToEnd, StepControl, StepReport, WorldEnd, WorldParts};
