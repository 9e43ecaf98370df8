//! Bit-packing of k-bit codes and of IEEE sign bits (docs/format.md §1–2).
//!
//! Each row is one little-endian bit stream padded to a whole byte. Public
//! functions take flat row-major slices plus `(rows, n)`, validate sizes, pick
//! the kernel once per call (`simd::level()`), and run it row by row. When a
//! packed row is a whole number of bytes, rows are contiguous in both layouts
//! and the array is processed as one long row (no per-row overhead).
use crate::error::invalid;
use crate::simd::{self, Level};
use crate::Result;
use sealed::Kernels;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Bytes of one packed row of `n` codes of `bits` bits: `ceil(n*bits/8)`.
pub fn packed_len(n: usize, bits: u32) -> Result<usize> {
    n.checked_mul(bits as usize).map(|b| b.div_ceil(8)).ok_or_else(|| crate::Error::Invalid("row too long".into()))
}

fn check_bits(bits: u32) -> Result<()> {
    if !(1..=8).contains(&bits) {
        return invalid(format!("bits must be in 1..8, got {bits}"));
    }
    Ok(())
}

fn check_len(what: &str, got: usize, rows: usize, per_row: usize) -> Result<()> {
    match rows.checked_mul(per_row) {
        Some(want) if want == got => Ok(()),
        _ => invalid(format!("{what} has {got} elements, expected {rows} rows x {per_row}")),
    }
}

static SCALAR: Kernels = Kernels {
    pack: pack_row_scalar,
    unpack: unpack_row_scalar,
    signs16: signs_row_scalar::<u16>,
    signs32: signs_row_scalar::<u32>,
    signs64: signs_row_scalar::<u64>,
    unsigns16: unsigns_row_scalar::<u16>,
    unsigns32: unsigns_row_scalar::<u32>,
    unsigns64: unsigns_row_scalar::<u64>,
};

/// The kernel table of `level`, lowered to a level this CPU runs.
pub(crate) fn table(level: Level) -> &'static Kernels {
    match simd::runnable(level) {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => &x86::AVX512,
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => &x86::AVX2,
        _ => &SCALAR,
    }
}

/// Run `f(row_in, row_out)` over rows, or once over everything when packed rows
/// are byte aligned (then the row boundary is invisible in both layouts).
#[inline]
fn for_rows<I, O>(
    input: &[I],
    out: &mut [O],
    rows: usize,
    in_row: usize,
    out_row: usize,
    aligned: bool,
    mut f: impl FnMut(&[I], &mut [O]),
) {
    if rows == 0 || in_row == 0 || out_row == 0 {
        return; // nothing to read or write
    }
    if aligned || rows == 1 {
        f(input, out);
        return;
    }
    for (i, o) in input.chunks_exact(in_row).zip(out.chunks_exact_mut(out_row)) {
        f(i, o);
    }
}

/// Pack `rows x n` codes (each `< 2**bits`) into `rows x packed_len(n, bits)` bytes.
pub fn pack_bits(codes: &[u8], rows: usize, n: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    pack_bits_with(table(simd::level()), codes, rows, n, bits, out)
}

fn pack_bits_with(k: &Kernels, codes: &[u8], rows: usize, n: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let pl = packed_len(n, bits)?;
    check_len("codes", codes.len(), rows, n)?;
    check_len("out", out.len(), rows, pl)?;
    if bits == 8 {
        // The identity, and every u8 fits: a plain memcpy (glibc picks streaming
        // stores for large copies).
        out.copy_from_slice(codes);
        return Ok(());
    }
    let mut or = 0u8;
    let aligned = (n * bits as usize).is_multiple_of(8);
    for_rows(codes, out, rows, n, pl, aligned, |c, o| {
        // SAFETY: a table from `table` (a level this CPU runs); `for_rows` hands out
        // n codes and pl = packed_len(n, bits) bytes per row (or all rows at once when
        // rows are byte aligned, where the same relation holds), bits in 1..=7.
        or |= unsafe { (k.pack)(c, bits, o) }
    });
    if bits < 8 && (or >> bits) != 0 {
        let (i, &v) = codes.iter().enumerate().find(|(_, &v)| (v >> bits) != 0).unwrap();
        return invalid(format!("code {v} at flat index {i} does not fit in {bits} bits (max {})", (1u32 << bits) - 1));
    }
    Ok(())
}

