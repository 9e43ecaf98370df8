//! C ABI of pbcodec (`include/pbcodec.h`, generated from this file by cbindgen).
//!
//! Conventions, for every function:
//! - Functions that can fail return a `PbcodecStatus`; `PBCODEC_STATUS_OK` is 0.
//!   On failure, `pbcodec_last_error` returns a message naming the problem
//!   (thread-local: each thread sees the message of its own last failed call).
//! - No panic ever crosses the boundary: every entry point runs under
//!   `catch_unwind`; an internal panic becomes `PBCODEC_STATUS_INTERNAL`.
//! - Input data are validated exactly as the Python package validates them
//!   (docs/format.md): a malformed blob or file returns `PBCODEC_STATUS_FORMAT`,
//!   never a crash, and nothing is allocated from an unchecked size.
//! - A tensor handle is immutable: any number of threads may use one handle
//!   at once (matvec, decompress, info). Handles are freed with
//!   `pbcodec_tensor_free` / `pbcodec_file_close` (NULL is accepted).
//! - Array lengths are element counts, not bytes, unless named `*_bytes`/`len`.
#![allow(clippy::missing_safety_doc)] // each function documents its pointer contract

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;

use core_::pb::{self, ScaleType};

mod st;
mod tensor;

use tensor::{Part, TensorData};

/// Version of this C ABI; incremented on any incompatible change.
pub const PBCODEC_ABI_VERSION: u32 = 1;

/// `flags` bit for `pbcodec_tensor_from_parts` and `pbcodec_file_open_buffer`:
/// copy the caller's buffers instead of borrowing them.
pub const PBCODEC_COPY: u32 = 1;

/// Result of every fallible call.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PbcodecStatus {
    Ok = 0,
    /// A bad argument: NULL pointer, wrong length, out-of-range parameter.
    InvalidArgument = 1,
    /// Malformed serialized data (blob, file, component buffers).
    Format = 2,
    /// A valid request this build does not implement (e.g. INT8 activations).
    Unsupported = 3,
    /// No tensor of that name (or of that kind) in the file.
    NotFound = 4,
    /// The file could not be opened or mapped.
    Io = 5,
    /// The output buffer is too small; the needed size was reported.
    BufferTooSmall = 6,
    /// A bug in pbcodec (a caught panic); the message says where.
    Internal = 7,
}

/// Activation mode of `pbcodec_tensor_matvec` (passed as a `uint32_t`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PbcodecActivation {
    /// float32 activations, float32 accumulation (docs/format.md §6.3); the
    /// first call builds the tensor's execution layout (§6.5), as INT8 does.
    Float32 = 0,
    /// int8 activations quantized per block of 64 columns, exact integer dot
    /// products (docs/format.md §6.4): bit-identical to Python's
    /// `PBTensor.matvec(x, activations="int8")`. The first call builds the
    /// tensor's execution layout (§6.5, ~2.9 bits/weight), kept until the tensor
    /// is freed. `PBCODEC_STATUS_INVALID_ARGUMENT` if the group size is not a
    /// multiple of 64 (or one group per row).
    Int8 = 1,
}

/// A compressed matrix (opaque). Created by `pbcodec_tensor_from_bytes`,
/// `pbcodec_tensor_from_parts` or `pbcodec_file_get_tensor`.
pub struct PbcodecTensor {
    data: Arc<TensorData>,
}

/// A pbcodec safetensors file, validated and memory-mapped (opaque).
pub struct PbcodecFile {
    data: st::FileData,
    /// Owner of the mapped or copied bytes (None: the caller's buffer).
    _backing: Option<Arc<dyn std::any::Any + Send + Sync>>,
    base: *const u8,
    /// Every tensor name, sorted: compressed tensors and plain tensors.
    names: Vec<(CString, bool)>,
}

