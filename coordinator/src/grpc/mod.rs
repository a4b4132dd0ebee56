//! The gRPC face of the coordinator: the service (handlers only), request
//! and reply conversion, the error-to-status map and the token check.

mod auth;
mod convert;
mod service;
mod status;

pub use auth::{JobToken, MIN_TOKEN_BYTES, TokenError};
pub use service::CoordinatorService;
