//! Bodies of the pbcodec fuzz targets (docs/fuzzing.md). Each takes arbitrary bytes and
//! panics only on a real bug: a panic inside the core, an accepted input that does not
//! round-trip to the same bytes, a valid tensor that a kernel rejects, or SIMD levels that
//! disagree where docs/format.md says every level gives the same result. Everything that
//! touches the core's API is in this file, so an API change is fixed in one place.
//!
//! - [`rle_from_bytes`]: `RLE.from_bytes` (docs/format.md §4).
//! - [`pb_from_bytes`]: `PBTensor.from_bytes` (§7), then every kernel on what it accepts.
//!
//! Both blob targets parse each input twice: as it is, and with its checksums recomputed,
//! so that mutations reach the checks behind the CRC (a libFuzzer mutation almost never
//! keeps a CRC-32C valid).
//! - [`pb_parts`]: a PBTensor built from arbitrary, unvalidated parts, as the Python
//!   constructor `PBTensor(shape, signs, mu, alpha, sigma, RLE(...), group_size)` and the
//!   PBLinear buffers hand them to the core: the validation that `load_file` and
//!   `PBTensor.from_parts` run (`pb::validate`), and decompress, the row-wise matvec, the
//!   execution layout (§6.5) and its float32 and int8 kernels (§6.4) on the raw parts.
use pbcodec::pb::{PbRef, ScaleType};
use pbcodec::{crc32c, fmatvec, format, layout, matvec, pb, qmatvec, rle, simd};

/// Largest dense buffer (elements) a target allocates for outputs and activations.
const MAX_DENSE: usize = 1 << 20;

/// `f` at every SIMD level this CPU has, the level restored afterwards.
fn at_each_level<T>(mut f: impl FnMut() -> T) -> Vec<T> {
    let before = simd::level();
    let out = simd::available()
        .into_iter()
        .map(|l| {
            simd::set_level(l).expect("an available level");
            f()
        })
        .collect();
    simd::set_level(before).expect("the previous level");
    out
}

/// float32 results equal bit for bit, any NaN equal to any NaN.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits())
}

/// Results of one operation at every SIMD level: all accepted or all rejected; accepted
/// when `must_succeed`; equal bit for bit when `same` (the spec fixes the arithmetic).
fn agree(what: &str, results: Vec<pbcodec::Result<Vec<f32>>>, must_succeed: bool, same: bool) {
    let ok = results[0].is_ok();
    assert!(results.iter().all(|r| r.is_ok() == ok), "{what}: SIMD levels disagree on acceptance: {results:?}");
    if must_succeed {
        if let Err(e) = &results[0] {
            panic!("{what}: rejected a valid tensor: {e}");
        }
    }
    if ok && same {
        let first = results[0].as_ref().unwrap();
        for r in &results[1..] {
            assert!(same_bits(first, r.as_ref().unwrap()), "{what}: SIMD levels give different results");
        }
    }
}

/// `data` with its last 4 bytes replaced by the CRC-32C of the bytes before them (None if
/// that changes nothing): a mutated blob then gets past the checksum to the deeper checks.
fn resealed(data: &[u8]) -> Option<Vec<u8>> {
    let k = data.len().checked_sub(4)?;
    let mut b = data.to_vec();
    b[k..].copy_from_slice(&crc32c::crc32c(&data[..k]).to_le_bytes());
    (b != data).then_some(b)
}

// ---------------------------------------------------------------------------- RLE

/// `RLE.from_bytes` on the input as it is and with a valid checksum.
pub fn rle_from_bytes(data: &[u8]) {
    rle_blob(data);
    if let Some(b) = resealed(data) {
        rle_blob(&b);
    }
}

/// An accepted blob re-serializes to itself, decodes (same array on every level) and
/// re-encodes with its own widths to the same streams.
fn rle_blob(data: &[u8]) {
    let Ok((shape, enc)) = format::rle_from_bytes(data) else { return };
    let again = format::rle_to_bytes(&enc.streams(), &shape).expect("an accepted blob re-serializes");
    assert_eq!(again, data, "an accepted blob is not canonical");
    let rows = rle::rows_of(&shape).expect("an accepted shape");
    let n = *shape.last().unwrap();
    let Some(total) = rows.checked_mul(n).filter(|&t| t <= MAX_DENSE) else { return };
    let dense = at_each_level(|| {
        let mut out = vec![0i8; total];
        rle::decode(&enc.streams(), &enc.value_offsets, &shape, &mut out).expect("an accepted blob decodes");
        out
    });
    assert!(dense.windows(2).all(|w| w[0] == w[1]), "SIMD levels decode differently");
    for re in at_each_level(|| rle::encode(&dense[0], &shape, Some(enc.count_bits), enc.value_bits)) {
        assert_eq!(re.expect("decoded values re-encode"), enc, "re-encoding changed the streams");
    }
}

