//! Matrix-vector product with float32 activations on the execution layout
//! (`activations="float32"`, docs/format.md §6.3; the layout is `layout.rs`).
//!
//! Per output row i and group g,
//!
//!   Σ_j Ŵ_ij x_j = mu·X_g + alpha·(X_g − 2·P_ig) + sigma·Σ_j q_ij x_j,
//!
//! with X_g = Σ_{j∈g} x_j and P_ig = Σ_{j∈g, bit=1} x_j.
//! The sign part uses one 16-entry table per 4-column quad (the sums of x over
//! every subset of the quad's columns, built once per call, as T-MAC does with
//! its lookup tables): the 16 rows of a tile look up their 4 sign bits with one
//! permute per quad. The residual comes from the layout's sparse records, block
//! by block: each code's activation is looked up by column (`vpermt2ps` on
//! AVX-512, `pshufb` on the activations' four byte planes on AVX2) and multiplied in float.
//!
//! Summation order is fixed per level and independent of the thread count;
//! different levels agree to float rounding (~1e-6 relative).
use crate::error::invalid;
use crate::layout::{Layout, BLOCK, TILE};
use crate::simd::{self, Level};
use crate::Result;

/// Per-call data derived from x.
pub(crate) struct Prep {
    batch: usize,
    quads: usize,
    /// `batch x quads x 16` subset sums per quad (entry `s` = Σ_{c ∈ s} x_{4k+c}).
    tables: Vec<f32>,
    /// `batch x (quads * 4)`, zero padded.
    xp: Vec<f32>,
    /// `batch x n_groups` group sums of x.
    xg: Vec<f32>,
    /// Quads per group (all quads for one group).
    qpg: usize,
    /// AVX2 level only (else empty): `batch x blocks x 4 x 64` bytes, byte k of
    /// each float of `xp`, block by block (the AVX2 residual's lookup tables).
    planes: Vec<u8>,
}

/// Whether the float kernels on the layout can run this tensor: group
/// boundaries must fall on quads (group size a multiple of 4, or one group).
pub fn supported(l: &Layout) -> bool {
    l.n_groups <= 1 || l.group_size.is_multiple_of(4)
}

fn prepare(l: &Layout, x: &[f32], batch: usize, planes: bool) -> Prep {
    let n = l.n;
    let quads = l.quads();
    let qpg = if l.n_groups <= 1 { quads.max(1) } else { l.group_size / 4 };
    let mut xp = vec![0f32; batch * quads * 4];
    let mut tables = vec![0f32; batch * quads * 16];
    let mut xg = vec![0f32; batch * l.n_groups];
    for b in 0..batch {
        let xr = &x[b * n..(b + 1) * n];
        xp[b * quads * 4..b * quads * 4 + n].copy_from_slice(xr);
        for (g, s) in xg[b * l.n_groups..(b + 1) * l.n_groups].iter_mut().enumerate() {
            *s = xr[(g * l.group_size).min(n)..((g + 1) * l.group_size).min(n)].iter().sum();
        }
        let xq = &xp[b * quads * 4..(b + 1) * quads * 4];
        for (k, t) in tables[b * quads * 16..(b + 1) * quads * 16].chunks_exact_mut(16).enumerate() {
            for s in 1..16usize {
                t[s] = t[s & (s - 1)] + xq[4 * k + s.trailing_zeros() as usize];
            }
        }
    }
    let planes = if planes {
        let mut pl = vec![0u8; xp.len() * 4];
        for (dst, blk) in pl.chunks_exact_mut(4 * BLOCK).zip(xp.chunks_exact(BLOCK)) {
            for (c, v) in blk.iter().enumerate() {
                for (k, byte) in v.to_le_bytes().into_iter().enumerate() {
                    dst[k * BLOCK + c] = byte;
                }
            }
        }
        pl
    } else {
        Vec::new()
    };
    Prep { batch, quads, tables, xp, xg, qpg, planes }
}