/// Unpack `rows x packed_len(count, bits)` bytes into `rows x count` codes.
pub fn unpack_bits(packed: &[u8], rows: usize, count: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    unpack_bits_with(table(simd::level()), packed, rows, count, bits, out)
}

fn unpack_bits_with(k: &Kernels, packed: &[u8], rows: usize, count: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let pl = packed_len(count, bits)?;
    check_len("packed", packed.len(), rows, pl)?;
    check_len("out", out.len(), rows, count)?;
    if bits == 8 {
        out.copy_from_slice(packed);
        return Ok(());
    }
    let aligned = (count * bits as usize).is_multiple_of(8);
    // SAFETY: as in `pack_bits_with`: pl = packed_len(count, bits) bytes per count codes.
    for_rows(packed, out, rows, pl, count, aligned, |p, o| unsafe { (k.unpack)(p, bits, o) });
    Ok(())
}

/// An unsigned word holding an IEEE float's bits: `u16` (float16/bfloat16),
/// `u32` (float32) or `u64` (float64). Sealed: implemented for these three only.
pub trait SignWord: sealed::Sealed {}
impl SignWord for u16 {}
impl SignWord for u32 {}
impl SignWord for u64 {}

mod sealed {
    /// The row kernels of one SIMD level (docs/format.md §1–2). Each works on one
    /// row whose output begins on a byte boundary.
    ///
    /// # Safety
    ///
    /// Entries are `unsafe fn` because the SIMD ones need CPU features. A table
    /// from [`table`](super::table) belongs to a level the CPU runs (it clamps with
    /// `simd::runnable`), which discharges that part; the caller must still give
    /// each entry slices of exactly these lengths (the SIMD kernels write through
    /// raw pointers sized from them):
    /// - `pack(codes, bits, out)`: `bits` in 1..=8, `out.len() == packed_len(codes.len(), bits)`;
    /// - `unpack(packed, bits, out)`: `bits` in 1..=8, `packed.len() == packed_len(out.len(), bits)`;
    /// - `signsN(x, out)`: `out.len() == x.len().div_ceil(8)`;
    /// - `unsignsN(packed, pos, neg, out)`: `packed.len() == out.len().div_ceil(8)`.
    ///
    /// The scalar entries are safe functions (bounds-checked) coerced to the table's type.
    pub struct Kernels {
        /// Pack a row; returns the OR of all codes (the caller validates the range).
        pub pack: unsafe fn(&[u8], u32, &mut [u8]) -> u8,
        /// Unpack a row of `out.len()` codes.
        pub unpack: unsafe fn(&[u8], u32, &mut [u8]),
        /// Pack the sign bits of a row of 16-bit words.
        pub signs16: unsafe fn(&[u16], &mut [u8]),
        /// Pack the sign bits of a row of 32-bit words.
        pub signs32: unsafe fn(&[u32], &mut [u8]),
        /// Pack the sign bits of a row of 64-bit words.
        pub signs64: unsafe fn(&[u64], &mut [u8]),
        /// Expand a row of sign bits to `pos` (bit 0) / `neg` (bit 1) 16-bit words.
        pub unsigns16: unsafe fn(&[u8], u16, u16, &mut [u16]),
        /// Expand a row of sign bits to 32-bit words.
        pub unsigns32: unsafe fn(&[u8], u32, u32, &mut [u32]),
        /// Expand a row of sign bits to 64-bit words.
        pub unsigns64: unsafe fn(&[u8], u64, u64, &mut [u64]),
    }

