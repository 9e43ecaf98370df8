//! x86-64 kernels for `bitpack` (AVX-512 with VBMI, and AVX2). Each kernel
//! does whole 32/64-code blocks and hands the row's tail to the scalar kernel;
//! a tail always starts on a byte boundary because a block is a whole number
//! of bytes in both layouts.
//!
//! Every kernel here is an entry of [`AVX512`] or [`AVX2`] and has the
//! contract of [`Kernels`]: its table's CPU features are present, and its
//! slices have exactly the lengths listed there. The SAFETY comments below
//! derive each raw-pointer access from those lengths; intrinsics without
//! pointers need no `unsafe` inside a `#[target_feature]` function.
use std::arch::x86_64::*;

use super::{pack_row_scalar, signs_row_scalar, unpack_row_scalar, unsigns_row_scalar, Kernels};

/// The AVX-512 (F/BW/VL/VBMI/VBMI2 + BMI2) kernels.
pub(super) static AVX512: Kernels = Kernels {
    pack: pack_row_avx512,
    unpack: unpack_row_avx512,
    signs16: signs16_avx512,
    signs32: signs32_avx512,
    signs64: signs64_avx512,
    unsigns16: unsigns16_avx512,
    unsigns32: unsigns32_avx512,
    unsigns64: unsigns64_avx512,
};

/// The AVX2 (+ BMI2) kernels.
pub(super) static AVX2: Kernels = Kernels {
    pack: pack_row_avx2,
    unpack: unpack_row_avx2,
    signs16: signs16_avx2,
    signs32: signs32_avx2,
    signs64: signs64_avx2,
    unsigns16: unsigns16_avx2,
    unsigns32: unsigns32_avx2,
    unsigns64: unsigns64_avx2,
};

// ----------------------------------------------------------------- AVX-512

/// OR of all bytes of `v`.
#[target_feature(enable = "avx512f")]
fn or_bytes512(v: __m512i) -> u8 {
    let x = _mm512_reduce_or_epi64(v) as u64;
    let x = x | (x >> 32);
    let x = x | (x >> 16);
    (x | (x >> 8)) as u8
}

/// 64 bytes of a local table as a vector.
#[target_feature(enable = "avx512f")]
fn vec512(t: &[u8; 64]) -> __m512i {
    // SAFETY: reads the 64 bytes of `t` (an unaligned load).
    unsafe { _mm512_loadu_si512(t.as_ptr().cast()) }
}

/// Compaction table for packing: byte `t < 8b` of the result takes byte
/// `t % b` of qword `t / b` (each qword holds 8 codes in its low `b` bytes).
fn pack_index(b: usize) -> [u8; 64] {
    let mut idx = [0u8; 64];
    for (t, v) in idx.iter_mut().enumerate().take(8 * b) {
        *v = (8 * (t / b) + t % b) as u8;
    }
    idx
}

