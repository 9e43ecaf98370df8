//! The load-time execution layout of a PBTensor (docs/format.md §6.5).
//!
//! The serialized format (v1) stores the sign plane row by row and the residual
//! as an escaped zero-run code: compact, but a kernel walking it does ~45 µops
//! per 8 codes. This layout is built once per tensor, in memory only, in the
//! shape the integer kernels consume:
//!
//! - rows are grouped in tiles of [`TILE`] = 16 (the tail tile is zero padded);
//! - columns in quads of 4, padded to whole blocks of [`BLOCK`] = 64 columns;
//! - per (tile, quad) one `u64` of sign bits, bit `4·r + c` for row `r` of the
//!   tile and column `c` of the quad — exactly the byte order of a 512-bit
//!   `vpdpbusd` whose 16 dword lanes are the tile's rows and whose 4 bytes per
//!   lane are the quad's columns;
//! - mu/alpha per (tile, group, row) and sigma per (tile, row) as f32;
//! - the residual codes per (tile, block) as (column, value) byte pairs with
//!   the rows sorted by count (`encode_sparse_tile`), so that 32 byte lanes hold
//!   two codes of each of 16 rows with no gaps, looked up by column with
//!   `vpermb` (AVX-512), `pshufb` (AVX2), `vpermt2ps` or `pshufb` on byte planes (float32
//!   mode) or an index (portable). ~2 bytes per code + 17 + P bytes per block (P: pairs).
//!
//! The sparse residual replaced a per-(tile, quad) salient mask plus the codes
//! in order, expanded per quad (`vpexpandb`, or a `pshufb` index per 8 mask
//! bits on AVX2): that costs work per *weight* where this costs work per
//! *code*. Measured on one Zen 4 core, batch 1: AVX2 int8 3.9 -> 11 weights per
//! cycle, AVX-512 int8 14 -> 19 in cache, AVX-512 float32 5.9 -> 12.
//!
//! Size at 10 % salient, 8-bit codes: 2.9 bits/weight (1 of sign words, ~1.8
//! of residual, the scales); `Layout::nbytes` reports it exactly.
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
/// A PBTensor rearranged for the integer kernels (see the module docs). Only
/// [`build`] makes one: the kernels rely on its invariants (consistent offsets,
/// padding after the residual bytes), so the fields are crate-private.
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
    /// Group means, `tiles x n_groups x 16` (zero for padding rows).
    pub(crate) mu: Vec<f32>,
    /// Group scales, `tiles x n_groups x 16` (zero for padding rows).
    pub(crate) alpha: Vec<f32>,
    /// Residual scales, `tiles x 16`.
    pub(crate) sigma: Vec<f32>,
    /// The residual codes.
    sparse: Sparse,
}

/// The residual as sorted (column, code) pairs per block (`encode_sparse_tile`).
#[derive(Debug, Clone)]
pub struct Sparse {
    /// The records of every (tile, block), tile after tile, [`SPARSE_PAD`] zeros at the end.
    pub(crate) bytes: Vec<u8>,
    /// `tiles + 1` offsets of each tile's first record.
    pub(crate) offsets: Vec<usize>,
}

impl Layout {
    /// Quads (4-column steps) per tile row, a whole number of blocks.
    pub fn quads(&self) -> usize {
        self.blocks * QUADS_PER_BLOCK
    }

    /// Resident size in bytes (what `PBTensor.stats()` reports).
    pub fn nbytes(&self) -> usize {
        8 * self.signs.len()
            + 4 * (self.mu.len() + self.alpha.len() + self.sigma.len())
            + self.sparse.bytes.len()
            + 8 * self.sparse.offsets.len()
    }

    /// The residual codes.
    pub fn sparse(&self) -> &Sparse {
        &self.sparse
    }

