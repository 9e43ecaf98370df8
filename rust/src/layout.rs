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
//! - the residual codes in one of two forms, each built when a kernel first
//!   needs it (from the other form if that one exists):
//!   - [`Sparse`] (every int8 kernel, see `encode_sparse_tile`): per (tile,
//!     block) the codes as (column, value) byte pairs with the rows sorted by
//!     count, so that 32 byte lanes hold two codes of each of 16 rows with no
//!     gaps, looked up by column with `pshufb` (AVX2) or `vpermb` (AVX-512).
//!     ~2 bytes per code + 17 bytes per 1024 weights. It replaced a salient
//!     mask expanded per quad (the expand form below): on AVX2, whose `pshufb`
//!     index per 8 mask bits cost ~1 instruction per weight, batch 1 went from
//!     3.9 to 11 weights/cycle (one Zen 4 core at the AVX2 level); on AVX-512,
//!     where `vpexpandb` takes ~3 cycles per 64 weights, from 14 to 19 in cache.
//!   - [`Expand`] (the float32-mode kernels): per (tile, quad) a `u64` salient
//!     mask in the sign words' bit order, and the nonzero codes of each tile in
//!     (quad, lane) order, stored as `q + 127` (0..=254): an expand with 127 in
//!     the empty lanes then gives `q + 127` in every lane. 1 bit/weight + 1 byte
//!     per code.
//!
//! Size at 10 % salient, 8-bit codes: 2.9 bits/weight with the sparse form,
//! 2.8 with the expand form; `Layout::nbytes` reports what is built.
use rayon::prelude::*;

use crate::error::{corrupt, invalid};
use crate::pb::{n_groups, PbRef};
use std::sync::OnceLock;

use crate::{parallel, rle, Result};

/// Rows per tile: the 16 dword lanes of a 512-bit register.
pub const TILE: usize = 16;
/// Columns per activation block of the int8 mode (one scale per block).
pub const BLOCK: usize = 64;
/// Quads (4 columns) per block.
pub const QUADS_PER_BLOCK: usize = BLOCK / 4;
/// Zero bytes after the expand form's values: vector kernels may load up to
/// this many bytes past a tile's last value.
pub const VALUE_PAD: usize = 64;

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
    /// The residual, expand form (built on first use).
    expand: OnceLock<Expand>,
    /// The residual, sparse form (built on first use).
    sparse: OnceLock<Sparse>,
}

/// The residual as salient masks plus values (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expand {
    /// `tiles x quads` words in the sign words' bit order: 1 where the code is nonzero.
    pub(crate) masks: Vec<u64>,
    /// Nonzero codes as `q + 127`, tile after tile, [`VALUE_PAD`] zeros at the end.
    pub(crate) values: Vec<u8>,
    /// `tiles + 1` offsets of each tile's values.
    pub(crate) value_offsets: Vec<usize>,
}

/// The residual as sorted (column, code) pairs per block (`encode_sparse_tile`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sparse {
    /// The records of every (tile, block), tile after tile, [`SPARSE_PAD`] zeros at the end.
    pub(crate) bytes: Vec<u8>,
    /// `tiles + 1` offsets of each tile's first record.
    pub(crate) offsets: Vec<usize>,
}

/// Which residual form a kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// [`Expand`]: the float32-mode kernels.
    Expand,
    /// [`Sparse`]: the int8 kernels.
    Sparse,
}

impl Form {
    /// The form named `name` ("expand" or "sparse").
    pub fn parse(name: &str) -> Option<Form> {
        match name {
            "expand" => Some(Form::Expand),
            "sparse" => Some(Form::Sparse),
            _ => None,
        }
    }
}

impl Layout {
    /// Quads (4-column steps) per tile row, a whole number of blocks.
    pub fn quads(&self) -> usize {
        self.blocks * QUADS_PER_BLOCK
    }

    /// Resident size in bytes (what `PBTensor.stats()` reports): the sign words,
    /// the scales and every residual form built so far.
    pub fn nbytes(&self) -> usize {
        let e = self.expand.get().map_or(0, |e| 8 * (e.masks.len() + e.value_offsets.len()) + e.values.len());
        let s = self.sparse.get().map_or(0, |s| s.bytes.len() + 8 * s.offsets.len());
        8 * self.signs.len() + 4 * (self.mu.len() + self.alpha.len() + self.sigma.len()) + e + s
    }