/// # Safety
/// An entry of [`AVX512`]: see [`Kernels`] (`out.len() == packed_len(codes.len(), bits)`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn pack_row_avx512(codes: &[u8], bits: u32, out: &mut [u8]) -> u8 {
    let b = bits as usize;
    let blocks = codes.len() / 64;
    let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
    // Block i reads codes [64i, 64i + 64) and writes out [8bi, 8bi + 8b): inside both
    // slices since i < codes.len() / 64 and out.len() = ceil(codes.len() * b / 8).
    let mut orv = _mm512_setzero_si512();
    match b {
        8 => {
            for i in 0..blocks {
                // SAFETY: codes [64i, 64i + 64), see above.
                let v = unsafe { _mm512_loadu_si512(src.add(64 * i).cast()) };
                orv = _mm512_or_si512(orv, v);
                // SAFETY: out [64i, 64i + 64) (b = 8).
                unsafe { _mm512_storeu_si512(dst.add(64 * i).cast(), v) };
            }
        }
        1 => {
            for i in 0..blocks {
                // SAFETY: codes [64i, 64i + 64).
                let v = unsafe { _mm512_loadu_si512(src.add(64 * i).cast()) };
                orv = _mm512_or_si512(orv, v);
                // SAFETY: out [8i, 8i + 8) (b = 1).
                unsafe { dst.add(8 * i).cast::<u64>().write_unaligned(_mm512_test_epi8_mask(v, v)) };
            }
        }
        _ => {
            // Merge neighbours in widening lanes (8->16->32->64 bits), so each
            // qword ends up with its 8 codes in the low b bytes; then compact.
            let (k1, k2, k4) =
                (_mm_cvtsi32_si128(b as i32), _mm_cvtsi32_si128(2 * b as i32), _mm_cvtsi32_si128(4 * b as i32));
            let (m8, m16, m32) = (_mm512_set1_epi16(0xFF), _mm512_set1_epi32(0xFFFF), _mm512_set1_epi64(0xFFFF_FFFF));
            let idx = vec512(&pack_index(b));
            let smask: u64 = (1u64 << (8 * b)) - 1;
            for i in 0..blocks {
                // SAFETY: codes [64i, 64i + 64).
                let v = unsafe { _mm512_loadu_si512(src.add(64 * i).cast()) };
                orv = _mm512_or_si512(orv, v);
                let x = _mm512_or_si512(_mm512_and_si512(v, m8), _mm512_sll_epi16(_mm512_srli_epi16::<8>(v), k1));
                let x = _mm512_or_si512(_mm512_and_si512(x, m16), _mm512_sll_epi32(_mm512_srli_epi32::<16>(x), k2));
                let x = _mm512_or_si512(_mm512_and_si512(x, m32), _mm512_sll_epi64(_mm512_srli_epi64::<32>(x), k4));
                let x = _mm512_permutexvar_epi8(idx, x);
                // SAFETY: out [8bi, 8bi + 8b); the masked-off bytes are not accessed.
                unsafe { _mm512_mask_storeu_epi8(dst.add(8 * b * i).cast(), smask, x) };
            }
        }
    }
    let done = blocks * 64;
    or_bytes512(orv) | pack_row_scalar(&codes[done..], bits, &mut out[done * b / 8..])
}

/// # Safety
/// An entry of [`AVX512`]: see [`Kernels`] (`packed.len() == packed_len(out.len(), bits)`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn unpack_row_avx512(packed: &[u8], bits: u32, out: &mut [u8]) {
    let b = bits as usize;
    let blocks = out.len() / 64;
    let (src, dst) = (packed.as_ptr(), out.as_mut_ptr());
    // Block i reads packed [8bi, 8bi + 8b) and writes out [64i, 64i + 64): inside both
    // slices since i < out.len() / 64 and packed.len() = ceil(out.len() * b / 8).
    match b {
        8 => {
            for i in 0..blocks {
                // SAFETY: packed [64i, 64i + 64) (b = 8) and out [64i, 64i + 64), see above.
                unsafe { _mm512_storeu_si512(dst.add(64 * i).cast(), _mm512_loadu_si512(src.add(64 * i).cast())) };
            }
        }
        1 => {
            for i in 0..blocks {
                // SAFETY: packed [8i, 8i + 8) (b = 1).
                let m = unsafe { src.add(8 * i).cast::<u64>().read_unaligned() };
                // SAFETY: out [64i, 64i + 64).
                unsafe { _mm512_storeu_si512(dst.add(64 * i).cast(), _mm512_maskz_set1_epi8(m, 1)) };
            }
        }
        _ => {
            // Qword g gets source bytes [b*g, b*g+8) (its 8 codes start byte
            // aligned); multishift then pulls code j from bit offset j*b.
            let mut spread = [0u8; 64];
            let mut ctrl = [0u8; 64];
            for g in 0..8 {
                for j in 0..8 {
                    spread[8 * g + j] = (b * g + j) as u8;
                    ctrl[8 * g + j] = (j * b) as u8;
                }
            }
            let (spread, ctrl) = (vec512(&spread), vec512(&ctrl));
            let vmask = _mm512_set1_epi8(((1u32 << b) - 1) as i8);
            let lmask: u64 = (1u64 << (8 * b)) - 1;
            for i in 0..blocks {
                // SAFETY: packed [8bi, 8bi + 8b); the masked-off bytes are not accessed.
                let s = unsafe { _mm512_maskz_loadu_epi8(lmask, src.add(8 * b * i).cast()) };
                let x = _mm512_multishift_epi64_epi8(ctrl, _mm512_permutexvar_epi8(spread, s));
                // SAFETY: out [64i, 64i + 64).
                unsafe { _mm512_storeu_si512(dst.add(64 * i).cast(), _mm512_and_si512(x, vmask)) };
            }
        }
    }
    let done = blocks * 64;
    unpack_row_scalar(&packed[done * b / 8..], bits, &mut out[done..]);
}

