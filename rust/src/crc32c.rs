//! CRC-32C (Castagnoli), used as the checksum of every serialized blob.
//! The SSE4.2 `crc32` instruction on the AVX2 and AVX-512 levels (both imply
//! SSE4.2), slicing-by-8 tables on the scalar level; chosen through
//! `simd::level()` like every other kernel, so `PBCODEC_SIMD=scalar` runs the
//! portable code.
use crate::simd::{self, Level};

const POLY: u32 = 0x82F6_3B78;

const fn make_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

static TABLES: [[u32; 256]; 8] = make_tables();

fn update_table(mut crc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = TABLES[7][(lo & 0xFF) as usize]
            ^ TABLES[6][((lo >> 8) & 0xFF) as usize]
            ^ TABLES[5][((lo >> 16) & 0xFF) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][(hi & 0xFF) as usize]
            ^ TABLES[2][((hi >> 8) & 0xFF) as usize]
            ^ TABLES[1][((hi >> 16) & 0xFF) as usize]
            ^ TABLES[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ TABLES[0][((crc ^ b as u32) & 0xFF) as usize];
    }
    crc
}

/// Update the non-inverted CRC state `crc` with the `crc32` instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn update_sse42(mut crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c64 = crc as u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        c64 = _mm_crc32_u64(c64, u64::from_le_bytes(c.try_into().unwrap()));
    }
    crc = c64 as u32;
    for &b in chunks.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    crc
}

/// A CRC-32C kernel: the non-inverted state after `data`.
///
/// # Safety
/// Call only a kernel returned by [`table`]: it belongs to a level the CPU runs
/// (`simd::runnable`), so its target features are present. Any input is valid.
type Kernel = unsafe fn(u32, &[u8]) -> u32;

/// The CRC-32C kernel of `level`, lowered to a level this CPU runs.
fn table(level: Level) -> Kernel {
    match simd::runnable(level) {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 => update_sse42,
        _ => update_table,
    }
}

/// Continue a CRC-32C over `data` (pass the previous *finalized* value, 0 to start).
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    append_with(table(simd::level()), crc, data)
}

fn append_with(kernel: Kernel, crc: u32, data: &[u8]) -> u32 {
    // SAFETY: `kernel` comes from `table` (see `Kernel`).
    !unsafe { kernel(!crc, data) }
}

/// CRC-32C of `data` (check value: `crc32c(b"123456789") == 0xE306_9283`).
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_on_every_level() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(!update_table(!0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        for lvl in simd::available() {
            assert_eq!(append_with(table(lvl), 0, b"123456789"), 0xE306_9283, "{lvl:?}");
            assert_eq!(append_with(table(lvl), 0, b""), 0, "{lvl:?}");
        }
    }

    #[test]
    fn append_matches_whole_on_every_level() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = crc32c(&data);
        assert_eq!(!update_table(!0, &data), whole);
        for split in [0, 1, 7, 8, 9, 500, 999, 1000] {
            assert_eq!(crc32c_append(crc32c(&data[..split]), &data[split..]), whole);
        }
        for lvl in simd::available() {
            let k = table(lvl);
            assert_eq!(append_with(k, 0, &data), whole, "{lvl:?}");
            for split in [0, 1, 7, 8, 9, 500, 999, 1000] {
                assert_eq!(append_with(k, append_with(k, 0, &data[..split]), &data[split..]), whole, "{lvl:?} {split}");
            }
        }
    }
}
