//! The partially-binarized tensor (docs/format.md §6–7): compression and the
//! serialized form. Decompression is `decompress.rs`; the matrix-vector kernels
//! are `fmatvec.rs`/`qmatvec.rs` (on the execution layout) and `matvec.rs`.
use rayon::prelude::*;

use crate::crc32c::crc32c;
use crate::error::{corrupt, invalid, truncated, unsupported};
use crate::half::{f16_to_f32, f64_to_f16};
use crate::{format, parallel, rle, Error, Result};

/// The stored type of the scales `mu`, `alpha`, `sigma`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleType {
    /// IEEE binary16 (`scale_dtype="float16"`).
    F16,
    /// IEEE binary32 (`scale_dtype="float32"`).
    F32,
}

impl ScaleType {
    /// The type of a width in bits (16 or 32), as the serialized header stores it.
    pub fn from_bits(bits: u32) -> Option<ScaleType> {
        match bits {
            16 => Some(ScaleType::F16),
            32 => Some(ScaleType::F32),
            _ => None,
        }
    }
    /// Width in bits: 16 or 32.
    pub fn bits(self) -> u32 {
        match self {
            ScaleType::F16 => 16,
            ScaleType::F32 => 32,
        }
    }
    fn width(self) -> usize {
        self.bits() as usize / 8
    }
    /// Round a float64 to this type (nearest-even); the result is returned as
    /// the f32 holding that exact value. A result that is not finite (overflow)
    /// is an error (docs/format.md §6.1; underflow is checked per row, see
    /// `binarize_row`).
    fn round(self, v: f64, what: &str, row: usize) -> Result<f32> {
        let r = match self {
            ScaleType::F16 => f16_to_f32(f64_to_f16(v)),
            ScaleType::F32 => v as f32,
        };
        if !r.is_finite() {
            let name = if self == ScaleType::F16 { "float16" } else { "float32" };
            return Err(Error::Scale(format!("row {row}: {what} = {v:e} overflows {name}; use scale_dtype='float32'")));
        }
        Ok(r)
    }
}

/// Largest `m x n` (product of the nonzero dimensions) a PBTensor may have: the
/// dense matrix must be addressable as float64, also when it is empty
/// (docs/format.md §7).
pub const MAX_ELEMENTS: u64 = 1 << 60;

/// Check a PBTensor shape against [`MAX_ELEMENTS`].
pub fn check_shape(m: usize, n: usize) -> std::result::Result<(), String> {
    match rle::nonzero_product(&[m, n]) {
        Some(p) if p < MAX_ELEMENTS => Ok(()),
        _ => Err(format!("shape ({m}, {n}) is too large (limit: 2**60 elements)")),
    }
}

/// Compression parameters (docs/format.md §6.1).
#[derive(Debug, Clone)]
pub struct Params {
    /// Fraction of weights kept as salient residual codes, in `[0, 1]`.
    pub salient: f64,
    /// Bits per residual code: 4 or 8.
    pub salient_bits: u32,
    /// Bits per zero-run code, 1..8; None: "auto" (the smallest blob).
    pub count_bits: Option<u32>,
    /// Columns per (mu, alpha) group, 1..n; None: the whole row.
    pub group_size: Option<usize>,
    /// false: "row" (same count per row), true: "tensor" (one threshold).
    pub select_tensor: bool,
    /// Subtract the group mean `mu` before binarizing (false: `mu = 0`).
    pub shift: bool,
    /// The scales' stored type.
    pub scale: ScaleType,
}

impl Default for Params {
    /// The defaults of `pbcodec.compress`: 10 % salient, 8-bit codes, automatic
    /// count bits, one group per row, row-wise selection, mean shift, float16 scales.
    fn default() -> Self {
        Params {
            salient: 0.1,
            salient_bits: 8,
            count_bits: None,
            group_size: None,
            select_tensor: false,
            shift: true,
            scale: ScaleType::F16,
        }
    }
}