/// Shape, parameters and size of a tensor (`pbcodec_tensor_info`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PbcodecInfo {
    /// Rows (output features).
    pub m: u64,
    /// Columns (input features).
    pub n: u64,
    /// Columns per (mu, alpha) group.
    pub group_size: u64,
    /// 16 (float16) or 32 (float32) scales.
    pub scale_bits: u32,
    /// Residual code width: 8 or 4.
    pub salient_bits: u32,
    /// Zero-run code width, 1..8.
    pub count_bits: u32,
    /// Stored (nonzero) residual codes.
    pub num_salient: u64,
    /// Exact length of the serialized blob (`pbcodec_tensor_to_bytes`).
    pub serialized_bytes: u64,
    /// `8 * serialized_bytes / (m * n)`; 0 for an empty matrix.
    pub bits_per_weight: f64,
}

/// Component buffers of a compressed matrix (docs/format.md §8: the seven
/// tensors of a file entry). Pointers may be NULL when their length is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PbcodecParts {
    pub m: u64,
    pub n: u64,
    pub group_size: u64,
    /// 16: `mu`, `alpha`, `sigma` hold little-endian float16; 32: float32.
    pub scale_bits: u32,
    /// 1..8.
    pub count_bits: u32,
    /// 8 or 4.
    pub salient_bits: u32,
    /// `m * ceil(n/8)` bytes.
    pub signs: *const u8,
    pub signs_len: usize,
    /// `m * n_groups` scales each (`n_groups = ceil(n / group_size)`), `m` for sigma.
    pub mu: *const c_void,
    pub mu_len: usize,
    pub alpha: *const c_void,
    pub alpha_len: usize,
    pub sigma: *const c_void,
    pub sigma_len: usize,
    /// The packed code stream, in bytes.
    pub counts: *const u8,
    pub counts_len: usize,
    /// The values stream, in bytes (int8 values, or packed 4-bit nibbles).
    pub values: *const u8,
    pub values_len: usize,
    /// `m + 1` code offsets (int64, native byte order).
    pub code_offsets: *const i64,
    pub code_offsets_len: usize,
}

/// A plain (not compressed) tensor of a file (`pbcodec_file_get_raw`).
/// Every pointer stays valid until the file is closed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PbcodecRawTensor {
    /// safetensors dtype code: "F32", "F16", "BF16", "I64", ...
    pub dtype: *const c_char,
    pub ndim: usize,
    pub shape: *const u64,
    /// Little-endian element data, as stored in the file.
    pub data: *const c_void,
    pub nbytes: usize,
}

// ------------------------------------------------------------- error plumbing

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

struct Fail(PbcodecStatus, String);

type R<T> = Result<T, Fail>;

fn fail<T>(status: PbcodecStatus, msg: impl Into<String>) -> R<T> {
    Err(Fail(status, msg.into()))
}

impl From<core_::Error> for Fail {
    fn from(e: core_::Error) -> Fail {
        match e {
            core_::Error::Invalid(m) | core_::Error::Scale(m) => Fail(PbcodecStatus::InvalidArgument, m),
            // ABI v1 documents FORMAT for any data it cannot read; the message names
            // the kind (truncated, unsupported version, corrupt).
            core_::Error::Corrupt(m) | core_::Error::Truncated(m) | core_::Error::Unsupported(m) => {
                Fail(PbcodecStatus::Format, m)
            }
        }
    }
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Run `f`, catching panics; record the outcome in the thread's last error.
fn guard(f: impl FnOnce() -> R<()>) -> PbcodecStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            PbcodecStatus::Ok
        }
        Ok(Err(Fail(status, msg))) => {
            set_error(&msg);
            status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal error in pbcodec (please report): {what}"));
            PbcodecStatus::Internal
        }
    }
}

/// Run `f` for a value-returning query that cannot report errors: a panic
/// yields `default`.
fn guard_value<T>(default: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(default)
}

