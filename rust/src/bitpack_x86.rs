//! x86-64 kernels for `bitpack` (AVX-512 with VBMI, and AVX2). Each kernel
//! does whole 32/64-code blocks and hands the row's tail to the scalar kernel;
//! a tail always starts on a byte boundary because a block is a whole number
//! of bytes in both layouts. Callers guarantee exact slice sizes (see
//! `bitpack.rs`) and that `simd` detected the features.
use std::arch::x86_64::*;

use crate::bitpack::{pack_row_scalar, signs_row_scalar, unpack_row_scalar, unsigns_row_scalar, Kernels};

pub(crate) static AVX512: Kernels = Kernels {
    pack: pack_row_avx512,
    unpack: unpack_row_avx512,
    signs16: signs16_avx512,
    signs32: signs32_avx512,
    signs64: signs64_avx512,
    unsigns16: unsigns16_avx512,
    unsigns32: unsigns32_avx512,
    unsigns64: unsigns64_avx512,
};

pub(crate) static AVX2: Kernels = Kernels {
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

#[inline(always)]
unsafe fn ld512(p: *const u8) -> __m512i {
    _mm512_loadu_si512(p as *const _)
}
#[inline(always)]
unsafe fn st512(p: *mut u8, v: __m512i) {
    _mm512_storeu_si512(p as *mut _, v)
}
#[inline(always)]
unsafe fn or_bytes512(v: __m512i) -> u8 {
    let x = _mm512_reduce_or_epi64(v) as u64;
    let x = x | (x >> 32);
    let x = x | (x >> 16);
    (x | (x >> 8)) as u8
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

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn pack_row_avx512(codes: &[u8], bits: u32, out: &mut [u8]) -> u8 {
    let b = bits as usize;
    let blocks = codes.len() / 64;
    let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
    let mut orv = _mm512_setzero_si512();
    match b {
        8 => {
            for i in 0..blocks {
                let v = ld512(src.add(64 * i));
                orv = _mm512_or_si512(orv, v);
                st512(dst.add(64 * i), v);
            }
        }
        1 => {
            for i in 0..blocks {
                let v = ld512(src.add(64 * i));
                orv = _mm512_or_si512(orv, v);
                (dst.add(8 * i) as *mut u64).write_unaligned(_mm512_test_epi8_mask(v, v));
            }
        }
        _ => {
            // Merge neighbours in widening lanes (8->16->32->64 bits), so each
            // qword ends up with its 8 codes in the low b bytes; then compact.
            let (k1, k2, k4) =
                (_mm_cvtsi32_si128(b as i32), _mm_cvtsi32_si128(2 * b as i32), _mm_cvtsi32_si128(4 * b as i32));
            let (m8, m16, m32) = (_mm512_set1_epi16(0xFF), _mm512_set1_epi32(0xFFFF), _mm512_set1_epi64(0xFFFF_FFFF));
            let idx = ld512(pack_index(b).as_ptr());
            let smask: u64 = (1u64 << (8 * b)) - 1;
            for i in 0..blocks {
                let v = ld512(src.add(64 * i));
                orv = _mm512_or_si512(orv, v);
                let x = _mm512_or_si512(_mm512_and_si512(v, m8), _mm512_sll_epi16(_mm512_srli_epi16::<8>(v), k1));
                let x = _mm512_or_si512(_mm512_and_si512(x, m16), _mm512_sll_epi32(_mm512_srli_epi32::<16>(x), k2));
                let x = _mm512_or_si512(_mm512_and_si512(x, m32), _mm512_sll_epi64(_mm512_srli_epi64::<32>(x), k4));
                let x = _mm512_permutexvar_epi8(idx, x);
                _mm512_mask_storeu_epi8(dst.add(8 * b * i) as *mut i8, smask, x);
            }
        }
    }
    let done = blocks * 64;
    or_bytes512(orv) | pack_row_scalar(&codes[done..], bits, &mut out[done * b / 8..])
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn unpack_row_avx512(packed: &[u8], bits: u32, out: &mut [u8]) {
    let b = bits as usize;
    let blocks = out.len() / 64;
    let (src, dst) = (packed.as_ptr(), out.as_mut_ptr());
    match b {
        8 => {
            for i in 0..blocks {
                st512(dst.add(64 * i), ld512(src.add(64 * i)));
            }
        }
        1 => {
            for i in 0..blocks {
                let m = (src.add(8 * i) as *const u64).read_unaligned();
                st512(dst.add(64 * i), _mm512_maskz_set1_epi8(m, 1));
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
            let (spread, ctrl) = (ld512(spread.as_ptr()), ld512(ctrl.as_ptr()));
            let vmask = _mm512_set1_epi8(((1u32 << b) - 1) as i8);
            let lmask: u64 = (1u64 << (8 * b)) - 1;
            for i in 0..blocks {
                let s = _mm512_maskz_loadu_epi8(lmask, src.add(8 * b * i) as *const i8);
                let x = _mm512_multishift_epi64_epi8(ctrl, _mm512_permutexvar_epi8(spread, s));
                st512(dst.add(64 * i), _mm512_and_si512(x, vmask));
            }
        }
    }
    let done = blocks * 64;
    unpack_row_scalar(&packed[done * b / 8..], bits, &mut out[done..]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn signs32_avx512(x: &[u32], out: &mut [u8]) {
    let blocks = x.len() / 64;
    let z = _mm512_setzero_si512();
    for i in 0..blocks {
        let p = x.as_ptr().add(64 * i) as *const u8;
        let mut m = 0u64;
        for q in 0..4 {
            m |= (_mm512_cmplt_epi32_mask(ld512(p.add(64 * q)), z) as u64) << (16 * q);
        }
        (out.as_mut_ptr().add(8 * i) as *mut u64).write_unaligned(m);
    }
    signs_row_scalar(&x[64 * blocks..], &mut out[8 * blocks..]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn signs16_avx512(x: &[u16], out: &mut [u8]) {
    let blocks = x.len() / 64;
    for i in 0..blocks {
        let p = x.as_ptr().add(64 * i) as *const u8;
        let m = _mm512_movepi16_mask(ld512(p)) as u64 | (_mm512_movepi16_mask(ld512(p.add(64))) as u64) << 32;
        (out.as_mut_ptr().add(8 * i) as *mut u64).write_unaligned(m);
    }
    signs_row_scalar(&x[64 * blocks..], &mut out[8 * blocks..]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn signs64_avx512(x: &[u64], out: &mut [u8]) {
    let blocks = x.len() / 64;
    let z = _mm512_setzero_si512();
    for i in 0..blocks {
        let p = x.as_ptr().add(64 * i) as *const u8;
        let mut m = 0u64;
        for q in 0..8 {
            m |= (_mm512_cmplt_epi64_mask(ld512(p.add(64 * q)), z) as u64) << (8 * q);
        }
        (out.as_mut_ptr().add(8 * i) as *mut u64).write_unaligned(m);
    }
    signs_row_scalar(&x[64 * blocks..], &mut out[8 * blocks..]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn unsigns32_avx512(packed: &[u8], pos: u32, neg: u32, out: &mut [u32]) {
    let blocks = out.len() / 16;
    let (pv, nv) = (_mm512_set1_epi32(pos as i32), _mm512_set1_epi32(neg as i32));
    for i in 0..blocks {
        let m = (packed.as_ptr().add(2 * i) as *const u16).read_unaligned();
        st512(out.as_mut_ptr().add(16 * i) as *mut u8, _mm512_mask_blend_epi32(m, pv, nv));
    }
    unsigns_row_scalar(&packed[2 * blocks..], pos, neg, &mut out[16 * blocks..]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn unsigns16_avx512(packed: &[u8], pos: u16, neg: u16, out: &mut [u16]) {
    let blocks = out.len() / 32;
    let (pv, nv) = (_mm512_set1_epi16(pos as i16), _mm512_set1_epi16(neg as i16));
    for i in 0..blocks {
        let m = (packed.as_ptr().add(4 * i) as *const u32).read_unaligned();
        st512(out.as_mut_ptr().add(32 * i) as *mut u8, _mm512_mask_blend_epi16(m, pv, nv));
    }
    unsigns_row_scalar(&packed[4 * blocks..], pos, neg, &mut out[32 * blocks..]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,bmi2")]
unsafe fn unsigns64_avx512(packed: &[u8], pos: u64, neg: u64, out: &mut [u64]) {
    let blocks = out.len() / 8;
    let (pv, nv) = (_mm512_set1_epi64(pos as i64), _mm512_set1_epi64(neg as i64));
    for i in 0..blocks {
        let m = *packed.get_unchecked(i);
        st512(out.as_mut_ptr().add(8 * i) as *mut u8, _mm512_mask_blend_epi64(m, pv, nv));
    }
    unsigns_row_scalar(&packed[blocks..], pos, neg, &mut out[8 * blocks..]);
}

// -------------------------------------------------------------------- AVX2

#[inline(always)]
unsafe fn ld256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}
#[inline(always)]
unsafe fn st256(p: *mut u8, v: __m256i) {
    _mm256_storeu_si256(p as *mut __m256i, v)
}
#[inline(always)]
unsafe fn or_bytes256(v: __m256i) -> u8 {
    let mut a = [0u64; 4];
    st256(a.as_mut_ptr() as *mut u8, v);
    let x = a[0] | a[1] | a[2] | a[3];
    let x = x | (x >> 32);
    let x = x | (x >> 16);
    (x | (x >> 8)) as u8
}

#[target_feature(enable = "avx2,bmi2")]
unsafe fn pack_row_avx2(codes: &[u8], bits: u32, out: &mut [u8]) -> u8 {
    let b = bits as usize;
    let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
    let mut orv = _mm256_setzero_si256();
    let blocks = match b {
        8 => {
            let blocks = codes.len() / 32;
            for i in 0..blocks {
                let v = ld256(src.add(32 * i));
                orv = _mm256_or_si256(orv, v);
                st256(dst.add(32 * i), v);
            }
            blocks
        }
        1 => {
            let blocks = codes.len() / 32;
            for i in 0..blocks {
                let v = ld256(src.add(32 * i));
                orv = _mm256_or_si256(orv, v);
                let m = _mm256_movemask_epi8(_mm256_slli_epi16::<7>(v)) as u32;
                (dst.add(4 * i) as *mut u32).write_unaligned(m);
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
            let idx = ld256(idx.as_ptr());
            let mut i = 0;
            while 32 * (i + 1) <= codes.len() && 4 * b * i + 2 * b + 16 <= out.len() {
                let v = ld256(src.add(32 * i));
                orv = _mm256_or_si256(orv, v);
                let x = _mm256_or_si256(_mm256_and_si256(v, m8), _mm256_sll_epi16(_mm256_srli_epi16::<8>(v), k1));
                let x = _mm256_or_si256(_mm256_and_si256(x, m16), _mm256_sll_epi32(_mm256_srli_epi32::<16>(x), k2));
                let x = _mm256_or_si256(_mm256_and_si256(x, m32), _mm256_sll_epi64(_mm256_srli_epi64::<32>(x), k4));
                let x = _mm256_shuffle_epi8(x, idx);
                let d = dst.add(4 * b * i);
                _mm_storeu_si128(d as *mut __m128i, _mm256_castsi256_si128(x));
                _mm_storeu_si128(d.add(2 * b) as *mut __m128i, _mm256_extracti128_si256::<1>(x));
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
        unpack_row_avx2_impl::<true>(rp, bits, ro);
        _mm_sfence(); // order the streaming stores before anything that follows
    } else {
        unpack_row_avx2_impl::<false>(packed, bits, out);
    }
}

/// 32-byte store; `NT`: non-temporal (the address is then 32-byte aligned).
#[inline(always)]
unsafe fn put<const NT: bool>(p: *mut u8, v: __m256i) {
    if NT {
        _mm256_stream_si256(p as *mut __m256i, v)
    } else {
        st256(p, v)
    }
}

#[target_feature(enable = "avx2,bmi2")]
unsafe fn unpack_row_avx2_impl<const NT: bool>(packed: &[u8], bits: u32, out: &mut [u8]) {
    let b = bits as usize;
    let (src, dst) = (packed.as_ptr(), out.as_mut_ptr());
    let blocks = match b {
        8 => {
            let blocks = out.len() / 32;
            for i in 0..blocks {
                st256(dst.add(32 * i), ld256(src.add(32 * i)));
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
                let m = (src.add(4 * i) as *const u32).read_unaligned();
                let v = _mm256_shuffle_epi8(_mm256_set1_epi32(m as i32), rep);
                let v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
                put::<NT>(dst.add(32 * i), _mm256_and_si256(v, one));
            }
            blocks
        }
        4 => {
            // Split nibbles, interleave them back in code order; the in-lane
            // unpacks leave 128-bit halves swapped, which the permutes fix.
            let m = _mm256_set1_epi8(0x0F);
            let blocks = out.len() / 64;
            for i in 0..blocks {
                let v = ld256(src.add(32 * i));
                let lo = _mm256_and_si256(v, m);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m);
                let a = _mm256_unpacklo_epi8(lo, hi);
                let b = _mm256_unpackhi_epi8(lo, hi);
                put::<NT>(dst.add(64 * i), _mm256_permute2x128_si256::<0x20>(a, b));
                put::<NT>(dst.add(64 * i + 32), _mm256_permute2x128_si256::<0x31>(a, b));
            }
            2 * blocks
        }
        2 => {
            // Four 2-bit fields per byte, interleaved in two levels (bytes, then
            // 16-bit pairs) back into code order.
            let m = _mm256_set1_epi8(3);
            let blocks = out.len() / 128;
            for i in 0..blocks {
                let v = ld256(src.add(32 * i));
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
                let o = dst.add(128 * i);
                put::<NT>(o, _mm256_permute2x128_si256::<0x20>(q0, q1));
                put::<NT>(o.add(32), _mm256_permute2x128_si256::<0x20>(q2, q3));
                put::<NT>(o.add(64), _mm256_permute2x128_si256::<0x31>(q0, q1));
                put::<NT>(o.add(96), _mm256_permute2x128_si256::<0x31>(q2, q3));
            }
            4 * blocks
        }
        _ => {
            // Each u16 lane j gets the two source bytes holding code j; a
            // multiply by 2^(8-offset) moves the code to bits 8.., then >> 8.
            let mut idx = [0u8; 16];
            let mut mul = [0u16; 8];
            for j in 0..8 {
                idx[2 * j] = (j * b / 8) as u8;
                idx[2 * j + 1] = (j * b / 8 + 1) as u8;
                mul[j] = 1 << (8 - (j * b) % 8);
            }
            let idx = _mm256_broadcastsi128_si256(_mm_loadu_si128(idx.as_ptr() as *const __m128i));
            let mul = _mm256_broadcastsi128_si256(_mm_loadu_si128(mul.as_ptr() as *const __m128i));
            let vmask = _mm256_set1_epi16(((1u32 << b) - 1) as i16);
            let lane = |p: *const u8| _mm_loadu_si128(p as *const __m128i);
            let mut i = 0;
            while 32 * (i + 1) <= out.len() && 4 * b * i + 3 * b + 16 <= packed.len() {
                let s = src.add(4 * b * i);
                let r0 = _mm256_set_m128i(lane(s.add(b)), lane(s));
                let r1 = _mm256_set_m128i(lane(s.add(3 * b)), lane(s.add(2 * b)));
                let f = |r: __m256i| {
                    let x = _mm256_mullo_epi16(_mm256_shuffle_epi8(r, idx), mul);
                    _mm256_and_si256(_mm256_srli_epi16::<8>(x), vmask)
                };
                let x = _mm256_permute4x64_epi64::<0xD8>(_mm256_packus_epi16(f(r0), f(r1)));
                st256(dst.add(32 * i), x);
                i += 1;
            }
            i
        }
    };
    let done = blocks * 32;
    unpack_row_scalar(&packed[done * b / 8..], bits, &mut out[done..]);
}

#[target_feature(enable = "avx2,bmi2")]
unsafe fn signs32_avx2(x: &[u32], out: &mut [u8]) {
    let blocks = x.len() / 32;
    for i in 0..blocks {
        let p = x.as_ptr().add(32 * i) as *const u8;
        let mut m = 0u32;
        for q in 0..4 {
            m |= (_mm256_movemask_ps(_mm256_castsi256_ps(ld256(p.add(32 * q)))) as u32) << (8 * q);
        }
        (out.as_mut_ptr().add(4 * i) as *mut u32).write_unaligned(m);
    }
    signs_row_scalar(&x[32 * blocks..], &mut out[4 * blocks..]);
}

#[target_feature(enable = "avx2,bmi2")]
unsafe fn signs16_avx2(x: &[u16], out: &mut [u8]) {
    let blocks = x.len() / 32;
    for i in 0..blocks {
        let p = x.as_ptr().add(32 * i) as *const u8;
        // Saturating pack keeps the sign; the permute undoes its lane interleave.
        let v = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi16(ld256(p), ld256(p.add(32))));
        (out.as_mut_ptr().add(4 * i) as *mut u32).write_unaligned(_mm256_movemask_epi8(v) as u32);
    }
    signs_row_scalar(&x[32 * blocks..], &mut out[4 * blocks..]);
}

#[target_feature(enable = "avx2,bmi2")]
unsafe fn signs64_avx2(x: &[u64], out: &mut [u8]) {
    let blocks = x.len() / 32;
    for i in 0..blocks {
        let p = x.as_ptr().add(32 * i) as *const u8;
        let mut m = 0u32;
        for q in 0..8 {
            m |= (_mm256_movemask_pd(_mm256_castsi256_pd(ld256(p.add(32 * q)))) as u32) << (4 * q);
        }
        (out.as_mut_ptr().add(4 * i) as *mut u32).write_unaligned(m);
    }
    signs_row_scalar(&x[32 * blocks..], &mut out[4 * blocks..]);
}

#[target_feature(enable = "avx2,bmi2")]
unsafe fn unsigns32_avx2(packed: &[u8], pos: u32, neg: u32, out: &mut [u32]) {
    let blocks = out.len() / 8;
    let (pv, nv) = (_mm256_set1_epi32(pos as i32), _mm256_set1_epi32(neg as i32));
    let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for i in 0..blocks {
        let v = _mm256_set1_epi32(*packed.get_unchecked(i) as i32);
        let m = _mm256_cmpeq_epi32(_mm256_and_si256(v, sel), sel);
        st256(out.as_mut_ptr().add(8 * i) as *mut u8, _mm256_blendv_epi8(pv, nv, m));
    }
    unsigns_row_scalar(&packed[blocks..], pos, neg, &mut out[8 * blocks..]);
}

#[target_feature(enable = "avx2,bmi2")]
unsafe fn unsigns16_avx2(packed: &[u8], pos: u16, neg: u16, out: &mut [u16]) {
    let blocks = out.len() / 16;
    let (pv, nv) = (_mm256_set1_epi16(pos as i16), _mm256_set1_epi16(neg as i16));
    let mut s = [0u16; 16];
    for (j, v) in s.iter_mut().enumerate() {
        *v = 1 << j;
    }
    let sel = ld256(s.as_ptr() as *const u8);
    for i in 0..blocks {
        let m = (packed.as_ptr().add(2 * i) as *const u16).read_unaligned();
        let v = _mm256_set1_epi16(m as i16);
        let m = _mm256_cmpeq_epi16(_mm256_and_si256(v, sel), sel);
        st256(out.as_mut_ptr().add(16 * i) as *mut u8, _mm256_blendv_epi8(pv, nv, m));
    }
    unsigns_row_scalar(&packed[2 * blocks..], pos, neg, &mut out[16 * blocks..]);
}

#[target_feature(enable = "avx2,bmi2")]
unsafe fn unsigns64_avx2(packed: &[u8], pos: u64, neg: u64, out: &mut [u64]) {
    // 4 outputs per nibble: two vectors per packed byte.
    let blocks = out.len() / 8;
    let (pv, nv) = (_mm256_set1_epi64x(pos as i64), _mm256_set1_epi64x(neg as i64));
    let sel_lo = _mm256_setr_epi64x(1, 2, 4, 8);
    let sel_hi = _mm256_setr_epi64x(16, 32, 64, 128);
    for i in 0..blocks {
        let v = _mm256_set1_epi64x(*packed.get_unchecked(i) as i64);
        let lo = _mm256_cmpeq_epi64(_mm256_and_si256(v, sel_lo), sel_lo);
        let hi = _mm256_cmpeq_epi64(_mm256_and_si256(v, sel_hi), sel_hi);
        let o = out.as_mut_ptr().add(8 * i) as *mut u8;
        st256(o, _mm256_blendv_epi8(pv, nv, lo));
        st256(o.add(32), _mm256_blendv_epi8(pv, nv, hi));
    }
    unsigns_row_scalar(&packed[blocks..], pos, neg, &mut out[8 * blocks..]);
}