/// A compressed matrix. Scales are kept as f32 holding exact float16/float32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct PbTensor {
    /// Rows (output features).
    pub m: usize,
    /// Columns (input features).
    pub n: usize,
    /// Columns per (mu, alpha) group (1 when `n = 0`).
    pub group_size: usize,
    /// The scales' stored type.
    pub scale: ScaleType,
    /// `m x ceil(n/8)` sign bits (1 = -1).
    pub signs: Vec<u8>,
    /// Group means, `m x n_groups`.
    pub mu: Vec<f32>,
    /// Group scales of the sign plane, `m x n_groups`.
    pub alpha: Vec<f32>,
    /// Residual scale per row, `m`.
    pub sigma: Vec<f32>,
    /// Residual codes, shape `(m, n)`, `value_bits = salient_bits`.
    pub residual: rle::Encoded,
}

/// A borrowed view of a compressed matrix: what decompress, matvec and the
/// serializer read (the Python binding builds one over numpy arrays, no copy).
#[derive(Debug, Clone, Copy)]
pub struct PbRef<'a> {
    /// Rows.
    pub m: usize,
    /// Columns.
    pub n: usize,
    /// Columns per group.
    pub group_size: usize,
    /// The scales' stored type.
    pub scale: ScaleType,
    /// `m x ceil(n/8)` sign bits.
    pub signs: &'a [u8],
    /// `m x n_groups` group means.
    pub mu: &'a [f32],
    /// `m x n_groups` group scales.
    pub alpha: &'a [f32],
    /// `m` residual scales.
    pub sigma: &'a [f32],
    /// The residual's streams, shape `(m, n)`.
    pub res: rle::Streams<'a>,
    /// The residual's `m + 1` value offsets.
    pub value_offsets: &'a [i64],
}

/// Groups of a row of `n` columns: `ceil(n / group_size)`, 0 when `n = 0`.
pub fn n_groups(n: usize, group_size: usize) -> usize {
    if n == 0 {
        0
    } else {
        n.div_ceil(group_size)
    }
}

/// Largest residual code magnitude for `salient_bits`.
fn qmax(salient_bits: u32) -> i32 {
    (1 << (salient_bits - 1)) - 1
}

/// Mark the `k` largest scores of `scores` (ties: smaller index) in `mark`.
/// Keys pack (bit-inverted score, index) so that ascending order is the
/// selection order; scores are non-negative floats, whose bits are monotonic.
fn select_top(scores: impl Iterator<Item = f32>, count: usize, k: usize, mark: &mut [u8]) {
    if k == 0 {
        return;
    }
    if k >= count {
        mark.fill(1);
        return;
    }
    if count <= 1usize << 32 {
        let mut keys: Vec<u64> = scores.enumerate().map(|(j, s)| ((!s.to_bits() as u64) << 32) | j as u64).collect();
        keys.select_nth_unstable(k - 1);
        for &key in &keys[..k] {
            mark[(key & 0xFFFF_FFFF) as usize] = 1;
        }
    } else {
        let mut keys: Vec<u128> = scores.enumerate().map(|(j, s)| ((!s.to_bits() as u128) << 64) | j as u128).collect();
        keys.select_nth_unstable(k - 1);
        for &key in &keys[..k] {
            mark[key as u64 as usize] = 1;
        }
    }
}

/// Outputs of one row of §6.1 steps 4–5.
struct RowOut<'a> {
    signs: &'a mut [u8],
    mu: &'a mut [f32],
    alpha: &'a mut [f32],
    q: &'a mut [i8],
}

