//! The escaped zero-run code (docs/format.md §3).
//!
//! Row `i` of a `rows x n` int8 array becomes codes (count of zeros before each
//! nonzero, with `ESC = 2^b - 1` meaning "skip ESC zeros, no value") and the
//! nonzero values. All rows' codes form one continuous bit stream; per-row
//! offsets into both streams let any row decode on its own.
use crate::error::{corrupt, invalid};
use crate::Result;

/// An encoded array: the two streams and the per-row offsets (`rows + 1` each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Bits per code `b` (1..8); the escape code is `2^b - 1`.
    pub count_bits: u32,
    /// Bits per stored value: 4 or 8.
    pub value_bits: u32,
    /// Packed code stream, `ceil(num_codes * count_bits / 8)` bytes.
    pub counts: Vec<u8>,
    /// 8-bit: the values as bytes; 4-bit: two's-complement nibbles, low first.
    pub values: Vec<u8>,
    /// `rows + 1` offsets of each row's first code (the last is `num_codes`).
    pub code_offsets: Vec<i64>,
    /// `rows + 1` offsets of each row's first value (the last is `num_values`).
    pub value_offsets: Vec<i64>,
}

/// Borrowed view of the streams, as the decoder and serializer see them.
#[derive(Debug, Clone, Copy)]
pub struct Streams<'a> {
    /// Bits per code (see [`Encoded::count_bits`]).
    pub count_bits: u32,
    /// Bits per value: 4 or 8.
    pub value_bits: u32,
    /// The packed code stream.
    pub counts: &'a [u8],
    /// The values stream.
    pub values: &'a [u8],
    /// `rows + 1` code offsets.
    pub code_offsets: &'a [i64],
}

impl Encoded {
    /// The streams as a borrowed view.
    pub fn streams(&self) -> Streams<'_> {
        Streams {
            count_bits: self.count_bits,
            value_bits: self.value_bits,
            counts: &self.counts,
            values: &self.values,
            code_offsets: &self.code_offsets,
        }
    }
    /// Codes in the stream (escapes included).
    pub fn num_codes(&self) -> u64 {
        *self.code_offsets.last().unwrap_or(&0) as u64
    }
    /// Stored (nonzero) values.
    pub fn num_values(&self) -> u64 {
        *self.value_offsets.last().unwrap_or(&0) as u64
    }
}

/// Check the stream parameters: `count_bits` in 1..8, `value_bits` 4 or 8
/// ([`Error::Invalid`](crate::Error::Invalid) otherwise).
pub fn check_params(count_bits: u32, value_bits: u32) -> Result<()> {
    if !(1..=8).contains(&count_bits) {
        return invalid(format!("count_bits must be in 1..8 or 'auto', got {count_bits}"));
    }
    if value_bits != 4 && value_bits != 8 {
        return invalid(format!("value_bits must be 4 or 8, got {value_bits}"));
    }
    Ok(())
}

/// Bytes of the values stream for `num_values` values.
pub fn values_len(num_values: u64, value_bits: u32) -> Option<u64> {
    if value_bits == 8 {
        Some(num_values)
    } else {
        Some(num_values.div_ceil(2))
    }
}

/// Bytes of the code stream.
pub fn counts_len(num_codes: u64, count_bits: u32) -> Option<u64> {
    num_codes.checked_mul(count_bits as u64).map(|b| b.div_ceil(8))
}

/// Bytes of the fixed part of the serialized header (docs/format.md §4).
pub(crate) const HEADER_LEN: usize = 16;

/// Bytes per entry of the serialized row index: 4 below 2^32 codes, else 8 (§4).
pub(crate) fn index_width(num_codes: u64) -> usize {
    if num_codes < (1u64 << 32) {
        4
    } else {
        8
    }
}

/// Exact length of the serialized form (docs/format.md §4, `format::rle_to_bytes`)
/// of an array with `ndim` dimensions and `rows` rows holding `num_codes` codes and
/// `num_values` values; None on overflow.
pub fn serialized_len(
    ndim: usize,
    rows: usize,
    num_codes: u64,
    num_values: u64,
    count_bits: u32,
    value_bits: u32,
) -> Option<u64> {
    let mut t = HEADER_LEN as u64;
    t = t.checked_add(8u64.checked_mul(ndim as u64)?)?;
    t = t.checked_add(16)?;
    t = t.checked_add((index_width(num_codes) as u64).checked_mul(rows as u64)?)?;
    t = t.checked_add(counts_len(num_codes, count_bits)?)?;
    t = t.checked_add(values_len(num_values, value_bits)?)?;
    t.checked_add(4)
}

