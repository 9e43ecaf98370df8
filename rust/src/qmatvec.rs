//! Matrix-vector product with int8 activations on the execution layout
//! (docs/format.md §6.4; the layout is `layout.rs`).
//!
//! Per batch row, x is quantized per block of 64 columns (symmetric, one f32
//! scale `d_b` per block). For each row i and block b the kernels compute two
//! exact integer sums,
//!
//!   S_ib = Σ_j s_ij·xq_j      (the sign part, s = ±1)
//!   R_ib = Σ_j q_ij·xq_j      (the residual part),
//!
//! and combine them in f32 in a fixed order, so every level (scalar, AVX2,
//! AVX-512) gives the same bits, and so does `pbcodec.reference`:
//!
//!   y_i = Σ_g (mu_ig·T_g + alpha_ig·Σ_{b∈g} d_b·S_ib) + sigma_i·Σ_b d_b·R_ib,
//!   T_g = Σ_{b∈g} d_b·X_b,  X_b = Σ_{j∈b} xq_j.
//!
//! The technique (int8 activations per block, weights repacked at load with
//! rows interleaved, byte dot products with a sign-bit expansion from a mask
//! register) follows the 1-2-bit CPU kernels of llama.cpp/ik_llama and
//! bitnet.cpp; the salient residual as per-block (column, code) pairs with rows
//! sorted by count, looked up with `vpermb` (AVX-512) or `pshufb` (AVX2), is
//! this project's own.
use crate::error::invalid;
use crate::layout::{self, Layout, BLOCK, QUADS_PER_BLOCK, TILE};
use crate::simd::{self, Level};
use crate::{parallel, Result};

/// The activations of one call, quantized (§6.4).
pub struct QuantX {
    /// Batch rows.
    pub batch: usize,
    /// Blocks of 64 columns per row.
    pub blocks: usize,
    /// Bytes per batch row of `xq` (`blocks * 64`).
    pub stride: usize,
    /// `batch x stride` int8 codes, zero past n.
    pub xq: Vec<i8>,
    /// `batch x blocks` block scales (NaN for a block holding a non-finite value).
    pub d: Vec<f32>,
    /// `batch x blocks` sums of each block's codes.
    pub xsum: Vec<i32>,
    /// `batch x n_groups`: T_g = Σ_{b∈g} d_b·X_b, in block order.
    pub tsum: Vec<f32>,
    /// Scalar level, batch below `ROWS_MIN_SCALAR` only (else empty):
    /// `batch x (stride / 8) x 256` sums of xq over every subset of each 8
    /// columns (T-MAC's tables, 8 bits wide), built once per call: 512 bytes per
    /// 8 columns, L2-resident at model widths.
    pub luts: Vec<i16>,
}

/// Quantize `batch x n` activations per block of 64 columns (§6.4), with the
/// loops compiled for the best SIMD level this CPU runs (the same IEEE
/// operations at every width, so the same bits).
pub fn quantize(x: &[f32], batch: usize, n: usize, l: &Layout) -> QuantX {
    quantize_at(simd::level(), x, batch, n, l)
}

fn quantize_at(level: Level, x: &[f32], batch: usize, n: usize, l: &Layout) -> QuantX {
    match simd::runnable(level) {
        // SAFETY: `runnable` returned a level this CPU runs.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::quantize_avx512(x, batch, n, l) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::quantize_avx2(x, batch, n, l) },
        _ => {
            let mut q = quantize_generic(x, batch, n, l, quantize_block);
            if batch < ROWS_MIN_SCALAR {
                // |a sum of 8 codes| <= 1016: i16.
                q.luts = vec![0; 32 * q.xq.len()];
                for (lut, x8) in q.luts.chunks_exact_mut(256).zip(q.xq.chunks_exact(8)) {
                    for i in 1..256usize {
                        lut[i] = lut[i & (i - 1)] + i16::from(x8[i.trailing_zeros() as usize]);
                    }
                }
            }
            q
        }
    }
}

/// The portable body of [`quantize`]; `inline(always)` so that each
/// `#[target_feature]` wrapper vectorizes it at its own width.
#[inline(always)]
fn quantize_generic(
    x: &[f32],
    batch: usize,
    n: usize,
    l: &Layout,
    block: impl Fn(&[f32], &mut [i8]) -> (f32, i32),
) -> QuantX {
    let blocks = l.blocks;
    let stride = blocks * BLOCK;
    let ng = l.n_groups;
    let bpg = l.blocks_per_group();
    let mut q = QuantX {
        batch,
        blocks,
        stride,
        xq: vec![0; batch * stride],
        d: vec![0.0; batch * blocks],
        xsum: vec![0; batch * blocks],
        tsum: vec![0.0; batch * ng],
        luts: Vec::new(),
    };
    for b in 0..batch {
        let xr = &x[b * n..(b + 1) * n];
        for kb in 0..blocks {
            let blk = &xr[kb * BLOCK..((kb + 1) * BLOCK).min(n)];
            let out = &mut q.xq[b * stride + kb * BLOCK..b * stride + kb * BLOCK + blk.len()];
            let (d, sum) = block(blk, out);
            q.d[b * blocks + kb] = d;
            q.xsum[b * blocks + kb] = sum;
        }
        for g in 0..ng {
            let mut t = 0f32;
            for kb in g * bpg..((g + 1) * bpg).min(blocks) {
                t += q.d[b * blocks + kb] * q.xsum[b * blocks + kb] as f32;
            }
            q.tsum[b * ng + g] = t;
        }
    }
    q
}

/// One block: returns (d, Σ codes). A block with a non-finite value gets
/// d = NaN and zero codes (its outputs become NaN, as in float arithmetic).
#[inline(always)]
fn quantize_block(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    // Branch-free folds (no early exit), so the loops vectorize.
    let finite = x.iter().fold(true, |a, v| a & v.is_finite());
    if !finite {
        out.fill(0);
        return (f32::NAN, 0);
    }
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    if d == 0.0 {
        out.fill(0);
        return (d, 0);
    }
    // Round half to even without a libm call (`round_ties_even` is one on baseline
    // x86-64, ~20 cycles a value: it made quantizing cost more than the GEMV at batch
    // 64): |v/d| <= 127.5, and adding 1.5·2^23 lands in [2^23, 2^24) where the float
    // addition itself rounds to an integer, half to even; subtracting it back is exact.
    const MAGIC: f32 = 12_582_912.0;
    for (o, &v) in out.iter_mut().zip(x) {
        let r = ((v / d + MAGIC) - MAGIC).clamp(-127.0, 127.0);
        // SAFETY: r is finite and integral in [-127, 127] (v and d finite, d > 0),
        // so the unchecked conversion is exact; unlike `as`, it vectorizes.
        *o = unsafe { r.to_int_unchecked::<i32>() } as i8;
    }
    (d, out.iter().map(|&c| i32::from(c)).sum())
}

/// The int8 tile kernel of one SIMD level: all batch rows of tile `t` into `yt`
/// (`batch x 16`, row-major).
///
/// # Safety
///
/// Call only a kernel returned by [`table`]: it belongs to a level the CPU runs
/// (`simd::runnable`, and VNNI for the AVX-512 kernel). `l` must be built by
/// `layout::build` (sizes and offsets consistent, records padded by
/// `layout::SPARSE_PAD`) with `l.int8_supported()`, `qx` made by `quantize` for
/// `l`, `t < l.tiles` and `yt.len() == qx.batch * TILE`.
type TileFn = unsafe fn(&Layout, usize, &QuantX, &mut [f32]);

/// The int8 tile kernel of `level`, lowered to a level this CPU runs. The
/// AVX-512 kernel needs VNNI (`vpdpbusd`); without it that level runs the AVX2 one.
fn table(level: Level) -> TileFn {
    match simd::runnable(level) {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if simd::has_vnni() => x86::tile_avx512,
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 => x86::tile_avx2,
        _ => tile_scalar,
    }
}

/// y = Ŵ x with int8 activations (§6.4) for `batch` rows of `x` (`batch x n`)
/// into `out` (`batch x m`); with `bias` (`m`), `y + bias` (one f32 addition).
///
/// Errors ([`Error::Invalid`](crate::Error::Invalid)): a group size the int8 mode
/// cannot run (not a multiple of 64, with more than one group), or `x`, `out` or
/// `bias` of the wrong size.
pub fn matvec_int8(l: &Layout, x: &[f32], batch: usize, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    matvec_int8_at(simd::level(), l, x, batch, bias, out)
}

