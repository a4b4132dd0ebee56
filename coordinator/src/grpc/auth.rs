//! The job token: every RPC must carry it (`authorization: Bearer <token>`).
//! It comes from a file or the SWIFTBRUSH_TOKEN environment variable, never
//! from a command-line argument (those show in `ps`). Only its sha256 is
//! kept, and tokens are compared as digests in constant time, so neither the
//! content nor the length of the token leaks through timing.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use swiftbrush_proto::rpc::{AUTHORIZATION, BEARER_PREFIX, TokenReadError, read_job_token};
use tonic::{Request, Status};

/// Shorter tokens are refused: a guessable token protects nothing.
pub const MIN_TOKEN_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Read(#[from] TokenReadError),
    #[error("the job token must be at least {MIN_TOKEN_BYTES} bytes of visible ASCII (no spaces)")]
    Weak,
}

#[derive(Clone)]
pub struct JobToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobToken(<redacted>)")
    }
}

impl JobToken {
    pub fn new(token: &str) -> Result<Self, TokenError> {
        // Visible ASCII only: it travels in an HTTP/2 header.
        if token.len() < MIN_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Weak);
        }
        Ok(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// `--token-file` (its first line) if given, else the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, TokenError> {
        let token = read_job_token(file)?;
        if let Some(path) = file {
            warn_if_readable_by_others(path);
        }
        Self::new(&token)
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.digest).into()
    }

    /// The interceptor that guards every RPC of the coordinator service.
    pub fn interceptor(self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        move |request: Request<()>| {
            let Some(value) = request.metadata().get(AUTHORIZATION) else {
                return Err(Status::unauthenticated("missing job token"));
            };
            let presented = value
                .as_bytes()
                .strip_prefix(BEARER_PREFIX.as_bytes())
                .unwrap_or_default();
            if self.matches(presented) {
                Ok(request)
            } else {
                Err(Status::unauthenticated("wrong job token"))
            }
        }
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "the token file is readable by others; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves_and_weak_ones_are_refused() {
        let token = JobToken::new("0123456789abcdef-secret").unwrap();
        assert!(token.matches(b"0123456789abcdef-secret"));
        assert!(!token.matches(b"0123456789abcdef-secreT"));
        assert!(!token.matches(b""));
        assert!(matches!(JobToken::new("short"), Err(TokenError::Weak)));
        assert!(matches!(
            JobToken::new("has a space in it ok"),
            Err(TokenError::Weak)
        ));
        assert_eq!(format!("{token:?}"), "JobToken(<redacted>)");
    }

    #[test]
    fn token_file_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef-secret\n").unwrap();
        let token = JobToken::load(Some(&path)).unwrap();
        assert!(token.matches(b"0123456789abcdef-secret"));
    }
}
