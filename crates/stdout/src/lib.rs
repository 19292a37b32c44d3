//! Command output on stdout that ends quietly when its reader goes away.
//!
//! Rust programs ignore SIGPIPE, so a write to a pipe whose reader has exited
//! (`gangplank install crds | head -1`) fails with EPIPE, and `println!` turns that into a
//! panic ("failed printing to stdout"). Gangplank's commands print with [`print`] and
//! [`println`] instead, which return [`Error::Closed`] then; each `main` ends such a command
//! without a message, with [`EXIT_CLOSED`] (141, 128 + SIGPIPE: what a shell reports for a
//! Unix tool killed by SIGPIPE, so `set -o pipefail` still sees that output was lost).

use std::fmt::Display;
use std::io::{self, Write as _};

/// The exit code of a command whose stdout was closed before it had written everything.
pub const EXIT_CLOSED: u8 = 141;

/// Why the output could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reader went away (EPIPE): nothing to report, nobody to report it to.
    #[error("stdout was closed before everything was written to it (its reader exited)")]
    Closed,
    /// Anything else, e.g. a full disk under `> file`.
    #[error("cannot write to stdout: {0}")]
    Write(#[source] io::Error),
}

/// Writes `text` to stdout and flushes it.
pub fn print(text: impl Display) -> Result<(), Error> {
    let mut out = io::stdout().lock();
    write!(out, "{text}").and_then(|()| out.flush()).map_err(classify)
}

/// Writes `text` and a newline to stdout and flushes it.
pub fn println(text: impl Display) -> Result<(), Error> {
    let mut out = io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(classify)
}

fn classify(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Error::Closed
    } else {
        Error::Write(e)
    }
}

/// Whether `err`, or an error it was caused by, is [`Error::Closed`]: the command should
/// end quietly with [`EXIT_CLOSED`].
pub fn closed(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if matches!(e.downcast_ref::<Error>(), Some(Error::Closed)) {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("printing the report")]
    struct Context(#[source] Error);

    #[test]
    fn a_closed_stdout_is_found_behind_context() {
        assert!(closed(&Error::Closed));
        assert!(closed(&Context(Error::Closed)));
        let other = Error::Write(io::Error::from(io::ErrorKind::StorageFull));
        assert!(!closed(&other));
        assert!(!closed(&Context(other)));
        assert!(matches!(
            classify(io::Error::from(io::ErrorKind::BrokenPipe)),
            Error::Closed
        ));
    }
}
