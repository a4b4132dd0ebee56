//! The training loop and what it is built from: caption feeds and gradient
//! synchronisation behind traits, so the distributed runtime swaps only
//! those two.

pub mod caption_feed;
pub mod checkpoint;
pub mod gradient_sync;
pub mod progress;
pub mod run;
pub mod single;
pub mod tensor_bytes;
pub mod text;

pub use run::{Resume, TrainError, TrainSummary, Trainer};
