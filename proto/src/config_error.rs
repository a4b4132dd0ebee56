//! Config errors that name the key path, the value and what is allowed.

use std::fmt;

/// One invalid or missing value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `method.lora.rank`.
    pub key: String,
    /// The value as written; `None` when the key is missing.
    pub value: Option<String>,
    pub allowed: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(
                f,
                "{} = {v} is not allowed; expected {}",
                self.key, self.allowed
            ),
            None => write!(f, "{} is missing; expected {}", self.key, self.allowed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not fit the schema (syntax, unknown key, wrong type).
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    /// Parsed, but values are out of range or inconsistent.
    #[error("invalid config:\n{}", list(.0))]
    Invalid(Vec<Problem>),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// One parse error per problem, each on its own line after the first.
    pub(crate) fn from_parses(origin: &str, messages: Vec<String>) -> Self {
        let message = match messages.as_slice() {
            [one] => one.clone(),
            many => format!(
                "{} problems:\n{}",
                many.len(),
                many.iter()
                    .map(|m| format!("  - {m}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        };
        ConfigError::Parse {
            origin: origin.to_owned(),
            message,
        }
    }
}

/// A parse error as (the dotted key at fault, the sentence naming it).
pub(crate) fn parse_problem(path: String, err: serde_norway::Error) -> (String, String) {
    {
        let location = err
            .location()
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        let raw = err.to_string();
        // serde_norway appends its own "at line N column M"; we print ours.
        let raw = match raw.find(" at line ") {
            Some(i) => raw[..i].to_owned(),
            None => raw,
        };
        // ... and prefixes nested errors with its own key path; we print ours.
        let raw = match raw.split_once(": ") {
            Some((prefix, rest)) if !prefix.contains(' ') && !prefix.is_empty() => rest.to_owned(),
            _ => raw,
        };
        match unknown_field(&raw) {
            Some((field, expected)) => {
                // The path already ends with the unknown key.
                let key = if path == field || path.ends_with(&format!(".{field}")) {
                    path.clone()
                } else {
                    join_key(&path, &field)
                };
                let hint = did_you_mean(&field, &expected)
                    .map(|s| format!("did you mean `{s}`? "))
                    .unwrap_or_default();
                let message = format!(
                    "{key}: unknown key{location}; {hint}allowed keys here: {}",
                    expected.join(", ")
                );
                (key, message)
            }
            None if path == "." || path.is_empty() => (String::new(), format!("{raw}{location}")),
            None => {
                let message = format!("{path}: {raw}{location}");
                (path, message)
            }
        }
    }
}

/// Extracts the field and the expected names from serde's
/// "unknown field `x`, expected one of `a`, `b`" (or "expected `a`").
fn unknown_field(msg: &str) -> Option<(String, Vec<String>)> {
    let rest = msg.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((field.to_owned(), expected))
}

fn join_key(parent: &str, field: &str) -> String {
    if parent.is_empty() || parent == "." {
        field.to_owned()
    } else {
        format!("{parent}.{field}")
    }
}

/// The closest allowed name, if it is close enough to be a typo.
fn did_you_mean<'a>(field: &str, expected: &'a [String]) -> Option<&'a str> {
    expected
        .iter()
        .map(|e| (strsim::jaro_winkler(field, e), e))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, e)| e.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_serde_unknown_field_message() {
        let (f, e) =
            unknown_field("unknown field `gudance_scale`, expected one of `a`, `guidance_scale`")
                .unwrap();
        assert_eq!(f, "gudance_scale");
        assert_eq!(e, vec!["a", "guidance_scale"]);
        assert_eq!(did_you_mean(&f, &e), Some("guidance_scale"));
    }

    #[test]
    fn no_suggestion_for_unrelated_names() {
        let e = vec!["rank".to_owned(), "alpha".to_owned()];
        assert_eq!(did_you_mean("zzzzzzzz", &e), None);
    }
}
