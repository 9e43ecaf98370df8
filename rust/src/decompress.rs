//! Decompression of a PBTensor (docs/format.md §6.2): `Ŵ = B + S`, row by row,
//! with `B` from the sign plane and the group scales and `S` from the decoded
//! residual codes. The row kernel has one entry per SIMD level; every level gives
//! the same bits (each operation rounded to f32 separately, no FMA).
use rayon::prelude::*;

use crate::error::invalid;
use crate::pb::PbRef;
use crate::simd::{self, Level};
use crate::{parallel, rle, Result};

impl PbRef<'_> {
    /// Decompress into `out` (`m x n` float32, row-major, fully overwritten),
    /// docs/format.md §6.2.
    ///
    /// Errors: [`Error::Invalid`](crate::Error::Invalid) if `out` does not hold
    /// `m * n` floats; a format error (see [`Error::is_format`](crate::Error::is_format))
    /// if the parts disagree with the shape or a row's residual does not decode.
    pub fn decompress(&self, out: &mut [f32]) -> Result<()> {
        decompress_at(self, simd::level(), out)
    }
}

fn decompress_at(t: &PbRef, level: Level, out: &mut [f32]) -> Result<()> {
    t.check_sizes()?;
    let (m, n, g, ng) = (t.m, t.n, t.group_size, t.n_groups());
    if out.len() != m * n {
        return invalid(format!("out has {} elements, expected {m} x {n}", out.len()));
    }
    if n == 0 {
        return Ok(());
    }
    rle::check_decodable(&t.res, t.value_offsets, m)?;
    let nb = n.div_ceil(8);
    let dequant = kernel(level, g, ng);
    // Rows decode independently: each task decodes its row's residual into
    // a small buffer, then writes B + S (§6.2) group by group.
    parallel::pool().install(|| {
        out.par_chunks_mut(n).enumerate().try_for_each_init(
            || vec![0i8; n],
            |q, (i, row)| {
                rle::decode_row(&t.res, t.value_offsets, i, q)?;
                let (signs, mu, alpha) =
                    (&t.signs[i * nb..(i + 1) * nb], &t.mu[i * ng..(i + 1) * ng], &t.alpha[i * ng..(i + 1) * ng]);
                // SAFETY: `dequant` comes from `kernel(level, g, ng)`; the slices are row
                // i's parts, of the lengths `Dequant` requires (check_sizes above).
                unsafe { dequant(signs, q, mu, alpha, g, t.sigma[i], row) };
                Ok::<(), crate::Error>(())
            },
        )
    })
}

/// The row kernel of §6.2: `out[j] = (mu ± alpha) + sigma * q[j]` for the group
/// of column j, `-` where the sign bit is 1.
///
/// # Safety
///
/// Call only a kernel returned by [`kernel`] for this row's `g` and `ng`: it
/// belongs to a level the CPU runs (`simd::runnable`), and its group boundaries
/// suit it. The slices must have the row's lengths: for `n = out.len()`,
/// `q.len() == n`, `signs.len() == n.div_ceil(8)`, `mu.len() == alpha.len() == ng`
/// with `ng = n.div_ceil(g)` and `g >= 1`.
type Dequant = unsafe fn(&[u8], &[i8], &[f32], &[f32], usize, f32, &mut [f32]);

/// The dequantization kernel for `level` (lowered to a level the CPU runs) and
/// a row of `ng` groups of `g` columns: the SIMD one needs byte-aligned groups.
fn kernel(level: Level, g: usize, ng: usize) -> Dequant {
    match simd::runnable(level) {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 if g.is_multiple_of(8) || ng == 1 => x86::dequant_row,
        _ => dequant_row_scalar,
    }
}

/// The portable kernel (see [`Dequant`]); safe, with bounds checks.
fn dequant_row_scalar(signs: &[u8], q: &[i8], mu: &[f32], alpha: &[f32], g: usize, sigma: f32, out: &mut [f32]) {
    let n = out.len();
    for gi in 0..mu.len() {
        let (pos, neg) = (mu[gi] + alpha[gi], mu[gi] - alpha[gi]);
        for j in gi * g..((gi + 1) * g).min(n) {
            let b = if (signs[j / 8] >> (j % 8)) & 1 == 1 { neg } else { pos };
            out[j] = b + sigma * q[j] as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// §6.2 for one row, 8 columns per step; groups are byte aligned (g % 8 == 0)
    /// or there is one group. Separate mul and add: bit-identical to the scalar path.
    ///
    /// # Safety
    /// An AVX2 entry of [`super::Dequant`]: AVX2 present, the slice lengths listed there.
    #[target_feature(enable = "avx2,fma,bmi2,popcnt")]
    pub(super) unsafe fn dequant_row(
        signs: &[u8],
        q: &[i8],
        mu: &[f32],
        alpha: &[f32],
        g: usize,
        sigma: f32,
        out: &mut [f32],
    ) {
        let n = out.len();
        let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let sg = _mm256_set1_ps(sigma);
        for gi in 0..mu.len() {
            let (p, m) = (mu[gi] + alpha[gi], mu[gi] - alpha[gi]);
            let (pos, neg) = (_mm256_set1_ps(p), _mm256_set1_ps(m));
            let (j0, j1) = (gi * g, ((gi + 1) * g).min(n));
            let mut j = j0;
            // Each step covers columns [j, j + 8) with j + 8 <= j1 <= n: inside q and
            // out, and sign byte j / 8 < n.div_ceil(8) = signs.len().
            while j + 8 <= j1 {
                // SAFETY: sign byte j / 8, see above.
                let bits = _mm256_set1_epi32(unsafe { *signs.get_unchecked(j / 8) } as i32);
                let mask = _mm256_cmpeq_epi32(_mm256_and_si256(bits, sel), sel);
                let b = _mm256_blendv_ps(pos, neg, _mm256_castsi256_ps(mask));
                // SAFETY: q [j, j + 8), see above.
                let q8 = unsafe { _mm_loadl_epi64(q.as_ptr().add(j).cast()) };
                let qv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
                // SAFETY: out [j, j + 8), see above.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(j), _mm256_add_ps(b, _mm256_mul_ps(sg, qv))) };
                j += 8;
            }
            for jj in j..j1 {
                let b = if (signs[jj / 8] >> (jj % 8)) & 1 == 1 { m } else { p };
                out[jj] = b + sigma * q[jj] as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{compress, Params, ScaleType};

    /// Every level's kernel gives the scalar kernel's bits, whatever the group
    /// size (the SIMD kernel runs only where groups are byte aligned).
    #[test]
    fn every_level_matches_scalar_bit_for_bit() {
        let mut s = 3u64;
        let (m, n) = (5, 203);
        let w: Vec<f32> = (0..m * n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect();
        for gs in [None, Some(8), Some(64), Some(7), Some(1)] {
            let p = Params { group_size: gs, scale: ScaleType::F32, ..Params::default() };
            let t = compress(&w, m, n, None, &p).unwrap();
            let mut want = vec![0f32; m * n];
            decompress_at(&t.view(), Level::Scalar, &mut want).unwrap();
            for lvl in simd::available() {
                let mut got = vec![f32::NAN; m * n];
                decompress_at(&t.view(), lvl, &mut got).unwrap();
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{lvl:?} group_size {gs:?}");
            }
        }
    }
}
