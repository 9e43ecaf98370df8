//! The serialized RLE (docs/format.md §4): little-endian header, streams, CRC-32C.
//! Parsers check every size against the buffer before allocating anything. The
//! size formula is `rle::serialized_len` (the encoder's "auto" width needs it too).
use crate::crc32c::crc32c;
use crate::error::{corrupt, truncated, unsupported};
use crate::rle::{self, index_width, Encoded, Streams, HEADER_LEN as HEADER};
use crate::Result;

/// Magic of a serialized RLE (docs/format.md §4).
pub const RLE_MAGIC: &[u8; 4] = b"PBRL";
/// The serialized RLE format version this build writes and reads.
pub const RLE_VERSION: u16 = 1;
const MAX_NDIM: usize = 32;
/// Serialize; the streams are validated strictly first so only canonical,
/// decodable data is ever written.
pub fn rle_to_bytes(s: &Streams, shape: &[usize]) -> Result<Vec<u8>> {
    if shape.is_empty() || shape.len() > MAX_NDIM {
        return corrupt(format!("ndim must be in 1..{MAX_NDIM}, got {}", shape.len()));
    }
    let vo = rle::validate(s, shape, true)?;
    rle_write(s, shape, *vo.last().unwrap() as u64)
}

/// Serialize streams that already passed `rle::validate(.., strict)` for this
/// shape, holding `num_values` values.
pub(crate) fn rle_write(s: &Streams, shape: &[usize], num_values: u64) -> Result<Vec<u8>> {
    let rows = rle::rows_of(shape)?;
    let num_codes = s.code_offsets[rows] as u64;
    let len = rle::serialized_len(shape.len(), rows, num_codes, num_values, s.count_bits, s.value_bits)
        .ok_or_else(|| crate::Error::Invalid("array too large to serialize".into()))?;
    let w = index_width(num_codes);
    let mut out = Vec::with_capacity(len as usize);
    out.extend_from_slice(RLE_MAGIC);
    out.extend_from_slice(&RLE_VERSION.to_le_bytes());
    out.extend_from_slice(&[s.count_bits as u8, s.value_bits as u8, shape.len() as u8, w as u8]);
    out.extend_from_slice(&[0u8; 6]);
    for &d in shape {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    out.extend_from_slice(&num_codes.to_le_bytes());
    out.extend_from_slice(&num_values.to_le_bytes());
    for &e in &s.code_offsets[1..] {
        out.extend_from_slice(&(e as u64).to_le_bytes()[..w]);
    }
    out.extend_from_slice(s.counts);
    out.extend_from_slice(s.values);
    let crc = crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() as u64, len);
    Ok(out)
}

/// A bounds-checked little-endian reader over the blob.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => truncated(format!("truncated: {what} needs {n} bytes at offset {}", self.pos)),
        }
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
}

