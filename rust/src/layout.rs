//! The load-time execution layout of a PBTensor (docs/format.md §6.5).
//!
//! The serialized format (v1) stores the sign plane row by row and the residual
//! as an escaped zero-run code: compact, but a kernel walking it does ~45 µops
//! per 8 codes. This layout is built once per tensor, in memory only, in the
//! shape the integer kernels consume:
//!
//! - rows are grouped in tiles of [`TILE`] = 16 (the tail tile is zero padded);
//! - columns in quads of 4, padded to whole blocks of [`BLOCK`] = 64 columns;
//! - per (tile, quad) one `u64` of sign bits and one `u64` salient mask, bit
//!   `4·r + c` for row `r` of the tile and column `c` of the quad — exactly the
//!   byte order of a 512-bit `vpdpbusd` whose 16 dword lanes are the tile's rows
//!   and whose 4 bytes per lane are the quad's columns;
//! - the nonzero residual codes of each tile in (quad, lane) order, stored as
//!   `q + 127` (0..=254): an expand with 127 in the empty lanes then gives
//!   `q + 127` in every lane (a merge-masked `vpexpandb` measured 1.8x faster on
//!   Zen 4 than a zero-masked one followed by an add);
//! - mu/alpha per (tile, group, row) and sigma per (tile, row) as f32.
//!
//! Size: 2 bits/weight + one byte per nonzero residual code + scales
//! (2.8 bits/weight at 10 % salient); `Layout::nbytes` reports it exactly.
use rayon::prelude::*;

use crate::error::{corrupt, invalid};
use crate::pb::{n_groups, PbRef};
use crate::{parallel, rle, Result};

/// Rows per tile: the 16 dword lanes of a 512-bit register.
pub const TILE: usize = 16;
/// Columns per activation block of the int8 mode (one scale per block).
pub const BLOCK: usize = 64;
/// Quads (4 columns) per block.
pub const QUADS_PER_BLOCK: usize = BLOCK / 4;
/// Zero bytes after the values: vector kernels may load up to this many bytes
/// past a tile's last value.
pub const VALUE_PAD: usize = 64;

/// A PBTensor rearranged for the integer kernels (see the module docs). Only
/// [`build`] makes one: the kernels rely on its invariants (consistent offsets,
/// [`VALUE_PAD`] readable bytes after the values), so the fields are crate-private.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Rows of the source tensor.
    pub(crate) m: usize,
    /// Columns of the source tensor.
    pub(crate) n: usize,
    /// Columns per (mu, alpha) group.
    pub(crate) group_size: usize,
    /// Groups per row.
    pub(crate) n_groups: usize,
    /// Tiles of [`TILE`] rows: `ceil(m / 16)`.
    pub(crate) tiles: usize,
    /// Blocks of [`BLOCK`] columns: `ceil(n / 64)`.
    pub(crate) blocks: usize,
    /// `tiles x quads` words, bit `4r + c` = sign bit (1: -alpha) of row `16t + r`, column `4k + c`.
    pub(crate) signs: Vec<u64>,
    /// `tiles x quads` words, same bit order: 1 where the residual code is nonzero.
    pub(crate) masks: Vec<u64>,
    /// Nonzero residual codes as `q + 127`, tile after tile, [`VALUE_PAD`] zeros at the end.
    pub(crate) values: Vec<u8>,
    /// `tiles + 1` offsets of each tile's values.
    pub(crate) value_offsets: Vec<usize>,
    /// Group means, `tiles x n_groups x 16` (zero for padding rows).
    pub(crate) mu: Vec<f32>,
    /// Group scales, `tiles x n_groups x 16` (zero for padding rows).
    pub(crate) alpha: Vec<f32>,
    /// Residual scales, `tiles x 16`.
    pub(crate) sigma: Vec<f32>,
}

impl Layout {
    /// Quads (4-column steps) per tile row, a whole number of blocks.
    pub fn quads(&self) -> usize {
        self.blocks * QUADS_PER_BLOCK
    }

    /// Resident size in bytes (what `PBTensor.stats()` reports).
    pub fn nbytes(&self) -> usize {
        8 * (self.signs.len() + self.masks.len())
            + self.values.len()
            + 8 * self.value_offsets.len()
            + 4 * (self.mu.len() + self.alpha.len() + self.sigma.len())
    }

    /// Tile `t`'s sign words, mask words (`quads()` each) and its mu and alpha
    /// (`n_groups x 16` each).
    pub fn tile(&self, t: usize) -> (&[u64], &[u64], &[f32], &[f32]) {
        let (q, s) = (self.quads(), self.n_groups * TILE);
        (
            &self.signs[t * q..(t + 1) * q],
            &self.masks[t * q..(t + 1) * q],
            &self.mu[t * s..(t + 1) * s],
            &self.alpha[t * s..(t + 1) * s],
        )
    }

