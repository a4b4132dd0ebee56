//! The training loop and what it is built from: caption feeds, gradient
//! synchronisation, checkpoint sinks and step controls behind traits, so a
//! single process and a distributed rank differ only in the `WorldParts`
//! they plug in.
//!
//! | file | owns |
//! |---|---|
//! | `run.rs` | [`Trainer`] and its loop with named steps, the world's end (close, preemption); [`Networks`] |
//! | `load.rs` | building a trainer from the config and the teacher folder |
//! | `checkpoint/` | checkpoints: [`Resume`], the `Checkpointer` (cadence, committed/written steps), the format, the upload thread and sinks, tensor bytes |
//! | `save_restore.rs` | which tensors a checkpoint holds, restore, the loop's checkpoint step |
//! | `optimizers.rs` | both Adams behind the step vote |
//! | `sharded_step.rs` | the same steps with `world.shard_state` (crate::shard): slices, the global norm in the vote |
//! | `grad_scaler.rs` | fp16 dynamic loss scaling, one GradScaler per optimizer |
//! | `metrics.rs` | rank 0's progress and TensorBoard file per world; [`StepReport`] |
//! | `world.rs` | what a world plugs in ([`WorldParts`]), [`World`], controls |
//! | `solo.rs` | [`SoloTrainer`]: one process alone (tests, bench) |
//! | `samples.rs` | the sample step's pictures |

pub mod caption_audit;
pub mod caption_feed;
pub mod checkpoint;
mod error;
pub mod events;
pub mod grad_scaler;
pub mod gradient_sync;
mod load;
mod metrics;
mod optimizers;
pub mod progress;
pub mod run;
mod samples;
mod save_restore;
mod sharded_step;
mod solo;
pub mod student_init;
pub mod text;
pub mod world;

pub use checkpoint::Resume;
pub use error::TrainError;
pub use load::device_of;
pub(crate) use load::{sample_shape, score_networks, vsd_config};
pub use metrics::StepReport;
pub use optimizers::Optimizers;
pub use run::{Networks, StepDone, TrainSummary, Trainer};
pub use solo::SoloTrainer;
use text::TextConditioner;
pub use world::{Directive, Phase, RunToEnd, StepControl, World, WorldEnd, WorldParts};
