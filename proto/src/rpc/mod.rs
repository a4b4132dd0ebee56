//! The coordinator's gRPC API (`proto/swiftbrush.proto`, package
//! `swiftbrush.v1`): generated message types, the client the worker uses
//! and the server trait the coordinator implements, plus the limits and
//! metadata names both sides agree on. docs/PROTOCOL.md describes the
//! protocol.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    tonic::include_proto!("swiftbrush.v1");
}

pub use generated::*;

/// The metadata key that carries the job token: `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// The scheme before the token in [`AUTHORIZATION`].
pub const BEARER_PREFIX: &str = "Bearer ";

/// The environment variable that holds the job token (the CLI never takes
/// it as an argument: arguments show up in `ps`).
pub const TOKEN_ENV: &str = "SWIFTBRUSH_TOKEN";

/// Largest request the coordinator decodes. The biggest legitimate ones
/// (a config, a staged-checkpoint list) are far smaller.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Largest reply; a captions reply is cut to fit well under it.
pub const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;

/// Longest a Rendezvous or FetchBootstrap call waits before replying.
pub const MAX_WAIT_MS: u64 = 30_000;

/// Largest bootstrap blob (an NCCL unique id is 128 bytes).
pub const MAX_BOOTSTRAP_BYTES: usize = 64 * 1024;

/// Most steps one GetCaptions call may ask for.
pub const MAX_CAPTION_STEPS: u32 = 64;

/// Most captions one rank takes in one step (`train.global_batch /
/// world.min_size`, checked by the config). With every caption at most
/// [`crate::caption_source::MAX_CAPTION_BYTES`], one step's captions always
/// fit a reply: a GetCaptions reply is bounded by construction, whatever
/// the caption files hold.
pub const MAX_CAPTIONS_PER_RANK_STEP: u32 = 1024;

// A caption's framing in the reply: its string's tag and length, and its id
// as a varint, are under 16 bytes; 1 KiB covers the step's own fields.
const _: () = assert!(
    MAX_CAPTIONS_PER_RANK_STEP as usize * (crate::caption_source::MAX_CAPTION_BYTES + 16) + 1024
        <= MAX_REPLY_BYTES
);

/// Largest staged-checkpoint JSON or job config accepted.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// Longest host, device, version or reason string accepted.
pub const MAX_NAME_BYTES: usize = 253;

/// Longest error a failing worker reports (Leave with `failed`); a worker
/// cuts a longer one to this.
pub const MAX_REASON_BYTES: usize = 2048;

mod client;
mod token;

pub use client::{
    ClientTls, ConnectError, CoordinatorConnection, TokenInterceptor, connect,
    install_crypto_provider,
};
pub use token::{TokenReadError, read_job_token};