/// A caller's buffer as a slice; NULL is allowed only for length 0.
unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> R<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return fail(PbcodecStatus::InvalidArgument, format!("{what} is NULL but its length is {len}"));
    }
    if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return fail(PbcodecStatus::InvalidArgument, format!("{what} is not aligned for its element type"));
    }
    // SAFETY: the caller promises `len` readable elements at `p`.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

unsafe fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> R<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return fail(PbcodecStatus::InvalidArgument, format!("{what} is NULL but its length is {len}"));
    }
    if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return fail(PbcodecStatus::InvalidArgument, format!("{what} is not aligned for float"));
    }
    // SAFETY: the caller promises `len` writable elements at `p`.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

unsafe fn tensor_ref<'a>(t: *const PbcodecTensor) -> R<&'a TensorData> {
    // SAFETY: a non-NULL handle comes from this library and is not yet freed.
    match unsafe { t.as_ref() } {
        Some(t) => Ok(&t.data),
        None => fail(PbcodecStatus::InvalidArgument, "tensor handle is NULL"),
    }
}

unsafe fn put_out<T>(out: *mut *mut T, value: T) -> R<()> {
    if out.is_null() {
        return fail(PbcodecStatus::InvalidArgument, "output pointer is NULL");
    }
    // SAFETY: `out` is a valid place for a pointer (checked non-NULL).
    unsafe { *out = Box::into_raw(Box::new(value)) };
    Ok(())
}

fn check_out_ptr<T>(out: *mut *mut T) -> R<()> {
    if out.is_null() {
        return fail(PbcodecStatus::InvalidArgument, "output pointer is NULL");
    }
    Ok(())
}

unsafe fn c_str<'a>(s: *const c_char, what: &str) -> R<&'a str> {
    if s.is_null() {
        return fail(PbcodecStatus::InvalidArgument, format!("{what} is NULL"));
    }
    // SAFETY: the caller passes a NUL-terminated string.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .or_else(|_| fail(PbcodecStatus::InvalidArgument, format!("{what} is not valid UTF-8")))
}

// ------------------------------------------------------------------- general

/// The library version ("0.1.0"), a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn pbcodec_version() -> *const c_char {
    c"0.1.0".as_ptr()
}

/// `PBCODEC_ABI_VERSION` of the library actually loaded (compare it with the
/// header's constant to detect a mismatched library).
#[no_mangle]
pub extern "C" fn pbcodec_abi_version() -> u32 {
    PBCODEC_ABI_VERSION
}

/// The message of this thread's last failed call ("" after a successful
/// one). The pointer stays valid until the next pbcodec call on this thread.
#[no_mangle]
pub extern "C" fn pbcodec_last_error() -> *const c_char {
    guard_value(c"".as_ptr(), || LAST_ERROR.with(|e| e.borrow().as_ptr()))
}

/// Use `n` worker threads (>= 1) for matvec and decompress, process-wide
/// (default: `PBCODEC_NUM_THREADS` or all cores). Results do not depend on it.
#[no_mangle]
pub extern "C" fn pbcodec_set_num_threads(n: usize) -> PbcodecStatus {
    guard(|| {
        if !(1..=1024).contains(&n) {
            return fail(PbcodecStatus::InvalidArgument, format!("number of threads must be in 1..1024, got {n}"));
        }
        Ok(core_::parallel::set_num_threads(n)?)
    })
}

/// Current number of worker threads.
#[no_mangle]
pub extern "C" fn pbcodec_get_num_threads() -> usize {
    guard_value(0, core_::parallel::num_threads)
}

// ------------------------------------------------------------------- tensors