    /// What the kernels need of a word type. Neither this trait nor [`Kernels`]
    /// can be named outside `bitpack`, so only this module can pick a kernel.
    pub trait Sealed: Copy + Send + Sync + 'static {
        /// The IEEE sign bit (the top bit) as 0 or 1.
        fn sign(self) -> u8;
        /// The table's sign-packing kernel for this word width.
        fn pack_kernel(k: &Kernels) -> unsafe fn(&[Self], &mut [u8]);
        /// The table's sign-expanding kernel for this word width.
        fn unpack_kernel(k: &Kernels) -> unsafe fn(&[u8], Self, Self, &mut [Self]);
    }

    macro_rules! sealed {
        ($t:ty, $p:ident, $u:ident) => {
            impl Sealed for $t {
                #[inline(always)]
                fn sign(self) -> u8 {
                    (self >> (<$t>::BITS - 1)) as u8
                }
                fn pack_kernel(k: &Kernels) -> unsafe fn(&[Self], &mut [u8]) {
                    k.$p
                }
                fn unpack_kernel(k: &Kernels) -> unsafe fn(&[u8], Self, Self, &mut [Self]) {
                    k.$u
                }
            }
        };
    }
    sealed!(u16, signs16, unsigns16);
    sealed!(u32, signs32, unsigns32);
    sealed!(u64, signs64, unsigns64);
}

/// Pack the sign bits of `rows x n` floats (given as their bit patterns).
pub fn pack_signs<T: SignWord>(x: &[T], rows: usize, n: usize, out: &mut [u8]) -> Result<()> {
    pack_signs_with(table(simd::level()), x, rows, n, out)
}

fn pack_signs_with<T: SignWord>(k: &Kernels, x: &[T], rows: usize, n: usize, out: &mut [u8]) -> Result<()> {
    let pl = packed_len(n, 1)?;
    check_len("x", x.len(), rows, n)?;
    check_len("out", out.len(), rows, pl)?;
    let f = T::pack_kernel(k);
    // SAFETY: a table from `table`; ceil(n/8) bytes per n words (per row, or for all
    // rows at once when n is a multiple of 8).
    for_rows(x, out, rows, n, pl, n.is_multiple_of(8), |a, o| unsafe { f(a, o) });
    Ok(())
}

/// Expand packed sign bits to `pos` (bit 0) / `neg` (bit 1) words: `rows x count`.
pub fn unpack_signs<T: SignWord>(
    packed: &[u8],
    rows: usize,
    count: usize,
    pos: T,
    neg: T,
    out: &mut [T],
) -> Result<()> {
    unpack_signs_with(table(simd::level()), packed, rows, count, pos, neg, out)
}

fn unpack_signs_with<T: SignWord>(
    k: &Kernels,
    packed: &[u8],
    rows: usize,
    count: usize,
    pos: T,
    neg: T,
    out: &mut [T],
) -> Result<()> {
    let pl = packed_len(count, 1)?;
    check_len("packed", packed.len(), rows, pl)?;
    check_len("out", out.len(), rows, count)?;
    let f = T::unpack_kernel(k);
    // SAFETY: a table from `table`; ceil(count/8) bytes per count words.
    for_rows(packed, out, rows, pl, count, count.is_multiple_of(8), |p, o| unsafe { f(p, pos, neg, o) });
    Ok(())
}

// ---------------------------------------------------------------------------
// Scalar kernels: the portable path (aarch64 etc.) and the tails of SIMD rows.
// A row's output begins on a byte boundary; `out.len()` is the exact size.