fn matvec_int8_at(
    level: Level,
    l: &Layout,
    x: &[f32],
    batch: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let n = l.n;
    if !l.int8_supported() {
        return invalid(format!(
            "int8 activations need a group size that is a multiple of {BLOCK} (or one group per row); \
             this tensor has group_size {}: use activations='float32'",
            l.group_size
        ));
    }
    if !has_work(l, x, batch, bias, out)? {
        return Ok(());
    }
    let qx = quantize_at(level, x, batch, n, l);
    let kernel = table(level);
    run_tiles(l, batch, bias, out, |t, y| {
        // SAFETY: `kernel` comes from `table`; `l` is a layout (built by layout::build,
        // int8_supported checked above), `qx` was quantized for it, and `run_tiles`
        // passes t < tiles with `y` of batch x 16 floats.
        unsafe { kernel(l, t, &qx, y) }
    });
    Ok(())
}

/// The size checks both layout matvecs make: `x` is `batch x n`, `out` `batch x m`,
/// `bias` (if any) `m`; returns whether there is anything to compute.
pub(crate) fn has_work(l: &Layout, x: &[f32], batch: usize, bias: Option<&[f32]>, out: &[f32]) -> Result<bool> {
    let (m, n) = (l.m, l.n);
    if x.len() != batch.saturating_mul(n) {
        return invalid(format!("x has {} elements, expected {batch} x {n}", x.len()));
    }
    if out.len() != batch.saturating_mul(m) {
        return invalid(format!("out has {} elements, expected {batch} x {m}", out.len()));
    }
    if bias.is_some_and(|b| b.len() != m) {
        return invalid(format!("bias must have {m} elements"));
    }
    Ok(m > 0 && batch > 0)
}

/// Run `tile(t, yt)` for every tile (`yt`: batch x 16 floats) over the worker
/// pool, then scatter the tiles' rows into `out` (`batch x m`), adding `bias`.
/// Each tile is computed by one thread, so results do not depend on the thread
/// count; small products run on the calling thread (a pool wake-up costs
/// ~5-10 µs, more than the work).
pub(crate) fn run_tiles(
    l: &Layout,
    batch: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    tile: impl Fn(usize, &mut [f32]) + Sync,
) {
    let m = l.m;
    let per_tile = batch * TILE;
    let mut yt = vec![0f32; l.tiles * per_tile];
    let run = |(t0, ys): (usize, &mut [f32])| {
        for (k, y) in ys.chunks_mut(per_tile).enumerate() {
            tile(t0 + k, y);
        }
    };
    let work = m.saturating_mul(l.n).saturating_mul(batch);
    let threads = parallel::num_threads();
    if work < (1 << 20) || threads == 1 {
        run((0, &mut yt[..]));
    } else {
        // Several chunks per thread, handed out dynamically (a late thread takes
        // fewer); the caller works too (parallel::team_chunks_mut).
        let tiles_per_task = (l.tiles / (threads * 8)).max(1);
        parallel::team_chunks_mut(&mut yt, tiles_per_task * per_tile, |c, ys| run((c * tiles_per_task, ys)));
    }
    for t in 0..l.tiles {
        for b in 0..batch {
            let rows = (m - t * TILE).min(TILE);
            let dst = &mut out[b * m + t * TILE..b * m + t * TILE + rows];
            let src = &yt[t * per_tile + b * TILE..t * per_tile + b * TILE + rows];
            match bias {
                Some(bias) => {
                    for ((d, s), c) in dst.iter_mut().zip(src).zip(&bias[t * TILE..t * TILE + rows]) {
                        *d = s + c;
                    }
                }
                None => dst.copy_from_slice(src),
            }
        }
    }
}

/// Whether block `kb` is the last of its group.
#[inline(always)]
fn group_ends(kb: usize, bpg: usize, blocks: usize) -> bool {
    (kb + 1).is_multiple_of(bpg) || kb + 1 == blocks
}

// ------------------------------------------------------------------ scalar

/// The residual sums Σ q·x of one block's 16 rows from its sparse record at
/// `*at` (advanced past it); `xb` is the block's 64 activations (int8 codes for
/// exact i32 sums, or f32). A pair's two codes of a row are summed before the
/// one addition to that row's sum.
#[inline(always)]
pub(crate) fn sparse_rows<X: Copy, T>(b: &[u8], at: &mut usize, xb: &[X]) -> [T; TILE]
where
    T: Copy + Default + From<X> + From<i8> + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    let pairs = b[*at] as usize;
    let head = &b[*at..*at + 1 + TILE + pairs];
    let mut acc = [T::default(); TILE]; // by sorted position
    let mut p = *at + head.len();
    for &nj in &head[1 + TILE..] {
        let n2 = 2 * nj as usize;
        let (cols, codes) = b[p..p + 2 * n2].split_at(n2);
        for (a, (c, q)) in acc.iter_mut().zip(cols.chunks_exact(2).zip(codes.chunks_exact(2))) {
            let x0 = T::from(xb[layout::col_of(c[0])]);
            let x1 = T::from(xb[layout::col_of(c[1])]);
            *a = *a + (T::from(q[0] as i8) * x0 + T::from(q[1] as i8) * x1);
        }
        p += 2 * n2;
    }
    *at = p;
    std::array::from_fn(|r| acc[usize::from(head[1 + r]) % TILE])
}

/// Portable kernel: the sign part by a 256-entry table per 8 columns (the sums
/// of xq over each subset of them, T-MAC style, built once per call in
/// `QuantX::luts`; a row's 8 sign bits are one byte of two quads' words
/// regrouped, so one lookup serves 8 weights), the residual from the sparse form ([`sparse_rows`]). Integer sums are exact, so the result equals
/// the SIMD kernels' bit for bit. Safe (bounds-checked); coerced to [`TileFn`].
fn tile_scalar(l: &Layout, t: usize, qx: &QuantX, yt: &mut [f32]) {
    if qx.batch >= ROWS_MIN_SCALAR {
        return tile_scalar_rows(l, t, qx, yt);
    }
    let quads = l.quads();
    let (ng, bpg) = (l.n_groups, l.blocks_per_group());
    let sw = &l.signs[t * quads..(t + 1) * quads];
    let sp = l.sparse();
    let mu = &l.mu[t * ng * TILE..(t + 1) * ng * TILE];
    let alpha = &l.alpha[t * ng * TILE..(t + 1) * ng * TILE];
    let sigma = &l.sigma[t * TILE..(t + 1) * TILE];
    for b in 0..qx.batch {
        let xq = &qx.xq[b * qx.stride..(b + 1) * qx.stride];
        let luts = &qx.luts[b * 32 * qx.stride..(b + 1) * 32 * qx.stride];
        let mut at = sp.offsets[t];
        let mut y = [0f32; TILE];
        let mut ss = [0f32; TILE];
        let mut sr = [0f32; TILE];
        for kb in 0..l.blocks {
            let mut p = [0i32; TILE];
            let r: [i32; TILE] = sparse_rows(&sp.bytes, &mut at, &xq[kb * BLOCK..(kb + 1) * BLOCK]);
            const LO: u64 = 0x0F0F_0F0F_0F0F_0F0F;
            for k in (kb * QUADS_PER_BLOCK..(kb + 1) * QUADS_PER_BLOCK).step_by(2) {
                let lut: &[i16; 256] = luts[128 * k..128 * k + 256].try_into().expect("256 entries");
                // Byte i of `even` is row 2i's bits of quads k, k + 1 (columns 4k..4k + 8),
                // of `odd` row 2i + 1's.
                let (w0, w1) = (sw[k], sw[k + 1]);
                let even = (w0 & LO) | ((w1 & LO) << 4);
                let odd = ((w0 >> 4) & LO) | (w1 & !LO);
                for i in 0..TILE / 2 {
                    p[2 * i] += i32::from(lut[((even >> (8 * i)) & 255) as usize]);
                    p[2 * i + 1] += i32::from(lut[((odd >> (8 * i)) & 255) as usize]);
                }
            }
            let (d, xs) = (qx.d[b * qx.blocks + kb], qx.xsum[b * qx.blocks + kb]);
            for rr in 0..TILE {
                ss[rr] += d * (xs - 2 * p[rr]) as f32;
                sr[rr] += d * r[rr] as f32;
            }
            if group_ends(kb, bpg, l.blocks) {
                let g = kb / bpg;
                let tg = qx.tsum[b * ng + g];
                for rr in 0..TILE {
                    y[rr] += mu[g * TILE + rr] * tg + alpha[g * TILE + rr] * ss[rr];
                    ss[rr] = 0.0;
                }
            }
        }
        for rr in 0..TILE {
            yt[b * TILE + rr] = y[rr] + sigma[rr] * sr[rr];
        }
    }
}