// ---------------------------------------------------------------------------- PBTensor

/// A fixed activation pattern (two rows, the second scaled) for tensors from blobs.
fn pattern_x(n: usize, batch: usize) -> Vec<f32> {
    (0..batch * n).map(|i| ((i * 7919 % 251) as f32 - 125.0) / 16.0 * (1 + i / n.max(1)) as f32).collect()
}

/// Every kernel on `v` at every level. `valid`: `v` passed validation, so each kernel
/// that supports its group size must accept it; otherwise any error is fine, a panic is not.
fn exercise(v: &PbRef, valid: bool, x: &[f32], batch: usize) {
    let (m, n) = (v.m, v.n);
    if let Some(total) = m.checked_mul(n).filter(|&t| t <= MAX_DENSE) {
        let r = at_each_level(|| {
            let mut o = vec![0f32; total];
            v.decompress(&mut o).map(|_| o)
        });
        agree("decompress", r, valid, true);
    }
    if m.checked_mul(n) != Some(1) {
        assert!(v.decompress(&mut [0f32]).is_err(), "decompress into a wrong-sized buffer");
    }

    let sized = x.len() == batch * n && m.checked_mul(batch).is_some_and(|t| t <= MAX_DENSE);
    if sized {
        let r = at_each_level(|| {
            let mut o = vec![0f32; m * batch];
            matvec::matvec(v, x, batch, &mut o).map(|_| o)
        });
        agree("row-wise matvec", r, valid, false); // summation order is the level's
    }
    if n > 0 && m <= MAX_DENSE {
        let mut o = vec![0f32; m];
        assert!(matvec::matvec(v, &x[..x.len().min(n - 1)], 1, &mut o).is_err(), "matvec with a short x");
    }

    let lay = layout::build(v);
    if valid {
        if let Err(e) = &lay {
            panic!("layout::build rejected a valid tensor: {e}");
        }
    }
    let Ok(l) = lay else { return };
    assert!(l.nbytes() > 0 || m == 0 || n == 0);
    if !sized {
        return;
    }
    let bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.25 - 1.0).collect();
    let bias = (batch % 2 == 1).then_some(&bias[..]);
    let r = at_each_level(|| {
        let mut o = vec![0f32; m * batch];
        fmatvec::matvec_f32(&l, x, batch, bias, &mut o).map(|_| o)
    });
    if fmatvec::supported(&l) {
        agree("layout float32 matvec", r, valid, false);
    } else {
        assert!(r.iter().all(|r| r.is_err()), "float32 layout kernel ran an unsupported group size");
    }
    let r = at_each_level(|| {
        let mut o = vec![0f32; m * batch];
        qmatvec::matvec_int8(&l, x, batch, bias, &mut o).map(|_| o)
    });
    if l.int8_supported() {
        agree("int8 matvec", r, valid, true); // §6.4: the same bits on every level
    } else {
        assert!(r.iter().all(|r| r.is_err()), "int8 kernel ran an unsupported group size");
    }
}

/// `PBTensor.from_bytes` on the input as it is and with valid checksums (the embedded
/// RLE's, located by the header's `L` field, then the blob's).
pub fn pb_from_bytes(data: &[u8]) {
    pb_blob(data);
    let mut b = data.to_vec();
    if b.len() >= 44 {
        let res_len = u64::from_le_bytes(b[32..40].try_into().unwrap());
        if let Some(start) = usize::try_from(res_len).ok().and_then(|l| (b.len() - 4).checked_sub(l)) {
            let end = b.len() - 4;
            if start >= 40 {
                if let Some(r) = resealed(&b[start..end]) {
                    b[start..end].copy_from_slice(&r);
                }
            }
        }
    }
    if let Some(r) = resealed(&b) {
        b = r;
    }
    if b != data {
        pb_blob(&b);
    }
}