/// Pack one row: 8 codes -> `bits` bytes through a u64.
fn pack_row_scalar(codes: &[u8], bits: u32, out: &mut [u8]) -> u8 {
    let b = bits as usize;
    let mut or = 0u8;
    let mut chunks = codes.chunks_exact(8);
    let mut o = 0;
    for c in &mut chunks {
        let mut acc = 0u64;
        for (j, &v) in c.iter().enumerate() {
            or |= v;
            acc |= (v as u64) << (j * b);
        }
        out[o..o + b].copy_from_slice(&acc.to_le_bytes()[..b]);
        o += b;
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut acc = 0u64;
        for (j, &v) in rem.iter().enumerate() {
            or |= v;
            acc |= (v as u64) << (j * b);
        }
        let nb = (rem.len() * b).div_ceil(8);
        out[o..o + nb].copy_from_slice(&acc.to_le_bytes()[..nb]);
    }
    // Codes wider than `bits` spill into neighbours; the caller errors on `or`.
    or
}

/// Unpack one row: `bits` bytes -> 8 codes through a u64.
fn unpack_row_scalar(packed: &[u8], bits: u32, out: &mut [u8]) {
    let b = bits as usize;
    let mask = (1u64 << b) - 1;
    let mut i = 0;
    let mut chunks = out.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w[..b].copy_from_slice(&packed[i..i + b]);
        let acc = u64::from_le_bytes(w);
        for (j, v) in c.iter_mut().enumerate() {
            *v = ((acc >> (j * b)) & mask) as u8;
        }
        i += b;
    }
    let rem = chunks.into_remainder();
    if !rem.is_empty() {
        let nb = packed.len() - i;
        let mut w = [0u8; 8];
        w[..nb].copy_from_slice(&packed[i..]);
        let acc = u64::from_le_bytes(w);
        for (j, v) in rem.iter_mut().enumerate() {
            *v = ((acc >> (j * b)) & mask) as u8;
        }
    }
}

/// Pack the sign bits of one row.
fn signs_row_scalar<T: SignWord>(x: &[T], out: &mut [u8]) {
    for (o, c) in out.iter_mut().zip(x.chunks(8)) {
        let mut byte = 0u8;
        for (j, &v) in c.iter().enumerate() {
            byte |= v.sign() << j;
        }
        *o = byte;
    }
}

