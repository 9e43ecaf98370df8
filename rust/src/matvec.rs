//! Row-wise decode-fused matrix-vector product y = Ŵ x straight from the
//! compressed parts (docs/format.md §6.3), never materializing Ŵ. Used for
//! group sizes the execution layout cannot run (`fmatvec::supported`).
//!
//! Per row i and column group g, with s = ±1 from the sign plane:
//!   Σ_j (mu + alpha·s_j) x_j = mu·Σ_g x + alpha·Σ_g s_j x_j,
//! so the dense part needs Σ_g x (precomputed once per call) and one signed
//! sum per group; the residual adds sigma_i · Σ_salient q_ij x_j, walking the
//! zero-run codes. Rows are split across the worker pool; each row is computed
//! by one thread in a fixed order, so results do not depend on thread count.
use rayon::prelude::*;

use crate::error::{corrupt, invalid};
use crate::pb::{n_groups, PbRef};
use crate::rle::{self, value_at, walk_row};
use crate::simd::{self, Level};
use crate::{parallel, Result};

/// Zero padding after each padded copy of x: covers reading a whole last sign
/// byte and SIMD tails.
const PAD: usize = 64;

/// Most batch rows one residual call accumulates (the size of `row`'s buffer).
const RESID_ROWS: usize = 64;

/// Per-call data shared by all rows.
struct Shared<'a> {
    t: &'a PbRef<'a>,
    batch: usize,
    /// batch x (n + PAD) copies of x, zero padded.
    xs: Vec<f32>,
    stride: usize,
    /// batch x n_groups sums of x per group.
    gsum: Vec<f32>,
    /// For batch > 1: x transposed, (n + PAD) x bpad (bpad = batch rounded up
    /// to 8), so one salient weight meets all batch rows in contiguous lanes.
    xt: Vec<f32>,
    bpad: usize,
}

/// y = Ŵ x for `batch` row vectors in `x` (`batch x n`), into `out` (`batch x m`).
///
/// Errors: [`Error::Invalid`](crate::Error::Invalid) if `x` or `out` has the wrong
/// size; a format error if the parts disagree with the shape or a row's residual
/// codes do not decode within the row.
pub fn matvec(t: &PbRef, x: &[f32], batch: usize, out: &mut [f32]) -> Result<()> {
    matvec_at(simd::level(), t, x, batch, out)
}

fn matvec_at(level: Level, t: &PbRef, x: &[f32], batch: usize, out: &mut [f32]) -> Result<()> {
    t.check_sizes()?;
    let (m, n) = (t.m, t.n);
    if x.len() != batch.saturating_mul(n) {
        return invalid(format!("x has {} elements, expected {batch} x {n}", x.len()));
    }
    if out.len() != batch.saturating_mul(m) {
        return invalid(format!("out has {} elements, expected {batch} x {m}", out.len()));
    }
    rle::check_decodable(&t.res, t.value_offsets, m)?;
    if m == 0 || batch == 0 {
        return Ok(());
    }
    let stride = n + PAD;
    let mut xs = vec![0f32; batch * stride];
    for b in 0..batch {
        xs[b * stride..b * stride + n].copy_from_slice(&x[b * n..(b + 1) * n]);
    }
    let (g, ng) = (t.group_size, n_groups(n, t.group_size));
    let mut gsum = vec![0f32; batch * ng];
    for b in 0..batch {
        for (gi, chunk) in x[b * n..(b + 1) * n].chunks(g.max(1)).enumerate() {
            gsum[b * ng + gi] = chunk.iter().sum();
        }
    }
    let bpad = batch.div_ceil(8) * 8;
    let mut xt = Vec::new();
    if batch > 1 {
        xt = vec![0f32; stride * bpad];
        for b in 0..batch {
            for j in 0..n {
                xt[j * bpad + b] = x[b * n + j];
            }
        }
    }
    let sh = Shared { t, batch, xs, stride, gsum, xt, bpad };
    // The SIMD residual walk keeps positions in i32 lanes (see x86::residual_cb).
    let rows = table(if n < (1 << 23) { level } else { Level::Scalar });
    // Rows per task: big enough to amortize scheduling, small enough to balance.
    let rows_per_task = 32usize;
    let mut yt = vec![0f32; m * batch]; // row-major m x batch, transposed at the end
    parallel::pool().install(|| {
        yt.par_chunks_mut(rows_per_task * batch).enumerate().try_for_each(|(blk, ys)| {
            let mut scratch = Scratch::default();
            // SAFETY: `rows` comes from `table` (n < 2^23 for a SIMD kernel); `sh` was
            // built above for a checked tensor; `ys` holds whole rows of y below m.
            unsafe { rows(&sh, blk * rows_per_task, &mut scratch, ys) }
        })
    })?;
    for i in 0..m {
        for b in 0..batch {
            out[b * m + i] = yt[i * batch + b];
        }
    }
    Ok(())
}