/// An accepted blob re-serializes to itself and runs through every kernel (decompress and
/// int8 matvec identical on every level).
fn pb_blob(data: &[u8]) {
    let Ok(t) = pb::from_bytes(data) else { return };
    let v = t.view();
    assert_eq!(pb::to_bytes(&v).expect("an accepted tensor re-serializes"), data, "not canonical");
    assert_eq!(pb::serialized_len(&v), Some(data.len() as u64));
    let batch = 2;
    if t.n.checked_mul(batch).is_some_and(|s| s <= MAX_DENSE) {
        exercise(&v, true, &pattern_x(t.n, batch), batch);
    } else {
        exercise(&v, true, &[], batch);
    }
}

/// Little-endian reader that never fails: missing bytes read as zero, and a section
/// holds at most the elements left in the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take(&mut self, k: usize) -> &[u8] {
        let k = k.min(self.0.len());
        let (a, b) = self.0.split_at(k);
        self.0 = b;
        a
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let s = self.take(4);
        b[..s.len()].copy_from_slice(s);
        u32::from_le_bytes(b)
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    /// A section: `u32` element count, then the elements (`size` bytes each).
    fn section<T>(&mut self, size: usize, conv: impl Fn(&[u8]) -> T) -> Vec<T> {
        let len = self.u32() as usize;
        let k = len.min(self.0.len() / size);
        self.take(k * size).chunks_exact(size).map(conv).collect()
    }
}

/// The input format of [`pb_parts`] (all little-endian; `tests/golden` tensors are
/// converted to it by `fuzz/seed_corpus.py`):
///
/// `m: u32, n: u32, group_size: u32, scale: u8 (odd: float32), count_bits: u8,
/// value_bits: u8, batch: u8`, then nine sections, each a `u32` element count and the
/// elements: `signs` (u8), `mu`, `alpha`, `sigma` (f32), `counts`, `values` (u8),
/// `code_offsets`, `value_offsets` (i64), `x` (f32, repeated to `batch x n`).
pub fn pb_parts(data: &[u8]) {
    let mut d = Input(data);
    let (m, n, group_size) = (d.u32() as usize, d.u32() as usize, d.u32() as usize);
    let scale = if d.u8() % 2 == 1 { ScaleType::F32 } else { ScaleType::F16 };
    let (count_bits, value_bits, batch) = (d.u8() as u32, d.u8() as u32, (d.u8() % 5) as usize);
    let f32s = |c: &[u8]| f32::from_le_bytes(c.try_into().unwrap());
    let i64s = |c: &[u8]| i64::from_le_bytes(c.try_into().unwrap());
    let signs = d.section(1, |c| c[0]);
    let mu = d.section(4, f32s);
    let alpha = d.section(4, f32s);
    let sigma = d.section(4, f32s);
    let counts = d.section(1, |c| c[0]);
    let values = d.section(1, |c| c[0]);
    let code_offsets = d.section(8, i64s);
    let value_offsets = d.section(8, i64s);
    let x0 = d.section(4, f32s);
    let x: Vec<f32> = match batch.checked_mul(n) {
        Some(len) if len <= MAX_DENSE && !x0.is_empty() => x0.iter().copied().cycle().take(len).collect(),
        Some(len) if len <= MAX_DENSE => vec![1.0; len],
        _ => Vec::new(),
    };
    let v = PbRef {
        m,
        n,
        group_size,
        scale,
        signs: &signs,
        mu: &mu,
        alpha: &alpha,
        sigma: &sigma,
        res: rle::Streams { count_bits, value_bits, counts: &counts, values: &values, code_offsets: &code_offsets },
        value_offsets: &value_offsets,
    };

    // What load_file / from_parts run: on success the parts are a valid tensor, whose
    // blob parses back to the same parts.
    if let Ok(vo) = pb::validate(&v) {
        let valid = PbRef { value_offsets: &vo, ..v };
        let blob = pb::to_bytes(&valid).expect("validated parts serialize");
        assert_eq!(pb::serialized_len(&valid), Some(blob.len() as u64));
        let t = pb::from_bytes(&blob).expect("a blob of validated parts parses");
        let bits = |a: &[f32]| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(t.signs == signs && t.residual.counts == counts && t.residual.values == values);
        assert!(bits(&t.mu) == bits(&mu) && bits(&t.alpha) == bits(&alpha) && bits(&t.sigma) == bits(&sigma));
        assert!(t.residual.code_offsets == code_offsets && t.residual.value_offsets == vo);
        exercise(&valid, true, &x, batch);
        if vo == value_offsets {
            return;
        }
    }
    // The raw parts, as an unvalidated Python PBTensor hands them to the kernels.
    exercise(&v, false, &x, batch);
}