/// Expand one row of sign bits.
fn unsigns_row_scalar<T: SignWord>(packed: &[u8], pos: T, neg: T, out: &mut [T]) {
    for (c, &byte) in out.chunks_mut(8).zip(packed) {
        for (j, v) in c.iter_mut().enumerate() {
            *v = if (byte >> j) & 1 != 0 { neg } else { pos };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// Bit-by-bit model of §1, independent of the kernels.
    fn model_pack(codes: &[u8], rows: usize, n: usize, bits: u32) -> Vec<u8> {
        let pl = (n * bits as usize).div_ceil(8);
        let mut out = vec![0u8; rows * pl];
        for r in 0..rows {
            for i in 0..n {
                for t in 0..bits as usize {
                    if (codes[r * n + i] >> t) & 1 == 1 {
                        let bit = i * bits as usize + t;
                        out[r * pl + bit / 8] |= 1 << (bit % 8);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn all_levels_match_model() {
        let mut seed = 7;
        for lvl in simd::available() {
            let k = table(lvl);
            for bits in 1..=8u32 {
                for &(rows, n) in
                    &[(1, 0), (3, 0), (0, 5), (1, 1), (2, 7), (3, 63), (2, 64), (2, 65), (1, 200), (5, 129), (1, 1000)]
                {
                    let codes: Vec<u8> = (0..rows * n).map(|_| (lcg(&mut seed) % (1 << bits)) as u8).collect();
                    let want = model_pack(&codes, rows, n, bits);
                    let mut got = vec![0xAAu8; want.len()];
                    pack_bits_with(k, &codes, rows, n, bits, &mut got).unwrap();
                    assert_eq!(got, want, "{lvl:?} bits={bits} rows={rows} n={n}");
                    let mut back = vec![0xAAu8; codes.len()];
                    unpack_bits_with(k, &got, rows, n, bits, &mut back).unwrap();
                    assert_eq!(back, codes, "{lvl:?} unpack bits={bits} rows={rows} n={n}");
                }
            }
        }
    }

    #[test]
    fn rejects_wide_codes_on_every_level() {
        for lvl in simd::available() {
            let k = table(lvl);
            for bits in 1..8u32 {
                for n in [1usize, 8, 64, 100, 300] {
                    let mut codes = vec![0u8; n];
                    codes[n - 1] = 1 << bits;
                    let mut out = vec![0u8; packed_len(n, bits).unwrap()];
                    assert!(pack_bits_with(k, &codes, 1, n, bits, &mut out).is_err(), "{lvl:?} {bits} {n}");
                }
            }
        }
    }

    #[test]
    fn signs_all_levels() {
        let mut seed = 3;
        for lvl in simd::available() {
            let k = table(lvl);
            for &(rows, n) in &[(1, 0), (1, 1), (2, 7), (3, 65), (2, 64), (1, 1000), (4, 33)] {
                let x32: Vec<u32> =
                    (0..rows * n).map(|_| lcg(&mut seed) as u32 ^ ((lcg(&mut seed) as u32) << 31)).collect();
                let bits: Vec<u8> = x32.iter().map(|v| (v >> 31) as u8).collect();
                let want = model_pack(&bits, rows, n, 1);
                let mut got = vec![0u8; want.len()];
                pack_signs_with(k, &x32, rows, n, &mut got).unwrap();
                assert_eq!(got, want, "{lvl:?} f32 {rows}x{n}");
                let x16: Vec<u16> = x32.iter().map(|&v| (v >> 16) as u16).collect();
                pack_signs_with(k, &x16, rows, n, &mut got).unwrap();
                assert_eq!(got, want, "{lvl:?} f16 {rows}x{n}");
                let x64: Vec<u64> = x32.iter().map(|&v| (v as u64) << 32 | 5).collect();
                pack_signs_with(k, &x64, rows, n, &mut got).unwrap();
                assert_eq!(got, want, "{lvl:?} f64 {rows}x{n}");

                let mut u32s = vec![0u32; rows * n];
                unpack_signs_with(k, &want, rows, n, 1u32, 2u32, &mut u32s).unwrap();
                assert!(u32s.iter().zip(&bits).all(|(&v, &b)| v == if b == 1 { 2 } else { 1 }));
                let mut u16s = vec![0u16; rows * n];
                unpack_signs_with(k, &want, rows, n, 1u16, 2u16, &mut u16s).unwrap();
                assert!(u16s.iter().zip(&bits).all(|(&v, &b)| v == if b == 1 { 2 } else { 1 }));
                let mut u64s = vec![0u64; rows * n];
                unpack_signs_with(k, &want, rows, n, 1u64, 2u64, &mut u64s).unwrap();
                assert!(u64s.iter().zip(&bits).all(|(&v, &b)| v == if b == 1 { 2 } else { 1 }));
            }
        }
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    /// Outputs over the streaming-store threshold, at every head alignment.
    #[test]
    fn large_unpack_matches_scalar() {
        let n = (4 << 20) + 1000;
        for bits in [1u32, 2, 4] {
            let codes: Vec<u8> = (0..n).map(|i| ((i * 7 + i / 3) % (1 << bits)) as u8).collect();
            let mut packed = vec![0u8; packed_len(n, bits).unwrap()];
            pack_bits(&codes, 1, n, bits, &mut packed).unwrap();
            for lvl in simd::available() {
                let k = table(lvl);
                for shift in [0usize, 8, 16, 24] {
                    let mut buf = vec![0u8; n + 64];
                    let base = buf.as_ptr() as usize;
                    let off = (32 - base % 32) % 32 + shift; // dst at 32-byte alignment + shift
                    let m = n - 64;
                    let mp = packed_len(m, bits).unwrap();
                    // Only whole input bytes: m codes from the start.
                    unpack_bits_with(k, &packed[..mp], 1, m, bits, &mut buf[off..off + m]).unwrap();
                    assert_eq!(&buf[off..off + m], &codes[..m], "{lvl:?} bits={bits} shift={shift}");
                }
            }
        }
    }
}