#[derive(Default)]
struct Scratch {
    /// Per 8-code chunk (batch > 1): lane positions and lane values (f32;
    /// 0 at position 0 for lanes that hold no value).
    pos: Vec<i32>,
    val: Vec<f32>,
    /// batch x n_groups signed sums.
    ssum: Vec<f32>,
}

/// The row kernel of one SIMD level: rows `first..first + ys.len() / batch` of
/// y (row-major `rows x batch`) into `ys`.
///
/// # Safety
///
/// Call only a kernel returned by [`table`]: it belongs to a level the CPU runs
/// (`simd::runnable`). `sh` must be as `matvec_at` builds it, for a tensor that
/// passed `check_sizes` and `rle::check_decodable`, with `n < 2^23` for a SIMD
/// kernel; `ys.len()` a multiple of `batch` and `first + ys.len() / batch <= m`.
type RowsFn = unsafe fn(&Shared, usize, &mut Scratch, &mut [f32]) -> Result<()>;

/// The row kernel of `level`, lowered to a level this CPU runs. The AVX-512
/// level has no kernel of its own here: it runs the AVX2 one.
fn table(level: Level) -> RowsFn {
    match simd::runnable(level) {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 => x86::rows,
        _ => rows_scalar,
    }
}

/// One row of y for every batch row: the group sums by `signed_sums` (into
/// `sc.ssum`, batch x n_groups), the residual by `resid(sh, i, sc, b0, rs)` for
/// batch rows `b0..b0 + rs.len()` in chunks of up to [`RESID_ROWS`], `b0 = 0`
/// first. Generic so that each level's kernels inline into its row loop.
#[inline(always)]
fn row(
    sh: &Shared,
    i: usize,
    sc: &mut Scratch,
    y: &mut [f32],
    signed_sums: impl FnOnce(&Shared, usize, &mut [f32]),
    mut resid: impl FnMut(&Shared, usize, &mut Scratch, usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let t = sh.t;
    let ng = n_groups(t.n, t.group_size);
    sc.ssum.clear();
    sc.ssum.resize(sh.batch * ng, 0.0);
    signed_sums(sh, i, &mut sc.ssum);
    let (mu, alpha, sigma) = (&t.mu[i * ng..(i + 1) * ng], &t.alpha[i * ng..(i + 1) * ng], t.sigma[i]);
    let mut rsum = [0f32; RESID_ROWS];
    let mut b0 = 0;
    while b0 < sh.batch {
        let nb = (sh.batch - b0).min(RESID_ROWS);
        let rs = &mut rsum[..nb];
        rs.fill(0.0);
        resid(sh, i, sc, b0, rs)?;
        for (u, r) in rs.iter().enumerate() {
            let b = b0 + u;
            let mut acc = 0f32;
            for gi in 0..ng {
                acc += mu[gi] * sh.gsum[b * ng + gi] + alpha[gi] * sc.ssum[b * ng + gi];
            }
            y[b] = acc + sigma * r;
        }
        b0 += nb;
    }
    Ok(())
}

// ------------------------------------------------------------------ scalar

/// The portable row kernel (see [`RowsFn`]); safe.
fn rows_scalar(sh: &Shared, first: usize, sc: &mut Scratch, ys: &mut [f32]) -> Result<()> {
    for (r, y) in ys.chunks_mut(sh.batch).enumerate() {
        row(sh, first + r, sc, y, scalar_signed_sums, |sh, i, _sc, b0, rs| scalar_residual(sh, i, b0, rs))?;
    }
    Ok(())
}

/// Σ_g s_j x_j per group and batch row into `ssum` (`batch x n_groups`).
fn scalar_signed_sums(sh: &Shared, i: usize, ssum: &mut [f32]) {
    let t = sh.t;
    let (n, g, ng) = (t.n, t.group_size, n_groups(t.n, t.group_size));
    let signs = &t.signs[i * n.div_ceil(8)..(i + 1) * n.div_ceil(8)];
    for b in 0..sh.batch {
        let x = &sh.xs[b * sh.stride..b * sh.stride + n];
        for gi in 0..ng {
            let (j0, j1) = (gi * g, ((gi + 1) * g).min(n));
            let mut acc = 0f32;
            for (j, &xj) in (j0..j1).zip(&x[j0..j1]) {
                // Negation is a flip of the sign bit: branch-free, same bits as -x.
                let neg = ((signs[j / 8] >> (j % 8)) & 1) as u32;
                acc += f32::from_bits(xj.to_bits() ^ (neg << 31));
            }
            ssum[b * ng + gi] = acc;
        }
    }
}

/// Walk row i's codes (validating as it goes, with the decoder's own walker)
/// and accumulate Σ q x for batch rows b0.. into rs.
fn scalar_residual(sh: &Shared, i: usize, b0: usize, rs: &mut [f32]) -> Result<()> {
    let r = &sh.t.res;
    let (v0, v1) = (sh.t.value_offsets[i] as usize, sh.t.value_offsets[i + 1] as usize);
    let (c0, c1) = (r.code_offsets[i] as u64, r.code_offsets[i + 1] as u64);
    let mut overflow = false;
    let walk = walk_row(r.counts, r.count_bits, c0, c1, sh.t.n, i, |pos, k| {
        if v0 + k >= v1 {
            overflow = true;
            return;
        }
        let q = value_at(r.values, r.value_bits, v0 + k) as f32;
        for (u, acc) in rs.iter_mut().enumerate() {
            *acc += q * sh.xs[(b0 + u) * sh.stride + pos];
        }
    })?;
    if overflow || walk.values != v1 - v0 {
        return corrupt(format!("row {i}: residual codes hold {} values, offsets say {}", walk.values, v1 - v0));
    }
    Ok(())
}

// --------------------------------------------------------------------- x86

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Scratch, Shared, PAD, RESID_ROWS};
    use crate::error::corrupt;
    use crate::pb::n_groups;
    use crate::Result;

    /// The AVX2 (+ FMA, BMI2, POPCNT) row kernel.
    ///
    /// # Safety
    /// See [`super::RowsFn`].
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    pub(super) unsafe fn rows(sh: &Shared, first: usize, sc: &mut Scratch, ys: &mut [f32]) -> Result<()> {
        for (r, y) in ys.chunks_mut(sh.batch).enumerate() {
            // This function's contract makes row first + r < m and `sh` what
            // `signed_sums` and `residual` need; `super::row` calls `residual` with
            // b0 = 0, RESID_ROWS, ... in order, b0 + rs.len() <= batch, and leaves
            // `sc`'s lanes alone in between.
            let sums = |sh: &Shared, i, ssum: &mut [f32]| {
                // SAFETY: see above.
                unsafe { signed_sums(sh, i, ssum) }
            };
            let resid = |sh: &Shared, i, sc: &mut Scratch, b0, rs: &mut [f32]| {
                // SAFETY: see above.
                unsafe { residual(sh, i, sc, b0, rs) }
            };
            super::row(sh, first + r, sc, y, sums, resid)?;
        }
        Ok(())
    }

    /// For each 8-lane mask: lane l holds the index of its value among the set
    /// lanes below it (an "expand" permutation for _mm256_permutevar8x32).
    static EXPAND: [[i32; 8]; 256] = {
        let mut t = [[0i32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let mut c = 0;
            let mut l = 0;
            while l < 8 {
                t[m][l] = c;
                if (m >> l) & 1 == 1 {
                    c += 1;
                }
                l += 1;
            }
            m += 1;
        }
        t
    };

    #[inline]
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Σ_g s_j x_j for every group and batch row. Byte-aligned groups (group
    /// size a multiple of 8, or one group) use the SIMD path; others fall back.
    /// Batch rows go in passes of up to 4, so each sign mask is built once per
    /// pass and feeds every row of it.
    ///
    /// # Safety
    /// AVX2 present; `sh` as in [`rows`], row `i < m`, `ssum.len() == batch * n_groups`.
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn signed_sums(sh: &Shared, i: usize, ssum: &mut [f32]) {
        let t = sh.t;
        let (n, g) = (t.n, t.group_size);
        let ng = n_groups(n, g);
        if ng > 1 && !g.is_multiple_of(8) {
            return super::scalar_signed_sums(sh, i, ssum);
        }
        let mut b0 = 0;
        while b0 < sh.batch {
            // SAFETY: this function's contract, and b0 + NB <= batch for the NB chosen.
            unsafe {
                match sh.batch - b0 {
                    1 => signed_sums_nb::<1>(sh, i, b0, ssum),
                    2 => signed_sums_nb::<2>(sh, i, b0, ssum),
                    3 => signed_sums_nb::<3>(sh, i, b0, ssum),
                    _ => signed_sums_nb::<4>(sh, i, b0, ssum),
                }
            }
            b0 += 4;
        }
    }

    /// `signed_sums` for batch rows `b0..b0 + NB`.
    ///
    /// # Safety
    /// As `signed_sums`, groups byte aligned (or one group), `b0 + NB <= batch`.
    #[inline]
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn signed_sums_nb<const NB: usize>(sh: &Shared, i: usize, b0: usize, ssum: &mut [f32]) {
        let t = sh.t;
        let (n, g) = (t.n, t.group_size);
        let ng = n_groups(n, g);
        let nbytes = n.div_ceil(8);
        let signs = &t.signs[i * nbytes..(i + 1) * nbytes];
        let one = _mm256_set1_ps(1.0);
        let mone = _mm256_set1_ps(-1.0);
        // Shift amounts that move bit (8q + l) of a 32-bit word to bit 31 of lane l.
        let sh32 = [
            _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
            _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
            _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
            _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0),
        ];
        // Row u of x: sh.xs [(b0 + u) stride, (b0 + u + 1) stride), stride = n + PAD.
        let xp: [&[f32]; NB] = std::array::from_fn(|u| &sh.xs[(b0 + u) * sh.stride..(b0 + u + 1) * sh.stride]);
        for gi in 0..ng {
            // Bytes of this group; the last group's partial byte has zero
            // padding bits and x is zero padded, so whole bytes are safe.
            // Every access below is to sign bytes [k, k + 4) with k + 4 <= k1 or byte
            // k < k1, k1 <= nbytes = signs.len(), and to x floats [8k, 8k + 32) or
            // [8k, 8k + 8) with 8 k1 <= n + 7 < stride: inside `signs` and `xp[u]`.
            let k0 = gi * g / 8;
            let k1 = (((gi + 1) * g).min(n)).div_ceil(8);
            // Independent FMA chains: four for one batch row, two per row
            // otherwise (the rows themselves interleave).
            let nacc = if NB == 1 { 4 } else { 2 };
            let mut acc = [[_mm256_setzero_ps(); 4]; NB];
            let mut k = k0;
            while k + 4 <= k1 {
                // SAFETY: sign bytes [k, k + 4), see above.
                let w = unsafe { signs.as_ptr().add(k).cast::<u32>().read_unaligned() };
                let v = _mm256_set1_epi32(w as i32);
                for q in 0..4 {
                    let m = _mm256_castsi256_ps(_mm256_sllv_epi32(v, sh32[q]));
                    let s = _mm256_blendv_ps(one, mone, m);
                    for u in 0..NB {
                        // SAFETY: x floats [8k + 8q, 8k + 8q + 8) of row u, see above.
                        let xv = unsafe { _mm256_loadu_ps(xp[u].as_ptr().add(8 * k + 8 * q)) };
                        acc[u][q % nacc] = _mm256_fmadd_ps(s, xv, acc[u][q % nacc]);
                    }
                }
                k += 4;
            }
            while k < k1 {
                // SAFETY: sign byte k < k1, see above.
                let v = _mm256_set1_epi32(unsafe { *signs.get_unchecked(k) } as i32);
                let m = _mm256_castsi256_ps(_mm256_sllv_epi32(v, sh32[0]));
                let s = _mm256_blendv_ps(one, mone, m);
                for u in 0..NB {
                    // SAFETY: x floats [8k, 8k + 8) of row u, see above.
                    let xv = unsafe { _mm256_loadu_ps(xp[u].as_ptr().add(8 * k)) };
                    acc[u][0] = _mm256_fmadd_ps(s, xv, acc[u][0]);
                }
                k += 1;
            }
            for u in 0..NB {
                let a = _mm256_add_ps(_mm256_add_ps(acc[u][0], acc[u][1]), _mm256_add_ps(acc[u][2], acc[u][3]));
                ssum[(b0 + u) * ng + gi] = hsum(a);
            }
        }
    }

    /// 8 codes of `CB` bits starting at stream bit `bit`, one per lane.
    ///
    /// # Safety
    /// Unless `CHECKED`, bytes `[bit / 8, bit / 8 + 8)` of `counts` exist.
    #[inline]
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn load_codes<const CB: u32, const CHECKED: bool>(counts: &[u8], bit: u64) -> __m256i {
        let byte = (bit >> 3) as usize;
        let w = if !CHECKED || byte + 8 <= counts.len() {
            // SAFETY: bytes [byte, byte + 8): checked here, or this function's contract.
            unsafe { counts.as_ptr().add(byte).cast::<u64>().read_unaligned() }
        } else {
            let mut t = [0u8; 8];
            let start = byte.min(counts.len()); // past the end: zeros, no panic
            let avail = counts.len() - start;
            t[..avail].copy_from_slice(&counts[start..]);
            u64::from_le_bytes(t)
        } >> (bit & 7);
        let mask = _mm256_set1_epi32(((1u32 << CB) - 1) as i32);
        let c = CB as i32;
        if CB <= 4 {
            // 8 codes fit in the low 32 bits (8*CB <= 32).
            let v = _mm256_set1_epi32(w as u32 as i32);
            let s = _mm256_setr_epi32(0, c, 2 * c, 3 * c, 4 * c, 5 * c, 6 * c, 7 * c);
            _mm256_and_si256(_mm256_srlv_epi32(v, s), mask)
        } else {
            let v = _mm256_set1_epi64x(w as i64);
            let lo = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, c as i64, 2 * c as i64, 3 * c as i64));
            let hi = _mm256_srlv_epi64(v, _mm256_setr_epi64x(4 * c as i64, 5 * c as i64, 6 * c as i64, 7 * c as i64));
            // Low dwords of each qword, in order: lo0 lo1 lo2 lo3 hi0 hi1 hi2 hi3.
            let idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
            let lo = _mm256_permutevar8x32_epi32(lo, idx);
            let hi = _mm256_permutevar8x32_epi32(hi, idx);
            _mm256_and_si256(_mm256_blend_epi32::<0xF0>(lo, hi), mask)
        }
    }

    /// Inclusive prefix sum of 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    fn prefix8(s: __m256i) -> __m256i {
        let t = _mm256_add_epi32(s, _mm256_slli_si256::<4>(s));
        let t = _mm256_add_epi32(t, _mm256_slli_si256::<8>(t));
        let carry = _mm256_shuffle_epi32::<0xFF>(_mm256_permute2x128_si256::<0x08>(t, t));
        _mm256_add_epi32(t, carry)
    }

    /// 8 values starting at value index `vi` as f32 lanes (lanes past the
    /// stream end read as 0).
    ///
    /// # Safety
    /// Unless `CHECKED`, the 8 bytes from the first value's byte exist in `values`.
    #[inline]
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn load_values<const CHECKED: bool>(values: &[u8], value_bits: u32, vi: usize) -> __m256 {
        if value_bits == 8 {
            let q = if !CHECKED || vi + 8 <= values.len() {
                // SAFETY: values [vi, vi + 8): checked here, or this function's contract.
                unsafe { _mm_loadl_epi64(values.as_ptr().add(vi).cast()) }
            } else {
                let mut t = [0u8; 8];
                let start = vi.min(values.len()); // past the end: zeros, no panic
                let avail = (values.len() - start).min(8);
                t[..avail].copy_from_slice(&values[start..start + avail]);
                _mm_cvtsi64_si128(i64::from_le_bytes(t))
            };
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
        } else {
            let byte = vi / 2;
            let w = if !CHECKED || byte + 8 <= values.len() {
                // SAFETY: values [byte, byte + 8): checked here, or this function's contract.
                unsafe { values.as_ptr().add(byte).cast::<u64>().read_unaligned() }
            } else {
                let mut t = [0u8; 8];
                let start = byte.min(values.len());
                let avail = (values.len() - start).min(8);
                t[..avail].copy_from_slice(&values[start..start + avail]);
                u64::from_le_bytes(t)
            } >> (4 * (vi & 1));
            let v = _mm256_set1_epi32(w as u32 as i32);
            let v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
            // Sign-extend each nibble: move it to the top, arithmetic shift back.
            _mm256_cvtepi32_ps(_mm256_srai_epi32::<28>(_mm256_slli_epi32::<28>(v)))
        }
    }

    /// Decode row i's residual into per-chunk (positions, values, masks), then
    /// accumulate Σ q·x for batch rows b0.. with masked gathers.
    ///
    /// # Safety
    /// AVX2 present; `sh` as in [`rows`] with n < 2^23, row `i < m`; `b0` a multiple
    /// of RESID_ROWS with `b0 + rs.len() <= batch`, `rs.len() <= RESID_ROWS`; for each
    /// row the call with `b0 = 0` comes first and `sc` is untouched until the row's
    /// last call (later calls reuse the lanes it decoded into `sc`).
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn residual(sh: &Shared, i: usize, sc: &mut Scratch, b0: usize, rs: &mut [f32]) -> Result<()> {
        // SAFETY: this function's contract.
        unsafe {
            match sh.t.res.count_bits {
                1 => residual_cb::<1>(sh, i, sc, b0, rs),
                2 => residual_cb::<2>(sh, i, sc, b0, rs),
                3 => residual_cb::<3>(sh, i, sc, b0, rs),
                4 => residual_cb::<4>(sh, i, sc, b0, rs),
                5 => residual_cb::<5>(sh, i, sc, b0, rs),
                6 => residual_cb::<6>(sh, i, sc, b0, rs),
                7 => residual_cb::<7>(sh, i, sc, b0, rs),
                _ => residual_cb::<8>(sh, i, sc, b0, rs),
            }
        }
    }

    /// One chunk of 8 codes: value-lane mask, positions (clamped into the
    /// padded x, so a malformed stream can never read outside it), and the
    /// values expanded to their lanes.
    ///
    /// # Safety
    /// Unless `CHECKED`, the 8 bytes at the chunk's first code and at its first
    /// value exist in their streams (`load_codes`, `load_values`).
    #[inline]
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn chunk<const CB: u32, const CHECKED: bool>(
        r: &crate::rle::Streams,
        c: u64,
        valid: __m256i,
        base: &mut __m256i,
        vi: &mut usize,
        lim: __m256i,
    ) -> (__m256i, __m256i, __m256) {
        let esc = _mm256_set1_epi32(((1u32 << CB) - 1) as i32);
        // SAFETY: this function's contract.
        let codes = unsafe { load_codes::<CB, CHECKED>(r.counts, c * CB as u64) };
        let isval = _mm256_andnot_si256(_mm256_cmpeq_epi32(codes, esc), valid);
        // step = code + 1 for values, ESC for escapes, 0 past the row's codes
        let step = _mm256_and_si256(_mm256_sub_epi32(codes, isval), valid);
        let incl = _mm256_add_epi32(prefix8(step), *base);
        *base = _mm256_permutevar8x32_epi32(incl, _mm256_set1_epi32(7));
        // base starts at -1, so the running sum is the value's position itself.
        let pos = _mm256_min_epu32(incl, lim);
        let m = _mm256_movemask_ps(_mm256_castsi256_ps(isval)) as usize;
        // SAFETY: this function's contract.
        let vals = unsafe { load_values::<CHECKED>(r.values, r.value_bits, *vi) };
        let perm = EXPAND[m];
        // SAFETY: reads the 8 lanes of EXPAND[m] (m < 256: an 8-bit mask).
        let perm = unsafe { _mm256_loadu_si256(perm.as_ptr().cast()) };
        *vi += m.count_ones() as usize;
        (isval, pos, _mm256_permutevar8x32_ps(vals, perm))
    }

    /// Walk codes [c0, c1). FUSED (batch 1): gather x and accumulate as we go,
    /// returning (Σ q·x, 0). Otherwise: store each chunk's 8 lanes into the spare
    /// capacity of `sc.pos` and `sc.val`, returning (0, lanes stored).
    ///
    /// # Safety
    /// `c0 <= c1 <= num_codes` of `r` (whose `counts` hold its codes), with
    /// `[*vi, *vi + c1 - c0)` the only value indices the walk can reach. If FUSED:
    /// `x` valid for reads of `PAD + n` floats with `lim = n + PAD - 1` (every
    /// position is clamped to `lim`); else `sc.pos` and `sc.val` have spare
    /// capacity for `(c1 - c0).div_ceil(8) * 8` lanes beyond their length.
    #[allow(clippy::too_many_arguments)] // the walk's state, passed to one caller
    #[inline]
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn decode_row<const CB: u32, const FUSED: bool>(
        r: &crate::rle::Streams,
        c0: u64,
        c1: u64,
        base: &mut __m256i,
        vi: &mut usize,
        lim: __m256i,
        x: *const f32,
        sc: &mut Scratch,
    ) -> (f32, usize) {
        let (pos0, val0) = (sc.pos.len(), sc.val.len());
        let (pp, vp) = (sc.pos.as_mut_ptr(), sc.val.as_mut_ptr());
        let ones = _mm256_set1_epi32(-1);
        // Two accumulators: consecutive chunks' FMAs do not wait on each other.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut k = 0usize;
        let mut c = c0;
        // One chunk per 8 codes of [c0, c1): k + 8 <= (c1 - c0).div_ceil(8) * 8, the
        // spare capacity; positions are clamped to lim.
        macro_rules! emit {
            ($m:expr, $p:expr, $v:expr, $acc:ident) => {
                if FUSED {
                    let mask = _mm256_castsi256_ps($m);
                    // SAFETY: lanes of $m gather x[pos] with pos <= lim = n + PAD - 1,
                    // inside x (contract); masked-off lanes are not read.
                    let xv = unsafe { _mm256_mask_i32gather_ps::<4>(_mm256_setzero_ps(), x, $p, mask) };
                    $acc = _mm256_fmadd_ps($v, xv, $acc);
                } else {
                    // Non-value lanes: value 0 at position 0, harmless to accumulate.
                    // SAFETY: 8 lanes at spare-capacity offset k, see above.
                    unsafe {
                        _mm256_storeu_si256(pp.add(pos0 + k).cast(), _mm256_and_si256($p, $m));
                        _mm256_storeu_ps(vp.add(val0 + k), _mm256_and_ps($v, _mm256_castsi256_ps($m)));
                    }
                    k += 8;
                }
            };
        }
        // Rows whose codes and values end at least 8 bytes before their
        // streams' ends (almost all) need no per-chunk bounds checks. Even a
        // malformed row holds at most one value per code, so the value index
        // stays below *vi + (c1 - c0) (the count is checked after the walk).
        let vmax = *vi + (c1 - c0) as usize;
        let vbytes = if r.value_bits == 8 { vmax } else { vmax / 2 + 1 };
        let fast = (c1 * CB as u64).div_ceil(8) as usize + 8 <= r.counts.len() && vbytes + 8 <= r.values.len();
        macro_rules! full_chunks {
            ($checked:expr) => {
                while c + 16 <= c1 {
                    // SAFETY: unchecked only when `fast`: every chunk's 8 code bytes and
                    // 8 value bytes lie before the streams' ends (see above).
                    let (m, p, v) = unsafe { chunk::<CB, $checked>(r, c, ones, base, vi, lim) };
                    emit!(m, p, v, acc0);
                    // SAFETY: as above.
                    let (m, p, v) = unsafe { chunk::<CB, $checked>(r, c + 8, ones, base, vi, lim) };
                    emit!(m, p, v, acc1);
                    c += 16;
                }
            };
        }
        if fast {
            full_chunks!(false);
        } else {
            full_chunks!(true);
        }
        if c + 8 <= c1 {
            // SAFETY: a checked chunk.
            let (m, p, v) = unsafe { chunk::<CB, true>(r, c, ones, base, vi, lim) };
            emit!(m, p, v, acc0);
            c += 8;
        }
        if c < c1 {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let valid = _mm256_cmpgt_epi32(_mm256_set1_epi32((c1 - c) as i32), lane);
            // SAFETY: a checked chunk.
            let (m, p, v) = unsafe { chunk::<CB, true>(r, c, valid, base, vi, lim) };
            emit!(m, p, v, acc1);
        }
        (hsum(_mm256_add_ps(acc0, acc1)), k)
    }

    /// `rs[b] = Σ_k val[k] · xt[pos[k]][b]` over the stored lanes, NBLK blocks of
    /// 8 batch rows held in registers.
    ///
    /// # Safety
    /// `xt` points at column `b0` of the transposed x (`(n + PAD) x bpad` floats),
    /// `sc.pos` holds positions `<= n + PAD - 1`, and `b0 + 8 NBLK <= bpad`.
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn accumulate_t<const NBLK: usize>(sc: &Scratch, xt: *const f32, bpad: usize, rs: &mut [f32]) {
        let mut acc = [_mm256_setzero_ps(); NBLK];
        for (&p, &v) in sc.pos.iter().zip(&sc.val) {
            // SAFETY: row p of xt, p <= n + PAD - 1 (contract).
            let row = unsafe { xt.add(p as usize * bpad) };
            let vb = _mm256_set1_ps(v);
            for (blk, a) in acc.iter_mut().enumerate() {
                // SAFETY: floats [8 blk, 8 blk + 8) of the row from column b0, with
                // b0 + 8 NBLK <= bpad (contract).
                let xv = unsafe { _mm256_loadu_ps(row.add(8 * blk)) };
                *a = _mm256_fmadd_ps(vb, xv, *a);
            }
        }
        let mut tmp = [0f32; RESID_ROWS];
        for (blk, a) in acc.iter().enumerate() {
            // SAFETY: floats [8 blk, 8 blk + 8) of tmp, blk < NBLK <= RESID_ROWS / 8.
            unsafe { _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * blk), *a) };
        }
        rs.copy_from_slice(&tmp[..rs.len()]);
    }

    /// `residual` for codes of `CB` bits.
    ///
    /// # Safety
    /// As `residual`, with `count_bits == CB`.
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    unsafe fn residual_cb<const CB: u32>(
        sh: &Shared,
        i: usize,
        sc: &mut Scratch,
        b0: usize,
        rs: &mut [f32],
    ) -> Result<()> {
        let t = sh.t;
        let r = &t.res;
        let n = t.n;
        let lim = _mm256_set1_epi32((n + PAD - 1) as i32);
        let fused = sh.batch == 1;
        // Decode once per row (the first batch chunk), reuse for the others.
        if b0 == 0 {
            let (c0, c1) = (r.code_offsets[i] as u64, r.code_offsets[i + 1] as u64);
            let (v0, v1) = (t.value_offsets[i] as usize, t.value_offsets[i + 1] as usize);
            // A valid row has at most n codes (each consumes >= 1 position);
            // with n < 2^23 the i32 position lanes can then never wrap.
            if c1 - c0 > n as u64 {
                return corrupt(format!("row {i}: {} residual codes for {n} columns", c1 - c0));
            }
            let lanes = (c1 - c0).div_ceil(8) as usize * 8;
            if !fused {
                sc.pos.clear();
                sc.pos.reserve(lanes);
                sc.val.clear();
                sc.val.reserve(lanes);
            }
            let mut base = _mm256_set1_epi32(-1);
            let mut vi = v0;
            let x0 = sh.xs.as_ptr(); // batch row 0: n + PAD floats
                                     // SAFETY: c0 <= c1 <= num_codes (check_decodable: monotone offsets inside
                                     // the code stream); batch 1: x0 is row 0 of xs, n + PAD floats, and lim
                                     // = n + PAD - 1; otherwise `lanes` of spare capacity were just reserved.
            let (acc, stored) = unsafe {
                if fused {
                    decode_row::<CB, true>(r, c0, c1, &mut base, &mut vi, lim, x0, sc)
                } else {
                    decode_row::<CB, false>(r, c0, c1, &mut base, &mut vi, lim, x0, sc)
                }
            };
            let end = (_mm256_cvtsi256_si32(base) + 1) as u32 as usize;
            if end > n || vi != v1 {
                return corrupt(format!(
                    "row {i}: residual codes end at {end} (row length {n}) with {} values (offsets say {})",
                    vi - v0,
                    v1 - v0
                ));
            }
            if fused {
                rs[0] = acc;
                return Ok(());
            }
            debug_assert_eq!(stored, lanes);
            // SAFETY: decode_row initialized exactly `stored` lanes of each vector,
            // after its (zero) length, within the `lanes` >= stored it reserved.
            unsafe {
                sc.pos.set_len(stored);
                sc.val.set_len(stored);
            }
        }
        // Every stored lane (value lanes hold their value, the others 0 at
        // position 0) meets all batch rows b0.. at once in xt.
        // b0 + 8 ceil(rs.len() / 8) <= bpad: b0 is a multiple of 8 and b0 + rs.len() <= batch.
        let xt = &sh.xt[b0..];
        // SAFETY: xt is the transposed x from column b0; stored positions are clamped
        // to n + PAD - 1 (or 0 for empty lanes); see above for the batch bound.
        unsafe {
            match rs.len().div_ceil(8) {
                1 => accumulate_t::<1>(sc, xt.as_ptr(), sh.bpad, rs),
                2 => accumulate_t::<2>(sc, xt.as_ptr(), sh.bpad, rs),
                3 => accumulate_t::<3>(sc, xt.as_ptr(), sh.bpad, rs),
                4 => accumulate_t::<4>(sc, xt.as_ptr(), sh.bpad, rs),
                5 => accumulate_t::<5>(sc, xt.as_ptr(), sh.bpad, rs),
                6 => accumulate_t::<6>(sc, xt.as_ptr(), sh.bpad, rs),
                7 => accumulate_t::<7>(sc, xt.as_ptr(), sh.bpad, rs),
                _ => accumulate_t::<8>(sc, xt.as_ptr(), sh.bpad, rs),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{compress, Params, ScaleType};
    use crate::testutil::rand_vec;

    fn check(m: usize, n: usize, p: &Params, batch: usize, seed: &mut u64) {
        let w = rand_vec(m * n, seed);
        let t = compress(&w, m, n, None, p).unwrap();
        let mut wh = vec![0f32; m * n];
        t.view().decompress(&mut wh).unwrap();
        let x = rand_vec(batch * n, seed);
        for lvl in simd::available() {
            let mut y = vec![0f32; batch * m];
            matvec_at(lvl, &t.view(), &x, batch, &mut y).unwrap();
            for b in 0..batch {
                for i in 0..m {
                    let (mut e, mut mag) = (0f64, 0f64);
                    for j in 0..n {
                        e += wh[i * n + j] as f64 * x[b * n + j] as f64;
                        mag += (wh[i * n + j] as f64 * x[b * n + j] as f64).abs();
                    }
                    let got = y[b * m + i] as f64;
                    assert!((got - e).abs() <= 1e-5 * mag + 1e-6, "{lvl:?} {m}x{n} {p:?} b={b} i={i}: {got} vs {e}");
                }
            }
        }
    }

    #[test]
    fn matches_decompressed_product() {
        let mut seed = 5;
        for cb in 1..=8u32 {
            for vb in [4u32, 8] {
                for (gs, n) in [(None, 67usize), (Some(32), 256), (Some(8), 100), (Some(7), 50), (None, 1000)] {
                    let p = Params {
                        salient: 0.15,
                        salient_bits: vb,
                        count_bits: Some(cb),
                        group_size: gs,
                        select_tensor: cb % 2 == 0,
                        shift: true,
                        scale: ScaleType::F16,
                    };
                    for batch in [1usize, 3] {
                        check(5, n, &p, batch, &mut seed);
                    }
                }
            }
        }
    }

    #[test]
    fn big_batch_and_many_rows() {
        let mut seed = 9;
        let p = Params { scale: ScaleType::F32, ..Params::default() };
        check(70, 300, &p, 70, &mut seed);
    }

    #[test]
    fn corrupted_stream_is_an_error_not_a_crash() {
        let mut seed = 1;
        let w = rand_vec(4 * 64, &mut seed);
        let p = Params { salient: 0.2, count_bits: Some(4), ..Params::default() };
        let t = compress(&w, 4, 64, None, &p).unwrap();
        let x = vec![1f32; 64];
        for lvl in simd::available() {
            for byte in 0..t.residual.counts.len() {
                let mut bad = t.clone();
                bad.residual.counts[byte] = 0xEE; // codes 14: runs past the row
                let mut y = vec![0f32; 4];
                let _ = matvec_at(lvl, &bad.view(), &x, 1, &mut y); // Ok or Err, never UB
            }
            let mut bad = t.clone();
            bad.residual.value_offsets[4] += 1;
            let mut y = vec![0f32; 4];
            assert!(matvec_at(lvl, &bad.view(), &x, 1, &mut y).is_err());
        }
    }
}