/// Parse and fully validate a serialized RLE. Returns the shape and the
/// encoded streams (with value offsets recomputed by the validating walk).
pub fn rle_from_bytes(buf: &[u8]) -> Result<(Vec<usize>, Encoded)> {
    if buf.len() < HEADER + 4 {
        return truncated(format!("truncated: buffer of {} bytes is too short for an RLE blob", buf.len()));
    }
    let mut r = Reader { buf, pos: 0 };
    if r.take(4, "magic")? != RLE_MAGIC {
        return corrupt("bad magic: not a pbcodec RLE blob");
    }
    let version = u16::from_le_bytes(r.take(2, "version")?.try_into().unwrap());
    if version != RLE_VERSION {
        return unsupported(format!("unsupported RLE format version {version} (this build reads {RLE_VERSION})"));
    }
    let h = r.take(4, "header")?;
    let (count_bits, value_bits, ndim, w) = (h[0] as u32, h[1] as u32, h[2] as usize, h[3] as usize);
    if r.take(6, "reserved")?.iter().any(|&b| b != 0) {
        return corrupt("reserved header bytes are not zero");
    }
    if !(1..=8).contains(&count_bits) {
        return corrupt(format!("count_bits {count_bits} out of range 1..8"));
    }
    if value_bits != 4 && value_bits != 8 {
        return corrupt(format!("value_bits {value_bits} must be 4 or 8"));
    }
    if !(1..=MAX_NDIM).contains(&ndim) {
        return corrupt(format!("ndim {ndim} out of range 1..{MAX_NDIM}"));
    }
    if w != 4 && w != 8 {
        return corrupt(format!("index width {w} must be 4 or 8"));
    }
    let mut shape = Vec::with_capacity(ndim);
    for _ in 0..ndim {
        let d = r.u64("shape")?;
        shape.push(usize::try_from(d).map_err(|_| crate::Error::Corrupt("dimension too large".into()))?);
    }
    let rows = rle::rows_of(&shape).map_err(|e| crate::Error::Corrupt(e.to_string()))?;
    let num_codes = r.u64("num_codes")?;
    let num_values = r.u64("num_values")?;
    if w != index_width(num_codes) {
        return corrupt(format!("index width {w} does not match {num_codes} codes"));
    }
    // Every size is checked against the buffer before anything is allocated.
    let want = rle::serialized_len(ndim, rows, num_codes, num_values, count_bits, value_bits);
    if want != Some(buf.len() as u64) {
        return match want {
            Some(n) if n > buf.len() as u64 => {
                truncated(format!("truncated: header describes {n} bytes, buffer has {}", buf.len()))
            }
            Some(n) => corrupt(format!("{} trailing bytes after the {n} the header describes", buf.len() as u64 - n)),
            None => corrupt("header sizes overflow"),
        };
    }
    let body = &buf[..buf.len() - 4];
    let stored = u32::from_le_bytes(buf[buf.len() - 4..].try_into().unwrap());
    let actual = crc32c(body);
    if stored != actual {
        return corrupt(format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"));
    }
    let ends = r.take(w * rows, "row index")?;
    let mut code_offsets = Vec::with_capacity(rows + 1);
    code_offsets.push(0i64);
    for e in ends.chunks_exact(w) {
        let mut t = [0u8; 8];
        t[..w].copy_from_slice(e);
        let v = u64::from_le_bytes(t);
        if v > num_codes {
            return corrupt(format!("row end {v} exceeds num_codes {num_codes}"));
        }
        code_offsets.push(v as i64);
    }
    if rows > 0 && code_offsets[rows] as u64 != num_codes {
        return corrupt("last row end does not equal num_codes");
    }
    if rows == 0 && num_codes != 0 {
        return corrupt("num_codes must be 0 for an array with no rows");
    }
    let counts = r.take(rle::counts_len(num_codes, count_bits).unwrap() as usize, "counts")?.to_vec();
    let values = r.take(rle::values_len(num_values, value_bits).unwrap() as usize, "values")?.to_vec();
    let s = Streams { count_bits, value_bits, counts: &counts, values: &values, code_offsets: &code_offsets };
    let value_offsets = rle::validate(&s, &shape, true)?;
    if value_offsets[rows] as u64 != num_values {
        return corrupt(format!("codes hold {} values, header says {num_values}", value_offsets[rows]));
    }
    Ok((shape, Encoded { count_bits, value_bits, counts, values, code_offsets, value_offsets }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn sample() -> (Vec<usize>, Encoded) {
        let x: Vec<i8> = (0..600).map(|i| if i % 7 == 0 { (i % 11) as i8 - 5 } else { 0 }).collect();
        let shape = vec![3, 200];
        let e = rle::encode(&x, &shape, Some(3), 8).unwrap();
        (shape, e)
    }

    #[test]
    fn round_trip() {
        let (shape, e) = sample();
        let b = rle_to_bytes(&e.streams(), &shape).unwrap();
        assert_eq!(b.len() as u64, rle::serialized_len(2, 3, e.num_codes(), e.num_values(), 3, 8).unwrap());
        let (s2, e2) = rle_from_bytes(&b).unwrap();
        assert_eq!(s2, shape);
        assert_eq!(e2, e);
    }

    #[test]
    fn every_corruption_is_an_error() {
        let (shape, e) = sample();
        let b = rle_to_bytes(&e.streams(), &shape).unwrap();
        for cut in 0..b.len() {
            assert!(matches!(rle_from_bytes(&b[..cut]), Err(Error::Truncated(_))), "truncated at {cut}");
        }
        let mut ext = b.clone();
        ext.push(0);
        assert!(matches!(rle_from_bytes(&ext), Err(Error::Corrupt(m)) if m.contains("trailing")));
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                let r = rle_from_bytes(&c);
                assert!(matches!(&r, Err(e) if e.is_format()), "flip {i}:{bit}");
                if (4..6).contains(&i) {
                    assert!(matches!(&r, Err(Error::Unsupported(m)) if m.contains("version")), "flip {i}:{bit}");
                }
                if i >= b.len() - 4 {
                    assert!(matches!(&r, Err(Error::Corrupt(m)) if m.contains("checksum")), "flip {i}:{bit}");
                }
            }
        }
    }
}