/// Batch size from which [`tile_scalar_rows`] runs.
const ROWS_MIN_SCALAR: usize = 4;

/// Batched portable kernel: each 64-column block of the tile is decoded once into
/// 16-bit weights interleaved by column pairs (sign bits as 0/1, residual codes
/// q scattered from the sparse form), then every batch row accumulates 16 row sums per pair of columns, a loop
/// the compiler vectorizes (`pmaddwd` on baseline x86-64; widening multiply-adds
/// on NEON). Measured on Zen 4 at the scalar level, 1024x4096: 1.14x faster than
/// per-row passes at batch 4, 1.43x at 16, 1.55x at 64. The integer sums equal
/// [`tile_scalar`]'s and the f32 combination runs in the same order per row, so
/// the bits are the same.
fn tile_scalar_rows(l: &Layout, t: usize, qx: &QuantX, yt: &mut [f32]) {
    let (ng, bpg) = (l.n_groups, l.blocks_per_group());
    let (sw, mu, alpha) = l.tile(t);
    let sp = l.sparse();
    let sigma = &l.sigma[t * TILE..(t + 1) * TILE];
    let batch = qx.batch;
    // [column pair][2 row + column in pair]
    let mut sbits = [[0i16; 2 * TILE]; BLOCK / 2];
    let mut codes = [[0i16; 2 * TILE]; BLOCK / 2];
    let mut ss = vec![[0f32; TILE]; batch];
    let mut sr = vec![[0f32; TILE]; batch];
    let mut y = vec![[0f32; TILE]; batch];
    let mut at = sp.offsets[t];
    for kb in 0..l.blocks {
        codes.iter_mut().for_each(|c| c.fill(0));
        layout::for_each_code(&sp.bytes, &mut at, |r, c, v| {
            if v != 0 {
                codes[c / 2][2 * r + c % 2] = i16::from(v);
            }
        });
        for j in 0..QUADS_PER_BLOCK {
            let k = kb * QUADS_PER_BLOCK + j;
            let w = sw[k];
            // Row r's 4 sign bits are bits 4r..4r+4: columns 4j..4j+4, pairs 2j, 2j+1.
            let [lo, hi] = &mut sbits[2 * j..2 * j + 2] else { unreachable!() };
            for r in 0..TILE {
                let nib = (w >> (4 * r)) as i16;
                lo[2 * r] = nib & 1;
                lo[2 * r + 1] = (nib >> 1) & 1;
                hi[2 * r] = (nib >> 2) & 1;
                hi[2 * r + 1] = (nib >> 3) & 1;
            }
        }
        let last = group_ends(kb, bpg, l.blocks);
        let g = kb / bpg;
        for b in 0..batch {
            let xq = &qx.xq[b * qx.stride + kb * BLOCK..][..BLOCK];
            let (d, xs) = (qx.d[b * qx.blocks + kb], qx.xsum[b * qx.blocks + kb]);
            let mut p = [0i32; TILE];
            let mut r = [0i32; TILE];
            for c2 in 0..BLOCK / 2 {
                let (x0, x1) = (i32::from(xq[2 * c2]), i32::from(xq[2 * c2 + 1]));
                let (sb, cd) = (&sbits[c2], &codes[c2]);
                for rr in 0..TILE {
                    p[rr] += i32::from(sb[2 * rr]) * x0 + i32::from(sb[2 * rr + 1]) * x1;
                    r[rr] += i32::from(cd[2 * rr]) * x0 + i32::from(cd[2 * rr + 1]) * x1;
                }
            }
            for rr in 0..TILE {
                ss[b][rr] += d * (xs - 2 * p[rr]) as f32;
                sr[b][rr] += d * r[rr] as f32;
            }
            if last {
                let tg = qx.tsum[b * ng + g];
                for rr in 0..TILE {
                    y[b][rr] += mu[g * TILE + rr] * tg + alpha[g * TILE + rr] * ss[b][rr];
                    ss[b][rr] = 0.0;
                }
            }
        }
    }
    for b in 0..batch {
        for rr in 0..TILE {
            yt[b * TILE + rr] = y[b][rr] + sigma[rr] * sr[b][rr];
        }
    }
}