// In the sign kernels, block i covers x words [Wi, Wi + W) and out bytes
// [W/8 i, W/8 (i + 1)) for a block of W words; i < x.len() / W and
// out.len() = ceil(x.len() / 8) keep both inside their slices. The unsign
// kernels are the same with the roles of `packed` and `out` exchanged.

/// # Safety
/// An entry of [`AVX512`]: see [`Kernels`] (`out.len() == x.len().div_ceil(8)`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn signs32_avx512(x: &[u32], out: &mut [u8]) {
    let blocks = x.len() / 64;
    let z = _mm512_setzero_si512();
    for i in 0..blocks {
        // SAFETY: the block's first word, inside x (see above).
        let p = unsafe { x.as_ptr().add(64 * i) };
        let mut m = 0u64;
        for q in 0..4 {
            // SAFETY: words [64i + 16q, 64i + 16q + 16) of the block.
            let v = unsafe { _mm512_loadu_si512(p.add(16 * q).cast()) };
            m |= (_mm512_cmplt_epi32_mask(v, z) as u64) << (16 * q);
        }
        // SAFETY: out [8i, 8i + 8).
        unsafe { out.as_mut_ptr().add(8 * i).cast::<u64>().write_unaligned(m) };
    }
    signs_row_scalar(&x[64 * blocks..], &mut out[8 * blocks..]);
}

/// # Safety
/// An entry of [`AVX512`]: see [`Kernels`] (`out.len() == x.len().div_ceil(8)`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn signs16_avx512(x: &[u16], out: &mut [u8]) {
    let blocks = x.len() / 64;
    for i in 0..blocks {
        // SAFETY: words [64i, 64i + 32) and [64i + 32, 64i + 64) of x.
        let (a, b) = unsafe {
            let p = x.as_ptr().add(64 * i);
            (_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(32).cast()))
        };
        let m = _mm512_movepi16_mask(a) as u64 | (_mm512_movepi16_mask(b) as u64) << 32;
        // SAFETY: out [8i, 8i + 8).
        unsafe { out.as_mut_ptr().add(8 * i).cast::<u64>().write_unaligned(m) };
    }
    signs_row_scalar(&x[64 * blocks..], &mut out[8 * blocks..]);
}

/// # Safety
/// An entry of [`AVX512`]: see [`Kernels`] (`out.len() == x.len().div_ceil(8)`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn signs64_avx512(x: &[u64], out: &mut [u8]) {
    let blocks = x.len() / 64;
    let z = _mm512_setzero_si512();
    for i in 0..blocks {
        // SAFETY: the block's first word, inside x.
        let p = unsafe { x.as_ptr().add(64 * i) };
        let mut m = 0u64;
        for q in 0..8 {
            // SAFETY: words [64i + 8q, 64i + 8q + 8) of the block.
            let v = unsafe { _mm512_loadu_si512(p.add(8 * q).cast()) };
            m |= (_mm512_cmplt_epi64_mask(v, z) as u64) << (8 * q);
        }
        // SAFETY: out [8i, 8i + 8).
        unsafe { out.as_mut_ptr().add(8 * i).cast::<u64>().write_unaligned(m) };
    }
    signs_row_scalar(&x[64 * blocks..], &mut out[8 * blocks..]);
}

/// # Safety
/// An entry of [`AVX512`]: see [`Kernels`] (`packed.len() == out.len().div_ceil(8)`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn unsigns32_avx512(packed: &[u8], pos: u32, neg: u32, out: &mut [u32]) {
    let blocks = out.len() / 16;
    let (pv, nv) = (_mm512_set1_epi32(pos as i32), _mm512_set1_epi32(neg as i32));
    for i in 0..blocks {
        // SAFETY: packed [2i, 2i + 2).
        let m = unsafe { packed.as_ptr().add(2 * i).cast::<u16>().read_unaligned() };
        // SAFETY: out words [16i, 16i + 16).
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(16 * i).cast(), _mm512_mask_blend_epi32(m, pv, nv)) };
    }
    unsigns_row_scalar(&packed[2 * blocks..], pos, neg, &mut out[16 * blocks..]);
}

/// # Safety
/// An entry of [`AVX512`]: see [`Kernels`] (`packed.len() == out.len().div_ceil(8)`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn unsigns16_avx512(packed: &[u8], pos: u16, neg: u16, out: &mut [u16]) {
    let blocks = out.len() / 32;
    let (pv, nv) = (_mm512_set1_epi16(pos as i16), _mm512_set1_epi16(neg as i16));
    for i in 0..blocks {
        // SAFETY: packed [4i, 4i + 4).
        let m = unsafe { packed.as_ptr().add(4 * i).cast::<u32>().read_unaligned() };
        // SAFETY: out words [32i, 32i + 32).
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(32 * i).cast(), _mm512_mask_blend_epi16(m, pv, nv)) };
    }
    unsigns_row_scalar(&packed[4 * blocks..], pos, neg, &mut out[32 * blocks..]);
}