/// Parse and validate a serialized PBTensor blob (docs/format.md §7, as
/// written by Python's `PBTensor.to_bytes`); the tensor owns a copy.
///
/// `buf`: `len` readable bytes. `out`: receives the new handle (free it with
/// `pbcodec_tensor_free`). Errors: `FORMAT` for any malformed blob.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_tensor_from_bytes(
    buf: *const u8,
    len: usize,
    out: *mut *mut PbcodecTensor,
) -> PbcodecStatus {
    guard(|| {
        check_out_ptr(out)?;
        let b = unsafe { slice(buf, len, "buf")? };
        let t = pb::from_bytes(b)?;
        unsafe { put_out(out, PbcodecTensor { data: Arc::new(TensorData::from_core(t)) }) }
    })
}

/// Check a serialized PBTensor blob without keeping anything: `OK` or
/// `FORMAT` with the reason.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_validate_bytes(buf: *const u8, len: usize) -> PbcodecStatus {
    guard(|| {
        let b = unsafe { slice(buf, len, "buf")? };
        pb::from_bytes(b)?;
        Ok(())
    })
}

/// Build a tensor from its component buffers (for example the seven
/// tensors of a safetensors entry that the caller has mapped itself), after
/// the same validation as a blob.
///
/// Zero-copy by default: the tensor reads the caller's `signs`, `counts`,
/// `values` and `code_offsets` buffers directly (they must stay alive and
/// unchanged until `pbcodec_tensor_free`); scales are widened to float32 in a
/// small copy. `flags & PBCODEC_COPY` copies everything instead.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_tensor_from_parts(
    parts: *const PbcodecParts,
    flags: u32,
    out: *mut *mut PbcodecTensor,
) -> PbcodecStatus {
    guard(|| {
        check_out_ptr(out)?;
        // SAFETY: NULL checked; a valid struct otherwise.
        let Some(p) = (unsafe { parts.as_ref() }) else {
            return fail(PbcodecStatus::InvalidArgument, "parts is NULL");
        };
        if flags & !PBCODEC_COPY != 0 {
            return fail(PbcodecStatus::InvalidArgument, format!("unknown flags {flags:#x}"));
        }
        let copy = flags & PBCODEC_COPY != 0;
        let too_big = || Fail(PbcodecStatus::InvalidArgument, "shape does not fit in memory".into());
        let m = usize::try_from(p.m).map_err(|_| too_big())?;
        let n = usize::try_from(p.n).map_err(|_| too_big())?;
        let g = usize::try_from(p.group_size).map_err(|_| too_big())?;
        let scale = match p.scale_bits {
            16 => ScaleType::F16,
            32 => ScaleType::F32,
            b => return fail(PbcodecStatus::InvalidArgument, format!("scale_bits must be 16 or 32, got {b}")),
        };
        let w = p.scale_bits as usize / 8;
        let scales = |ptr: *const c_void, len: usize, what: &str| -> R<Vec<f32>> {
            let bytes_len = len.checked_mul(w).ok_or_else(too_big)?;
            // Scales may be unaligned float16/float32: read them as bytes.
            let b = unsafe { slice(ptr as *const u8, bytes_len, what)? };
            Ok(tensor::scales_from_le(b, scale))
        };
        let mu = scales(p.mu, p.mu_len, "mu")?;
        let alpha = scales(p.alpha, p.alpha_len, "alpha")?;
        let sigma = scales(p.sigma, p.sigma_len, "sigma")?;
        let signs = unsafe { slice(p.signs, p.signs_len, "signs")? };
        let counts = unsafe { slice(p.counts, p.counts_len, "counts")? };
        let values = unsafe { slice(p.values, p.values_len, "values")? };
        let co = unsafe { slice(p.code_offsets, p.code_offsets_len, "code_offsets")? };
        let part = |s: &[u8]| -> Part<u8> {
            if copy {
                Part::Owned(s.to_vec())
            } else {
                // SAFETY: the caller keeps the buffer alive (documented contract).
                unsafe { tensor::u8_part(s) }
            }
        };
        let t = TensorData {
            m,
            n,
            group_size: g,
            scale,
            count_bits: p.count_bits,
            value_bits: p.salient_bits,
            signs: part(signs),
            counts: part(counts),
            values: part(values),
            code_offsets: if copy {
                Part::Owned(co.to_vec())
            } else {
                // SAFETY: as above; aligned (checked by `slice`).
                Part::Borrowed(unsafe { std::slice::from_raw_parts(co.as_ptr(), co.len()) })
            },
            mu,
            alpha,
            sigma,
            value_offsets: Vec::new(),
            layout: std::sync::OnceLock::new(),
            _keep: None,
        };
        if p.count_bits == 0 || p.count_bits > 8 || (p.salient_bits != 4 && p.salient_bits != 8) {
            return fail(
                PbcodecStatus::Format,
                format!("bad residual parameters: count_bits={}, salient_bits={}", p.count_bits, p.salient_bits),
            );
        }
        let t = t.validate()?;
        unsafe { put_out(out, PbcodecTensor { data: Arc::new(t) }) }
    })
}