    /// The residual forms built so far, by name: "expand", "sparse".
    pub fn forms(&self) -> Vec<&'static str> {
        let e = self.expand.get().map(|_| "expand");
        let s = self.sparse.get().map(|_| "sparse");
        e.into_iter().chain(s).collect()
    }

    /// The residual's expand form, built now (from the sparse form) if needed.
    pub fn expand(&self) -> &Expand {
        self.expand.get_or_init(|| {
            let sp = self.sparse.get().expect("a layout holds at least one residual form");
            self.convert(|ti, q| decode_sparse_tile(sp, ti, self.blocks, q), Form::Expand).0.expect("expand form")
        })
    }

    /// The residual's sparse form, built now (from the expand form) if needed.
    pub fn sparse(&self) -> &Sparse {
        self.sparse.get_or_init(|| {
            let ex = self.expand.get().expect("a layout holds at least one residual form");
            self.convert(|ti, q| decode_expand_tile(ex, ti, self.quads(), q), Form::Sparse).1.expect("sparse form")
        })
    }

    /// The form `f`, built if needed.
    pub fn ensure(&self, f: Form) {
        match f {
            Form::Expand => _ = self.expand(),
            Form::Sparse => _ = self.sparse(),
        }
    }

    /// Re-encode the residual in form `to`, decoding each tile with `decode`
    /// (`TILE x blocks·64` codes, row-major).
    fn convert(&self, decode: impl Fn(usize, &mut [i8]) + Sync, to: Form) -> (Option<Expand>, Option<Sparse>) {
        let np = self.blocks * BLOCK;
        let tiles: Vec<TileCodes> = parallel::pool().install(|| {
            (0..self.tiles)
                .into_par_iter()
                .map_init(
                    || vec![0i8; TILE * np],
                    |q, ti| {
                        q.fill(0);
                        decode(ti, q);
                        encode_tile(q, np, self.blocks, to)
                    },
                )
                .collect()
        });
        assemble(tiles, to)
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

/// Zero bytes after the sparse records: the AVX2 kernel loads 32 bytes at a
/// pair's column bytes and at its codes, up to 32 bytes past the record.
pub const SPARSE_PAD: usize = 64;

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

/// The expand form's mask words and values of one tile from its codes `q`
/// (`TILE x np`).
fn encode_expand_tile(q: &[i8], np: usize, masks: &mut Vec<u64>, values: &mut Vec<u8>) {
    for k in 0..np / 4 {
        let mut mword = 0u64;
        for r in 0..TILE {
            for c in 0..4 {
                let v = q[r * np + 4 * k + c];
                if v != 0 {
                    mword |= 1u64 << (4 * r + c);
                    values.push((i16::from(v) + 127) as u8);
                }
            }
        }
        masks.push(mword);
    }
}

/// Tile `ti`'s codes from the expand form into `q` (`TILE x quads·4`, zeroed).
fn decode_expand_tile(ex: &Expand, ti: usize, quads: usize, q: &mut [i8]) {
    let np = 4 * quads;
    let mut vi = ex.value_offsets[ti];
    for (k, &w) in ex.masks[ti * quads..(ti + 1) * quads].iter().enumerate() {
        let mut bits = w;
        while bits != 0 {
            let lane = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            q[(lane / 4) * np + 4 * k + lane % 4] = (i16::from(ex.values[vi]) - 127) as i8;
            vi += 1;
        }
    }
}

/// One tile's residual, encoded.
enum TileCodes {
    Expand(Vec<u64>, Vec<u8>),
    Sparse(Vec<u8>),
}

fn encode_tile(q: &[i8], np: usize, blocks: usize, form: Form) -> TileCodes {
    match form {
        Form::Expand => {
            let (mut m, mut v) = (Vec::with_capacity(np / 4), Vec::new());
            encode_expand_tile(q, np, &mut m, &mut v);
            TileCodes::Expand(m, v)
        }
        Form::Sparse => {
            let mut b = Vec::new();
            encode_sparse_tile(q, np, blocks, &mut b);
            TileCodes::Sparse(b)
        }
    }
}

/// Concatenate the tiles' codes into form `form` (offsets, padding).
fn assemble(tiles: Vec<TileCodes>, form: Form) -> (Option<Expand>, Option<Sparse>) {
    let mut offsets = Vec::with_capacity(tiles.len() + 1);
    offsets.push(0);
    match form {
        Form::Expand => {
            let (mut masks, mut values) = (Vec::new(), Vec::new());
            for t in tiles {
                if let TileCodes::Expand(m, v) = t {
                    masks.extend_from_slice(&m);
                    values.extend_from_slice(&v);
                }
                offsets.push(values.len());
            }
            values.resize(values.len() + VALUE_PAD, 0);
            (Some(Expand { masks, values, value_offsets: offsets }), None)
        }
        Form::Sparse => {
            let mut bytes = Vec::new();
            for t in tiles {
                if let TileCodes::Sparse(b) = t {
                    bytes.extend_from_slice(&b);
                }
                offsets.push(bytes.len());
            }
            bytes.resize(bytes.len() + SPARSE_PAD, 0);
            (None, Some(Sparse { bytes, offsets }))
        }
    }
}

/// Build the layout of `t` (validating the residual streams as it decodes
/// them), with the residual in the form the int8 kernels read (sparse).
pub fn build(t: &PbRef) -> Result<Layout> {
    build_with(t, Form::Sparse)
}

/// [`build`] with the residual first encoded in `form`.
pub fn build_with(t: &PbRef, form: Form) -> Result<Layout> {
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
    // Per-tile residual codes first (decoded and encoded in parallel), concatenated after.
    let mut codes: Vec<Option<TileCodes>> = (0..tiles).map(|_| None).collect();
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
                        // The compressor never emits -128 and validation rejects it; the
                        // kernels rely on |q| <= 127 (no overflow in byte arithmetic).
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
                    *code = Some(encode_tile(q, np, blocks, form));
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
    // Tiles of no columns (n = 0) have empty codes in either form.
    let codes = codes.into_iter().map(|c| c.unwrap_or_else(|| encode_tile(&[], 0, 0, form))).collect();
    let (e, s) = assemble(codes, form);
    let (expand, sparse) = (OnceLock::new(), OnceLock::new());
    if let Some(e) = e {
        _ = expand.set(e);
    }
    if let Some(s) = s {
        _ = sparse.set(s);
    }
    Ok(Layout { m, n, group_size: t.group_size, n_groups: ng, tiles, blocks, signs, mu, alpha, sigma, expand, sparse })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{compress, Params};
    use crate::testutil::rand_vec;

    /// Both residual forms hold the same codes: each built directly equals the
    /// one converted from the other, at every shape edge (tail tiles and blocks,
    /// no codes, every code salient, a row of 64 codes in one block, n = 0).
    #[test]
    fn forms_convert_both_ways() {
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
            let e = build_with(&t.view(), Form::Expand).unwrap();
            let s = build_with(&t.view(), Form::Sparse).unwrap();
            assert!(e.sparse.get().is_none() && s.expand.get().is_none());
            assert_eq!(e.sparse(), s.sparse.get().unwrap(), "{m}x{n} salient={salient}");
            assert_eq!(s.expand(), e.expand.get().unwrap(), "{m}x{n} salient={salient}");
            assert_eq!(e.nbytes(), s.nbytes(), "both forms built on both");
            // The sparse records decode to the source's codes.
            let np = s.blocks * BLOCK;
            let mut q = vec![0i8; TILE * np];
            let mut row = vec![0i8; n];
            for ti in 0..s.tiles {
                q.fill(0);
                decode_sparse_tile(s.sparse(), ti, s.blocks, &mut q);
                for r in 0..TILE {
                    let i = ti * TILE + r;
                    if i < m {
                        let v = t.view();
                        rle::decode_row(&v.res, v.value_offsets, i, &mut row).unwrap();
                        assert_eq!(&q[r * np..r * np + n], &row[..], "row {i}");
                    }
                    assert!(q[r * np + n.min(np)..(r + 1) * np].iter().all(|&v| v == 0));
                }
            }
        }
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