/// # Safety
/// An entry of [`AVX512`]: see [`Kernels`] (`packed.len() == out.len().div_ceil(8)`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn unsigns64_avx512(packed: &[u8], pos: u64, neg: u64, out: &mut [u64]) {
    let blocks = out.len() / 8;
    let (pv, nv) = (_mm512_set1_epi64(pos as i64), _mm512_set1_epi64(neg as i64));
    for i in 0..blocks {
        // SAFETY: byte i of packed, i < out.len() / 8 <= packed.len().
        let m = unsafe { *packed.get_unchecked(i) };
        // SAFETY: out words [8i, 8i + 8).
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(8 * i).cast(), _mm512_mask_blend_epi64(m, pv, nv)) };
    }
    unsigns_row_scalar(&packed[blocks..], pos, neg, &mut out[8 * blocks..]);
}

// -------------------------------------------------------------------- AVX2

/// OR of all bytes of `v`.
#[target_feature(enable = "avx2")]
fn or_bytes256(v: __m256i) -> u8 {
    let x = (_mm256_extract_epi64::<0>(v) | _mm256_extract_epi64::<1>(v))
        | (_mm256_extract_epi64::<2>(v) | _mm256_extract_epi64::<3>(v));
    let x = x as u64;
    let x = x | (x >> 32);
    let x = x | (x >> 16);
    (x | (x >> 8)) as u8
}

/// 32 bytes of a local table as a vector.
#[target_feature(enable = "avx2")]
fn vec256(t: &[u8; 32]) -> __m256i {
    // SAFETY: reads the 32 bytes of `t` (an unaligned load).
    unsafe { _mm256_loadu_si256(t.as_ptr().cast()) }
}

/// 16 bytes of a local table as a vector.
#[target_feature(enable = "avx2")]
fn vec128(t: &[u8; 16]) -> __m128i {
    // SAFETY: reads the 16 bytes of `t` (an unaligned load).
    unsafe { _mm_loadu_si128(t.as_ptr().cast()) }
}

/// # Safety
/// An entry of [`AVX2`]: see [`Kernels`] (`out.len() == packed_len(codes.len(), bits)`).
#[target_feature(enable = "avx2,bmi2")]
unsafe fn pack_row_avx2(codes: &[u8], bits: u32, out: &mut [u8]) -> u8 {
    let b = bits as usize;
    let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
    // As in AVX-512, with blocks of 32 codes: block i reads codes [32i, 32i + 32) and
    // writes out [4bi, 4bi + 4b), inside both slices for i < codes.len() / 32.
    let mut orv = _mm256_setzero_si256();
    let blocks = match b {
        8 => {
            let blocks = codes.len() / 32;
            for i in 0..blocks {
                // SAFETY: codes [32i, 32i + 32), see above.
                let v = unsafe { _mm256_loadu_si256(src.add(32 * i).cast()) };
                orv = _mm256_or_si256(orv, v);
                // SAFETY: out [32i, 32i + 32) (b = 8).
                unsafe { _mm256_storeu_si256(dst.add(32 * i).cast(), v) };
            }
            blocks
        }
        1 => {
            let blocks = codes.len() / 32;
            for i in 0..blocks {
                // SAFETY: codes [32i, 32i + 32).
                let v = unsafe { _mm256_loadu_si256(src.add(32 * i).cast()) };
                orv = _mm256_or_si256(orv, v);
                let m = _mm256_movemask_epi8(_mm256_slli_epi16::<7>(v)) as u32;
                // SAFETY: out [4i, 4i + 4) (b = 1).
                unsafe { dst.add(4 * i).cast::<u32>().write_unaligned(m) };
            }
            blocks
        }
        _ => {
            // As in AVX-512, then each 128-bit lane compacts its 2 qwords to
            // 2b bytes and is stored with a 16-byte store; the second store
            // overlaps the first's garbage, so keep 16 bytes of room.
            let (k1, k2, k4) =
                (_mm_cvtsi32_si128(b as i32), _mm_cvtsi32_si128(2 * b as i32), _mm_cvtsi32_si128(4 * b as i32));
            let (m8, m16, m32) = (_mm256_set1_epi16(0xFF), _mm256_set1_epi32(0xFFFF), _mm256_set1_epi64x(0xFFFF_FFFF));
            let mut idx = [0x80u8; 32];
            for t in 0..2 * b {
                idx[t] = (8 * (t / b) + t % b) as u8;
                idx[16 + t] = idx[t];
            }
            let idx = vec256(&idx);
            let mut i = 0;
            while 32 * (i + 1) <= codes.len() && 4 * b * i + 2 * b + 16 <= out.len() {
                // SAFETY: codes [32i, 32i + 32) (the loop condition).
                let v = unsafe { _mm256_loadu_si256(src.add(32 * i).cast()) };
                orv = _mm256_or_si256(orv, v);
                let x = _mm256_or_si256(_mm256_and_si256(v, m8), _mm256_sll_epi16(_mm256_srli_epi16::<8>(v), k1));
                let x = _mm256_or_si256(_mm256_and_si256(x, m16), _mm256_sll_epi32(_mm256_srli_epi32::<16>(x), k2));
                let x = _mm256_or_si256(_mm256_and_si256(x, m32), _mm256_sll_epi64(_mm256_srli_epi64::<32>(x), k4));
                let x = _mm256_shuffle_epi8(x, idx);
                // SAFETY: out [4bi, 4bi + 2b + 16), inside out by the loop condition.
                unsafe {
                    let d = dst.add(4 * b * i);
                    _mm_storeu_si128(d.cast(), _mm256_castsi256_si128(x));
                    _mm_storeu_si128(d.add(2 * b).cast(), _mm256_extracti128_si256::<1>(x));
                }
                i += 1;
            }
            i
        }
    };
    let done = blocks * 32;
    or_bytes256(orv) | pack_row_scalar(&codes[done..], bits, &mut out[done * b / 8..])
}