/// Free a tensor handle (NULL is a no-op). Buffers it borrowed may be
/// released after this returns.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_tensor_free(t: *mut PbcodecTensor) {
    if !t.is_null() {
        // SAFETY: `t` came from Box::into_raw in this library and is freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(t) })));
    }
}

/// Shape, parameters and size of a tensor.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_tensor_info(t: *const PbcodecTensor, info: *mut PbcodecInfo) -> PbcodecStatus {
    guard(|| {
        let t = unsafe { tensor_ref(t)? };
        if info.is_null() {
            return fail(PbcodecStatus::InvalidArgument, "info is NULL");
        }
        let v = t.view();
        let bytes = pb::serialized_len(&v).unwrap_or(u64::MAX);
        let mn = (t.m as f64) * (t.n as f64);
        let i = PbcodecInfo {
            m: t.m as u64,
            n: t.n as u64,
            group_size: t.group_size as u64,
            scale_bits: t.scale.bits(),
            salient_bits: t.value_bits,
            count_bits: t.count_bits,
            num_salient: *t.value_offsets.last().unwrap_or(&0) as u64,
            serialized_bytes: bytes,
            bits_per_weight: if mn > 0.0 { 8.0 * bytes as f64 / mn } else { 0.0 },
        };
        // SAFETY: non-NULL, the caller's struct.
        unsafe { *info = i };
        Ok(())
    })
}

/// `y[b, i] = sum_j W[i, j] * x[b, j]` for a batch of row vectors `x`, straight
/// from the compressed data without rebuilding `W`
/// (docs/format.md §6.3), multi-threaded; results do not depend on the
/// thread count and equal Python's `PBTensor.matvec`.
///
/// `mode`: a `PbcodecActivation` (`PBCODEC_ACTIVATION_FLOAT32` or
/// `PBCODEC_ACTIVATION_INT8`). `x`: `x_len = batch * n`
/// float32, row-major. `y`: `y_len = batch * m` float32, overwritten. The
/// batch is `x_len / n` (`y_len / m` when `n = 0`).
#[no_mangle]
pub unsafe extern "C" fn pbcodec_tensor_matvec(
    t: *const PbcodecTensor,
    mode: u32,
    x: *const f32,
    x_len: usize,
    y: *mut f32,
    y_len: usize,
) -> PbcodecStatus {
    guard(|| {
        let t = unsafe { tensor_ref(t)? };
        if mode != PbcodecActivation::Float32 as u32 && mode != PbcodecActivation::Int8 as u32 {
            return fail(PbcodecStatus::InvalidArgument, format!("unknown activation mode {mode}"));
        }
        let batch = x_len.checked_div(t.n).or(y_len.checked_div(t.m)).unwrap_or(0);
        if batch.checked_mul(t.n) != Some(x_len) || batch.checked_mul(t.m) != Some(y_len) {
            return fail(
                PbcodecStatus::InvalidArgument,
                format!("x has {x_len} and y {y_len} elements: not batch x {} and batch x {}", t.n, t.m),
            );
        }
        let xs = unsafe { slice(x, x_len, "x")? };
        let ys = unsafe { slice_mut(y, y_len, "y")? };
        if mode == PbcodecActivation::Int8 as u32 {
            return Ok(core_::qmatvec::matvec_int8(t.layout()?, xs, batch, None, ys)?);
        }
        // As Python does: the layout kernel where the group size allows it.
        let lay = t.layout()?;
        if core_::fmatvec::supported(lay) {
            return Ok(core_::fmatvec::matvec_f32(lay, xs, batch, None, ys)?);
        }
        Ok(core_::matvec::matvec(&t.view(), xs, batch, ys)?)
    })
}

