//! float16 conversions (no f16 type on stable Rust). `f64_to_f16` rounds to
//! nearest-even directly from float64, like numpy's `np.float16(x)`.

/// `x` rounded to the nearest float16 (ties to even), as its bit pattern;
/// overflow gives ±inf, NaN stays NaN.
pub fn f64_to_f16(x: f64) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 48) & 0x8000) as u16;
    let exp = ((b >> 52) & 0x7FF) as i32;
    let man = b & ((1u64 << 52) - 1);
    if exp == 0x7FF {
        return if man == 0 { sign | 0x7C00 } else { sign | 0x7E00 | ((man >> 42) as u16 & 0x1FF) };
    }
    let e = exp - 1023 + 15;
    if e >= 0x1F {
        return sign | 0x7C00;
    }
    if e <= 0 {
        if e < -10 {
            return sign; // below half the smallest subnormal: rounds to zero
        }
        let m = man | (1u64 << 52);
        let shift = (43 - e) as u32; // value = m * 2^(e-43) in units of 2^-24
        let q = m >> shift;
        let rem = m & ((1u64 << shift) - 1);
        let half = 1u64 << (shift - 1);
        let q = if rem > half || (rem == half && q & 1 == 1) { q + 1 } else { q };
        return sign | q as u16; // q == 0x400 is the smallest normal: still correct
    }
    let q = ((e as u64) << 10) | (man >> 42);
    let rem = man & ((1u64 << 42) - 1);
    let half = 1u64 << 41;
    let q = if rem > half || (rem == half && q & 1 == 1) { q + 1 } else { q };
    sign | q as u16 // a carry into the exponent is the correct rounding (up to inf)
}

/// The float16 with bit pattern `h`, exactly, as a float32.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: exact in f32.
            return f32::from_bits(sign) + (if sign != 0 { -1.0 } else { 1.0 }) * (man as f32) * (2.0f32).powi(-24);
        }
    } else if exp == 0x1F {
        sign | 0x7F80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_half() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                continue;
            }
            assert_eq!(f64_to_f16(f as f64), h, "{h:#06x} {f}");
        }
    }

    #[test]
    fn rounding() {
        assert_eq!(f64_to_f16(1.0), 0x3C00);
        assert_eq!(f64_to_f16(65504.0), 0x7BFF);
        assert_eq!(f64_to_f16(65520.0), 0x7C00); // ties to even -> inf
        assert_eq!(f64_to_f16(65519.99), 0x7BFF);
        assert_eq!(f64_to_f16(2f64.powi(-25)), 0); // tie -> even (0)
        assert_eq!(f64_to_f16(2f64.powi(-25) * 1.0001), 1);
        assert_eq!(f64_to_f16(1.0 + 2f64.powi(-11)), 0x3C00); // tie -> even
        assert_eq!(f64_to_f16(1.0 + 3.0 * 2f64.powi(-11)), 0x3C02);
        assert_eq!(f64_to_f16(-0.0), 0x8000);
    }
}