/// Outputs at least this large are written with non-temporal stores: they do
/// not fit in cache anyway, and streaming stores skip reading each destination
/// line before overwriting it (unpacking writes 2-8x what it reads).
const STREAM_BYTES: usize = 4 << 20;

/// # Safety
/// An entry of [`AVX2`]: see [`Kernels`] (`packed.len() == packed_len(out.len(), bits)`).
#[target_feature(enable = "avx2,bmi2")]
unsafe fn unpack_row_avx2(packed: &[u8], bits: u32, out: &mut [u8]) {
    let b = bits as usize;
    let dst = out.as_ptr() as usize;
    // A scalar head brings the output to 32-byte alignment; it must end on a
    // whole input byte (numpy's 16-byte aligned buffers always do).
    let head = (32 - dst % 32) % 32;
    if b <= 4 && out.len() >= STREAM_BYTES && (head * b).is_multiple_of(8) {
        let (hp, rp) = packed.split_at(head * b / 8);
        let (ho, ro) = out.split_at_mut(head);
        unpack_row_scalar(hp, bits, ho);
        // SAFETY: the split is at a whole input byte, so rp.len() = packed_len(ro.len(), b);
        // ro starts 32-byte aligned (head was chosen so), as NT = true requires.
        unsafe { unpack_row_avx2_impl::<true>(rp, bits, ro) };
        _mm_sfence(); // order the streaming stores before anything that follows
    } else {
        // SAFETY: this function's contract.
        unsafe { unpack_row_avx2_impl::<false>(packed, bits, out) };
    }
}

/// 32-byte store; `NT`: non-temporal.
///
/// # Safety
/// AVX2 is available; `p` is valid for 32 bytes of writes, and 32-byte aligned if `NT`.
#[inline(always)]
unsafe fn put<const NT: bool>(p: *mut u8, v: __m256i) {
    // SAFETY: this function's contract.
    unsafe {
        if NT {
            _mm256_stream_si256(p.cast(), v)
        } else {
            _mm256_storeu_si256(p.cast(), v)
        }
    }
}