/// Rebuild the dense matrix `W` (`m x n` float32, row-major) into `out`
/// (`out_len = m * n`), with the arithmetic of docs/format.md §6.2.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_tensor_decompress(
    t: *const PbcodecTensor,
    out: *mut f32,
    out_len: usize,
) -> PbcodecStatus {
    guard(|| {
        let t = unsafe { tensor_ref(t)? };
        if t.m.checked_mul(t.n) != Some(out_len) {
            return fail(
                PbcodecStatus::InvalidArgument,
                format!("out has {out_len} elements, expected {} x {}", t.m, t.n),
            );
        }
        let o = unsafe { slice_mut(out, out_len, "out")? };
        Ok(t.view().decompress(o)?)
    })
}

/// Serialize (docs/format.md §7). Writes the blob into `buf` when `cap` is
/// large enough; `*len` receives the blob's length in any case. With
/// `buf = NULL` or a `cap` too small: `PBCODEC_STATUS_BUFFER_TOO_SMALL` (ask
/// for the size, allocate, call again).
#[no_mangle]
pub unsafe extern "C" fn pbcodec_tensor_to_bytes(
    t: *const PbcodecTensor,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> PbcodecStatus {
    guard(|| {
        let t = unsafe { tensor_ref(t)? };
        if len.is_null() {
            return fail(PbcodecStatus::InvalidArgument, "len is NULL");
        }
        let v = t.view();
        let need = pb::serialized_len(&v)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| Fail(PbcodecStatus::InvalidArgument, "tensor too large to serialize".into()))?;
        // SAFETY: non-NULL.
        unsafe { *len = need };
        if buf.is_null() || cap < need {
            return fail(PbcodecStatus::BufferTooSmall, format!("the blob needs {need} bytes, the buffer has {cap}"));
        }
        let b = pb::to_bytes(&v)?;
        let dst = unsafe { slice_mut(buf, b.len(), "buf")? };
        dst.copy_from_slice(&b);
        Ok(())
    })
}

// --------------------------------------------------------------------- files

fn file_from(
    data: st::FileData,
    backing: Option<Arc<dyn std::any::Any + Send + Sync>>,
    base: *const u8,
) -> R<PbcodecFile> {
    let mut names: Vec<(CString, bool)> = Vec::new();
    for (k, c) in data.compressed.keys().map(|k| (k, true)).chain(data.raw.keys().map(|k| (k, false))) {
        let s = CString::new(k.as_str())
            .or_else(|_| fail(PbcodecStatus::Format, format!("tensor name {k:?} contains a NUL character")))?;
        names.push((s, c));
    }
    names.sort();
    Ok(PbcodecFile { data, _backing: backing, base, names })
}