    /// Tile `t`'s sign words (`quads()`) and its mu and alpha (`n_groups x 16` each).
    pub fn tile(&self, t: usize) -> (&[u64], &[f32], &[f32]) {
        let (q, s) = (self.quads(), self.n_groups * TILE);
        (&self.signs[t * q..(t + 1) * q], &self.mu[t * s..(t + 1) * s], &self.alpha[t * s..(t + 1) * s])
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

/// Zero bytes after the sparse records: kernels load 32 bytes at a pair's
/// columns and codes whatever its length; the farthest read is the AVX-512
/// kernel's load of a second pair's columns when there is none, exactly 32 bytes
/// past the last record (AddressSanitizer flags a pad of 31).
pub const SPARSE_PAD: usize = 64;
const _: () = assert!(SPARSE_PAD >= 32);

/// The column byte of the sparse form for column `c` (0..64) of a block: `c`
/// itself in bits 0-5 (what `vpermb` reads) plus a copy of bit 4 in bit 7, so
/// that `pshufb` (which reads bits 0-3, and zeroes lanes with bit 7) can look
/// `c` up in four 16-byte tables with two lookups per 32 columns.
pub(crate) const fn col_byte(c: usize) -> u8 {
    ((c & 63) | ((c >> 4) & 1) << 7) as u8
}

/// The column (0..64) that [`col_byte`] encoded as `b`.
#[inline(always)]
pub(crate) const fn col_of(b: u8) -> usize {
    (b & 63) as usize
}

/// Append the sparse records of one tile: `q` is its `TILE x np` residual codes
/// (row-major, `np = blocks·64`, zero past the tensor's rows and columns). One
/// record per block of 64 columns:
///
/// - `P`, the number of pairs (`ceil(max_r count_r / 2)`, count_r = the row's
///   nonzero codes in the block);
/// - 16 bytes `pos[r]`: the position of row `r` when the rows are sorted by
///   count, largest first (ties by row);
/// - `P` bytes `n_j`: how many rows have more than `2j` codes (non-increasing,
///   so pair `j` covers sorted positions `0..n_j`);
/// - per pair `j`: `2 n_j` column bytes ([`col_byte`]), then `2 n_j` codes
///   (`i8`): bytes `2i` and `2i + 1` hold the `(2j)`-th and `(2j + 1)`-th code of
///   the row at position `i` in column order (code 0, column 0 when it has
///   only `2j + 1`).
///
/// Sorting makes each pair a prefix of the positions, so a pair is 2·n_j
/// dense lanes with no gaps; adjacent bytes belong to one row, so `pmaddubsw`
/// sums a row's two codes. Size: ~2 bytes per code plus 17 + P bytes per block.
fn encode_sparse_tile(q: &[i8], np: usize, blocks: usize, out: &mut Vec<u8>) {
    for kb in 0..blocks {
        let mut cnt = [0usize; TILE];
        let mut ent = [[(0u8, 0i8); BLOCK]; TILE];
        for r in 0..TILE {
            for (c, &v) in q[r * np + kb * BLOCK..][..BLOCK].iter().enumerate() {
                if v != 0 {
                    ent[r][cnt[r]] = (col_byte(c), v);
                    cnt[r] += 1;
                }
            }
        }
        let mut order: [usize; TILE] = std::array::from_fn(|i| i);
        order.sort_by_key(|&r| std::cmp::Reverse(cnt[r]));
        let pairs = cnt[order[0]].div_ceil(2);
        out.push(pairs as u8);
        let mut pos = [0u8; TILE];
        for (i, &r) in order.iter().enumerate() {
            pos[r] = i as u8;
        }
        out.extend_from_slice(&pos);
        let lanes = |j: usize| &order[..order.iter().take_while(|&&r| cnt[r] > 2 * j).count()];
        for j in 0..pairs {
            out.push(lanes(j).len() as u8);
        }
        for j in 0..pairs {
            for &r in lanes(j) {
                out.extend((2 * j..2 * j + 2).map(|e| if e < cnt[r] { ent[r][e].0 } else { 0 }));
            }
            for &r in lanes(j) {
                out.extend((2 * j..2 * j + 2).map(|e| if e < cnt[r] { ent[r][e].1 as u8 } else { 0 }));
            }
        }
    }
}

/// The header of the sparse record at `rec`: the number of pairs `P`, the
/// 16 `pos` bytes, the `P` bytes `n_j`, and the start of the first pair.
///
/// # Safety
/// `rec` points at a record of a layout's sparse stream.
#[inline(always)]
pub(crate) unsafe fn record_head(rec: *const u8) -> (usize, *const u8, *const u8, *const u8) {
    // SAFETY: the contract (a record's header is 1 + 16 + P bytes).
    unsafe {
        let np = *rec as usize;
        let ns = rec.add(1 + TILE);
        (np, rec.add(1), ns, ns.add(np))
    }
}

/// Walk the sparse record at `*at` (advanced past it): `f(row, column, code)`
/// for each of its codes (in pair order; padding codes 0 included).
#[inline(always)]
pub(crate) fn for_each_code(b: &[u8], at: &mut usize, mut f: impl FnMut(usize, usize, i8)) {
    let pairs = b[*at] as usize;
    let pos = &b[*at + 1..*at + 1 + TILE];
    let mut row = [0usize; TILE];
    for (r, &p) in pos.iter().enumerate() {
        row[p as usize % TILE] = r;
    }
    let mut p = *at + 1 + TILE + pairs;
    for &nj in &b[*at + 1 + TILE..*at + 1 + TILE + pairs] {
        let n2 = 2 * nj as usize;
        for (i, (&c, &v)) in b[p..p + n2].iter().zip(&b[p + n2..p + 2 * n2]).enumerate() {
            f(row[i / 2], col_of(c), v as i8);
        }
        p += 2 * n2;
    }
    *at = p;
}

/// Tile `ti`'s codes from the sparse form into `q` (`TILE x blocks·64`, zeroed).
#[cfg(test)]
fn decode_sparse_tile(sp: &Sparse, ti: usize, blocks: usize, q: &mut [i8]) {
    let np = blocks * BLOCK;
    let mut at = sp.offsets[ti];
    for kb in 0..blocks {
        for_each_code(&sp.bytes, &mut at, |r, c, v| {
            if v != 0 {
                q[r * np + kb * BLOCK + c] = v;
            }
        });
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
    let np = blocks * BLOCK;
    let ng = n_groups(n, t.group_size);
    let nb = n.div_ceil(8);
    let words = tiles.checked_mul(quads).ok_or_else(|| crate::Error::Invalid("layout too large".into()))?;
    if words.checked_mul(16).is_none() {
        return invalid("layout too large");
    }
    let mut signs = vec![0u64; words];
    let mut mu = vec![0f32; tiles * ng * TILE];
    let mut alpha = vec![0f32; tiles * ng * TILE];
    let mut sigma = vec![0f32; tiles * TILE];
    // Per-tile residual records first (decoded and encoded in parallel), concatenated after.
    let mut codes: Vec<Vec<u8>> = vec![Vec::new(); tiles];
    if tiles > 0 && quads > 0 {
        parallel::pool().install(|| {
            signs.par_chunks_mut(quads).zip(codes.par_iter_mut()).enumerate().try_for_each_init(
                || vec![0i8; TILE * np],
                |q, (ti, (sw, code))| -> Result<()> {
                    let rows = (m - ti * TILE).min(TILE);
                    q.fill(0);
                    for r in 0..rows {
                        rle::decode_row(&t.res, t.value_offsets, ti * TILE + r, &mut q[r * np..r * np + n])?;
                    }
                    if let Some(i) = q.iter().position(|&v| v == i8::MIN) {
                        // A format rule (codes lie in -Q..Q, §7): the compressor never emits
                        // -128 and validation rejects it; check it here too, as the kernels'
                        // bounds (|q|·|x| <= 127², pairs below i16 saturation) assume it.
                        return corrupt(format!("row {}: residual code -128 is outside -127..127", ti * TILE + i / np));
                    }
                    for r in 0..rows {
                        let row = &t.signs[(ti * TILE + r) * nb..(ti * TILE + r + 1) * nb];
                        for (k, s) in sw.iter_mut().enumerate() {
                            // Columns 4k..4k+3 are one nibble of byte k/2 (zero past n: padding bits are 0).
                            let nib = if k / 2 < nb { (row[k / 2] >> (4 * (k % 2))) & 0xF } else { 0 };
                            *s |= (nib as u64) << (4 * r);
                        }
                    }
                    encode_sparse_tile(q, np, blocks, code);
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
    let mut bytes = Vec::with_capacity(codes.iter().map(Vec::len).sum::<usize>() + SPARSE_PAD);
    let mut offsets = Vec::with_capacity(tiles + 1);
    offsets.push(0);
    for c in &codes {
        bytes.extend_from_slice(c);
        offsets.push(bytes.len());
    }
    bytes.resize(bytes.len() + SPARSE_PAD, 0);
    let sparse = Sparse { bytes, offsets };
    Ok(Layout { m, n, group_size: t.group_size, n_groups: ng, tiles, blocks, signs, mu, alpha, sigma, sparse })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{compress, Params};
    use crate::testutil::rand_vec;

    /// The sparse records decode to the source's codes at every shape edge (tail
    /// tiles and blocks, no codes, every code salient, 4-bit codes, n = 0, m = 0).
    #[test]
    fn sparse_form_holds_the_codes() {
        let mut seed = 3;
        let cases = [
            (37, 200, 0.1, 8),
            (16, 64, 1.0, 8),
            (5, 130, 0.0, 8),
            (33, 100, 0.5, 4),
            (1, 1, 1.0, 8),
            (20, 0, 0.1, 8),
            (0, 50, 0.1, 8),
        ];
        for (m, n, salient, vb) in cases {
            let w = rand_vec(m * n, &mut seed);
            let p = Params { salient, salient_bits: vb, ..Params::default() };
            let t = compress(&w, m, n, None, &p).unwrap();
            let v = t.view();
            let s = build(&v).unwrap();
            assert_eq!(s.sparse.offsets.len(), s.tiles + 1);
            assert_eq!(s.sparse.bytes.len(), s.sparse.offsets[s.tiles] + SPARSE_PAD);
            let np = s.blocks * BLOCK;
            let mut q = vec![0i8; TILE * np];
            let mut row = vec![0i8; n];
            for ti in 0..s.tiles {
                q.fill(0);
                decode_sparse_tile(&s.sparse, ti, s.blocks, &mut q);
                for r in 0..TILE {
                    let i = ti * TILE + r;
                    if i < m {
                        rle::decode_row(&v.res, v.value_offsets, i, &mut row).unwrap();
                        assert_eq!(&q[r * np..r * np + n], &row[..], "{m}x{n} salient={salient} row {i}");
                    }
                    assert!(q[r * np + n.min(np)..(r + 1) * np].iter().all(|&v| v == 0));
                }
            }
        }
    }

    /// Weights whose salient codes all fall in block 1 give records of no pairs
    /// around records with pairs in the same tile (what the kernel tests'
    /// `heavy_block` case relies on).
    #[test]
    fn heavy_block_gives_empty_records() {
        let (m, n) = (32, 256);
        let mut w = rand_vec(m * n, &mut 9);
        crate::testutil::heavy_block(&mut w, n);
        let t = compress(&w, m, n, None, &Params::default()).unwrap();
        let l = build(&t.view()).unwrap();
        let mut at = l.sparse.offsets[0];
        let mut pairs = vec![];
        for _ in 0..l.blocks {
            pairs.push(l.sparse.bytes[at]);
            for_each_code(&l.sparse.bytes, &mut at, |_, c, _| assert!(c < BLOCK));
        }
        assert_eq!(at, l.sparse.offsets[1]);
        assert!(pairs[0] == 0 && pairs[1] > 0 && pairs[2] == 0 && pairs[3] == 0, "{pairs:?}");
    }

    /// A block where one row has all 64 codes and the others none: 32 pairs of
    /// one lane each; the record's size is exactly 1 + 16 + 32 + 32 x 4.
    #[test]
    fn sparse_record_of_a_full_row() {
        let np = BLOCK;
        let mut q = vec![0i8; TILE * np];
        for c in 0..BLOCK {
            q[5 * np + c] = (c as i8) - 30 + i8::from(c == 30);
        }
        let mut out = Vec::new();
        encode_sparse_tile(&q, np, 1, &mut out);
        assert_eq!(out.len(), 1 + TILE + 32 + 32 * 4);
        assert_eq!(out[0], 32);
        assert_eq!(out[1 + 5], 0, "row 5 sorts first");
        assert!(out[1 + TILE..1 + TILE + 32].iter().all(|&n| n == 1));
        let sp = Sparse { offsets: vec![0, out.len()], bytes: out };
        let mut back = vec![0i8; TILE * np];
        decode_sparse_tile(&sp, 0, 1, &mut back);
        assert_eq!(back, q);
        for c in 0..BLOCK {
            assert_eq!(col_of(col_byte(c)), c);
        }
    }
}
