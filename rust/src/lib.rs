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

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    /// `len` pseudo-random floats in [-2, 2) from a 64-bit LCG (deterministic per seed).
    pub(crate) fn rand_vec(len: usize, seed: &mut u64) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// Weights for the kernel tests' shape cases: `rand_vec`, and for n =
    /// [`HEAVY_N`] with [`heavy_block`] applied (records of no pairs around
    /// records with pairs).
    pub(crate) fn case_weights(m: usize, n: usize, seed: &mut u64) -> Vec<f32> {
        let mut w = rand_vec(m * n, seed);
        if n == HEAVY_N {
            heavy_block(&mut w, n);
        }
        w
    }

    /// The column count of the heavy-block case of [`case_weights`].
    pub(crate) const HEAVY_N: usize = 256;

    /// Scale columns 64..128 of each `n`-column row by 100, so that row-wise
    /// salient selection puts every code of a row in that block (other blocks of
    /// the layout get empty records).
    pub(crate) fn heavy_block(w: &mut [f32], n: usize) {
        for row in w.chunks_exact_mut(n.max(1)) {
            for v in row.iter_mut().skip(64).take(64) {
                *v *= 100.0;
            }
        }
    }
}