/// # Safety
/// `packed.len() == packed_len(out.len(), bits)` for `bits` in 1..=8, and if `NT`,
/// `out` starts at a 32-byte boundary.
#[target_feature(enable = "avx2,bmi2")]
unsafe fn unpack_row_avx2_impl<const NT: bool>(packed: &[u8], bits: u32, out: &mut [u8]) {
    let b = bits as usize;
    let (src, dst) = (packed.as_ptr(), out.as_mut_ptr());
    // Each arm writes out [32i, 32i + 32) per 32 codes for 32i + 32 <= out.len(), and
    // reads the packed bytes of those codes, [4bi, 4bi + 4b), inside packed since
    // packed.len() = ceil(out.len() * b / 8). Stores at dst + 32k stay 32-byte aligned.
    let blocks = match b {
        8 => {
            let blocks = out.len() / 32;
            for i in 0..blocks {
                // SAFETY: packed and out [32i, 32i + 32), see above.
                unsafe { _mm256_storeu_si256(dst.add(32 * i).cast(), _mm256_loadu_si256(src.add(32 * i).cast())) };
            }
            blocks
        }
        1 => {
            let blocks = out.len() / 32;
            let rep = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
            );
            let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let one = _mm256_set1_epi8(1);
            for i in 0..blocks {
                // SAFETY: packed [4i, 4i + 4).
                let m = unsafe { src.add(4 * i).cast::<u32>().read_unaligned() };
                let v = _mm256_shuffle_epi8(_mm256_set1_epi32(m as i32), rep);
                let v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
                // SAFETY: out [32i, 32i + 32); see above for NT.
                unsafe { put::<NT>(dst.add(32 * i), _mm256_and_si256(v, one)) };
            }
            blocks
        }
        4 => {
            // Split nibbles, interleave them back in code order; the in-lane
            // unpacks leave 128-bit halves swapped, which the permutes fix.
            let m = _mm256_set1_epi8(0x0F);
            let blocks = out.len() / 64;
            for i in 0..blocks {
                // SAFETY: packed [32i, 32i + 32): the bytes of codes [64i, 64i + 64).
                let v = unsafe { _mm256_loadu_si256(src.add(32 * i).cast()) };
                let lo = _mm256_and_si256(v, m);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m);
                let a = _mm256_unpacklo_epi8(lo, hi);
                let b = _mm256_unpackhi_epi8(lo, hi);
                // SAFETY: out [64i, 64i + 64).
                unsafe {
                    put::<NT>(dst.add(64 * i), _mm256_permute2x128_si256::<0x20>(a, b));
                    put::<NT>(dst.add(64 * i + 32), _mm256_permute2x128_si256::<0x31>(a, b));
                }
            }
            2 * blocks
        }
        2 => {
            // Four 2-bit fields per byte, interleaved in two levels (bytes, then
            // 16-bit pairs) back into code order.
            let m = _mm256_set1_epi8(3);
            let blocks = out.len() / 128;
            for i in 0..blocks {
                // SAFETY: packed [32i, 32i + 32): the bytes of codes [128i, 128i + 128).
                let v = unsafe { _mm256_loadu_si256(src.add(32 * i).cast()) };
                let f0 = _mm256_and_si256(v, m);
                let f1 = _mm256_and_si256(_mm256_srli_epi16::<2>(v), m);
                let f2 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m);
                let f3 = _mm256_and_si256(_mm256_srli_epi16::<6>(v), m);
                let (a, b) = (_mm256_unpacklo_epi8(f0, f1), _mm256_unpacklo_epi8(f2, f3));
                let (c, d) = (_mm256_unpackhi_epi8(f0, f1), _mm256_unpackhi_epi8(f2, f3));
                let q0 = _mm256_unpacklo_epi16(a, b);
                let q1 = _mm256_unpackhi_epi16(a, b);
                let q2 = _mm256_unpacklo_epi16(c, d);
                let q3 = _mm256_unpackhi_epi16(c, d);
                // SAFETY: out [128i, 128i + 128).
                unsafe {
                    let o = dst.add(128 * i);
                    put::<NT>(o, _mm256_permute2x128_si256::<0x20>(q0, q1));
                    put::<NT>(o.add(32), _mm256_permute2x128_si256::<0x20>(q2, q3));
                    put::<NT>(o.add(64), _mm256_permute2x128_si256::<0x31>(q0, q1));
                    put::<NT>(o.add(96), _mm256_permute2x128_si256::<0x31>(q2, q3));
                }
            }
            4 * blocks
        }
        _ => {
            // Each u16 lane j gets the two source bytes holding code j; a
            // multiply by 2^(8-offset) moves the code to bits 8.., then >> 8.
            let mut idx = [0u8; 16];
            let mut mul = [0u8; 16];
            for j in 0..8 {
                idx[2 * j] = (j * b / 8) as u8;
                idx[2 * j + 1] = (j * b / 8 + 1) as u8;
                mul[2 * j..2 * j + 2].copy_from_slice(&(1u16 << (8 - (j * b) % 8)).to_le_bytes());
            }
            let idx = _mm256_broadcastsi128_si256(vec128(&idx));
            let mul = _mm256_broadcastsi128_si256(vec128(&mul));
            let vmask = _mm256_set1_epi16(((1u32 << b) - 1) as i16);
            let mut i = 0;
            // The 16-byte loads read packed [4bi, 4bi + 3b + 16): the loop condition.
            while 32 * (i + 1) <= out.len() && 4 * b * i + 3 * b + 16 <= packed.len() {
                // SAFETY: four 16-byte loads at 4bi + {0, b, 2b, 3b}, see above.
                let (r0, r1) = unsafe {
                    let s = src.add(4 * b * i);
                    (
                        _mm256_loadu2_m128i(s.add(b).cast(), s.cast()),
                        _mm256_loadu2_m128i(s.add(3 * b).cast(), s.add(2 * b).cast()),
                    )
                };
                let x0 = _mm256_mullo_epi16(_mm256_shuffle_epi8(r0, idx), mul);
                let x1 = _mm256_mullo_epi16(_mm256_shuffle_epi8(r1, idx), mul);
                let f0 = _mm256_and_si256(_mm256_srli_epi16::<8>(x0), vmask);
                let f1 = _mm256_and_si256(_mm256_srli_epi16::<8>(x1), vmask);
                let x = _mm256_permute4x64_epi64::<0xD8>(_mm256_packus_epi16(f0, f1));
                // SAFETY: out [32i, 32i + 32) (the loop condition).
                unsafe { _mm256_storeu_si256(dst.add(32 * i).cast(), x) };
                i += 1;
            }
            i
        }
    };
    let done = blocks * 32;
    unpack_row_scalar(&packed[done * b / 8..], bits, &mut out[done..]);
}

