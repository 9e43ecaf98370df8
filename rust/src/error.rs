//! One error type for the core; the binding layer maps `Invalid` to
//! `ValueError`, `Format` to `pbcodec.FormatError` and `Scale` to
//! `pbcodec.ScaleRangeError` (a `ValueError`).
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A bad argument from the caller (dtype-independent: range, shape, size).
    Invalid(String),
    /// Malformed serialized or encoded data.
    Format(String),
    /// A scale the chosen scale type cannot hold (float16 overflow, or a nonzero
    /// `alpha`/`sigma` that rounds to zero): `pbcodec.ScaleRangeError` in Python,
    /// a `ValueError`, so callers can retry with float32 scales.
    Scale(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid(m) | Error::Format(m) | Error::Scale(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}

pub(crate) fn format_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Format(msg.into()))
}
