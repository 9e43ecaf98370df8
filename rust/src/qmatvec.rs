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
//! bitnet.cpp; the salient residual as a per-tile bitmask plus values expanded
//! with `vpexpandb` is this project's own.
use rayon::prelude::*;

use crate::error::invalid;
use crate::layout::{Layout, BLOCK, QUADS_PER_BLOCK, TILE};
use crate::simd::{self, Level};
use crate::{parallel, Result};

/// The activations of one call, quantized (§6.4).
pub struct QuantX {
    pub batch: usize,
    pub blocks: usize,
    /// Bytes per batch row of `xq` (`blocks * 32`).
    pub stride: usize,
    /// `batch x stride` int8 codes, zero past n.
    pub xq: Vec<i8>,
    /// `batch x blocks` block scales (NaN for a block holding a non-finite value).
    pub d: Vec<f32>,
    /// `batch x blocks` sums of each block's codes.
    pub xsum: Vec<i32>,
    /// `batch x n_groups`: T_g = Σ_{b∈g} d_b·X_b, in block order.
    pub tsum: Vec<f32>,
}

/// Quantize `batch x n` activations per block of 64 columns (§6.4).
pub fn quantize(x: &[f32], batch: usize, n: usize, l: &Layout) -> QuantX {
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
    };
    for b in 0..batch {
        let xr = &x[b * n..(b + 1) * n];
        for kb in 0..blocks {
            let blk = &xr[kb * BLOCK..((kb + 1) * BLOCK).min(n)];
            let out = &mut q.xq[b * stride + kb * BLOCK..b * stride + kb * BLOCK + blk.len()];
            let (d, sum) = quantize_block(blk, out);
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
fn quantize_block(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    if !x.iter().all(|v| v.is_finite()) {
        out.fill(0);
        return (f32::NAN, 0);
    }
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    if d == 0.0 {
        out.fill(0);
        return (d, 0);
    }
    let mut sum = 0i32;
    for (o, &v) in out.iter_mut().zip(x) {
        let c = (v / d).round_ties_even().clamp(-127.0, 127.0) as i8;
        *o = c;
        sum += c as i32;
    }
    (d, sum)
}

/// A tile kernel: all batch rows of tile `t` into `yt` (`batch x 16`).
type TileFn = unsafe fn(&Layout, usize, &QuantX, &mut [f32]);

/// The int8 tile kernel of each SIMD level.
///
/// # Safety
/// The entry for a level may only be called when the CPU supports that level
/// (`simd::level()` never reports more than `simd::detected()`), with a
/// layout built by `layout::build` (offsets and sizes consistent) and a
/// `QuantX` made by `quantize` for it; `yt` must hold `batch x 16` floats.
fn tile_kernel(level: Level) -> TileFn {
    #[cfg(target_arch = "x86_64")]
    {
        match level {
            Level::Avx512 if simd::has_vnni() => return x86::tile_avx512,
            Level::Avx512 | Level::Avx2 => return x86::tile_avx2,
            Level::Scalar => {}
        }
    }
    let _ = level;
    tile_scalar
}

/// y = Ŵ x with int8 activations (§6.4) for `batch` rows of `x` (`batch x n`)
/// into `out` (`batch x m`); with `bias` (`m`), `y + bias` (one f32 addition).
pub fn matvec_int8(l: &Layout, x: &[f32], batch: usize, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    let (m, n) = (l.m, l.n);
    if !l.int8_supported() {
        return invalid(format!(
            "int8 activations need a group size that is a multiple of {BLOCK} (or one group per row); \
             this tensor has group_size {}: use activations='float32'",
            l.group_size
        ));
    }
    if x.len() != batch.saturating_mul(n) {
        return invalid(format!("x has {} elements, expected {batch} x {n}", x.len()));
    }
    if out.len() != batch.saturating_mul(m) {
        return invalid(format!("out has {} elements, expected {batch} x {m}", out.len()));
    }
    if m == 0 || batch == 0 {
        return Ok(());
    }
    let qx = quantize(x, batch, n, l);
    let kernel = tile_kernel(simd::level());
    run_tiles(l, batch, bias, out, |t, y| {
        // SAFETY: the kernel matches simd::level() (a level the CPU has); `l` was
        // built by layout::build, `qx` by quantize(l), `y` holds batch x 16 floats.
        unsafe { kernel(l, t, &qx, y) }
    });
    Ok(())
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
        let tiles_per_task = (l.tiles / (threads * 8)).max(1);
        parallel::pool().install(|| {
            yt.par_chunks_mut(tiles_per_task * per_tile).enumerate().for_each(|(c, ys)| run((c * tiles_per_task, ys)))
        });
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

/// Portable kernel: the sign part by a 16-entry table per quad (the sums of
/// xq over each subset of the quad's 4 columns, T-MAC style), the residual by
/// walking the mask's set bits. Integer sums are exact, so the result equals
/// the SIMD kernels' bit for bit.
///
/// # Safety
/// Safe to call with any layout built by `layout::build` and its `QuantX`;
/// `unsafe` only to share the kernel table's signature.
unsafe fn tile_scalar(l: &Layout, t: usize, qx: &QuantX, yt: &mut [f32]) {
    let quads = l.quads();
    let (ng, bpg) = (l.n_groups, l.blocks_per_group());
    let sw = &l.signs[t * quads..(t + 1) * quads];
    let mw = &l.masks[t * quads..(t + 1) * quads];
    let mu = &l.mu[t * ng * TILE..(t + 1) * ng * TILE];
    let alpha = &l.alpha[t * ng * TILE..(t + 1) * ng * TILE];
    let sigma = &l.sigma[t * TILE..(t + 1) * TILE];
    for b in 0..qx.batch {
        let xq = &qx.xq[b * qx.stride..(b + 1) * qx.stride];
        let mut vi = l.value_offsets[t];
        let mut y = [0f32; TILE];
        let mut ss = [0f32; TILE];
        let mut sr = [0f32; TILE];
        for kb in 0..l.blocks {
            let mut p = [0i32; TILE];
            let mut r = [0i32; TILE];
            for k in kb * QUADS_PER_BLOCK..(kb + 1) * QUADS_PER_BLOCK {
                let x4 = [xq[4 * k] as i32, xq[4 * k + 1] as i32, xq[4 * k + 2] as i32, xq[4 * k + 3] as i32];
                let mut lut = [0i32; 16];
                for i in 1..16usize {
                    lut[i] = lut[i & (i - 1)] + x4[i.trailing_zeros() as usize];
                }
                let w = sw[k];
                for (rr, pv) in p.iter_mut().enumerate() {
                    *pv += lut[((w >> (4 * rr)) & 15) as usize];
                }
                let mut bits = mw[k];
                while bits != 0 {
                    let lane = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    r[lane / 4] += (l.values[vi] as i32 - 127) * x4[lane % 4];
                    vi += 1;
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

// --------------------------------------------------------------------- x86

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::QuantX;
    use crate::layout::{Layout, QUADS_PER_BLOCK, TILE};

    /// AVX-512 (F/BW/VNNI/VBMI2) tile kernel, batch rows in passes of up to 4.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/VNNI/VBMI2 and POPCNT; see `tile_kernel`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,popcnt")]
    pub(super) unsafe fn tile_avx512(l: &Layout, t: usize, qx: &QuantX, yt: &mut [f32]) {
        let mut b0 = 0;
        while b0 < qx.batch {
            // SAFETY: same contract as this function; b0 + NB <= batch.
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

    /// NB batch rows; ACC independent accumulator sets per row (alternate quads),
    /// so the dot-product chains overlap when NB is small.
    #[inline(always)]
    unsafe fn tile512<const NB: usize, const ACC: usize>(l: &Layout, t: usize, qx: &QuantX, b0: usize, yt: &mut [f32]) {
        let quads = l.quads();
        let (ng, bpg, blocks) = (l.n_groups, l.blocks_per_group(), l.blocks);
        // SAFETY (whole body): t < tiles, so the tile's words, scales and value
        // range lie inside the layout's vectors; xq rows hold blocks*32 bytes, read
        // 4 at a time at k < quads; expand-loads read exactly popcount(mask) bytes
        // from the tile's values (masked-off bytes are not accessed).
        unsafe {
            let sw = l.signs.as_ptr().add(t * quads);
            let mw = l.masks.as_ptr().add(t * quads);
            let mut vp = l.values.as_ptr().add(l.value_offsets[t]);
            let mu = l.mu.as_ptr().add(t * ng * TILE);
            let alpha = l.alpha.as_ptr().add(t * ng * TILE);
            let ones = _mm512_set1_epi8(1);
            let fill = _mm512_set1_epi8(127);
            let mut xp = [std::ptr::null::<i8>(); NB];
            for (u, p) in xp.iter_mut().enumerate() {
                *p = qx.xq.as_ptr().add((b0 + u) * qx.stride);
            }
            let z = _mm512_setzero_si512();
            let mut y = [_mm512_setzero_ps(); NB];
            let mut ss = [_mm512_setzero_ps(); NB];
            let mut sr = [_mm512_setzero_ps(); NB];
            let mut gb = 0; // blocks of the current group done (no division per block)
            for kb in 0..blocks {
                // Two accumulator sets (even and odd quads) when ACC == 2; constant
                // indices only, so they stay in registers.
                let mut p0 = [z; NB];
                let mut r0 = [z; NB];
                let mut p1 = [z; NB];
                let mut r1 = [z; NB];
                let mut k = kb * QUADS_PER_BLOCK;
                for _ in 0..QUADS_PER_BLOCK / 2 {
                    quad512::<NB>(*sw.add(k), *mw.add(k), &mut vp, ones, fill, &xp, k, &mut p0, &mut r0);
                    if ACC == 2 {
                        quad512::<NB>(
                            *sw.add(k + 1),
                            *mw.add(k + 1),
                            &mut vp,
                            ones,
                            fill,
                            &xp,
                            k + 1,
                            &mut p1,
                            &mut r1,
                        );
                    } else {
                        quad512::<NB>(
                            *sw.add(k + 1),
                            *mw.add(k + 1),
                            &mut vp,
                            ones,
                            fill,
                            &xp,
                            k + 1,
                            &mut p0,
                            &mut r0,
                        );
                    }
                    k += 2;
                }
                let p = [p0, p1];
                let r = [r0, r1];
                for u in 0..NB {
                    let bi = (b0 + u) * blocks + kb;
                    let xs = *qx.xsum.get_unchecked(bi);
                    let d = _mm512_set1_ps(*qx.d.get_unchecked(bi));
                    let (mut pp, mut rr) = (p[0][u], r[0][u]);
                    if ACC == 2 {
                        pp = _mm512_add_epi32(pp, p[1][u]);
                        rr = _mm512_add_epi32(rr, r[1][u]);
                    }
                    // S = X - 2P; R = R' - 127 X (the empty lanes held 127).
                    let s = _mm512_sub_epi32(_mm512_set1_epi32(xs), _mm512_slli_epi32::<1>(pp));
                    let rv = _mm512_sub_epi32(rr, _mm512_set1_epi32(127 * xs));
                    ss[u] = _mm512_add_ps(ss[u], _mm512_mul_ps(d, _mm512_cvtepi32_ps(s)));
                    sr[u] = _mm512_add_ps(sr[u], _mm512_mul_ps(d, _mm512_cvtepi32_ps(rv)));
                }
                gb += 1;
                if gb == bpg || kb + 1 == blocks {
                    gb = 0;
                    let g = kb / bpg;
                    let muv = _mm512_loadu_ps(mu.add(g * TILE));
                    let alv = _mm512_loadu_ps(alpha.add(g * TILE));
                    for u in 0..NB {
                        let tg = _mm512_set1_ps(*qx.tsum.get_unchecked((b0 + u) * ng + g));
                        let part = _mm512_add_ps(_mm512_mul_ps(muv, tg), _mm512_mul_ps(alv, ss[u]));
                        y[u] = _mm512_add_ps(y[u], part);
                        ss[u] = _mm512_setzero_ps();
                    }
                }
            }
            let sg = _mm512_loadu_ps(l.sigma.as_ptr().add(t * TILE));
            for u in 0..NB {
                let v = _mm512_add_ps(y[u], _mm512_mul_ps(sg, sr[u]));
                _mm512_storeu_ps(yt.as_mut_ptr().add((b0 + u) * TILE), v);
            }
        }
    }

    /// One quad (4 columns x 16 rows) for NB batch rows: sign bits -> bytes 0/1,
    /// residual codes -> q+127 bytes (127 in empty lanes), two `vpdpbusd` per row.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn quad512<const NB: usize>(
        ks: __mmask64,
        km: __mmask64,
        vp: &mut *const u8,
        ones: __m512i,
        fill: __m512i,
        xp: &[*const i8; NB],
        k: usize,
        p: &mut [__m512i; NB],
        r: &mut [__m512i; NB],
    ) {
        // SAFETY: called from tile512 under its contract (see there).
        unsafe {
            let wb = _mm512_maskz_mov_epi8(ks, ones);
            // q + 127 in the salient lanes, 127 (q = 0) elsewhere: every lane is
            // unsigned, and the 127·X_b this adds is subtracted per block.
            let wv = _mm512_mask_expandloadu_epi8(fill, km, *vp as *const i8);
            *vp = vp.add(km.count_ones() as usize);
            for u in 0..NB {
                let xb = _mm512_set1_epi32((xp[u].add(4 * k) as *const i32).read_unaligned());
                p[u] = _mm512_dpbusd_epi32(p[u], wb, xb);
                r[u] = _mm512_dpbusd_epi32(r[u], wv, xb);
            }
        }
    }

    /// For each 8-lane mask byte: a `pshufb` index that moves the k-th value
    /// byte to the lane of the k-th set bit, and 0x80 (zero) to the others.
    static EXPAND8: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut m = 0;
        while m < 256 {
            let (mut w, mut c, mut l) = (0u64, 0u64, 0);
            while l < 8 {
                let b = if (m >> l) & 1 == 1 {
                    c += 1;
                    c - 1
                } else {
                    0x80
                };
                w |= b << (8 * l);
                l += 1;
            }
            t[m] = w;
            m += 1;
        }
        t
    };

    /// AVX2 tile kernel (also used on AVX-512 CPUs without VNNI), batch rows in
    /// passes of up to 2: the tile as two halves of 8 rows. Sign bits become bytes
    /// 0/1 with `pshufb`+`pand`+`pminub` and meet the activations in `pmaddubsw`
    /// (int16 sums, widened once per block); residual codes are expanded from the
    /// mask with a `pshufb` index per 8 lanes and multiplied as |q|·sign(x, q).
    ///
    /// # Safety
    /// The CPU must have AVX2, BMI2 and POPCNT; see `tile_kernel`.
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    pub(super) unsafe fn tile_avx2(l: &Layout, t: usize, qx: &QuantX, yt: &mut [f32]) {
        let mut b0 = 0;
        while b0 < qx.batch {
            // SAFETY: same contract as this function; b0 + NB <= batch.
            unsafe {
                match qx.batch - b0 {
                    1 => tile256::<1>(l, t, qx, b0, yt),
                    _ => tile256::<2>(l, t, qx, b0, yt),
                }
            }
            b0 += 2;
        }
    }

    /// The 32 residual codes (8 rows x 4 columns, lane 4r + c) whose mask is `m`,
    /// as signed bytes (0 in empty lanes), read from `*vp` (advanced past them).
    ///
    /// # Safety
    /// AVX2 must be available; `*vp` points into a layout's values with at least
    /// `popcount(m)` values plus `VALUE_PAD` readable bytes after it.
    #[inline(always)]
    pub(crate) unsafe fn expand32(m: u32, vp: &mut *const u8) -> __m256i {
        // SAFETY: see the function's contract; 16-byte loads at value offsets
        // inside the tile stay within its values plus VALUE_PAD.
        unsafe {
            let (m0, m1, m2, m3) = (m & 0xFF, (m >> 8) & 0xFF, (m >> 16) & 0xFF, m >> 24);
            let (c0, c1, c2) = (m0.count_ones(), m1.count_ones(), m2.count_ones());
            let rep = 0x0101_0101_0101_0101u64;
            // Index bytes of the upper 8 lanes of each 16 count from that half's start.
            let lo = _mm_set_epi64x((EXPAND8[m1 as usize] + c0 as u64 * rep) as i64, EXPAND8[m0 as usize] as i64);
            let hi = _mm_set_epi64x((EXPAND8[m3 as usize] + c2 as u64 * rep) as i64, EXPAND8[m2 as usize] as i64);
            let idx = _mm256_set_m128i(hi, lo);
            let c01 = (c0 + c1) as usize;
            let v = _mm256_loadu2_m128i((*vp).add(c01) as *const __m128i, *vp as *const __m128i);
            *vp = vp.add(m.count_ones() as usize);
            // Stored bytes are q + 127; lanes without a value (index 0x80) become 0.
            _mm256_blendv_epi8(
                _mm256_sub_epi8(_mm256_shuffle_epi8(v, idx), _mm256_set1_epi8(127)),
                _mm256_setzero_si256(),
                idx,
            )
        }
    }

    /// Residual of 32 lanes (8 rows x 4 columns) whose mask is `m`: Σ q·x per
    /// row as 8 i32, values read from `*vp` (advanced past them).
    #[inline(always)]
    unsafe fn resid32<const NB: usize>(m: u32, vp: &mut *const u8, xb: &[__m256i; NB], out: &mut [__m256i; NB]) {
        // SAFETY: called from tile256 under its contract (see expand32's).
        unsafe {
            let q = expand32(m, vp);
            let aq = _mm256_abs_epi8(q);
            let ones16 = _mm256_set1_epi16(1);
            for u in 0..NB {
                // |q| * sign(x, q): no int16 saturation since |q|, |x| <= 127.
                let pr = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(xb[u], q));
                out[u] = _mm256_add_epi32(out[u], _mm256_madd_epi16(pr, ones16));
            }
        }
    }

    #[inline(always)]
    unsafe fn tile256<const NB: usize>(l: &Layout, t: usize, qx: &QuantX, b0: usize, yt: &mut [f32]) {
        let quads = l.quads();
        let (ng, bpg, blocks) = (l.n_groups, l.blocks_per_group(), l.blocks);
        // SAFETY (whole body): as in tile512; vector loads of values read at most
        // 16 bytes past a value index inside the tile, covered by VALUE_PAD.
        unsafe {
            let sw = l.signs.as_ptr().add(t * quads);
            let mw = l.masks.as_ptr().add(t * quads);
            let mut vp = l.values.as_ptr().add(l.value_offsets[t]);
            let mut xp = [std::ptr::null::<i8>(); NB];
            for (u, p) in xp.iter_mut().enumerate() {
                *p = qx.xq.as_ptr().add((b0 + u) * qx.stride);
            }
            // Byte L of a half gets byte L/8 of the 32 sign bits; bit L%8 selects it.
            let shuf = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
            );
            let bitsel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let one8 = _mm256_set1_epi8(1);
            let ones16 = _mm256_set1_epi16(1);
            let z = _mm256_setzero_si256();
            // Float state per batch row and half: y, Σ d·S of the group, Σ d·R.
            let mut y = [[_mm256_setzero_ps(); 2]; NB];
            let mut ss = [[_mm256_setzero_ps(); 2]; NB];
            let mut sr = [[_mm256_setzero_ps(); 2]; NB];
            let mut gb = 0;
            for kb in 0..blocks {
                let mut p16 = [[z; 2]; NB]; // Σ bit·x as int16 pairs (< 2^15 per block)
                let mut r32 = [[z; 2]; NB];
                for k in kb * QUADS_PER_BLOCK..(kb + 1) * QUADS_PER_BLOCK {
                    let ws = *sw.add(k);
                    let wm = *mw.add(k);
                    let mut xb = [z; NB];
                    for u in 0..NB {
                        xb[u] = _mm256_set1_epi32((xp[u].add(4 * k) as *const i32).read_unaligned());
                    }
                    for h in 0..2 {
                        let bits = _mm256_set1_epi32((ws >> (32 * h)) as u32 as i32);
                        let sel = _mm256_and_si256(_mm256_shuffle_epi8(bits, shuf), bitsel);
                        let b01 = _mm256_min_epu8(sel, one8);
                        for u in 0..NB {
                            p16[u][h] = _mm256_add_epi16(p16[u][h], _mm256_maddubs_epi16(b01, xb[u]));
                        }
                        let mut rr = [z; NB];
                        resid32::<NB>((wm >> (32 * h)) as u32, &mut vp, &xb, &mut rr);
                        for u in 0..NB {
                            r32[u][h] = _mm256_add_epi32(r32[u][h], rr[u]);
                        }
                    }
                }
                for u in 0..NB {
                    let bi = (b0 + u) * blocks + kb;
                    let xs = *qx.xsum.get_unchecked(bi);
                    let d = _mm256_set1_ps(*qx.d.get_unchecked(bi));
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
                        let muv = _mm256_loadu_ps(l.mu.as_ptr().add((t * ng + g) * TILE + 8 * h));
                        let alv = _mm256_loadu_ps(l.alpha.as_ptr().add((t * ng + g) * TILE + 8 * h));
                        for u in 0..NB {
                            let tg = _mm256_set1_ps(*qx.tsum.get_unchecked((b0 + u) * ng + g));
                            let part = _mm256_add_ps(_mm256_mul_ps(muv, tg), _mm256_mul_ps(alv, ss[u][h]));
                            y[u][h] = _mm256_add_ps(y[u][h], part);
                            ss[u][h] = _mm256_setzero_ps();
                        }
                    }
                }
            }
            for h in 0..2 {
                let sg = _mm256_loadu_ps(l.sigma.as_ptr().add(t * TILE + 8 * h));
                for u in 0..NB {
                    let v = _mm256_add_ps(y[u][h], _mm256_mul_ps(sg, sr[u][h]));
                    _mm256_storeu_ps(yt.as_mut_ptr().add((b0 + u) * TILE + 8 * h), v);
                }
            }
        }
    }
}
