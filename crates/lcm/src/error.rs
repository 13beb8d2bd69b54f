//! The errors a caller can act on, typed so that every front end (the CLI, an HTTP API, a worker)
//! maps them the same way: a request to fix, a file that is not there, a size that does not fit.
//! Everything else (a corrupt weight file, an I/O failure) travels as an `anyhow::Error` whose
//! chain may hold one of these; [`Error::find`] looks for it.

/// What went wrong with a request or a name, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Arguments that cannot run: out of range, inconsistent with each other, or not supported by
    /// the loaded model (HTTP 400).
    #[error("{0}")]
    InvalidRequest(String),
    /// A request whose buffers cannot fit in the memory this machine has (HTTP 413).
    #[error("{0}")]
    TooLarge(String),
    /// A file, folder or model that does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
}

impl Error {
    /// The typed error anywhere in an `anyhow` chain (`None`: an internal or I/O failure).
    pub fn find(error: &anyhow::Error) -> Option<&Error> {
        error.chain().find_map(|e| e.downcast_ref::<Error>())
    }

    /// The HTTP status a server answers this error with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::InvalidRequest(_) => 400,
            Self::TooLarge(_) => 413,
            Self::NotFound(_) => 404,
        }
    }
}

/// `return Err(Error::InvalidRequest(format!(...)))`.
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::InvalidRequest(format!($($arg)*)).into())
    };
}
pub(crate) use invalid;

/// `return Err(Error::NotFound(format!(...)))`.
macro_rules! not_found {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::NotFound(format!($($arg)*)).into())
    };
}
pub(crate) use not_found;