// ------------------------------------------------------------------ encode

/// Positions of the nonzero bytes of `row`, in order (SWAR over 8-byte words:
/// at 1–20% density most words are skipped with one compare).
#[inline(always)]
fn for_each_nonzero(row: &[i8], mut f: impl FnMut(usize)) {
    const LO7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    let mut words = row.chunks_exact(8);
    let mut base = 0;
    for w in &mut words {
        let w: [i8; 8] = w.try_into().unwrap();
        let w = u64::from_le_bytes(w.map(|b| b as u8));
        if w != 0 {
            // High bit of each byte set iff the byte is nonzero.
            let mut nz = ((w & LO7).wrapping_add(LO7) | w) & !LO7;
            while nz != 0 {
                f(base + (nz.trailing_zeros() / 8) as usize);
                nz &= nz - 1;
            }
        }
        base += 8;
    }
    for (j, &b) in words.remainder().iter().enumerate() {
        if b != 0 {
            f(base + j);
        }
    }
}

/// Little-endian bit writer for the code stream.
struct BitWriter {
    buf: Vec<u8>,
    acc: u64,
    nacc: u32,
}

impl BitWriter {
    #[inline(always)]
    fn put(&mut self, v: u64, nbits: u32) {
        // nbits <= 32 and nacc < 32, so the shifted value fits in 64 bits.
        self.acc |= v << self.nacc;
        self.nacc += nbits;
        if self.nacc >= 32 {
            self.buf.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.nacc -= 32;
        }
    }
    /// `count` codes of all-ones (escapes) of `b` bits each.
    fn put_ones(&mut self, count: usize, b: u32) {
        let mut total = count as u64 * b as u64;
        while total >= 32 {
            self.put(0xFFFF_FFFF, 32);
            total -= 32;
        }
        if total > 0 {
            self.put((1u64 << total) - 1, total as u32);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        let nb = self.nacc.div_ceil(8) as usize;
        self.buf.extend_from_slice(&self.acc.to_le_bytes()[..nb]);
        self.buf
    }
}

/// Rows of an array shape: the product of all but the last axis (0 when one of
/// them is 0). ndim must be in 1..=32 and the product of the **nonzero**
/// dimensions below 2^63 (docs/format.md §4): every shape, empty ones included,
/// is then one a reader such as numpy can represent (an int8 array of it is
/// addressable), and rows and the element count fit in an i64.
pub fn rows_of(shape: &[usize]) -> Result<usize> {
    if shape.is_empty() || shape.len() > 32 {
        return invalid(format!("arrays must have 1..32 dimensions, got {}", shape.len()));
    }
    let too_big = || crate::Error::Invalid(format!("shape {shape:?} is too large (limit: 2**63 elements)"));
    nonzero_product(shape).filter(|&p| p < (1u64 << 63)).ok_or_else(too_big)?;
    let lead = &shape[..shape.len() - 1];
    // No overflow: without zeros, rows is at most the nonzero product.
    let rows = if lead.contains(&0) { 0 } else { nonzero_product(lead).unwrap_or(u64::MAX) };
    usize::try_from(rows).map_err(|_| too_big())
}

/// Product of the nonzero entries of `dims` (1 for none), or None on u64 overflow.
pub fn nonzero_product(dims: &[usize]) -> Option<u64> {
    dims.iter().filter(|&&d| d != 0).try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
}

/// Encode `x` (row-major, `shape`) with the given `count_bits` (None: auto).
///
/// One scan collects every nonzero's preceding run length; "auto" then picks
/// the width from the run-length histogram (no second scan of `x`), and the
/// codes are emitted from the runs.
pub fn encode(x: &[i8], shape: &[usize], count_bits: Option<u32>, value_bits: u32) -> Result<Encoded> {
    let rows = rows_of(shape)?;
    let n = *shape.last().unwrap();
    if x.len() != rows * n {
        return invalid(format!("values has {} elements, shape needs {}", x.len(), rows * n));
    }
    check_params(count_bits.unwrap_or(1), value_bits)?;
    if value_bits == 4 {
        if let Some((i, &v)) = x.iter().enumerate().find(|(_, &v)| !(-8..=7).contains(&v)) {
            return invalid(format!("value {v} at flat index {i} does not fit in 4 bits (-8..7)"));
        }
    }
    // Pass 1: runs (zeros before each nonzero), values, values per row.
    let mut runs: Vec<usize> = Vec::with_capacity(x.len() / 8 + 16);
    let mut vals: Vec<u8> = Vec::with_capacity(x.len() / 8 + 16);
    let mut value_offsets = Vec::with_capacity(rows + 1);
    value_offsets.push(0i64);
    // Runs >= 255 are rare; their exact code counts per width are summed here.
    let mut hist = [0u64; 255];
    let mut long_codes = [0u64; 8];
    for r in 0..rows {
        let row = &x[r * n..(r + 1) * n];
        let mut next = 0usize;
        for_each_nonzero(row, |p| {
            let run = p - next;
            runs.push(run);
            vals.push(row[p] as u8);
            if run < 255 {
                hist[run] += 1;
            } else {
                for (b, c) in long_codes.iter_mut().enumerate() {
                    *c += (run / ((1usize << (b + 1)) - 1)) as u64 + 1;
                }
            }
            next = p + 1;
        });
        value_offsets.push(vals.len() as i64);
    }
    let nvals = vals.len() as u64;
    let b = match count_bits {
        Some(b) => b,
        None => {
            // Exact total codes for every width, then the smallest serialized size.
            let mut best = (u64::MAX, 1u32);
            for b in 1..=8u32 {
                let esc = (1u64 << b) - 1;
                let mut codes = long_codes[b as usize - 1];
                for (run, &h) in hist.iter().enumerate() {
                    codes += h * (run as u64 / esc + 1);
                }
                let size = serialized_len(shape.len(), rows, codes, nvals, b, value_bits).unwrap_or(u64::MAX);
                if size < best.0 {
                    best = (size, b);
                }
            }
            best.1
        }
    };
    // Pass 2: codes from the runs.
    let esc = (1usize << b) - 1;
    let mut w = BitWriter { buf: Vec::with_capacity(runs.len() * b as usize / 8 + 16), acc: 0, nacc: 0 };
    let mut code_offsets = Vec::with_capacity(rows + 1);
    code_offsets.push(0i64);
    let mut ncodes = 0usize;
    let mut k = 0usize;
    for r in 0..rows {
        let end = value_offsets[r + 1] as usize;
        while k < end {
            let run = runs[k];
            let (q, rem) = if run < esc { (0, run) } else { (run / esc, run % esc) };
            if q > 0 {
                w.put_ones(q, b);
            }
            w.put(rem as u64, b);
            ncodes += q + 1;
            k += 1;
        }
        code_offsets.push(ncodes as i64);
    }
    let values = if value_bits == 8 {
        vals
    } else {
        // Two's-complement nibbles, low nibble first.
        vals.chunks(2).map(|c| (c[0] & 0xF) | (c.get(1).map_or(0, |v| v & 0xF) << 4)).collect()
    };
    Ok(Encoded { count_bits: b, value_bits, counts: w.finish(), values, code_offsets, value_offsets })
}

// ------------------------------------------------------------------ decode

/// Read up to 57 bits at any bit offset of `buf` (zero beyond its end).
#[inline(always)]
fn peek(buf: &[u8], bitpos: u64) -> u64 {
    let byte = (bitpos >> 3) as usize;
    let w = if byte + 8 <= buf.len() {
        u64::from_le_bytes(buf[byte..byte + 8].try_into().unwrap())
    } else {
        let mut t = [0u8; 8];
        let avail = buf.len().saturating_sub(byte);
        t[..avail].copy_from_slice(&buf[byte..byte + avail]);
        u64::from_le_bytes(t)
    };
    w >> (bitpos & 7)
}

/// Value `i` of a values stream (8-bit bytes or 4-bit two's-complement nibbles).
#[inline(always)]
pub(crate) fn value_at(values: &[u8], value_bits: u32, i: usize) -> i8 {
    if value_bits == 8 {
        values[i] as i8
    } else {
        // Sign-extend the nibble.
        (((values[i / 2] >> (4 * (i & 1))) << 4) as i8) >> 4
    }
}

/// What a row walk reports.
pub(crate) struct RowWalk {
    pub values: usize,
    last_code_is_escape: bool,
}

/// Walk row codes `[c0, c1)` of the stream; call `put(pos, value_index)` for
/// each value. Errors if a value lands at `pos >= n` or escapes pass `n`.
#[inline(always)]
pub(crate) fn walk_row(
    counts: &[u8],
    b: u32,
    c0: u64,
    c1: u64,
    n: usize,
    row: usize,
    mut put: impl FnMut(usize, usize),
) -> Result<RowWalk> {
    let esc = (1u64 << b) - 1;
    let per_peek = (57 / b) as u64;
    let mut pos = 0u64;
    let mut nv = 0usize;
    let mut c = c0;
    let mut last = 0u64;
    while c < c1 {
        let word = peek(counts, c * b as u64);
        let take = per_peek.min(c1 - c);
        for t in 0..take {
            let code = (word >> (t * b as u64)) & esc;
            last = code;
            if code == esc {
                pos += esc;
            } else {
                pos += code;
                if pos >= n as u64 {
                    return corrupt(format!("row {row}: a value decodes at position {pos}, past the row length {n}"));
                }
                put(pos as usize, nv);
                nv += 1;
                pos += 1;
            }
        }
        c += take;
    }
    if pos > n as u64 {
        return corrupt(format!("row {row}: escapes run to position {pos}, past the row length {n}"));
    }
    Ok(RowWalk { values: nv, last_code_is_escape: c1 > c0 && last == esc })
}

/// Check offsets against the streams (lengths, monotonicity) without decoding.
fn check_offsets(s: &Streams, rows: usize) -> Result<(u64, u64)> {
    if s.code_offsets.len() != rows + 1 {
        return corrupt(format!("code_offsets has {} entries, expected rows + 1 = {}", s.code_offsets.len(), rows + 1));
    }
    if s.code_offsets[0] != 0 {
        return corrupt("code_offsets must start at 0");
    }
    if s.code_offsets.windows(2).any(|w| w[1] < w[0]) {
        return corrupt("code_offsets must be non-decreasing");
    }
    let num_codes = s.code_offsets[rows] as u64;
    if counts_len(num_codes, s.count_bits) != Some(s.counts.len() as u64) {
        return corrupt(format!(
            "counts stream has {} bytes, {} codes of {} bits need {}",
            s.counts.len(),
            num_codes,
            s.count_bits,
            counts_len(num_codes, s.count_bits).unwrap_or(u64::MAX)
        ));
    }
    let cap = if s.value_bits == 8 { s.values.len() as u64 } else { s.values.len() as u64 * 2 };
    Ok((num_codes, cap))
}

/// Validate the streams of a `shape` array and return the value offsets.
/// `strict` also demands the canonical form of §3.3 (what `from_bytes` and
/// `to_bytes` require): no trailing escapes, no zero values, zero padding.
pub fn validate(s: &Streams, shape: &[usize], strict: bool) -> Result<Vec<i64>> {
    check_params(s.count_bits, s.value_bits).map_err(|e| crate::Error::Corrupt(e.to_string()))?;
    let rows = rows_of(shape).map_err(|e| crate::Error::Corrupt(e.to_string()))?;
    let n = *shape.last().unwrap();
    let (num_codes, _) = check_offsets(s, rows)?;
    let mut value_offsets = Vec::with_capacity(rows + 1);
    value_offsets.push(0i64);
    let mut total = 0usize;
    for r in 0..rows {
        let (c0, c1) = (s.code_offsets[r] as u64, s.code_offsets[r + 1] as u64);
        let walk = walk_row(s.counts, s.count_bits, c0, c1, n, r, |_, _| {})?;
        if strict && walk.last_code_is_escape {
            return corrupt(format!("row {r}: ends with an escape code (not canonical)"));
        }
        total += walk.values;
        value_offsets.push(total as i64);
    }
    let want = values_len(total as u64, s.value_bits).unwrap();
    if s.values.len() as u64 != want {
        return corrupt(format!(
            "values stream has {} bytes, the codes need {} values ({} bytes)",
            s.values.len(),
            total,
            want
        ));
    }
    if strict {
        let pad_bits = (num_codes * s.count_bits as u64) % 8;
        if pad_bits != 0 && (s.counts[s.counts.len() - 1] >> pad_bits) != 0 {
            return corrupt("nonzero padding bits after the last code");
        }
        if s.value_bits == 8 {
            if let Some(i) = s.values.iter().position(|&v| v == 0) {
                return corrupt(format!("value {i} is zero (not canonical)"));
            }
        } else {
            if let Some(i) = (0..total).find(|&i| value_at(s.values, 4, i) == 0) {
                return corrupt(format!("value {i} is zero (not canonical)"));
            }
            if total % 2 == 1 && s.values[total / 2] >> 4 != 0 {
                return corrupt("nonzero padding nibble after the last value");
            }
        }
    }
    Ok(value_offsets)
}

/// Check the streams and value offsets of a `rows x n` array before decoding
/// rows independently (O(rows)); `decode_row` relies on these.
pub fn check_decodable(s: &Streams, value_offsets: &[i64], rows: usize) -> Result<()> {
    check_params(s.count_bits, s.value_bits).map_err(|e| crate::Error::Corrupt(e.to_string()))?;
    let (_, cap) = check_offsets(s, rows)?;
    if value_offsets.len() != rows + 1 || value_offsets[0] != 0 || value_offsets.windows(2).any(|w| w[1] < w[0]) {
        return corrupt("value_offsets must have rows + 1 non-decreasing entries starting at 0");
    }
    if value_offsets[rows] as u64 > cap {
        return corrupt("value_offsets point past the values stream");
    }
    Ok(())
}

/// Decode row `r` into `row` (length n, fully overwritten), validating as it
/// goes. The streams must have passed `check_decodable`.
pub fn decode_row(s: &Streams, value_offsets: &[i64], r: usize, row: &mut [i8]) -> Result<()> {
    row.fill(0);
    let n = row.len();
    let (v0, v1) = (value_offsets[r] as usize, value_offsets[r + 1] as usize);
    let (c0, c1) = (s.code_offsets[r] as u64, s.code_offsets[r + 1] as u64);
    let mut overflow = false;
    let walk = walk_row(s.counts, s.count_bits, c0, c1, n, r, |p, k| {
        let vi = v0 + k;
        if vi < v1 {
            row[p] = value_at(s.values, s.value_bits, vi);
        } else {
            overflow = true;
        }
    })?;
    if overflow || walk.values != v1 - v0 {
        return corrupt(format!("row {r}: codes hold {} values, value_offsets say {}", walk.values, v1 - v0));
    }
    Ok(())
}

/// Decode into `out` (`rows x n`, fully overwritten). Validates bounds as it
/// goes, so a hand-built or corrupted stream errors instead of misbehaving.
pub fn decode(s: &Streams, value_offsets: &[i64], shape: &[usize], out: &mut [i8]) -> Result<()> {
    let rows = rows_of(shape)?;
    let n = *shape.last().unwrap();
    if out.len() != rows * n {
        return invalid(format!("out has {} elements, expected {}", out.len(), rows * n));
    }
    check_decodable(s, value_offsets, rows)?;
    if n == 0 {
        return Ok(());
    }
    for (r, row) in out.chunks_exact_mut(n).enumerate() {
        decode_row(s, value_offsets, r, row)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes_of(e: &Encoded) -> Vec<u8> {
        let n = e.num_codes() as usize;
        let mut out = vec![0u8; n];
        crate::bitpack::unpack_bits(&e.counts, 1, n, e.count_bits, &mut out).unwrap();
        out
    }

    #[test]
    fn seed_example() {
        let x = [0i8, 0, 0, 0, 0, 0, 5, 0, 0, 1];
        let e = encode(&x, &[10], Some(4), 8).unwrap();
        assert_eq!(codes_of(&e), vec![6, 2]);
        assert_eq!(e.values, vec![5, 1]);
    }

    #[test]
    fn escape_example() {
        let mut x = vec![0i8; 41];
        x[40] = 3;
        let e = encode(&x, &[41], Some(4), 8).unwrap();
        assert_eq!(codes_of(&e), vec![15, 15, 10]);
        assert_eq!(e.values, vec![3]);
    }

    #[test]
    fn round_trip_all_widths() {
        let mut seed = 11u64;
        for value_bits in [4u32, 8] {
            for b in 1..=8u32 {
                for &(rows, n) in &[(1usize, 0usize), (3, 1), (4, 37), (2, 300), (1, 1000)] {
                    let x: Vec<i8> = (0..rows * n)
                        .map(|_| {
                            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                            let r = (seed >> 33) as u32;
                            if r.is_multiple_of(10) {
                                ((r >> 8) % 15) as i8 - 7
                            } else {
                                0
                            }
                        })
                        .collect();
                    let shape = [rows, n];
                    let e = encode(&x, &shape, Some(b), value_bits).unwrap();
                    let vo = validate(&e.streams(), &shape, true).unwrap();
                    assert_eq!(vo, e.value_offsets);
                    let mut out = vec![9i8; x.len()];
                    decode(&e.streams(), &e.value_offsets, &shape, &mut out).unwrap();
                    assert_eq!(out, x, "b={b} vb={value_bits} {rows}x{n}");
                }
            }
        }
    }

    #[test]
    fn decode_rejects_overrun() {
        // One code 9 in a row of length 5: value at position 9.
        let s = Streams { count_bits: 4, value_bits: 8, counts: &[9], values: &[1], code_offsets: &[0, 1] };
        let mut out = [0i8; 5];
        assert!(decode(&s, &[0, 1], &[5], &mut out).is_err());
        assert!(validate(&s, &[5], false).is_err());
    }
}