/// Open a pbcodec safetensors file (docs/format.md §8, written by
/// `pbcodec compress` or `pbcodec.save_file`): memory-mapped, header and every
/// compressed tensor validated (`FORMAT` on anything malformed, `IO` when it
/// cannot be read). The file must not be modified while it is open.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_file_open(path: *const c_char, out: *mut *mut PbcodecFile) -> PbcodecStatus {
    guard(|| {
        check_out_ptr(out)?;
        let path = unsafe { c_str(path, "path")? };
        let f = std::fs::File::open(path).or_else(|e| fail(PbcodecStatus::Io, format!("{path}: {e}")))?;
        // SAFETY: read-only map; the file must not change while open (documented).
        let map = unsafe { memmap2::Mmap::map(&f) }.or_else(|e| fail(PbcodecStatus::Io, format!("{path}: {e}")))?;
        let backing: Arc<dyn std::any::Any + Send + Sync> = Arc::new(map);
        let bytes: &[u8] = backing.downcast_ref::<memmap2::Mmap>().unwrap();
        let base = bytes.as_ptr();
        // SAFETY: `backing` owns the map and is kept by the file and each tensor.
        let data = unsafe { st::open(bytes, Some(backing.clone())) }
            .map_err(|e| Fail(PbcodecStatus::Format, format!("{path}: {e}")))?;
        let f = file_from(data, Some(backing), base)?;
        unsafe { put_out(out, f) }
    })
}

/// Open a pbcodec safetensors file held in memory (`len` bytes at `buf`).
/// Zero-copy by default (the buffer must stay alive and unchanged until the
/// file and every tensor taken from it are freed); `flags & PBCODEC_COPY`
/// copies it.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_file_open_buffer(
    buf: *const u8,
    len: usize,
    flags: u32,
    out: *mut *mut PbcodecFile,
) -> PbcodecStatus {
    guard(|| {
        check_out_ptr(out)?;
        if flags & !PBCODEC_COPY != 0 {
            return fail(PbcodecStatus::InvalidArgument, format!("unknown flags {flags:#x}"));
        }
        let b = unsafe { slice(buf, len, "buf")? };
        let (backing, bytes): (Option<Arc<dyn std::any::Any + Send + Sync>>, &[u8]) = if flags & PBCODEC_COPY != 0 {
            let v: Arc<dyn std::any::Any + Send + Sync> = Arc::new(b.to_vec());
            let p = v.downcast_ref::<Vec<u8>>().unwrap();
            // SAFETY: the Vec's heap buffer lives as long as `v`, which the file keeps.
            let s = unsafe { std::slice::from_raw_parts(p.as_ptr(), p.len()) };
            (Some(v), s)
        } else {
            (None, b)
        };
        // SAFETY: the bytes are owned by `backing` or kept alive by the caller.
        let data = unsafe { st::open(bytes, backing.clone()) }.map_err(|e| Fail(PbcodecStatus::Format, e))?;
        let f = file_from(data, backing, bytes.as_ptr())?;
        unsafe { put_out(out, f) }
    })
}

/// Close a file (NULL is a no-op). Tensors taken from it stay valid (they
/// keep the mapping alive) until freed.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_file_close(f: *mut PbcodecFile) {
    if !f.is_null() {
        // SAFETY: `f` came from Box::into_raw in this library and is freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(f) })));
    }
}

/// Number of tensors in the file: compressed tensors (by their name, not
/// their components) and plain tensors. 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_file_num_tensors(f: *const PbcodecFile) -> usize {
    // SAFETY: a non-NULL handle from this library.
    guard_value(0, || unsafe { f.as_ref() }.map_or(0, |f| f.names.len()))
}

/// The `index`-th tensor name (sorted order) and whether it is compressed
/// (`*compressed` = 1) or plain (0; read it with `pbcodec_file_get_raw`).
/// `*name` stays valid until the file is closed. `compressed` may be NULL.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_file_tensor_name(
    f: *const PbcodecFile,
    index: usize,
    name: *mut *const c_char,
    compressed: *mut i32,
) -> PbcodecStatus {
    guard(|| {
        // SAFETY: a non-NULL handle from this library.
        let Some(f) = (unsafe { f.as_ref() }) else {
            return fail(PbcodecStatus::InvalidArgument, "file handle is NULL");
        };
        if name.is_null() {
            return fail(PbcodecStatus::InvalidArgument, "name is NULL");
        }
        let Some((s, c)) = f.names.get(index) else {
            return fail(
                PbcodecStatus::NotFound,
                format!("index {index} out of range (the file has {} tensors)", f.names.len()),
            );
        };
        // SAFETY: checked non-NULL; `compressed` may be NULL.
        unsafe {
            *name = s.as_ptr();
            if !compressed.is_null() {
                *compressed = *c as i32;
            }
        }
        Ok(())
    })
}