fn binarize_row(i: usize, w: &[f32], sal: &[u8], g: usize, p: &Params, out: RowOut) -> Result<f32> {
    let n = w.len();
    out.signs.fill(0);
    out.q.fill(0);
    for (gi, g0) in (0..n).step_by(g.max(1)).enumerate() {
        let g1 = (g0 + g).min(n);
        let (mut sum, mut c) = (0f64, 0usize);
        for j in g0..g1 {
            if sal[j] == 0 {
                sum += w[j] as f64;
                c += 1;
            }
        }
        let mu = p.scale.round(if p.shift && c > 0 { sum / c as f64 } else { 0.0 }, "mu", i)?;
        let mut asum = 0f64;
        for j in g0..g1 {
            if sal[j] == 0 {
                asum += (w[j] as f64 - mu as f64).abs();
            }
        }
        let alpha = p.scale.round(if c > 0 { asum / c as f64 } else { 0.0 }, "alpha", i)?;
        for (j, &wj) in (g0..g1).zip(&w[g0..g1]) {
            if wj < mu {
                out.signs[j / 8] |= 1 << (j % 8);
            }
        }
        out.mu[gi] = mu;
        out.alpha[gi] = alpha;
    }
    let resid = |j: usize| {
        let gi = j / g;
        let s = if (out.signs[j / 8] >> (j % 8)) & 1 == 1 { -1.0 } else { 1.0 };
        w[j] as f64 - (out.mu[gi] as f64 + s * out.alpha[gi] as f64)
    };
    let qm = qmax(p.salient_bits);
    let mut rmax = 0f64;
    for (j, _) in sal.iter().enumerate().filter(|(_, &s)| s != 0) {
        rmax = rmax.max(resid(j).abs());
    }
    let sigma = p.scale.round(rmax / qm as f64, "sigma", i)?;
    // Underflow (float16): a row with a nonzero weight whose scales all round to 0
    // would decompress to zeros -- the counterpart of overflow, refused alike. A single
    // scale rounding to 0 in a row that keeps others (e.g. alpha = mu's own rounding
    // error with group_size 1) loses less than 2^-25 per weight and is not an error.
    if p.scale == ScaleType::F16 && sigma == 0.0 && out.mu.iter().chain(out.alpha.iter()).all(|&v| v == 0.0) {
        let big = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        if big != 0.0 {
            return Err(Error::Scale(format!(
                "row {i}: every float16 scale underflows to 0 (largest |weight| {big:e}): the row would \
                 decompress to zeros; use scale_dtype='float32'"
            )));
        }
    }
    if sigma > 0.0 {
        for (j, _) in sal.iter().enumerate().filter(|(_, &s)| s != 0) {
            let v = (resid(j) / sigma as f64).round_ties_even();
            out.q[j] = v.clamp(-qm as f64, qm as f64) as i8;
        }
    }
    Ok(sigma)
}

