//! An error and its causes as one line of text, for a person (the
//! binary's last words) and for the coordinator (a failing worker's
//! reason): one piece of code, so both say the same thing.

use std::error::Error;

/// The error and its causes joined by ": ", as anyhow's `{:#}` writes
/// them, less every cause whose text the line already holds: many error
/// types write their source into their own message (`"cannot start the
/// job: {0}"`), and the chain would then say each thing twice.
pub fn error_line(error: &(dyn Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(error);
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot start the job: {0}")]
        Job(#[from] Inner),
        #[error("train")]
        Context(#[source] Box<Outer>),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("captions.txt: no captions")]
    struct Inner;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = Outer::Context(Box::new(Outer::from(Inner)));
        assert_eq!(
            error_line(&e),
            "train: cannot start the job: captions.txt: no captions"
        );
        let io = std::io::Error::other("no such directory");
        assert_eq!(error_line(&io), "no such directory");
    }
}
