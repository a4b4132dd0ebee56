//! Every error the coordinator can return, mapped to a gRPC status in one
//! exhaustive match: adding an error variant anywhere fails to compile
//! until it is given a code here. The codes tell a worker what to do:
//! UNAUTHENTICATED (fix the token), INVALID_ARGUMENT (a bug in the caller),
//! NOT_FOUND (register again), FAILED_PRECONDITION (stale generation or
//! wrong state: heartbeat to learn the current one), ABORTED and
//! UNAVAILABLE (retry), ALREADY_EXISTS (someone else did it).

use swiftbrush_proto::ConfigError;
use swiftbrush_proto::run_store::RunStoreError;
use tonic::Status;

use crate::app::{AppError, CorpusError};
use crate::domain::CoreError;

impl From<AppError> for Status {
    fn from(error: AppError) -> Self {
        let message = error.to_string();
        match error {
            AppError::Core(core) => match core {
                CoreError::NoJob
                | CoreError::JobEnded { .. }
                | CoreError::HostQuarantined { .. }
                | CoreError::StaleGeneration { .. }
                | CoreError::FutureGeneration { .. }
                | CoreError::NotInWorld { .. } => Status::failed_precondition(message),
                CoreError::JobExists { .. }
                | CoreError::AlreadyCommitted { .. }
                | CoreError::BootstrapConflict { .. } => Status::already_exists(message),
                CoreError::InvalidJob(_) | CoreError::InvalidField { .. } => {
                    Status::invalid_argument(message)
                }
                CoreError::UnknownWorker(_) | CoreError::WorkerDead { .. } => {
                    Status::not_found(message)
                }
                CoreError::TooManyWorkers { .. } => Status::resource_exhausted(message),
                // Final for this worker: its teacher will not change by asking again.
                CoreError::TeacherMismatch { .. } => Status::permission_denied(message),
                CoreError::WrongRank { .. } | CoreError::NotRankZero { .. } => {
                    Status::permission_denied(message)
                }
                CoreError::StepOutOfRange { .. } => Status::out_of_range(message),
                CoreError::CommitInFlight { .. } => Status::aborted(message),
            },
            AppError::Invalid { .. } => Status::invalid_argument(message),
            AppError::Config(config) => match config {
                ConfigError::Parse { .. } | ConfigError::Invalid(_) => {
                    Status::invalid_argument(message)
                }
                ConfigError::Read { .. } => Status::failed_precondition(message),
            },
            AppError::Captions(captions) => match captions {
                CorpusError::NoSources | CorpusError::UnknownFormat(_) | CorpusError::Parse(_) => {
                    Status::invalid_argument(message)
                }
                CorpusError::Read { .. } => Status::failed_precondition(message),
            },
            AppError::Store(store) => match store {
                RunStoreError::AlreadyCommitted { .. } => Status::already_exists(message),
                RunStoreError::StaleGeneration { .. }
                | RunStoreError::LeaseHeld { .. }
                | RunStoreError::LeaseLost { .. } => Status::failed_precondition(message),
                RunStoreError::InvalidName { .. } | RunStoreError::InvalidWrite { .. } => {
                    Status::invalid_argument(message)
                }
                RunStoreError::Store { .. } => Status::unavailable(message),
                RunStoreError::NoSuchCheckpoint { .. }
                | RunStoreError::NoCheckpoint { .. }
                | RunStoreError::NoSuchFile { .. } => Status::not_found(message),
                RunStoreError::InvalidCheckpoint { .. } | RunStoreError::Json { .. } => {
                    Status::data_loss(message)
                }
                RunStoreError::InvalidUrl { .. }
                | RunStoreError::UnsupportedScheme { .. }
                | RunStoreError::LocalDir { .. }
                | RunStoreError::Configure { .. }
                | RunStoreError::InvalidRetention
                | RunStoreError::BlockingInAsync
                | RunStoreError::Runtime(_) => Status::internal(message),
            },
            AppError::Internal(_) => Status::internal(message),
        }
    }
}