/// Compress a row-major `m x n` float32 matrix (docs/format.md §6.1).
pub fn compress(w: &[f32], m: usize, n: usize, importance: Option<&[f32]>, p: &Params) -> Result<PbTensor> {
    if w.len() != m.saturating_mul(n) {
        return invalid(format!("weight has {} elements, expected {m} x {n}", w.len()));
    }
    check_shape(m, n).or_else(invalid)?;
    if !(0.0..=1.0).contains(&p.salient) {
        return invalid(format!("salient must be in [0, 1], got {}", p.salient));
    }
    if p.salient_bits != 4 && p.salient_bits != 8 {
        return invalid(format!("salient_bits must be 4 or 8, got {}", p.salient_bits));
    }
    if let Some(cb) = p.count_bits {
        rle::check_params(cb, 8)?;
    }
    let g = match p.group_size {
        _ if n == 0 => 1,
        None => n,
        Some(g) if (1..=n).contains(&g) => g,
        Some(g) => return invalid(format!("group_size must be in 1..{n}, got {g}")),
    };
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return invalid(format!("weight[{}, {}] is not finite ({})", i / n.max(1), i % n.max(1), w[i]));
    }
    if let Some(imp) = importance {
        if imp.len() != n {
            return invalid(format!("importance has {} entries, expected n = {n}", imp.len()));
        }
        if let Some(j) = imp.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
            return invalid(format!("importance[{j}] = {} must be finite and >= 0", imp[j]));
        }
    }
    let score = |i: usize, j: usize| -> f32 {
        let a = w[i * n + j].abs();
        match importance {
            // + 0.0 turns a -0.0 product into +0.0: keys rank by bit pattern.
            Some(imp) => a * imp[j] + 0.0,
            None => a,
        }
    };
    let pool = parallel::pool();
    let mut sal = vec![0u8; m * n];
    if p.select_tensor {
        let k = (p.salient * (m * n) as f64).round_ties_even() as usize;
        select_top((0..m * n).map(|f| score(f / n, f % n)), m * n, k.min(m * n), &mut sal);
    } else if n > 0 {
        let k = ((p.salient * n as f64).round_ties_even() as usize).min(n);
        pool.install(|| {
            sal.par_chunks_mut(n).enumerate().for_each(|(i, row)| select_top((0..n).map(|j| score(i, j)), n, k, row))
        });
    }
    let ng = n_groups(n, g);
    let nb = n.div_ceil(8);
    let mut signs = vec![0u8; m * nb];
    let mut mu = vec![0f32; m * ng];
    let mut alpha = vec![0f32; m * ng];
    let mut sigma = vec![0f32; m];
    let mut q = vec![0i8; m * n];
    if n > 0 {
        pool.install(|| {
            signs
                .par_chunks_mut(nb)
                .zip(mu.par_chunks_mut(ng))
                .zip(alpha.par_chunks_mut(ng))
                .zip(q.par_chunks_mut(n))
                .zip(sigma.par_iter_mut())
                .enumerate()
                .try_for_each(|(i, ((((s, mu), a), q), sg))| {
                    let out = RowOut { signs: s, mu, alpha: a, q };
                    *sg = binarize_row(i, &w[i * n..(i + 1) * n], &sal[i * n..(i + 1) * n], g, p, out)?;
                    Ok::<(), crate::Error>(())
                })
        })?;
    }
    let residual = rle::encode(&q, &[m, n], p.count_bits, p.salient_bits)?;
    Ok(PbTensor { m, n, group_size: g, scale: p.scale, signs, mu, alpha, sigma, residual })
}

impl PbTensor {
    /// The tensor as a borrowed view.
    pub fn view(&self) -> PbRef<'_> {
        PbRef {
            m: self.m,
            n: self.n,
            group_size: self.group_size,
            scale: self.scale,
            signs: &self.signs,
            mu: &self.mu,
            alpha: &self.alpha,
            sigma: &self.sigma,
            res: self.residual.streams(),
            value_offsets: &self.residual.value_offsets,
        }
    }
}

impl PbRef<'_> {
    /// Groups per row.
    pub fn n_groups(&self) -> usize {
        n_groups(self.n, self.group_size)
    }

    /// Check that every part has the size the shape implies (cheap; the
    /// residual's stream contents are checked by the kernels that walk them).
    pub fn check_sizes(&self) -> Result<()> {
        // Shapes come from user-modifiable Python objects: checked arithmetic.
        check_shape(self.m, self.n).or_else(corrupt)?;
        let group_ok = if self.n == 0 { self.group_size == 1 } else { (1..=self.n).contains(&self.group_size) };
        if !group_ok {
            return corrupt(format!("group_size {} out of range for n = {}", self.group_size, self.n));
        }
        let ng = self.n_groups();
        let eq = |len: usize, a: usize, b: usize| a.checked_mul(b) == Some(len);
        let ok = eq(self.signs.len(), self.m, self.n.div_ceil(8))
            && eq(self.mu.len(), self.m, ng)
            && eq(self.alpha.len(), self.m, ng)
            && self.sigma.len() == self.m
            && self.res.code_offsets.len() == self.m + 1
            && self.value_offsets.len() == self.m + 1;
        if !ok {
            return corrupt("PBTensor parts have inconsistent sizes");
        }
        Ok(())
    }
}