    /// Whether the int8 kernels can run on this tensor: each group must be a
    /// whole number of activation blocks (or the row one group).
    pub fn int8_supported(&self) -> bool {
        self.n_groups <= 1 || self.group_size.is_multiple_of(BLOCK)
    }

    /// Blocks per group for the int8 kernels (all blocks when there is one group).
    pub fn blocks_per_group(&self) -> usize {
        if self.n_groups <= 1 {
            self.blocks.max(1)
        } else {
            self.group_size / BLOCK
        }
    }
}

/// Build the layout of `t` (validating the residual streams as it decodes them).
pub fn build(t: &PbRef) -> Result<Layout> {
    t.check_sizes()?;
    let (m, n) = (t.m, t.n);
    rle::check_decodable(&t.res, t.value_offsets, m)?;
    let tiles = m.div_ceil(TILE);
    let blocks = n.div_ceil(BLOCK);
    let quads = blocks * QUADS_PER_BLOCK;
    let ng = n_groups(n, t.group_size);
    let nb = n.div_ceil(8);
    let words = tiles.checked_mul(quads).ok_or_else(|| crate::Error::Invalid("layout too large".into()))?;
    if words.checked_mul(16).is_none() {
        return invalid("layout too large");
    }
    let mut signs = vec![0u64; words];
    let mut masks = vec![0u64; words];
    let mut mu = vec![0f32; tiles * ng * TILE];
    let mut alpha = vec![0f32; tiles * ng * TILE];
    let mut sigma = vec![0f32; tiles * TILE];
    // Per-tile values first (decoded in parallel), concatenated after.
    let mut tile_values: Vec<Vec<u8>> = vec![Vec::new(); tiles];
    if tiles > 0 && quads > 0 {
        parallel::pool().install(|| {
            signs
                .par_chunks_mut(quads)
                .zip(masks.par_chunks_mut(quads))
                .zip(tile_values.par_iter_mut())
                .enumerate()
                .try_for_each_init(
                    || vec![0i8; TILE * n],
                    |q, (ti, ((sw, mw), vals))| -> Result<()> {
                        let rows = (m - ti * TILE).min(TILE);
                        q.fill(0);
                        for r in 0..rows {
                            rle::decode_row(&t.res, t.value_offsets, ti * TILE + r, &mut q[r * n..(r + 1) * n])?;
                        }
                        for (k, (s, mk)) in sw.iter_mut().zip(mw.iter_mut()).enumerate() {
                            let mut sword = 0u64;
                            let mut mword = 0u64;
                            for r in 0..rows {
                                let row = &t.signs[(ti * TILE + r) * nb..(ti * TILE + r + 1) * nb];
                                // Columns 4k..4k+3 are one nibble of byte k/2 (zero past n: padding bits are 0).
                                let nib = if k / 2 < nb { (row[k / 2] >> (4 * (k % 2))) & 0xF } else { 0 };
                                sword |= (nib as u64) << (4 * r);
                                for c in 0..4 {
                                    let j = 4 * k + c;
                                    if j < n && q[r * n + j] != 0 {
                                        mword |= 1u64 << (4 * r + c);
                                    }
                                }
                            }
                            *s = sword;
                            *mk = mword;
                            let mut bits = mword;
                            while bits != 0 {
                                let lane = bits.trailing_zeros() as usize;
                                bits &= bits - 1;
                                let (r, c) = (lane / 4, lane % 4);
                                let v = q[r * n + 4 * k + c];
                                if v == i8::MIN {
                                    // The compressor never emits -128 and validation rejects it; the
                                    // kernels rely on |q| <= 127 (no overflow in byte arithmetic).
                                    return corrupt(format!(
                                        "row {}: residual code -128 is outside -127..127",
                                        ti * TILE + r
                                    ));
                                }
                                vals.push((v as i16 + 127) as u8);
                            }
                        }
                        Ok(())
                    },
                )
        })?;
    }
    for ti in 0..tiles {
        let rows = (m - ti * TILE).min(TILE);
        for r in 0..rows {
            let i = ti * TILE + r;
            for g in 0..ng {
                mu[(ti * ng + g) * TILE + r] = t.mu[i * ng + g];
                alpha[(ti * ng + g) * TILE + r] = t.alpha[i * ng + g];
            }
            sigma[ti * TILE + r] = t.sigma[i];
        }
    }
    let total: usize = tile_values.iter().map(Vec::len).sum();
    let mut values = Vec::with_capacity(total + VALUE_PAD);
    let mut value_offsets = Vec::with_capacity(tiles + 1);
    value_offsets.push(0);
    for v in &tile_values {
        values.extend_from_slice(v);
        value_offsets.push(values.len());
    }
    values.resize(total + VALUE_PAD, 0);
    Ok(Layout {
        m,
        n,
        group_size: t.group_size,
        n_groups: ng,
        tiles,
        blocks,
        signs,
        masks,
        values,
        value_offsets,
        mu,
        alpha,
        sigma,
    })
}