/// # Safety
/// An entry of [`AVX2`]: see [`Kernels`] (`out.len() == x.len().div_ceil(8)`).
#[target_feature(enable = "avx2,bmi2")]
unsafe fn signs32_avx2(x: &[u32], out: &mut [u8]) {
    let blocks = x.len() / 32;
    for i in 0..blocks {
        // SAFETY: the block's first word, inside x.
        let p = unsafe { x.as_ptr().add(32 * i) };
        let mut m = 0u32;
        for q in 0..4 {
            // SAFETY: words [32i + 8q, 32i + 8q + 8) of the block.
            let v = unsafe { _mm256_loadu_si256(p.add(8 * q).cast()) };
            m |= (_mm256_movemask_ps(_mm256_castsi256_ps(v)) as u32) << (8 * q);
        }
        // SAFETY: out [4i, 4i + 4).
        unsafe { out.as_mut_ptr().add(4 * i).cast::<u32>().write_unaligned(m) };
    }
    signs_row_scalar(&x[32 * blocks..], &mut out[4 * blocks..]);
}

/// # Safety
/// An entry of [`AVX2`]: see [`Kernels`] (`out.len() == x.len().div_ceil(8)`).
#[target_feature(enable = "avx2,bmi2")]
unsafe fn signs16_avx2(x: &[u16], out: &mut [u8]) {
    let blocks = x.len() / 32;
    for i in 0..blocks {
        // SAFETY: words [32i, 32i + 16) and [32i + 16, 32i + 32) of x.
        let (a, b) = unsafe {
            let p = x.as_ptr().add(32 * i);
            (_mm256_loadu_si256(p.cast()), _mm256_loadu_si256(p.add(16).cast()))
        };
        // Saturating pack keeps the sign; the permute undoes its lane interleave.
        let v = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi16(a, b));
        // SAFETY: out [4i, 4i + 4).
        unsafe { out.as_mut_ptr().add(4 * i).cast::<u32>().write_unaligned(_mm256_movemask_epi8(v) as u32) };
    }
    signs_row_scalar(&x[32 * blocks..], &mut out[4 * blocks..]);
}

/// # Safety
/// An entry of [`AVX2`]: see [`Kernels`] (`out.len() == x.len().div_ceil(8)`).
#[target_feature(enable = "avx2,bmi2")]
unsafe fn signs64_avx2(x: &[u64], out: &mut [u8]) {
    let blocks = x.len() / 32;
    for i in 0..blocks {
        // SAFETY: the block's first word, inside x.
        let p = unsafe { x.as_ptr().add(32 * i) };
        let mut m = 0u32;
        for q in 0..8 {
            // SAFETY: words [32i + 4q, 32i + 4q + 4) of the block.
            let v = unsafe { _mm256_loadu_si256(p.add(4 * q).cast()) };
            m |= (_mm256_movemask_pd(_mm256_castsi256_pd(v)) as u32) << (4 * q);
        }
        // SAFETY: out [4i, 4i + 4).
        unsafe { out.as_mut_ptr().add(4 * i).cast::<u32>().write_unaligned(m) };
    }
    signs_row_scalar(&x[32 * blocks..], &mut out[4 * blocks..]);
}

