//! The one error type. Each variant says who can fix the failure, and the exit code follows.

use std::fmt;
use std::io;

/// What went wrong, sorted by what the operator has to do about it.
#[derive(Debug)]
pub enum Error {
    /// Bad flags or values on the command line or in the environment: fix the invocation.
    Usage(String),
    /// Configuration or local setup the operator must fix (missing server URL, unreadable CA
    /// file, state directory that cannot be created).
    Config(String),
    /// A failure the next run may fix by itself: network, timeout, 5xx, a full disk.
    Transient(String),
    /// The server refused us in a way only an operator can fix (401, 403, 409, 422).
    Refused { status: u16, message: String },
}

impl Error {
    /// The process exit code documented in `--help` and the README.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Transient(_) => 1,
            Error::Usage(_) | Error::Config(_) => 2,
            Error::Refused { .. } => 3,
        }
    }

    /// An I/O failure on a local path, worded for the operator. Permission problems need the
    /// operator; everything else (disk full, interrupted) may pass by the next run.
    pub fn io(what: &str, path: &std::path::Path, err: io::Error) -> Error {
        let message = format!("{what} {}: {err}", path.display());
        match err.kind() {
            io::ErrorKind::PermissionDenied => Error::Config(format!(
                "{message} (run as root or give the agent's user access to it)"
            )),
            io::ErrorKind::ReadOnlyFilesystem => {
                Error::Config(format!("{message} (the state directory must be writable)"))
            }
            _ => Error::Transient(message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => write!(f, "{m} (see --help)"),
            Error::Config(m) | Error::Transient(m) => f.write_str(m),
            // A 2xx answer that the agent cannot act on is no refusal by the server's status.
            Error::Refused { status, message } if (200..300).contains(status) => {
                write!(f, "server answered HTTP {status}: {message}")
            }
            Error::Refused { status, message } => {
                write!(f, "server refused (HTTP {status}): {message}")
            }
        }
    }
}

impl std::error::Error for Error {}

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;