// --------------------------------------------------------------------- x86

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::QuantX;
    use crate::layout::{self, Layout, BLOCK, QUADS_PER_BLOCK, TILE};

    // Bounds used by the SAFETY comments of both kernels, for tile t < tiles of a
    // layout from `layout::build` and a QuantX from `quantize` (see `TileFn`):
    // - sign words [t quads, (t + 1) quads) exist, and a quad index k < quads;
    // - the tile's sparse records start at sparse().offsets[t], one per block, each
    //   as `layout::encode_sparse_tile` wrote it (header P, pos[16], n_j[P], then the
    //   pairs): walking a record by its own header ends at the next one, and after
    //   the last tile come SPARSE_PAD (64) readable zero bytes, so a 32-byte load at
    //   a pair's columns or codes stays inside the stream (only `layout::build`
    //   makes a Layout);
    // - xq row b < batch has stride = quads * 4 bytes: bytes [4k, 4k + 4) exist;
    // - d, xsum hold batch x blocks entries, tsum batch x n_groups;
    // - mu, alpha hold tiles x n_groups x 16 floats, sigma tiles x 16;
    // - yt holds batch x 16 floats.

    /// [`super::quantize`] vectorized for AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_avx512(x: &[f32], batch: usize, n: usize, l: &Layout) -> QuantX {
        super::quantize_generic(x, batch, n, l, |blk, out| {
            // SAFETY: this function's contract (AVX-512 F/BW/VL).
            unsafe { quantize_block512(blk, out) }
        })
    }

    /// One block of [`super::quantize_block`] in four zmm registers: the same IEEE
    /// operations in the same order per value (divide, add and subtract 1.5·2^23,
    /// clamp), so the same codes, d and sum.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL; `x.len() == out.len() <= 64`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn quantize_block512(x: &[f32], out: &mut [i8]) -> (f32, i32) {
        debug_assert!(x.len() == out.len() && x.len() <= BLOCK);
        let len = x.len();
        let lane_mask = |i: usize| -> __mmask16 {
            let k = len.saturating_sub(16 * i).min(16);
            ((1u32 << k) - 1) as __mmask16
        };
        let absm = _mm512_set1_epi32(0x7fff_ffff);
        let inf = _mm512_set1_ps(f32::INFINITY);
        let mut v = [_mm512_setzero_ps(); 4];
        let mut amax = _mm512_setzero_ps();
        let mut bad: __mmask16 = 0;
        for (i, vi) in v.iter_mut().enumerate() {
            // SAFETY: masked load of the block's floats [16 i, min(len, 16 i + 16)); with
            // an empty mask (a short block) nothing is read at the wrapped pointer.
            *vi = unsafe { _mm512_maskz_loadu_ps(lane_mask(i), x.as_ptr().wrapping_add(16 * i)) };
            let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(*vi), absm));
            // Not less than +inf, or unordered (NaN): not finite.
            bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(a, inf);
            amax = _mm512_max_ps(amax, a);
        }
        if bad != 0 {
            out.fill(0);
            return (f32::NAN, 0);
        }
        let d = _mm512_reduce_max_ps(amax) / 127.0;
        if d == 0.0 {
            out.fill(0);
            return (d, 0);
        }
        const MAGIC: f32 = 12_582_912.0;
        let (dv, mv) = (_mm512_set1_ps(d), _mm512_set1_ps(MAGIC));
        let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
        let mut sum = _mm512_setzero_si512();
        for (i, vi) in v.iter().enumerate() {
            let r = _mm512_sub_ps(_mm512_add_ps(_mm512_div_ps(*vi, dv), mv), mv);
            let c = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
            // Lanes past len hold 0/d = 0.
            sum = _mm512_add_epi32(sum, c);
            // SAFETY: masked store of codes [16 i, min(len, 16 i + 16)) of out; nothing is
            // written with an empty mask.
            unsafe { _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().wrapping_add(16 * i).cast(), lane_mask(i), c) };
        }
        (d, _mm512_reduce_add_epi32(sum))
    }

    /// [`super::quantize`] vectorized for AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_avx2(x: &[f32], batch: usize, n: usize, l: &Layout) -> QuantX {
        super::quantize_generic(x, batch, n, l, super::quantize_block)
    }

    /// AVX-512 (F/BW/VBMI/VNNI) tile kernel, batch rows in passes of up to 4.
    ///
    /// # Safety
    /// The AVX-512 entry of [`super::TileFn`]: the CPU has AVX-512 F/BW/VL/VBMI/VNNI/VBMI2
    /// and POPCNT, and the arguments meet the contract there.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512vbmi2,popcnt")]
    pub(super) unsafe fn tile_avx512(l: &Layout, t: usize, qx: &QuantX, yt: &mut [f32]) {
        if qx.batch >= ROWS_MIN {
            // SAFETY: this function's contract.
            unsafe { tile512_rows(l, t, qx, yt) };
            return;
        }
        let mut b0 = 0;
        while b0 < qx.batch {
            // SAFETY: this function's contract, and b0 + NB <= batch for the NB chosen.
            unsafe {
                match qx.batch - b0 {
                    1 => tile512::<1, 2>(l, t, qx, b0, yt),
                    2 => tile512::<2, 2>(l, t, qx, b0, yt),
                    3 => tile512::<3, 1>(l, t, qx, b0, yt),
                    _ => tile512::<4, 1>(l, t, qx, b0, yt),
                }
            }
            b0 += 4;
        }
    }

    /// Batch size from which [`tile512_rows`] runs.
    const ROWS_MIN: usize = 16;
    /// Batch rows per pass of [`tile512_rows`] (its per-row state lives on the stack).
    const ROWS_CHUNK: usize = 32;

    /// Two pairs of a sparse record for the AVX-512 kernels, interleaved so that
    /// one dword lane holds the four codes of one sorted position (pair j's two,
    /// then pair j + 1's; lane order in [`unsort512_index`]): column bytes, |codes|
    /// (0 past each pair's lanes), and the mask of negative codes.
    type Pairs512 = (__m512i, __m512i, __mmask64);

    /// Interleave two 32-byte pairs by 16-bit units (one position's two codes):
    /// positions 0-3 and 8-11 from the low unpack, 4-7 and 12-15 from the high one
    /// (`vpunpck*` works per 128 bits).
    ///
    /// # Safety
    /// AVX-512 F.
    #[inline(always)]
    unsafe fn interleave_pairs(a: __m256i, b: __m256i) -> __m512i {
        // SAFETY: the contract; registers only.
        unsafe {
            let lo = _mm256_unpacklo_epi16(a, b);
            let hi = _mm256_unpackhi_epi16(a, b);
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        }
    }

    /// Decode pairs with `n_j = n0` and `n_{j+1} = n1` (0: none) at `*d`
    /// (advanced past them). Codes are read with masked loads, so the lanes past a
    /// pair are zero without a mask table.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `*d` is at pair j's column bytes in a sparse stream (the
    /// 32-byte column loads stay inside the stream's `SPARSE_PAD`).
    #[inline(always)]
    unsafe fn load_pairs512(n0: u8, n1: u8, d: &mut *const u8) -> Pairs512 {
        let (a, b) = (2 * n0 as usize, 2 * n1 as usize);
        let (k0, k1) = (((1u64 << a) - 1) as u32, ((1u64 << b) - 1) as u32);
        // SAFETY: the contract; masked loads touch only their pair's codes.
        unsafe {
            let c0 = _mm256_loadu_si256((*d).cast());
            let q0 = _mm256_maskz_loadu_epi8(k0, (*d).add(a).cast());
            let d1 = (*d).add(2 * a);
            let c1 = _mm256_loadu_si256(d1.cast());
            let q1 = _mm256_maskz_loadu_epi8(k1, d1.add(b).cast());
            *d = d1.add(2 * b);
            let q = interleave_pairs(q0, q1);
            (interleave_pairs(c0, c1), _mm512_abs_epi8(q), _mm512_movepi8_mask(q))
        }
    }

    /// Add two pairs' products to the per-position sums: the block's activations
    /// `xz` at the lanes' columns by one `vpermb`, negated where the code is
    /// negative, then one `vpdpbusd` with |q| (a position's four codes per dword).
    ///
    /// # Safety
    /// AVX-512 F/BW/VBMI/VNNI.
    #[inline(always)]
    unsafe fn pairs512_dot(xz: __m512i, p: &Pairs512, acc: &mut __m512i) {
        // SAFETY: the contract; registers only.
        unsafe {
            let xv = _mm512_permutexvar_epi8(p.0, xz);
            let sx = _mm512_mask_sub_epi8(xv, p.2, _mm512_setzero_si512(), xv);
            *acc = _mm512_dpbusd_epi32(*acc, p.1, sx);
        }
    }

    /// `vpermd` indices that put a record's sorted positions back in row order:
    /// row r reads the lane where [`interleave_pairs`] put position `pos[r]`
    /// (its bits 2 and 3 swapped).
    ///
    /// # Safety
    /// AVX-512 F; 16 readable bytes at `pos`.
    #[inline(always)]
    unsafe fn unsort512_index(pos: *const u8) -> __m512i {
        // SAFETY: the contract.
        unsafe {
            let p = _mm512_cvtepu8_epi32(_mm_loadu_si128(pos.cast()));
            let b2 = _mm512_slli_epi32::<1>(_mm512_and_si512(p, _mm512_set1_epi32(4)));
            let b3 = _mm512_srli_epi32::<1>(_mm512_and_si512(p, _mm512_set1_epi32(8)));
            _mm512_or_si512(_mm512_and_si512(p, _mm512_set1_epi32(3)), _mm512_or_si512(b2, b3))
        }
    }

    /// The residual sums R (16 rows) of one block for NB batch rows, from its
    /// sparse record at `*rec` (advanced past it); `xb[u]` is the block's 64 int8
    /// activations of row u.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VBMI; `*rec` is a record of a sparse stream; 64 readable
    /// bytes at each `xb[u]`.
    #[inline(always)]
    unsafe fn sparse_block512<const NB: usize>(rec: &mut *const u8, xb: &[*const i8; NB]) -> [__m512i; NB] {
        // SAFETY: the contract (record layout; load_pairs512 advances d past each
        // pair, so it ends at the next record).
        unsafe {
            let (np, pos, ns, mut d) = layout::record_head(*rec);
            let ix = unsort512_index(pos);
            let z = _mm512_setzero_si512();
            let mut xz = [z; NB];
            for u in 0..NB {
                xz[u] = _mm512_loadu_si512(xb[u].cast());
            }
            let mut acc = [z; NB];
            let mut j = 0;
            while j < np {
                let n1 = if j + 1 < np { *ns.add(j + 1) } else { 0 };
                let pr = load_pairs512(*ns.add(j), n1, &mut d);
                for u in 0..NB {
                    pairs512_dot(xz[u], &pr, &mut acc[u]);
                }
                j += 2;
            }
            *rec = d;
            let mut r = [z; NB];
            for u in 0..NB {
                r[u] = _mm512_permutexvar_epi32(ix, acc[u]);
            }
            r
        }
    }

    /// Batched AVX-512 kernel on the sparse residual form, the counterpart of
    /// [`tile256_rows`]: each block's sign bytes and pairs are decoded once per pass
    /// (up to 1 KiB + 4 KiB in L1), then every batch row of the pass streams over
    /// them: two `vpdpbusd` per two quads for the sign part, [`pairs512_dot`] per
    /// two pairs for the residual.
    ///
    /// # Safety
    /// As `tile_avx512`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512vbmi2,popcnt")]
    unsafe fn tile512_rows(l: &Layout, t: usize, qx: &QuantX, yt: &mut [f32]) {
        let (ng, bpg, blocks) = (l.n_groups, l.blocks_per_group(), l.blocks);
        let (sw, mu, alpha) = l.tile(t);
        let sp = l.sparse();
        let ones = _mm512_set1_epi8(1);
        let z = _mm512_setzero_si512();
        let zf = _mm512_setzero_ps();
        let mut wb = [z; QUADS_PER_BLOCK];
        let mut pb: [Pairs512; BLOCK / 4] = [(z, z, 0); BLOCK / 4];
        let mut ss = [zf; ROWS_CHUNK];
        let mut sr = [zf; ROWS_CHUNK];
        let mut y = [zf; ROWS_CHUNK];
        let mut c0 = 0;
        while c0 < qx.batch {
            let rows = (qx.batch - c0).min(ROWS_CHUNK);
            // SAFETY: the tile's first record (module bounds).
            let mut rec = unsafe { sp.bytes.as_ptr().add(sp.offsets[t]) };
            ss[..rows].fill(zf);
            sr[..rows].fill(zf);
            y[..rows].fill(zf);
            let mut gb = 0;
            for kb in 0..blocks {
                for (j, w) in wb.iter_mut().enumerate() {
                    *w = _mm512_maskz_mov_epi8(sw[kb * QUADS_PER_BLOCK + j], ones);
                }
                // SAFETY: rec is at block kb's record (module bounds); load_pairs512
                // advances d past each pair, so it ends at the next record.
                let (npp, ix) = unsafe {
                    let (np, pos, ns, mut d) = layout::record_head(rec);
                    let ix = unsort512_index(pos);
                    let npp = np.div_ceil(2);
                    for (i, p) in pb[..npp].iter_mut().enumerate() {
                        let n1 = if 2 * i + 1 < np { *ns.add(2 * i + 1) } else { 0 };
                        *p = load_pairs512(*ns.add(2 * i), n1, &mut d);
                    }
                    rec = d;
                    (npp, ix)
                };
                let last = gb + 1 == bpg || kb + 1 == blocks;
                let g = kb / bpg;
                // SAFETY: AVX-512 F; the tile's 16 scales of group g.
                let (muv, alv) =
                    unsafe { (_mm512_loadu_ps(mu[g * TILE..].as_ptr()), _mm512_loadu_ps(alpha[g * TILE..].as_ptr())) };
                for u in 0..rows {
                    let b = c0 + u;
                    let xr = &qx.xq[b * qx.stride + kb * BLOCK..b * qx.stride + (kb + 1) * BLOCK];
                    let (mut p0, mut p1) = (z, z);
                    for j in (0..QUADS_PER_BLOCK).step_by(2) {
                        let x0 = i32::from_le_bytes([
                            xr[4 * j] as u8,
                            xr[4 * j + 1] as u8,
                            xr[4 * j + 2] as u8,
                            xr[4 * j + 3] as u8,
                        ]);
                        let x1 = i32::from_le_bytes([
                            xr[4 * j + 4] as u8,
                            xr[4 * j + 5] as u8,
                            xr[4 * j + 6] as u8,
                            xr[4 * j + 7] as u8,
                        ]);
                        p0 = _mm512_dpbusd_epi32(p0, wb[j], _mm512_set1_epi32(x0));
                        p1 = _mm512_dpbusd_epi32(p1, wb[j + 1], _mm512_set1_epi32(x1));
                    }
                    // SAFETY: AVX-512 (contract); xr holds the block's 64 codes.
                    let rv = unsafe {
                        let xz = _mm512_loadu_si512(xr.as_ptr().cast());
                        let mut acc = z;
                        for p in &pb[..npp] {
                            pairs512_dot(xz, p, &mut acc);
                        }
                        _mm512_permutexvar_epi32(ix, acc)
                    };
                    let bi = b * blocks + kb;
                    let (xs, d) = (qx.xsum[bi], _mm512_set1_ps(qx.d[bi]));
                    // S = X - 2P, as in tile512 (same f32 order).
                    let sv = _mm512_sub_epi32(_mm512_set1_epi32(xs), _mm512_slli_epi32::<1>(_mm512_add_epi32(p0, p1)));
                    ss[u] = _mm512_add_ps(ss[u], _mm512_mul_ps(d, _mm512_cvtepi32_ps(sv)));
                    sr[u] = _mm512_add_ps(sr[u], _mm512_mul_ps(d, _mm512_cvtepi32_ps(rv)));
                    if last {
                        let tg = _mm512_set1_ps(qx.tsum[b * ng + g]);
                        let part = _mm512_add_ps(_mm512_mul_ps(muv, tg), _mm512_mul_ps(alv, ss[u]));
                        y[u] = _mm512_add_ps(y[u], part);
                        ss[u] = zf;
                    }
                }
                gb = if last { 0 } else { gb + 1 };
            }
            // SAFETY: the tile's 16 sigmas.
            let sg = unsafe { _mm512_loadu_ps(l.sigma[t * TILE..].as_ptr()) };
            for u in 0..rows {
                let v = _mm512_add_ps(y[u], _mm512_mul_ps(sg, sr[u]));
                let o = &mut yt[(c0 + u) * TILE..(c0 + u + 1) * TILE];
                // SAFETY: 16 floats of yt.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
            }
            c0 += rows;
        }
    }

    /// NB batch rows of the AVX-512 kernel on the sparse residual form: the sign
    /// part as in [`tile512`], the residual by [`sparse_block512`].
    ///
    /// # Safety
    /// As `tile_avx512`, with `b0 + NB <= batch`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512vbmi2,popcnt")]
    unsafe fn tile512<const NB: usize, const ACC: usize>(l: &Layout, t: usize, qx: &QuantX, b0: usize, yt: &mut [f32]) {
        let quads = l.quads();
        let (ng, bpg, blocks) = (l.n_groups, l.blocks_per_group(), l.blocks);
        // The tile's sign words, scales and first record, and xq rows b0..
        // (bounds-checked once per tile; the loops below index from these).
        let sp = l.sparse();
        let sw = l.signs[t * quads..].as_ptr();
        let (mu, alpha) = (l.mu[t * ng * TILE..].as_ptr(), l.alpha[t * ng * TILE..].as_ptr());
        let mut rec = sp.bytes[sp.offsets[t]..].as_ptr();
        let xp: [*const i8; NB] = std::array::from_fn(|u| qx.xq[(b0 + u) * qx.stride..].as_ptr());
        let ones = _mm512_set1_epi8(1);
        let z = _mm512_setzero_si512();
        let mut y = [_mm512_setzero_ps(); NB];
        let mut ss = [_mm512_setzero_ps(); NB];
        let mut sr = [_mm512_setzero_ps(); NB];
        let mut gb = 0; // blocks of the current group done (no division per block)
        for kb in 0..blocks {
            let mut xb = xp;
            for u in 0..NB {
                // SAFETY: block kb of xq row b0 + u (module bounds).
                xb[u] = unsafe { xp[u].add(kb * BLOCK) };
            }
            // SAFETY: rec is at block kb's record; 64 bytes at each xb[u].
            let r = unsafe { sparse_block512::<NB>(&mut rec, &xb) };
            let mut p0 = [z; NB];
            let mut p1 = [z; NB];
            let mut k = kb * QUADS_PER_BLOCK;
            for _ in 0..QUADS_PER_BLOCK / 2 {
                // SAFETY: quads k, k + 1 < quads (block kb < blocks); bytes [4k, 4k + 8)
                // of each xq row (module bounds).
                unsafe {
                    let (w0, w1) =
                        (_mm512_maskz_mov_epi8(*sw.add(k), ones), _mm512_maskz_mov_epi8(*sw.add(k + 1), ones));
                    for u in 0..NB {
                        let x0 = _mm512_set1_epi32(xp[u].add(4 * k).cast::<i32>().read_unaligned());
                        let x1 = _mm512_set1_epi32(xp[u].add(4 * k + 4).cast::<i32>().read_unaligned());
                        p0[u] = _mm512_dpbusd_epi32(p0[u], w0, x0);
                        if ACC == 2 {
                            p1[u] = _mm512_dpbusd_epi32(p1[u], w1, x1);
                        } else {
                            p0[u] = _mm512_dpbusd_epi32(p0[u], w1, x1);
                        }
                    }
                }
                k += 2;
            }
            for u in 0..NB {
                let bi = (b0 + u) * blocks + kb;
                // SAFETY: bi < batch x blocks (module bounds).
                let (xs, d) = unsafe { (*qx.xsum.get_unchecked(bi), *qx.d.get_unchecked(bi)) };
                let d = _mm512_set1_ps(d);
                let pp = if ACC == 2 { _mm512_add_epi32(p0[u], p1[u]) } else { p0[u] };
                let s = _mm512_sub_epi32(_mm512_set1_epi32(xs), _mm512_slli_epi32::<1>(pp));
                ss[u] = _mm512_add_ps(ss[u], _mm512_mul_ps(d, _mm512_cvtepi32_ps(s)));
                sr[u] = _mm512_add_ps(sr[u], _mm512_mul_ps(d, _mm512_cvtepi32_ps(r[u])));
            }
            gb += 1;
            if gb == bpg || kb + 1 == blocks {
                gb = 0;
                let g = kb / bpg;
                // SAFETY: scales [g 16, g 16 + 16) of the tile, g < n_groups.
                let (muv, alv) = unsafe { (_mm512_loadu_ps(mu.add(g * TILE)), _mm512_loadu_ps(alpha.add(g * TILE))) };
                for u in 0..NB {
                    // SAFETY: (b0 + u) ng + g < batch x n_groups (module bounds).
                    let tg = _mm512_set1_ps(unsafe { *qx.tsum.get_unchecked((b0 + u) * ng + g) });
                    let part = _mm512_add_ps(_mm512_mul_ps(muv, tg), _mm512_mul_ps(alv, ss[u]));
                    y[u] = _mm512_add_ps(y[u], part);
                    ss[u] = _mm512_setzero_ps();
                }
            }
        }
        // SAFETY: the tile's 16 sigmas.
        let sg = unsafe { _mm512_loadu_ps(l.sigma.as_ptr().add(t * TILE)) };
        for u in 0..NB {
            let v = _mm512_add_ps(y[u], _mm512_mul_ps(sg, sr[u]));
            // SAFETY: floats [(b0 + u) 16, (b0 + u + 1) 16) of yt, b0 + u < batch.
            unsafe { _mm512_storeu_ps(yt.as_mut_ptr().add((b0 + u) * TILE), v) };
        }
    }

    /// AVX2 tile kernel (also used on AVX-512 CPUs without VNNI), batch rows in
    /// passes of up to 2: the tile as two halves of 8 rows. Sign bits become bytes
    /// 0/1 with `pshufb`+`pand`+`pminub` and meet the activations in `pmaddubsw`
    /// (int16 sums, widened once per block); the residual comes from the sparse
    /// form, one [`pair_dot`] per pair of codes per row.
    ///
    /// # Safety
    /// The AVX2 entry of [`super::TileFn`]: the CPU has AVX2, FMA, BMI2 and POPCNT,
    /// and the arguments meet the contract there.
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    pub(super) unsafe fn tile_avx2(l: &Layout, t: usize, qx: &QuantX, yt: &mut [f32]) {
        if qx.batch >= ROWS_MIN_AVX2 {
            // SAFETY: this function's contract.
            unsafe { tile256_rows(l, t, qx, yt) };
            return;
        }
        let mut b0 = 0;
        while b0 < qx.batch {
            // SAFETY: this function's contract, and b0 + NB <= batch for the NB chosen.
            unsafe {
                match qx.batch - b0 {
                    1 => tile256::<1>(l, t, qx, b0, yt),
                    _ => tile256::<2>(l, t, qx, b0, yt),
                }
            }
            b0 += 2;
        }
    }

    /// Bytes `[0xFF; 32]` then `[0; 32]`: a load at `32 - k` keeps the first `k` bytes.
    pub(crate) static KEEP: [u8; 64] = {
        let mut a = [0u8; 64];
        let mut i = 0;
        while i < 32 {
            a[i] = 0xFF;
            i += 1;
        }
        a
    };

    /// One pair of a sparse record, decoded for [`pair_dot`]: column bytes, the
    /// same with bit 7 flipped, the blend selector (bit 5 moved to bit 7), codes
    /// (0 past the pair's lanes) and their absolute values.
    type Pair = [__m256i; 5];

    /// Decode the pair whose `n_j` is `nj` at `*d` (advanced past it).
    ///
    /// # Safety
    /// AVX2; `*d` is at the pair's column bytes in a sparse stream (32-byte loads
    /// at its columns and codes stay inside the stream's `SPARSE_PAD`).
    #[inline(always)]
    unsafe fn load_pair(nj: u8, d: &mut *const u8) -> Pair {
        let n2 = 2 * nj as usize;
        // SAFETY: the contract; n2 <= 32, so KEEP[32 - n2..][..32] is in bounds.
        unsafe {
            let cols = _mm256_loadu_si256((*d).cast());
            let keep = _mm256_loadu_si256(KEEP.as_ptr().add(32 - n2).cast());
            let q = _mm256_and_si256(_mm256_loadu_si256((*d).add(n2).cast()), keep);
            *d = (*d).add(2 * n2);
            let ix = _mm256_xor_si256(cols, _mm256_set1_epi8(0x80u8 as i8));
            [cols, ix, _mm256_slli_epi16::<2>(cols), q, _mm256_abs_epi8(q)]
        }
    }

    /// The four 16-column tables of a block's 64 activations at `x`, each in both
    /// 128-bit halves (`pshufb` looks up within a half).
    ///
    /// # Safety
    /// AVX2; 64 readable bytes at `x`.
    #[inline(always)]
    unsafe fn block_tables(x: *const i8) -> [__m256i; 4] {
        // SAFETY: the contract.
        unsafe {
            [
                _mm256_broadcastsi128_si256(_mm_loadu_si128(x.cast())),
                _mm256_broadcastsi128_si256(_mm_loadu_si128(x.add(16).cast())),
                _mm256_broadcastsi128_si256(_mm_loadu_si128(x.add(32).cast())),
                _mm256_broadcastsi128_si256(_mm_loadu_si128(x.add(48).cast())),
            ]
        }
    }

    /// Add a pair's products to the even- and odd-position sums: the activations
    /// at the lanes' columns by four `pshufb` (two per 32 columns, each zeroing
    /// the lanes of the other table through bit 7) and a blend on column bit 5,
    /// then |q|·sign(x, q) with `pmaddubsw` (a row's two codes summed, one int16
    /// per sorted position, |sum| <= 2·127·127) and two `pmaddwd` that split the
    /// even and odd positions into i32.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn pair_dot(tab: &[__m256i; 4], p: &Pair, ae: &mut __m256i, ao: &mut __m256i) {
        let [cols, ix, sel, q, aq] = *p;
        // SAFETY: AVX2 (contract); registers only.
        unsafe {
            let lo = _mm256_or_si256(_mm256_shuffle_epi8(tab[0], cols), _mm256_shuffle_epi8(tab[1], ix));
            let hi = _mm256_or_si256(_mm256_shuffle_epi8(tab[2], cols), _mm256_shuffle_epi8(tab[3], ix));
            let xv = _mm256_blendv_epi8(lo, hi, sel);
            let pr = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(xv, q));
            *ae = _mm256_add_epi32(*ae, _mm256_madd_epi16(pr, _mm256_set1_epi32(1)));
            *ao = _mm256_add_epi32(*ao, _mm256_madd_epi16(pr, _mm256_set1_epi32(1 << 16)));
        }
    }

    /// `vpermd` indices and blend selectors that put a record's sorted positions
    /// back in row order: for rows 0-7 and 8-15, position `pos[r]` is lane
    /// `pos[r] / 2` of the even (`pos[r]` even) or odd sums.
    ///
    /// # Safety
    /// AVX2; 16 readable bytes at `pos`.
    #[inline(always)]
    unsafe fn unsort_index(pos: *const u8) -> [(__m256i, __m256); 2] {
        // SAFETY: the contract.
        unsafe {
            let p0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(pos.cast()));
            let p1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(pos.add(8).cast()));
            [
                (_mm256_srli_epi32::<1>(p0), _mm256_castsi256_ps(_mm256_slli_epi32::<31>(p0))),
                (_mm256_srli_epi32::<1>(p1), _mm256_castsi256_ps(_mm256_slli_epi32::<31>(p1))),
            ]
        }
    }

    /// The residual sums R of rows 0-7 and 8-15 from the even and odd position sums.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn unsort(ix: &[(__m256i, __m256); 2], ae: __m256i, ao: __m256i) -> [__m256i; 2] {
        // SAFETY: AVX2 (contract); registers only.
        unsafe {
            // No closure: it would lose the caller's target features if not inlined.
            let mut r = [_mm256_setzero_si256(); 2];
            for (rh, &(i, s)) in r.iter_mut().zip(ix) {
                let e = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(ae, i));
                let o = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(ao, i));
                *rh = _mm256_castps_si256(_mm256_blendv_ps(e, o, s));
            }
            r
        }
    }

    /// Sign bytes 0/1 of 8 rows x 4 columns (lane 4r + c) from 32 sign bits.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn sign_bytes(bits: u32) -> __m256i {
        // SAFETY: AVX2 (contract); registers only.
        unsafe {
            // Byte L gets byte L/8 of the 32 sign bits; bit L%8 selects it.
            let shuf = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
            );
            let bitsel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let sel = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf), bitsel);
            _mm256_min_epu8(sel, _mm256_set1_epi8(1))
        }
    }

    /// Batch size from which [`tile256_rows`] runs.
    const ROWS_MIN_AVX2: usize = 4;

    /// Batched AVX2 tile kernel, the counterpart of [`tile512_rows`]: each block's
    /// sign bytes and sparse residual pairs are decoded once per pass into an L1
    /// buffer (up to 6 KiB), then every batch row of the pass streams over it
    /// (`pmaddubsw` for the sign part, [`pair_dot`] for the residual).
    ///
    /// # Safety
    /// As `tile_avx2`.
    #[inline]
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn tile256_rows(l: &Layout, t: usize, qx: &QuantX, yt: &mut [f32]) {
        let (ng, bpg, blocks) = (l.n_groups, l.blocks_per_group(), l.blocks);
        let (sw, mu, alpha) = l.tile(t);
        let sp = l.sparse();
        let ones16 = _mm256_set1_epi16(1);
        let z = _mm256_setzero_si256();
        let zf = _mm256_setzero_ps();
        // Per quad and half (8 rows): sign bytes 0/1; per pair of the block's record.
        let mut sbuf = [z; 2 * QUADS_PER_BLOCK];
        let mut pbuf = [[z; 5]; BLOCK / 2];
        let mut ss = [[zf; 2]; ROWS_CHUNK];
        let mut sr = [[zf; 2]; ROWS_CHUNK];
        let mut y = [[zf; 2]; ROWS_CHUNK];
        let mut c0 = 0;
        while c0 < qx.batch {
            let rows = (qx.batch - c0).min(ROWS_CHUNK);
            // SAFETY: the tile's first record (module bounds).
            let mut rec = unsafe { sp.bytes.as_ptr().add(sp.offsets[t]) };
            ss[..rows].fill([zf; 2]);
            sr[..rows].fill([zf; 2]);
            y[..rows].fill([zf; 2]);
            let mut gb = 0;
            for kb in 0..blocks {
                for j in 0..QUADS_PER_BLOCK {
                    let ws = sw[kb * QUADS_PER_BLOCK + j];
                    for h in 0..2 {
                        // SAFETY: AVX2 (contract).
                        sbuf[2 * j + h] = unsafe { sign_bytes((ws >> (32 * h)) as u32) };
                    }
                }
                // SAFETY: rec is at block kb's record (module bounds); load_pair
                // advances it past each pair, so it ends at the next record.
                let (np, ix) = unsafe {
                    let (np, pos, ns, mut d) = layout::record_head(rec);
                    let ix = unsort_index(pos);
                    for (j, pb) in pbuf[..np].iter_mut().enumerate() {
                        *pb = load_pair(*ns.add(j), &mut d);
                    }
                    rec = d;
                    (np, ix)
                };
                let last = gb + 1 == bpg || kb + 1 == blocks;
                let g = kb / bpg;
                for u in 0..rows {
                    let b = c0 + u;
                    let xr = &qx.xq[b * qx.stride + kb * BLOCK..b * qx.stride + (kb + 1) * BLOCK];
                    let mut p16 = [z; 2]; // Σ bit·x as int16 pairs (< 2^15 per block)
                    for j in 0..QUADS_PER_BLOCK {
                        let x4 = i32::from_le_bytes([
                            xr[4 * j] as u8,
                            xr[4 * j + 1] as u8,
                            xr[4 * j + 2] as u8,
                            xr[4 * j + 3] as u8,
                        ]);
                        let xb = _mm256_set1_epi32(x4);
                        for h in 0..2 {
                            p16[h] = _mm256_add_epi16(p16[h], _mm256_maddubs_epi16(sbuf[2 * j + h], xb));
                        }
                    }
                    let (mut ae, mut ao) = (z, z);
                    // SAFETY: xr holds the block's 64 codes.
                    let tab = unsafe { block_tables(xr.as_ptr()) };
                    for p in &pbuf[..np] {
                        // SAFETY: AVX2 (contract).
                        unsafe { pair_dot(&tab, p, &mut ae, &mut ao) };
                    }
                    // SAFETY: AVX2 (contract).
                    let r32 = unsafe { unsort(&ix, ae, ao) };
                    let bi = b * blocks + kb;
                    let (xs, d) = (qx.xsum[bi], _mm256_set1_ps(qx.d[bi]));
                    for h in 0..2 {
                        // Same f32 order as tile256.
                        let pp = _mm256_madd_epi16(p16[h], ones16);
                        let sv = _mm256_sub_epi32(_mm256_set1_epi32(xs), _mm256_slli_epi32::<1>(pp));
                        ss[u][h] = _mm256_add_ps(ss[u][h], _mm256_mul_ps(d, _mm256_cvtepi32_ps(sv)));
                        sr[u][h] = _mm256_add_ps(sr[u][h], _mm256_mul_ps(d, _mm256_cvtepi32_ps(r32[h])));
                    }
                    if last {
                        let tg = _mm256_set1_ps(qx.tsum[b * ng + g]);
                        for h in 0..2 {
                            let o = g * TILE + 8 * h;
                            // SAFETY: scales [o, o + 8) of the tile's group g.
                            let (muv, alv) = unsafe {
                                (_mm256_loadu_ps(mu[o..o + 8].as_ptr()), _mm256_loadu_ps(alpha[o..o + 8].as_ptr()))
                            };
                            let part = _mm256_add_ps(_mm256_mul_ps(muv, tg), _mm256_mul_ps(alv, ss[u][h]));
                            y[u][h] = _mm256_add_ps(y[u][h], part);
                            ss[u][h] = zf;
                        }
                    }
                }
                gb = if last { 0 } else { gb + 1 };
            }
            for h in 0..2 {
                let o = t * TILE + 8 * h;
                // SAFETY: sigmas [o, o + 8) of the tile.
                let sg = unsafe { _mm256_loadu_ps(l.sigma[o..o + 8].as_ptr()) };
                for u in 0..rows {
                    let v = _mm256_add_ps(y[u][h], _mm256_mul_ps(sg, sr[u][h]));
                    let dst = &mut yt[(c0 + u) * TILE + 8 * h..(c0 + u) * TILE + 8 * h + 8];
                    // SAFETY: 8 floats of yt.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) };
                }
            }
            c0 += rows;
        }
    }

    /// NB batch rows of the AVX2 kernel.
    ///
    /// # Safety
    /// As `tile_avx2`, with `b0 + NB <= batch`.
    #[inline]
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn tile256<const NB: usize>(l: &Layout, t: usize, qx: &QuantX, b0: usize, yt: &mut [f32]) {
        let quads = l.quads();
        let (ng, bpg, blocks) = (l.n_groups, l.blocks_per_group(), l.blocks);
        // The tile's sign words and first sparse record, and xq rows b0..
        // (bounds-checked once per tile; the loops below index from these).
        let sw = l.signs[t * quads..].as_ptr();
        let sp = l.sparse();
        let mut rec = sp.bytes[sp.offsets[t]..].as_ptr();
        let xp: [*const i8; NB] = std::array::from_fn(|u| qx.xq[(b0 + u) * qx.stride..].as_ptr());
        let ones16 = _mm256_set1_epi16(1);
        let z = _mm256_setzero_si256();
        // Float state per batch row and half: y, Σ d·S of the group, Σ d·R.
        let mut y = [[_mm256_setzero_ps(); 2]; NB];
        let mut ss = [[_mm256_setzero_ps(); 2]; NB];
        let mut sr = [[_mm256_setzero_ps(); 2]; NB];
        let mut gb = 0;
        for kb in 0..blocks {
            let mut p16 = [[z; 2]; NB]; // Σ bit·x as int16 pairs (< 2^15 per block)
                                        // The residual: each pair of the block's record is decoded once and
                                        // dotted with every batch row's activations.
            let mut ae = [z; NB];
            let mut ao = [z; NB];
            // SAFETY: rec is at block kb's record (module bounds; load_pair advances it
            // past each pair, so it ends at the next record); 64 bytes of each xq row
            // at the block.
            let r32 = unsafe {
                let (np, pos, ns, mut d) = layout::record_head(rec);
                let ix = unsort_index(pos);
                let mut tab = [[z; 4]; NB];
                for u in 0..NB {
                    tab[u] = block_tables(xp[u].add(kb * BLOCK));
                }
                for j in 0..np {
                    let p = load_pair(*ns.add(j), &mut d);
                    for u in 0..NB {
                        pair_dot(&tab[u], &p, &mut ae[u], &mut ao[u]);
                    }
                }
                rec = d;
                let mut r = [[z; 2]; NB];
                for u in 0..NB {
                    r[u] = unsort(&ix, ae[u], ao[u]);
                }
                r
            };
            for k in kb * QUADS_PER_BLOCK..(kb + 1) * QUADS_PER_BLOCK {
                // SAFETY: quad k < quads (block kb < blocks).
                let ws = unsafe { *sw.add(k) };
                let mut xb = [z; NB];
                for u in 0..NB {
                    // SAFETY: bytes [4k, 4k + 4) of xq row b0 + u (module bounds).
                    xb[u] = _mm256_set1_epi32(unsafe { xp[u].add(4 * k).cast::<i32>().read_unaligned() });
                }
                for h in 0..2 {
                    // SAFETY: AVX2 (contract).
                    let b01 = unsafe { sign_bytes((ws >> (32 * h)) as u32) };
                    for (pu, xu) in p16.iter_mut().zip(&xb) {
                        pu[h] = _mm256_add_epi16(pu[h], _mm256_maddubs_epi16(b01, *xu));
                    }
                }
            }
            for u in 0..NB {
                let bi = (b0 + u) * blocks + kb;
                // SAFETY: bi < batch x blocks (module bounds).
                let (xs, d) = unsafe { (*qx.xsum.get_unchecked(bi), *qx.d.get_unchecked(bi)) };
                let d = _mm256_set1_ps(d);
                for h in 0..2 {
                    let pp = _mm256_madd_epi16(p16[u][h], ones16);
                    let s = _mm256_sub_epi32(_mm256_set1_epi32(xs), _mm256_slli_epi32::<1>(pp));
                    ss[u][h] = _mm256_add_ps(ss[u][h], _mm256_mul_ps(d, _mm256_cvtepi32_ps(s)));
                    sr[u][h] = _mm256_add_ps(sr[u][h], _mm256_mul_ps(d, _mm256_cvtepi32_ps(r32[u][h])));
                }
            }
            gb += 1;
            if gb == bpg || kb + 1 == blocks {
                gb = 0;
                let g = kb / bpg;
                for h in 0..2 {
                    let o = (t * ng + g) * TILE + 8 * h;
                    // SAFETY: scales [o, o + 8) of half h of the tile's group g.
                    let (muv, alv) =
                        unsafe { (_mm256_loadu_ps(l.mu.as_ptr().add(o)), _mm256_loadu_ps(l.alpha.as_ptr().add(o))) };
                    for u in 0..NB {
                        // SAFETY: (b0 + u) ng + g < batch x n_groups (module bounds).
                        let tg = _mm256_set1_ps(unsafe { *qx.tsum.get_unchecked((b0 + u) * ng + g) });
                        let part = _mm256_add_ps(_mm256_mul_ps(muv, tg), _mm256_mul_ps(alv, ss[u][h]));
                        y[u][h] = _mm256_add_ps(y[u][h], part);
                        ss[u][h] = _mm256_setzero_ps();
                    }
                }
            }
        }
        for h in 0..2 {
            // SAFETY: sigmas [8h, 8h + 8) of the tile.
            let sg = unsafe { _mm256_loadu_ps(l.sigma.as_ptr().add(t * TILE + 8 * h)) };
            for u in 0..NB {
                let v = _mm256_add_ps(y[u][h], _mm256_mul_ps(sg, sr[u][h]));
                // SAFETY: floats [8h, 8h + 8) of yt row b0 + u < batch.
                unsafe { _mm256_storeu_ps(yt.as_mut_ptr().add((b0 + u) * TILE + 8 * h), v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout;
    use crate::pb::{compress, Params, ScaleType};
    use crate::testutil::rand_vec;

    fn params(salient: f64, salient_bits: u32, group_size: Option<usize>) -> Params {
        Params { salient, salient_bits, group_size, ..Params::default() }
    }

    /// The activation quantizer gives the same codes, scales and sums at every
    /// level, ties, zeros, non-finite and subnormal values included.
    #[test]
    fn quantize_is_the_same_at_every_level() {
        let mut seed = 5;
        for n in [1usize, 7, 64, 65, 100, 200] {
            let t = compress(&rand_vec(3 * n, &mut seed), 3, n, None, &params(0.1, 8, None)).unwrap();
            let l = layout::build(&t.view()).unwrap();
            let batch = 6;
            let mut x = rand_vec(batch * n, &mut seed);
            // Row 1: ties (k + 0.5 after scaling by 127 / amax) and zeros; row 2 all
            // zero; rows 3-5: a NaN, an infinity, a subnormal.
            for (j, v) in x[n..2 * n].iter_mut().enumerate() {
                *v = ((j % 7) as f32 - 3.0) * 0.5;
            }
            x[n] = 127.0 / 2.0;
            x[2 * n..3 * n].fill(0.0);
            x[3 * n + n / 2] = f32::NAN;
            x[4 * n] = f32::NEG_INFINITY;
            x[5 * n + n - 1] = 1e-40;
            let want = quantize_at(Level::Scalar, &x, batch, n, &l);
            for lvl in simd::available() {
                let got = quantize_at(lvl, &x, batch, n, &l);
                assert_eq!(got.xq, want.xq, "{lvl:?} n={n}");
                assert_eq!(got.xsum, want.xsum, "{lvl:?} n={n}");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.d), bits(&want.d), "{lvl:?} n={n}");
                assert_eq!(bits(&got.tsum), bits(&want.tsum), "{lvl:?} n={n}");
            }
        }
    }

    /// Every level's int8 kernel gives the scalar kernel's bits (§6.4: exact
    /// integer sums combined in a fixed order), for batch sizes that exercise every
    /// pass width and both batched kernels, tail tiles, several groups and the bias.
    #[test]
    fn every_level_matches_scalar_bit_for_bit() {
        let mut seed = 11;
        let cases = [
            (37, 200, None, 8, 0.12),
            (16, 128, Some(64), 4, 0.12),
            (5, 64, None, 8, 0.12),
            (40, 384, Some(128), 8, 0.12),
            (18, 130, None, 8, 1.0), // every code salient: 32 pairs per block
            (17, 70, None, 8, 0.0),  // none
            (21, 300, None, 8, 0.5),
            (32, 256, None, 8, 0.1), // testutil::HEAVY_N: codes only in block 1
            (20, 0, None, 8, 0.1),
        ];
        for (m, n, gs, vb, salient) in cases {
            let w = crate::testutil::case_weights(m, n, &mut seed);
            let t = compress(&w, m, n, None, &params(salient, vb, gs)).unwrap();
            let l = layout::build(&t.view()).unwrap();
            let bias = rand_vec(m, &mut seed);
            // 16.. run the batched kernel; 33 and 70 span several of its row chunks.
            for batch in [1usize, 2, 3, 4, 5, 9, 16, 33, 70] {
                let x = rand_vec(batch * n, &mut seed);
                for b in [None, Some(&bias[..])] {
                    let mut want = vec![0f32; batch * m];
                    matvec_int8_at(Level::Scalar, &l, &x, batch, b, &mut want).unwrap();
                    for lvl in simd::available() {
                        let mut got = vec![f32::NAN; batch * m];
                        matvec_int8_at(lvl, &l, &x, batch, b, &mut got).unwrap();
                        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{lvl:?} {m}x{n} g={gs:?} vb={vb} batch={batch} bias={}", b.is_some());
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let mut seed = 2;
        let w = rand_vec(20 * 64, &mut seed);
        let p = Params { scale: ScaleType::F32, ..Params::default() };
        let l = layout::build(&compress(&w, 20, 64, None, &p).unwrap().view()).unwrap();
        let x = vec![1f32; 64];
        let mut y = vec![0f32; 20];
        assert!(matvec_int8(&l, &x[..63], 1, None, &mut y).is_err());
        assert!(matvec_int8(&l, &x, 1, None, &mut y[..19]).is_err());
        assert!(matvec_int8(&l, &x, 1, Some(&[0f32; 19]), &mut y).is_err());
        assert!(matvec_int8(&l, &x, 1, Some(&[0f32; 20]), &mut y).is_ok());
    }
}