// ------------------------------------------------------------ serialization

/// Magic of a serialized PBTensor (docs/format.md §7).
pub const PB_MAGIC: &[u8; 4] = b"PBTN";
/// The serialized PBTensor format version this build writes and reads.
pub const PB_VERSION: u16 = 1;
const PB_HEADER: usize = 40;

fn put_scales(out: &mut Vec<u8>, v: &[f32], scale: ScaleType) {
    for &x in v {
        match scale {
            ScaleType::F16 => out.extend_from_slice(&f64_to_f16(x as f64).to_le_bytes()),
            ScaleType::F32 => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
}

fn get_scales(b: &[u8], scale: ScaleType) -> Vec<f32> {
    match scale {
        ScaleType::F16 => b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        ScaleType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
    }
}

/// Scales must be finite, representable in the scale type, and `alpha`, `sigma` >= 0.
fn check_scales(t: &PbRef) -> Result<()> {
    let fits = |v: f32| match t.scale {
        ScaleType::F16 => f16_to_f32(f64_to_f16(v as f64)).to_bits() == v.to_bits(),
        ScaleType::F32 => true,
    };
    for (name, v, nonneg) in [("mu", &t.mu, false), ("alpha", &t.alpha, true), ("sigma", &t.sigma, true)] {
        if let Some(i) = v.iter().position(|&x| !x.is_finite() || (nonneg && x < 0.0) || !fits(x)) {
            return corrupt(format!("{name}[{i}] = {} is not a valid scale", v[i]));
        }
    }
    Ok(())
}

/// Residual codes must be in -Q..Q (the compressor never emits -2^(b-1)).
fn check_codes(r: &rle::Streams, num_values: usize) -> Result<()> {
    let qm = qmax(r.value_bits);
    let nv = num_values;
    let bad = (0..nv).find(|&i| (rle::value_at(r.values, r.value_bits, i) as i32) < -qm);
    if let Some(i) = bad {
        return corrupt(format!("residual value {i} is outside -{qm}..{qm}"));
    }
    Ok(())
}

fn check_sign_padding(signs: &[u8], m: usize, n: usize) -> Result<()> {
    let nb = n.div_ceil(8);
    if !n.is_multiple_of(8) {
        for i in 0..m {
            if signs[i * nb + nb - 1] >> (n % 8) != 0 {
                return corrupt(format!("row {i}: nonzero padding bits in the sign plane"));
            }
        }
    }
    Ok(())
}

/// Every check `from_bytes` makes, on parts from elsewhere (a file's tensors):
/// sizes, scales, sign padding, canonical residual streams and code range.
/// Returns the residual's value offsets (recomputed by the validating walk).
pub fn validate(t: &PbRef) -> Result<Vec<i64>> {
    t.check_sizes()?;
    check_scales(t)?;
    check_sign_padding(t.signs, t.m, t.n)?;
    let vo = rle::validate(&t.res, &[t.m, t.n], true)?;
    check_codes(&t.res, *vo.last().unwrap_or(&0) as usize)?;
    Ok(vo)
}

/// Serialize (docs/format.md §7) after every check [`validate`] makes; the
/// residual's `value_offsets` must also match its codes. Errors: a format error
/// naming the first inconsistency.
pub fn to_bytes(t: &PbRef) -> Result<Vec<u8>> {
    let vo = validate(t)?;
    if vo != t.value_offsets {
        return corrupt("residual value_offsets do not match its codes");
    }
    // `validate` already ran the residual's strict validation.
    let rb = format::rle_write(&t.res, &[t.m, t.n], *vo.last().unwrap_or(&0) as u64)?;
    let mut out = Vec::with_capacity(PB_HEADER + t.signs.len() + rb.len() + 4 * (2 * t.mu.len() + t.m) + 4);
    out.extend_from_slice(PB_MAGIC);
    out.extend_from_slice(&PB_VERSION.to_le_bytes());
    out.extend_from_slice(&[1u8, t.scale.bits() as u8]);
    for v in [t.m as u64, t.n as u64, t.group_size as u64, rb.len() as u64] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(t.signs);
    put_scales(&mut out, t.mu, t.scale);
    put_scales(&mut out, t.alpha, t.scale);
    put_scales(&mut out, t.sigma, t.scale);
    out.extend_from_slice(&rb);
    let crc = crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Exact serialized size without building the blob.
pub fn serialized_len(t: &PbRef) -> Option<u64> {
    let rl = rle::serialized_len(
        2,
        t.m,
        *t.res.code_offsets.last()? as u64,
        *t.value_offsets.last()? as u64,
        t.res.count_bits,
        t.res.value_bits,
    )?;
    let w = t.scale.width() as u64;
    (PB_HEADER as u64 + 4)
        .checked_add(t.signs.len() as u64)?
        .checked_add((2 * t.mu.len() as u64 + t.m as u64).checked_mul(w)?)?
        .checked_add(rl)
}

/// Parse and fully validate a serialized PBTensor (docs/format.md §7): every size
/// is checked against the buffer before anything is allocated. Errors:
/// [`Error::Truncated`], [`Error::Unsupported`] (version, `dense_bits`) or
/// [`Error::Corrupt`], naming the problem.
pub fn from_bytes(buf: &[u8]) -> Result<PbTensor> {
    if buf.len() < PB_HEADER + 4 {
        return truncated(format!("truncated: buffer of {} bytes is too short for a PBTensor", buf.len()));
    }
    if &buf[..4] != PB_MAGIC {
        return corrupt("bad magic: not a pbcodec PBTensor blob");
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if version != PB_VERSION {
        return unsupported(format!("unsupported PBTensor format version {version} (this build reads {PB_VERSION})"));
    }
    if buf[6] != 1 {
        return unsupported(format!("dense_bits {} is not supported (this build reads 1)", buf[6]));
    }
    let scale = ScaleType::from_bits(buf[7] as u32)
        .ok_or_else(|| crate::Error::Corrupt(format!("scale width {} must be 16 or 32", buf[7])))?;
    let rd = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
    let too_big = || crate::Error::Corrupt("header sizes overflow".into());
    let m = usize::try_from(rd(8)).map_err(|_| too_big())?;
    let n = usize::try_from(rd(16)).map_err(|_| too_big())?;
    let g = usize::try_from(rd(24)).map_err(|_| too_big())?;
    let rl = usize::try_from(rd(32)).map_err(|_| too_big())?;
    check_shape(m, n).or_else(corrupt)?;
    if n == 0 && g != 1 {
        return corrupt(format!("group_size must be 1 for n = 0, got {g}"));
    }
    if n > 0 && !(1..=n).contains(&g) {
        return corrupt(format!("group_size {g} out of range 1..{n}"));
    }
    let ng = n_groups(n, g);
    let w = scale.width();
    let signs_len = m.checked_mul(n.div_ceil(8)).ok_or_else(too_big)?;
    let scales_len = m
        .checked_mul(ng)
        .and_then(|v| v.checked_mul(2))
        .and_then(|v| v.checked_add(m))
        .and_then(|v| v.checked_mul(w))
        .ok_or_else(too_big)?;
    let total = [signs_len, scales_len, rl, PB_HEADER + 4]
        .iter()
        .try_fold(0usize, |a, &b| a.checked_add(b))
        .ok_or_else(too_big)?;
    if total > buf.len() {
        return truncated(format!("length mismatch: header describes {total} bytes, buffer has {}", buf.len()));
    }
    if total < buf.len() {
        return corrupt(format!("length mismatch: header describes {total} bytes, buffer has {}", buf.len()));
    }
    let stored = u32::from_le_bytes(buf[buf.len() - 4..].try_into().unwrap());
    let actual = crc32c(&buf[..buf.len() - 4]);
    if stored != actual {
        return corrupt(format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"));
    }
    let mut o = PB_HEADER;
    let mut take = |len: usize| {
        let s = &buf[o..o + len];
        o += len;
        s
    };
    let signs = take(signs_len).to_vec();
    let mu = get_scales(take(m * ng * w), scale);
    let alpha = get_scales(take(m * ng * w), scale);
    let sigma = get_scales(take(m * w), scale);
    let (shape, residual) = format::rle_from_bytes(take(rl))?;
    if shape != [m, n] {
        return corrupt(format!("residual has shape {shape:?}, expected [{m}, {n}]"));
    }
    let t = PbTensor { m, n, group_size: g, scale, signs, mu, alpha, sigma, residual };
    check_sign_padding(&t.signs, m, n)?;
    check_scales(&t.view())?;
    check_codes(&t.residual.streams(), t.residual.num_values() as usize)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(m: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..m * n)
            .map(|_| {
                let mut u = || {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
                };
                ((-2.0 * u().ln()).sqrt() * (std::f64::consts::TAU * u()).cos()) as f32
            })
            .collect()
    }

    #[test]
    fn compress_round_trip_and_accuracy() {
        let (m, n) = (16, 200);
        let w = gaussian(m, n, 1);
        for (gs, tensor, scale) in
            [(None, false, ScaleType::F16), (Some(64), true, ScaleType::F32), (Some(7), false, ScaleType::F16)]
        {
            let p = Params { group_size: gs, select_tensor: tensor, scale, ..Params::default() };
            let t = compress(&w, m, n, None, &p).unwrap();
            assert!(t.residual.num_values() as usize <= m * n / 10 + m);
            let b = to_bytes(&t.view()).unwrap();
            assert_eq!(b.len() as u64, serialized_len(&t.view()).unwrap());
            let t2 = from_bytes(&b).unwrap();
            assert_eq!(t2, t);
            let mut wh = vec![0f32; m * n];
            t.view().decompress(&mut wh).unwrap();
            let err: f64 = w.iter().zip(&wh).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let pow: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum();
            assert!(10.0 * (pow / err).log10() > 6.0, "snr too low");
            for cut in 0..b.len() {
                assert!(matches!(from_bytes(&b[..cut]), Err(Error::Truncated(_))), "cut {cut}");
            }
        }
    }

    /// Each kind of damage surfaces as its own error kind.
    #[test]
    fn error_kinds() {
        let w = gaussian(3, 40, 4);
        let b = to_bytes(&compress(&w, 3, 40, None, &Params::default()).unwrap().view()).unwrap();
        let with_crc = |mut v: Vec<u8>| {
            let n = v.len() - 4;
            let c = crc32c(&v[..n]);
            v[n..].copy_from_slice(&c.to_le_bytes());
            v
        };
        let mut v = b.clone();
        v[4] = 2; // version 2, valid checksum
        assert!(matches!(from_bytes(&with_crc(v)), Err(Error::Unsupported(m)) if m.contains("version 2")));
        let mut v = b.clone();
        v[6] = 2; // dense_bits 2
        assert!(matches!(from_bytes(&with_crc(v)), Err(Error::Unsupported(m)) if m.contains("dense_bits")));
        let mut v = b.clone();
        *v.last_mut().unwrap() ^= 1;
        assert!(matches!(from_bytes(&v), Err(Error::Corrupt(m)) if m.contains("checksum")));
        let mut v = b.clone();
        v.push(0);
        assert!(matches!(from_bytes(&v), Err(Error::Corrupt(m)) if m.contains("length mismatch")));
        let mut v = b.clone();
        v[0] = b'X';
        assert!(matches!(from_bytes(&v), Err(Error::Corrupt(m)) if m.contains("magic")));
        // The embedded residual blob's own version.
        let rle_at = b.len() - 4 - u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
        let mut v = b.clone();
        v[rle_at + 4] = 9;
        let n = v.len() - 8;
        let c = crc32c(&v[rle_at..n]);
        v[n..n + 4].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(from_bytes(&with_crc(v)), Err(Error::Unsupported(m)) if m.contains("RLE format version 9")));
        assert!(Error::Truncated(String::new()).is_format() && !Error::Invalid(String::new()).is_format());
    }

    #[test]
    fn salient_positions_are_accurate() {
        let (m, n) = (4, 100);
        let mut w = gaussian(m, n, 2);
        w[17] = 40.0; // a huge outlier must be salient and reconstructed well
        let t = compress(&w, m, n, None, &Params::default()).unwrap();
        let mut wh = vec![0f32; m * n];
        t.view().decompress(&mut wh).unwrap();
        assert!((wh[17] - 40.0).abs() < 0.5, "{}", wh[17]);
    }

    #[test]
    fn float16_underflow_is_refused_like_overflow() {
        let w: Vec<f32> = gaussian(4, 64, 3).iter().map(|v| v * 1e-8).collect();
        for scale in [ScaleType::F16, ScaleType::F32] {
            let p = Params { scale, ..Params::default() };
            let r = compress(&w, 4, 64, None, &p);
            match scale {
                ScaleType::F16 => {
                    assert!(matches!(&r, Err(Error::Scale(m)) if m.contains("underflows to 0")), "{r:?}")
                }
                ScaleType::F32 => assert!(r.is_ok()),
            }
        }
        let big: Vec<f32> = gaussian(4, 64, 3).iter().map(|v| v * 1e6).collect();
        assert!(
            matches!(compress(&big, 4, 64, None, &Params::default()), Err(Error::Scale(m)) if m.contains("overflows"))
        );
        // A zero row is not an underflow (its scales are exactly 0), nor is a row that keeps
        // a nonzero scale while one rounds to 0 (group size 1: alpha is mu's rounding error).
        assert!(compress(&[0.0; 64], 1, 64, None, &Params::default()).is_ok());
        let one = Params { group_size: Some(1), salient: 0.0, ..Params::default() };
        let w: Vec<f32> = (0..64).map(|j| 1e-6 * (1.0 + j as f32 / 64.0)).collect();
        let t = compress(&w, 1, 64, None, &one).unwrap();
        let lost = (0..64).filter(|&j| t.alpha[j] == 0.0 && w[j] as f64 != t.mu[j] as f64).count();
        assert!(lost > 0 && t.mu.iter().all(|&v| v > 0.0), "{lost}");
    }

    #[test]
    fn shapes_beyond_the_limit_are_refused() {
        assert!(check_shape(0, (1 << 60) - 1).is_ok());
        assert!(check_shape(0, 1 << 60).is_err());
        assert!(check_shape(1 << 31, 1 << 30).is_err());
        // A 96-byte blob of shape (0, 2^63) with a valid checksum.
        let mut rle = Vec::new();
        rle.extend_from_slice(b"PBRL");
        rle.extend_from_slice(&[1, 0, 4, 8, 2, 4, 0, 0, 0, 0, 0, 0]);
        for v in [0u64, 1 << 63, 0, 0] {
            rle.extend_from_slice(&v.to_le_bytes());
        }
        let c = crc32c(&rle);
        rle.extend_from_slice(&c.to_le_bytes());
        let mut b = Vec::new();
        b.extend_from_slice(b"PBTN");
        b.extend_from_slice(&[1, 0, 1, 16]);
        for v in [0u64, 1 << 63, 1, rle.len() as u64] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&rle);
        let c = crc32c(&b);
        b.extend_from_slice(&c.to_le_bytes());
        assert_eq!(b.len(), 96);
        assert!(matches!(from_bytes(&b), Err(Error::Corrupt(m)) if m.contains("too large")));
        assert!(matches!(format::rle_from_bytes(&rle), Err(Error::Corrupt(m)) if m.contains("too large")));
    }
}
