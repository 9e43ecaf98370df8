//! pbcodec core: bit-packing, the escaped zero-run code, serialization.
//!
//! Pure Rust with no Python dependency; `python.rs` (feature `python`) is the
//! thin PyO3 layer. All array functions work on flat row-major slices with an
//! explicit `(rows, n)` view: the row is the last axis of the caller's array.
//!
//! Every SIMD kernel family has one table per level, looked up through `simd`
//! (see there). Each unsafe operation sits in its own `unsafe` block with a
//! `// SAFETY:` comment, and each kernel table has one `# Safety` contract;
//! CI enforces both (`-D warnings` turns the lints below into errors).
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod bitpack;
pub mod crc32c;
pub mod decompress;
pub mod error;
pub mod fmatvec;
pub mod format;
pub mod half;
pub mod json;
pub mod layout;
pub mod matvec;
pub mod parallel;
pub mod pb;
pub mod qmatvec;
pub mod rle;
pub mod simd;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
