//! Reading the job token, the same way for the coordinator and every
//! client: the first line of `--token-file`, else SWIFTBRUSH_TOKEN; never a
//! command-line argument (those show in `ps`).

use std::path::Path;

use super::TOKEN_ENV;

#[derive(Debug, thiserror::Error)]
pub enum TokenReadError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no job token: pass --token-file PATH or set {TOKEN_ENV} (never on the command line)")]
    Missing,
    #[error("the job token is empty (--token-file or {TOKEN_ENV})")]
    Empty,
}

/// The token text, trimmed: the first line of `file` if given (a trailing
/// newline is not part of it), else the environment variable.
pub fn read_job_token(file: Option<&Path>) -> Result<String, TokenReadError> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| TokenReadError::Read {
                path: path.display().to_string(),
                source,
            })?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        None => std::env::var(TOKEN_ENV)
            .map_err(|_| TokenReadError::Missing)?
            .trim()
            .to_owned(),
    };
    if token.is_empty() {
        return Err(TokenReadError::Empty);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_of_the_file_trimmed_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  abcdefghijklmnopqrstuvwxyz  \nsecond line\n").unwrap();
        assert_eq!(
            read_job_token(Some(&path)).unwrap(),
            "abcdefghijklmnopqrstuvwxyz"
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            read_job_token(Some(&path)),
            Err(TokenReadError::Empty)
        ));
        let missing = dir.path().join("no-such-token");
        let e = read_job_token(Some(&missing)).unwrap_err().to_string();
        assert!(
            e.contains("cannot read the token file") && e.contains("no-such-token"),
            "{e}"
        );
    }
}