/// The float tile kernel of one SIMD level: all batch rows of tile `t` into `yt`
/// (`batch x 16`, row-major).
///
/// # Safety
///
/// Call only a kernel returned by [`table`]: it belongs to a level the CPU runs
/// (`simd::runnable`). `l` must be built by `layout::build` (sizes and offsets
/// consistent, records padded by `layout::SPARSE_PAD`) with `supported(l)`, `p`
/// made by `prepare` for `l`, `t < l.tiles` and `yt.len() == p.batch * TILE`.
type TileFn = unsafe fn(&Layout, usize, &Prep, &mut [f32]);

/// The float tile kernel of `level`, lowered to a level this CPU runs.
fn table(level: Level) -> TileFn {
    match simd::runnable(level) {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => x86::tile_avx512,
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::tile_avx2,
        _ => tile_scalar,
    }
}

/// y = Ŵ x (float32 activations) for `batch` rows of `x` (`batch x n`) into
/// `out` (`batch x m`), plus `bias` (`m`) if given.
///
/// Errors ([`Error::Invalid`](crate::Error::Invalid)): a group size that splits
/// quads (see [`supported`]), or `x`, `out` or `bias` of the wrong size.
pub fn matvec_f32(l: &Layout, x: &[f32], batch: usize, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    matvec_f32_at(simd::level(), l, x, batch, bias, out)
}

fn matvec_f32_at(
    level: Level,
    l: &Layout,
    x: &[f32],
    batch: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    if !supported(l) {
        return invalid(format!("the layout kernels need a group size that is a multiple of 4, got {}", l.group_size));
    }
    if !crate::qmatvec::has_work(l, x, batch, bias, out)? {
        return Ok(());
    }
    let p = prepare(l, x, batch, simd::runnable(level) == Level::Avx2);
    let kernel = table(level);
    crate::qmatvec::run_tiles(l, batch, bias, out, |t, y| {
        // SAFETY: `kernel` comes from `table`; `l` is a layout (supported, checked
        // above), `p` was prepared for it, and `run_tiles` passes t < tiles with `y`
        // of batch x 16 floats.
        unsafe { kernel(l, t, &p, y) }
    });
    Ok(())
}

// ------------------------------------------------------------------ scalar

/// Portable kernel: one table lookup per row and quad for the sign part, the
/// residual from the sparse form, block by block. Safe (bounds-checked);
/// coerced to [`TileFn`].
fn tile_scalar(l: &Layout, t: usize, p: &Prep, yt: &mut [f32]) {
    let quads = p.quads;
    let ng = l.n_groups;
    let sw = &l.signs[t * quads..(t + 1) * quads];
    let sp = l.sparse();
    for b in 0..p.batch {
        let tab = &p.tables[b * quads * 16..(b + 1) * quads * 16];
        let xq = &p.xp[b * quads * 4..(b + 1) * quads * 4];
        let mut y = [0f32; TILE];
        let mut r = [0f32; TILE];
        let mut at = sp.offsets[t];
        for xb in xq.chunks_exact(BLOCK) {
            let rb: [f32; TILE] = crate::qmatvec::sparse_rows(&sp.bytes, &mut at, xb);
            for (ri, v) in r.iter_mut().zip(rb) {
                *ri += v;
            }
        }
        for g in 0..ng {
            let mut pp = [0f32; TILE];
            for k in g * p.qpg..((g + 1) * p.qpg).min(quads) {
                let w = sw[k];
                for (rr, pv) in pp.iter_mut().enumerate() {
                    *pv += tab[16 * k + ((w >> (4 * rr)) & 15) as usize];
                }
            }
            let xg = p.xg[b * ng + g];
            for rr in 0..TILE {
                let (mu, al) = (l.mu[(t * ng + g) * TILE + rr], l.alpha[(t * ng + g) * TILE + rr]);
                y[rr] += mu * xg + al * (xg - 2.0 * pp[rr]);
            }
        }
        for rr in 0..TILE {
            yt[b * TILE + rr] = y[rr] + l.sigma[t * TILE + rr] * r[rr];
        }
    }
}