/// The compressed tensor `name` of the file, as a new handle (free it with
/// `pbcodec_tensor_free`; it stays valid after the file is closed).
/// `NOT_FOUND` if the file has no compressed tensor of that name.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_file_get_tensor(
    f: *const PbcodecFile,
    name: *const c_char,
    out: *mut *mut PbcodecTensor,
) -> PbcodecStatus {
    guard(|| {
        check_out_ptr(out)?;
        // SAFETY: a non-NULL handle from this library.
        let Some(f) = (unsafe { f.as_ref() }) else {
            return fail(PbcodecStatus::InvalidArgument, "file handle is NULL");
        };
        let name = unsafe { c_str(name, "name")? };
        let Some(t) = f.data.compressed.get(name) else {
            let hint =
                if f.data.raw.contains_key(name) { " (it is a plain tensor: use pbcodec_file_get_raw)" } else { "" };
            return fail(PbcodecStatus::NotFound, format!("no compressed tensor {name:?} in the file{hint}"));
        };
        unsafe { put_out(out, PbcodecTensor { data: t.clone() }) }
    })
}

/// The plain (not compressed) tensor `name`: dtype, shape and a pointer to
/// its bytes in the mapped file (valid until the file is closed).
/// `NOT_FOUND` if there is no plain tensor of that name.
#[no_mangle]
pub unsafe extern "C" fn pbcodec_file_get_raw(
    f: *const PbcodecFile,
    name: *const c_char,
    out: *mut PbcodecRawTensor,
) -> PbcodecStatus {
    guard(|| {
        // SAFETY: a non-NULL handle from this library.
        let Some(f) = (unsafe { f.as_ref() }) else {
            return fail(PbcodecStatus::InvalidArgument, "file handle is NULL");
        };
        if out.is_null() {
            return fail(PbcodecStatus::InvalidArgument, "out is NULL");
        }
        let name = unsafe { c_str(name, "name")? };
        let Some(r) = f.data.raw.get(name) else {
            let hint = if f.data.compressed.contains_key(name) {
                " (it is compressed: use pbcodec_file_get_tensor)"
            } else {
                ""
            };
            return fail(PbcodecStatus::NotFound, format!("no plain tensor {name:?} in the file{hint}"));
        };
        let data = if r.end > r.start {
            // SAFETY: the range was checked against the buffer by the parser.
            unsafe { f.base.add(f.data.data_start + r.start) as *const c_void }
        } else {
            ptr::null()
        };
        let rt = PbcodecRawTensor {
            dtype: r.dtype.as_ptr(),
            ndim: r.shape.len(),
            shape: r.shape.as_ptr(),
            data,
            nbytes: r.end - r.start,
        };
        // SAFETY: non-NULL, the caller's struct.
        unsafe { *out = rt };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {})); // keep the test output clean
        let st = guard(|| panic!("kernel bug {}", 42));
        std::panic::set_hook(prev);
        assert_eq!(st, PbcodecStatus::Internal);
        let msg = unsafe { CStr::from_ptr(pbcodec_last_error()) }.to_str().unwrap().to_string();
        assert!(msg.contains("kernel bug 42"), "{msg}");
        assert_eq!(guard(|| Ok(())), PbcodecStatus::Ok);
        assert_eq!(unsafe { CStr::from_ptr(pbcodec_last_error()) }.to_bytes(), b"");
    }
}