/// # Safety
/// An entry of [`AVX2`]: see [`Kernels`] (`packed.len() == out.len().div_ceil(8)`).
#[target_feature(enable = "avx2,bmi2")]
unsafe fn unsigns32_avx2(packed: &[u8], pos: u32, neg: u32, out: &mut [u32]) {
    let blocks = out.len() / 8;
    let (pv, nv) = (_mm256_set1_epi32(pos as i32), _mm256_set1_epi32(neg as i32));
    let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for i in 0..blocks {
        // SAFETY: byte i of packed, i < out.len() / 8 <= packed.len().
        let v = _mm256_set1_epi32(unsafe { *packed.get_unchecked(i) } as i32);
        let m = _mm256_cmpeq_epi32(_mm256_and_si256(v, sel), sel);
        // SAFETY: out words [8i, 8i + 8), i < out.len() / 8.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(8 * i).cast(), _mm256_blendv_epi8(pv, nv, m)) };
    }
    unsigns_row_scalar(&packed[blocks..], pos, neg, &mut out[8 * blocks..]);
}

/// # Safety
/// An entry of [`AVX2`]: see [`Kernels`] (`packed.len() == out.len().div_ceil(8)`).
#[target_feature(enable = "avx2,bmi2")]
unsafe fn unsigns16_avx2(packed: &[u8], pos: u16, neg: u16, out: &mut [u16]) {
    let blocks = out.len() / 16;
    let (pv, nv) = (_mm256_set1_epi16(pos as i16), _mm256_set1_epi16(neg as i16));
    let sel = _mm256_setr_epi16(
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        512,
        1024,
        2048,
        4096,
        8192,
        16384,
        i16::MIN, // bit 15
    );
    for i in 0..blocks {
        // SAFETY: packed [2i, 2i + 2), i < out.len() / 16.
        let m = unsafe { packed.as_ptr().add(2 * i).cast::<u16>().read_unaligned() };
        let v = _mm256_set1_epi16(m as i16);
        let m = _mm256_cmpeq_epi16(_mm256_and_si256(v, sel), sel);
        // SAFETY: out words [16i, 16i + 16).
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(16 * i).cast(), _mm256_blendv_epi8(pv, nv, m)) };
    }
    unsigns_row_scalar(&packed[2 * blocks..], pos, neg, &mut out[16 * blocks..]);
}

/// # Safety
/// An entry of [`AVX2`]: see [`Kernels`] (`packed.len() == out.len().div_ceil(8)`).
#[target_feature(enable = "avx2,bmi2")]
unsafe fn unsigns64_avx2(packed: &[u8], pos: u64, neg: u64, out: &mut [u64]) {
    // 4 outputs per nibble: two vectors per packed byte.
    let blocks = out.len() / 8;
    let (pv, nv) = (_mm256_set1_epi64x(pos as i64), _mm256_set1_epi64x(neg as i64));
    let sel_lo = _mm256_setr_epi64x(1, 2, 4, 8);
    let sel_hi = _mm256_setr_epi64x(16, 32, 64, 128);
    for i in 0..blocks {
        // SAFETY: byte i of packed, i < out.len() / 8 <= packed.len().
        let v = _mm256_set1_epi64x(unsafe { *packed.get_unchecked(i) } as i64);
        let lo = _mm256_cmpeq_epi64(_mm256_and_si256(v, sel_lo), sel_lo);
        let hi = _mm256_cmpeq_epi64(_mm256_and_si256(v, sel_hi), sel_hi);
        // SAFETY: out words [8i, 8i + 8), i < out.len() / 8.
        unsafe {
            let o = out.as_mut_ptr().add(8 * i);
            _mm256_storeu_si256(o.cast(), _mm256_blendv_epi8(pv, nv, lo));
            _mm256_storeu_si256(o.add(4).cast(), _mm256_blendv_epi8(pv, nv, hi));
        }
    }
    unsigns_row_scalar(&packed[blocks..], pos, neg, &mut out[8 * blocks..]);
}
