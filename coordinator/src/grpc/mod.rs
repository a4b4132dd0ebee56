//! The gRPC face of the coordinator: the service (handlers only), request
//! checks and conversion, reply conversion, the error-to-status map and the token check.

mod auth;
mod replies;
mod requests;
mod service;
mod status;

pub use auth::{JobToken, MIN_TOKEN_BYTES, TokenError};
pub use service::CoordinatorService;
