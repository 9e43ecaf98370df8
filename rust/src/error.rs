//! One error type for the core, with one variant per kind of failure. The
//! binding layer maps each kind to its own Python exception (`python.rs`):
//!
//! | kind | Python |
//! |---|---|
//! | [`Error::Invalid`] | `ValueError` |
//! | [`Error::Corrupt`] | `pbcodec.CorruptError` |
//! | [`Error::Truncated`] | `pbcodec.TruncatedError` |
//! | [`Error::Unsupported`] | `pbcodec.UnsupportedVersionError` |
//! | [`Error::Scale`] | `pbcodec.ScaleRangeError` (a `ValueError`) |
//!
//! The three data kinds ([`Error::is_format`]) are subclasses of
//! `pbcodec.FormatError` (a `ValueError`), so `except FormatError` catches them all.
use std::fmt;

/// A failure of a core function; each variant carries a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A bad argument from the caller (dtype-independent: range, shape, size).
    Invalid(String),
    /// Malformed data: bad magic, checksum mismatch, parts or sizes that disagree,
    /// trailing bytes, a stream that does not decode within its array, a
    /// non-canonical encoding, a value out of range.
    Corrupt(String),
    /// Data that ends early: shorter than its fixed header, or than the length the
    /// header describes (a cut-off download or file).
    Truncated(String),
    /// Data in a format version, or using a feature of one (PBTensor `dense_bits`
    /// other than 1), that this build does not read: written by a newer pbcodec.
    Unsupported(String),
    /// A scale the chosen scale type cannot hold (float16 overflow, or a row whose
    /// float16 scales all round to zero): `pbcodec.ScaleRangeError` in Python,
    /// a `ValueError`, so callers can retry with float32 scales.
    Scale(String),
}

impl Error {
    /// Whether this is a data error (corrupt, truncated or unsupported): what
    /// Python raises as a `pbcodec.FormatError`.
    pub fn is_format(&self) -> bool {
        matches!(self, Error::Corrupt(_) | Error::Truncated(_) | Error::Unsupported(_))
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        match self {
            Error::Invalid(m) | Error::Corrupt(m) | Error::Truncated(m) | Error::Unsupported(m) | Error::Scale(m) => m,
        }
    }
}

/// The core's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}

pub(crate) fn corrupt<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Corrupt(msg.into()))
}

pub(crate) fn truncated<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Truncated(msg.into()))
}

pub(crate) fn unsupported<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Unsupported(msg.into()))
}