// --------------------------------------------------------------------- x86

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Prep;
    use crate::layout::{Layout, BLOCK, TILE};

    // Bounds used by the SAFETY comments, for tile t < tiles of a layout from
    // `layout::build` and a Prep from `prepare` (see `TileFn`):
    // - sign words [t quads, (t + 1) quads) exist, and a quad index k < quads;
    // - the tile's sparse records start at sparse().offsets[t], one per block;
    //   walking a record by its own header ends at the next one, and SPARSE_PAD (64)
    //   readable bytes follow the last, so a 32-byte load at a pair stays inside;
    // - tables row b < batch holds quads x 16 floats, xp row b quads x 4 floats;
    // - xg holds batch x n_groups sums; mu, alpha tiles x n_groups x 16, sigma tiles x 16;
    // - yt holds batch x 16 floats.

    /// AVX-512 (F/BW/VBMI) tile kernel, batch rows in passes of up to 2.
    ///
    /// # Safety
    /// The AVX-512 entry of [`super::TileFn`]: the CPU has AVX-512 F/BW/VL/VBMI/VBMI2
    /// and POPCNT, and the arguments meet the contract there.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,popcnt")]
    pub(super) unsafe fn tile_avx512(l: &Layout, t: usize, p: &Prep, yt: &mut [f32]) {
        let mut b0 = 0;
        while b0 < p.batch {
            // SAFETY: this function's contract, and b0 + NB <= batch for the NB chosen.
            unsafe {
                if p.batch - b0 == 1 {
                    tile512::<1>(l, t, p, b0, yt);
                } else {
                    tile512::<2>(l, t, p, b0, yt);
                }
            }
            b0 += 2;
        }
    }

    /// The first 16 floats of `v` (panics if fewer).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load16(v: &[f32]) -> __m512 {
        let v = &v[..16];
        // SAFETY: 16 floats of `v`.
        unsafe { _mm512_loadu_ps(v.as_ptr()) }
    }

    /// The residual sums Σ q·x (f32) of one block's 16 rows for NB batch rows,
    /// from its sparse record at `*rec` (advanced past it); `xb[u]` points at the
    /// block's 64 floats of row u. Each 16 codes of a pair look their activations
    /// up by column with two `vpermt2ps` (32 floats each) and a blend on column
    /// bit 5, and meet their codes in one FMA (lanes 2i, 2i + 1: the row at sorted
    /// position 8h + i); at the end adjacent lanes are added and the positions put
    /// back in row order.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `*rec` is a record of a sparse stream (its `SPARSE_PAD`
    /// covers the 32-byte column loads); 64 readable floats at each `xb[u]`.
    #[inline(always)]
    unsafe fn sparse_block512<const NB: usize>(rec: &mut *const u8, xb: &[*const f32; NB]) -> [__m512; NB] {
        // SAFETY: the contract; masked loads touch only the pair's codes.
        unsafe {
            let (np, pos, ns, mut d) = crate::layout::record_head(*rec);
            let zf = _mm512_setzero_ps();
            let mut xt = [[zf; 4]; NB];
            for u in 0..NB {
                for (i, v) in xt[u].iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(xb[u].add(16 * i));
                }
            }
            let (m63, b5) = (_mm512_set1_epi32(63), _mm512_set1_epi32(32));
            let mut acc = [[zf; 2]; NB];
            for j in 0..np {
                let n2 = 2 * *ns.add(j) as usize;
                let q = _mm256_maskz_loadu_epi8(((1u64 << n2) - 1) as u32, d.add(n2).cast());
                let qh = [_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q)];
                // Lanes past 2 n_j hold code 0: skip the second half when it is all such.
                for h in 0..n2.div_ceil(16) {
                    let c = _mm512_and_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128(d.add(16 * h).cast())), m63);
                    let hi = _mm512_test_epi32_mask(c, b5);
                    let qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(qh[h]));
                    for u in 0..NB {
                        let lo = _mm512_permutex2var_ps(xt[u][0], c, xt[u][1]);
                        let up = _mm512_permutex2var_ps(xt[u][2], c, xt[u][3]);
                        let xv = _mm512_mask_blend_ps(hi, lo, up);
                        acc[u][h] = _mm512_fmadd_ps(qf, xv, acc[u][h]);
                    }
                }
                d = d.add(2 * n2);
            }
            *rec = d;
            // Row r reads lane 2 (pos mod 8) of half pos / 8 (index bit 4).
            let pv = _mm512_cvtepu8_epi32(_mm_loadu_si128(pos.cast()));
            let ix = _mm512_or_si512(
                _mm512_slli_epi32::<1>(_mm512_and_si512(pv, _mm512_set1_epi32(7))),
                _mm512_slli_epi32::<1>(_mm512_and_si512(pv, _mm512_set1_epi32(8))),
            );
            let mut r = [zf; NB];
            for u in 0..NB {
                // Lane 2i + lane 2i + 1: the position's two codes.
                let s0 = _mm512_add_ps(acc[u][0], _mm512_permute_ps::<0b10_11_00_01>(acc[u][0]));
                let s1 = _mm512_add_ps(acc[u][1], _mm512_permute_ps::<0b10_11_00_01>(acc[u][1]));
                r[u] = _mm512_permutex2var_ps(s0, ix, s1);
            }
            r
        }
    }

    /// NB batch rows of the AVX-512 kernel.
    ///
    /// # Safety
    /// As `tile_avx512`, with `b0 + NB <= batch`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,popcnt")]
    unsafe fn tile512<const NB: usize>(l: &Layout, t: usize, p: &Prep, b0: usize, yt: &mut [f32]) {
        let quads = p.quads;
        let ng = l.n_groups;
        let sw = &l.signs[t * quads..(t + 1) * quads];
        let sp = l.sparse();
        // Byte 0 of each dword r gets bits 4r..4r+7 of the sign word: the low
        // 4 bits (row r's nibble) index the table (vpermps reads 4 bits).
        let ctrl = _mm512_set_epi8(
            0, 0, 0, 60, 0, 0, 0, 56, 0, 0, 0, 52, 0, 0, 0, 48, 0, 0, 0, 44, 0, 0, 0, 40, 0, 0, 0, 36, 0, 0, 0, 32, 0,
            0, 0, 28, 0, 0, 0, 24, 0, 0, 0, 20, 0, 0, 0, 16, 0, 0, 0, 12, 0, 0, 0, 8, 0, 0, 0, 4, 0, 0, 0, 0,
        );
        let tab: [*const f32; NB] = std::array::from_fn(|u| p.tables[(b0 + u) * quads * 16..].as_ptr());
        let xq: [*const f32; NB] = std::array::from_fn(|u| p.xp[(b0 + u) * quads * 4..].as_ptr());
        let mut y = [_mm512_setzero_ps(); NB];
        // The residual, block by block from the sparse form.
        let mut rs = [_mm512_setzero_ps(); NB];
        let mut rec = sp.bytes[sp.offsets[t]..].as_ptr();
        for kb in 0..quads / 16 {
            let mut xb = xq;
            for u in 0..NB {
                // SAFETY: block kb of xp row b0 + u (module bounds).
                xb[u] = unsafe { xq[u].add(kb * BLOCK) };
            }
            // SAFETY: rec is at block kb's record (module bounds); 64 floats at each xb[u].
            let r = unsafe { sparse_block512::<NB>(&mut rec, &xb) };
            for u in 0..NB {
                rs[u] = _mm512_add_ps(rs[u], r[u]);
            }
        }
        for g in 0..ng {
            let mut pp = [_mm512_setzero_ps(); NB];
            let k1 = ((g + 1) * p.qpg).min(quads);
            for k in g * p.qpg..k1 {
                // SAFETY: quad k < quads.
                let wk = unsafe { *sw.get_unchecked(k) };
                let idx = _mm512_multishift_epi64_epi8(ctrl, _mm512_set1_epi64(wk as i64));
                for u in 0..NB {
                    // SAFETY: floats [16k, 16k + 16) of tables row b0 + u (module bounds).
                    let tv = unsafe { _mm512_loadu_ps(tab[u].add(16 * k)) };
                    pp[u] = _mm512_add_ps(pp[u], _mm512_permutexvar_ps(idx, tv));
                }
            }
            let muv = load16(&l.mu[(t * ng + g) * TILE..]);
            let alv = load16(&l.alpha[(t * ng + g) * TILE..]);
            for u in 0..NB {
                // SAFETY: (b0 + u) ng + g < batch x n_groups (module bounds).
                let xg = _mm512_set1_ps(unsafe { *p.xg.get_unchecked((b0 + u) * ng + g) });
                let s = _mm512_sub_ps(xg, _mm512_add_ps(pp[u], pp[u]));
                y[u] = _mm512_add_ps(y[u], _mm512_fmadd_ps(muv, xg, _mm512_mul_ps(alv, s)));
            }
        }
        let sg = load16(&l.sigma[t * TILE..]);
        for u in 0..NB {
            let v = _mm512_fmadd_ps(sg, rs[u], y[u]);
            let out = &mut yt[(b0 + u) * TILE..(b0 + u + 1) * TILE];
            // SAFETY: the 16 floats of `out`.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
        }
    }

    /// The residual sums Σ q·x (f32) of one block's 16 rows (rows 0-7 and 8-15)
    /// from its sparse record at `*rec` (advanced past it); `pl` points at the
    /// block's activations as four byte planes of 64 bytes (byte k of each float).
    /// Each pair's 32 codes look up the four bytes of their activations with the
    /// int8 kernel's `pshufb` tables (gather-free: with `vgatherdps` the whole
    /// kernel was 1.3× slower on Zen 4), reassemble the floats with byte and word unpacks,
    /// and meet their codes (sign-extended the same way) in four FMAs. Lanes hold
    /// codes (0-3 | 16-19), (4-7 | 20-23), (8-11 | 24-27), (12-15 | 28-31); code c
    /// belongs to sorted position c / 2.
    ///
    /// # Safety
    /// AVX2 and FMA; `*rec` is a record of a sparse stream (its `SPARSE_PAD`
    /// covers the 32-byte loads); 256 readable bytes at `pl`.
    #[inline(always)]
    unsafe fn sparse_block_avx2(rec: &mut *const u8, pl: *const u8) -> [__m256; 2] {
        // SAFETY: the contract; pshufb only indexes inside its 16-byte tables.
        unsafe {
            let (np, pos, ns, mut d) = crate::layout::record_head(*rec);
            let x80 = _mm256_set1_epi8(0x80u8 as i8);
            let zi = _mm256_setzero_si256();
            let mut acc = [_mm256_setzero_ps(); 4];
            for j in 0..np {
                let n2 = 2 * *ns.add(j) as usize;
                let keep = _mm256_loadu_si256(crate::qmatvec::x86::KEEP.as_ptr().add(32 - n2).cast());
                let cols = _mm256_loadu_si256(d.cast());
                let q = _mm256_and_si256(_mm256_loadu_si256(d.add(n2).cast()), keep);
                d = d.add(2 * n2);
                let ix = _mm256_xor_si256(cols, x80);
                let sel = _mm256_slli_epi16::<2>(cols);
                let mut b = [zi; 4];
                for (k, bk) in b.iter_mut().enumerate() {
                    let t = pl.add(64 * k);
                    let t0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.cast()));
                    let t1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(16).cast()));
                    let t2 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(32).cast()));
                    let t3 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(48).cast()));
                    let lo = _mm256_or_si256(_mm256_shuffle_epi8(t0, cols), _mm256_shuffle_epi8(t1, ix));
                    let hi = _mm256_or_si256(_mm256_shuffle_epi8(t2, cols), _mm256_shuffle_epi8(t3, ix));
                    *bk = _mm256_blendv_epi8(lo, hi, sel);
                }
                let (w01l, w01h) = (_mm256_unpacklo_epi8(b[0], b[1]), _mm256_unpackhi_epi8(b[0], b[1]));
                let (w23l, w23h) = (_mm256_unpacklo_epi8(b[2], b[3]), _mm256_unpackhi_epi8(b[2], b[3]));
                let f = [
                    _mm256_unpacklo_epi16(w01l, w23l),
                    _mm256_unpackhi_epi16(w01l, w23l),
                    _mm256_unpacklo_epi16(w01h, w23h),
                    _mm256_unpackhi_epi16(w01h, w23h),
                ];
                let s8 = _mm256_cmpgt_epi8(zi, q);
                let (ql, qh) = (_mm256_unpacklo_epi8(q, s8), _mm256_unpackhi_epi8(q, s8));
                let (sl, sh) = (_mm256_srai_epi16::<15>(ql), _mm256_srai_epi16::<15>(qh));
                let qi = [
                    _mm256_unpacklo_epi16(ql, sl),
                    _mm256_unpackhi_epi16(ql, sl),
                    _mm256_unpacklo_epi16(qh, sh),
                    _mm256_unpackhi_epi16(qh, sh),
                ];
                for m in 0..4 {
                    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qi[m]), _mm256_castsi256_ps(f[m]), acc[m]);
                }
            }
            *rec = d;
            // Adjacent lanes are one position's two codes: positions (0-3 | 8-11)
            // and (4-7 | 12-15).
            let lo = _mm256_hadd_ps(acc[0], acc[1]);
            let hi = _mm256_hadd_ps(acc[2], acc[3]);
            let mut r = [_mm256_setzero_ps(); 2];
            for (h, rh) in r.iter_mut().enumerate() {
                let pv = _mm256_cvtepu8_epi32(_mm_loadl_epi64(pos.add(8 * h).cast()));
                let lane = _mm256_or_si256(
                    _mm256_and_si256(pv, _mm256_set1_epi32(3)),
                    _mm256_srli_epi32::<1>(_mm256_and_si256(pv, _mm256_set1_epi32(8))),
                );
                let (a, c) = (_mm256_permutevar8x32_ps(lo, lane), _mm256_permutevar8x32_ps(hi, lane));
                *rh = _mm256_blendv_ps(a, c, _mm256_castsi256_ps(_mm256_slli_epi32::<29>(pv)));
            }
            r
        }
    }

    /// The first 8 floats of `v` (panics if fewer).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load8(v: &[f32]) -> __m256 {
        let v = &v[..8];
        // SAFETY: 8 floats of `v`.
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    /// AVX2 tile kernel: two halves of 8 rows; the 16-entry tables as two 8-entry
    /// `vpermps` and a blend on the index's bit 3; the residual from the sparse
    /// records, looked up in byte planes ([`sparse_block_avx2`]).
    ///
    /// # Safety
    /// The AVX2 entry of [`super::TileFn`]: the CPU has AVX2, FMA, BMI2 and POPCNT,
    /// and the arguments meet the contract there.
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    pub(super) unsafe fn tile_avx2(l: &Layout, t: usize, p: &Prep, yt: &mut [f32]) {
        let quads = p.quads;
        let ng = l.n_groups;
        let sw = &l.signs[t * quads..(t + 1) * quads];
        let sp = l.sparse();
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        for b in 0..p.batch {
            let tab = p.tables[b * quads * 16..].as_ptr();
            let planes = p.planes[b * quads * 16..].as_ptr();
            let mut y = [_mm256_setzero_ps(); 2];
            // The residual, block by block from the sparse form.
            let mut rs = [_mm256_setzero_ps(); 2];
            let mut rec = sp.bytes[sp.offsets[t]..].as_ptr();
            for kb in 0..quads / 16 {
                // SAFETY: rec is at block kb's record (module bounds); the block's 64
                // floats of xp row b.
                let r = unsafe { sparse_block_avx2(&mut rec, planes.add(kb * 4 * BLOCK)) };
                rs[0] = _mm256_add_ps(rs[0], r[0]);
                rs[1] = _mm256_add_ps(rs[1], r[1]);
            }
            for g in 0..ng {
                let mut pp = [_mm256_setzero_ps(); 2];
                let k1 = ((g + 1) * p.qpg).min(quads);
                for k in g * p.qpg..k1 {
                    // SAFETY: quad k < quads.
                    let w = unsafe { *sw.get_unchecked(k) };
                    // SAFETY: floats [16k, 16k + 16) of tables row b (module bounds).
                    let (tlo, thi) =
                        unsafe { (_mm256_loadu_ps(tab.add(16 * k)), _mm256_loadu_ps(tab.add(16 * k + 8))) };
                    for (h, pph) in pp.iter_mut().enumerate() {
                        let idx = _mm256_srlv_epi32(_mm256_set1_epi32((w >> (32 * h)) as u32 as i32), shifts);
                        let lo = _mm256_permutevar8x32_ps(tlo, idx);
                        let hi = _mm256_permutevar8x32_ps(thi, idx);
                        let sel = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
                        *pph = _mm256_add_ps(*pph, _mm256_blendv_ps(lo, hi, sel));
                    }
                }
                // SAFETY: b ng + g < batch x n_groups (module bounds).
                let xg = _mm256_set1_ps(unsafe { *p.xg.get_unchecked(b * ng + g) });
                for h in 0..2 {
                    let muv = load8(&l.mu[(t * ng + g) * TILE + 8 * h..]);
                    let alv = load8(&l.alpha[(t * ng + g) * TILE + 8 * h..]);
                    let s = _mm256_sub_ps(xg, _mm256_add_ps(pp[h], pp[h]));
                    y[h] = _mm256_add_ps(y[h], _mm256_fmadd_ps(muv, xg, _mm256_mul_ps(alv, s)));
                }
            }
            for (h, yh) in y.iter().enumerate() {
                let sg = load8(&l.sigma[t * TILE + 8 * h..]);
                let rv = rs[h];
                let out = &mut yt[b * TILE + 8 * h..b * TILE + 8 * h + 8];
                // SAFETY: the 8 floats of `out`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_fmadd_ps(sg, rv, *yh)) };
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

    /// Every level agrees with the decompressed product to float rounding, for
    /// batch sizes that exercise every pass width, tail tiles, groups and the bias.
    #[test]
    fn every_level_matches_the_decompressed_product() {
        let mut seed = 17;
        let cases = [
            (37, 203, None, 8, 0.12),
            (16, 128, Some(4), 4, 0.12),
            (5, 64, Some(32), 8, 0.12),
            (40, 384, Some(12), 8, 0.12),
            (18, 130, None, 8, 1.0), // 32 pairs per block
            (17, 70, None, 8, 0.0),  // no pairs
            (32, 256, None, 8, 0.1), // testutil::HEAVY_N: codes only in block 1
            (20, 0, None, 8, 0.1),
        ];
        for (m, n, gs, vb, salient) in cases {
            let w = crate::testutil::case_weights(m, n, &mut seed);
            let p = Params { salient, salient_bits: vb, group_size: gs, scale: ScaleType::F32, ..Params::default() };
            let t = compress(&w, m, n, None, &p).unwrap();
            let mut wh = vec![0f32; m * n];
            t.view().decompress(&mut wh).unwrap();
            let l = layout::build(&t.view()).unwrap();
            assert!(supported(&l));
            let bias = rand_vec(m, &mut seed);
            for batch in [1usize, 2, 3, 5] {
                let x = rand_vec(batch * n, &mut seed);
                for lvl in simd::available() {
                    let mut y = vec![f32::NAN; batch * m];
                    matvec_f32_at(lvl, &l, &x, batch, Some(&bias), &mut y).unwrap();
                    for b in 0..batch {
                        for i in 0..m {
                            let (mut e, mut mag) = (bias[i] as f64, bias[i].abs() as f64);
                            for j in 0..n {
                                e += wh[i * n + j] as f64 * x[b * n + j] as f64;
                                mag += (wh[i * n + j] as f64 * x[b * n + j] as f64).abs();
                            }
                            let got = y[b * m + i] as f64;
                            assert!((got - e).abs() <= 1e-5 * mag + 1e-6, "{lvl:?} {m}x{n} b={b} i={i}: {got} vs {e}");
                        }
                    }
                }
            }
        }
    }
}
