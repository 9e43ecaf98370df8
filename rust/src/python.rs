//! PyO3 binding layer: converts arrays and errors, releases the GIL, nothing
//! else. Shapes, dtypes and `out=` are prepared by the Python package
//! (`python/pbcodec`); the core re-checks every size, so a caller that skips
//! the package still gets an exception, never unsoundness.
use numpy::{PyArray1, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyType};

use crate::pb::{self, PbRef, ScaleType};
use crate::{bitpack, format, parallel, rle, simd, Error};

static CORRUPT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static TRUNCATED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static UNSUPPORTED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SCALE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Each error kind as its Python exception (`pbcodec.errors`; the three data
/// kinds subclass `FormatError`).
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let (cell, name, m) = match e {
        Error::Invalid(m) => return PyValueError::new_err(m),
        Error::Corrupt(m) => (&CORRUPT_ERROR, "CorruptError", m),
        Error::Truncated(m) => (&TRUNCATED_ERROR, "TruncatedError", m),
        Error::Unsupported(m) => (&UNSUPPORTED_ERROR, "UnsupportedVersionError", m),
        Error::Scale(m) => (&SCALE_ERROR, "ScaleRangeError", m),
    };
    match cell.import(py, "pbcodec.errors", name) {
        Ok(t) => PyErr::from_type(t.clone(), m),
        Err(err) => err,
    }
}

trait IntoPy<T> {
    fn py(self, py: Python<'_>) -> PyResult<T>;
}
impl<T> IntoPy<T> for crate::Result<T> {
    fn py(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

/// Rust slices must be aligned: an unaligned numpy view (e.g. of a memory-mapped
/// file) is rejected here; the Python layer copies such arrays first.
fn aligned<T>(s: &[T], name: &str) -> PyResult<()> {
    if !(s.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(PyValueError::new_err(format!("{name} is not aligned in memory")));
    }
    Ok(())
}
fn ro<'a, T: numpy::Element>(a: &'a PyReadonlyArrayDyn<'_, T>, name: &str) -> PyResult<&'a [T]> {
    let s = a.as_slice().map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))?;
    aligned(s, name)?;
    Ok(s)
}
fn rw<'a, T: numpy::Element>(a: &'a mut PyReadwriteArrayDyn<'_, T>, name: &str) -> PyResult<&'a mut [T]> {
    let s = a.as_slice_mut().map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))?;
    aligned(s, name)?;
    Ok(s)
}

#[pyfunction]
fn pack_bits(
    py: Python<'_>,
    codes: PyReadonlyArrayDyn<'_, u8>,
    rows: usize,
    n: usize,
    bits: u32,
    mut out: PyReadwriteArrayDyn<'_, u8>,
) -> PyResult<()> {
    let (c, o) = (ro(&codes, "codes")?, rw(&mut out, "out")?);
    py.detach(|| bitpack::pack_bits(c, rows, n, bits, o)).py(py)
}

#[pyfunction]
fn unpack_bits(
    py: Python<'_>,
    packed: PyReadonlyArrayDyn<'_, u8>,
    rows: usize,
    count: usize,
    bits: u32,
    mut out: PyReadwriteArrayDyn<'_, u8>,
) -> PyResult<()> {
    let (p, o) = (ro(&packed, "packed")?, rw(&mut out, "out")?);
    py.detach(|| bitpack::unpack_bits(p, rows, count, bits, o)).py(py)
}

macro_rules! sign_fns {
    ($pack:ident, $unpack:ident, $t:ty) => {
        #[pyfunction]
        fn $pack(
            py: Python<'_>,
            x: PyReadonlyArrayDyn<'_, $t>,
            rows: usize,
            n: usize,
            mut out: PyReadwriteArrayDyn<'_, u8>,
        ) -> PyResult<()> {
            let (x, o) = (ro(&x, "x")?, rw(&mut out, "out")?);
            py.detach(|| bitpack::pack_signs::<$t>(x, rows, n, o)).py(py)
        }

        #[pyfunction]
        fn $unpack(
            py: Python<'_>,
            packed: PyReadonlyArrayDyn<'_, u8>,
            rows: usize,
            count: usize,
            pos: $t,
            neg: $t,
            mut out: PyReadwriteArrayDyn<'_, $t>,
        ) -> PyResult<()> {
            let (p, o) = (ro(&packed, "packed")?, rw(&mut out, "out")?);
            py.detach(|| bitpack::unpack_signs::<$t>(p, rows, count, pos, neg, o)).py(py)
        }
    };
}
sign_fns!(pack_signs16, unpack_signs16, u16);
sign_fns!(pack_signs32, unpack_signs32, u32);
sign_fns!(pack_signs64, unpack_signs64, u64);

type EncodedPy<'py> =
    (Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>, u32);

fn encoded_to_py(py: Python<'_>, e: rle::Encoded) -> EncodedPy<'_> {
    (
        PyArray1::from_vec(py, e.counts),
        PyArray1::from_vec(py, e.values),
        PyArray1::from_vec(py, e.code_offsets),
        PyArray1::from_vec(py, e.value_offsets),
        e.count_bits,
    )
}

/// `count_bits == 0` means "auto".
#[pyfunction]
fn rle_encode<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    shape: Vec<usize>,
    count_bits: u32,
    value_bits: u32,
) -> PyResult<EncodedPy<'py>> {
    let xs = ro(&x, "values")?;
    let cb = if count_bits == 0 { None } else { Some(count_bits) };
    let e = py.detach(|| rle::encode(xs, &shape, cb, value_bits)).py(py)?;
    Ok(encoded_to_py(py, e))
}

#[allow(clippy::too_many_arguments)]
#[pyfunction]
fn rle_decode(
    py: Python<'_>,
    counts: PyReadonlyArrayDyn<'_, u8>,
    values: PyReadonlyArrayDyn<'_, u8>,
    code_offsets: PyReadonlyArrayDyn<'_, i64>,
    value_offsets: PyReadonlyArrayDyn<'_, i64>,
    shape: Vec<usize>,
    count_bits: u32,
    value_bits: u32,
    mut out: PyReadwriteArrayDyn<'_, i8>,
) -> PyResult<()> {
    let s = rle::Streams {
        count_bits,
        value_bits,
        counts: ro(&counts, "counts")?,
        values: ro(&values, "values")?,
        code_offsets: ro(&code_offsets, "code_offsets")?,
    };
    let vo = ro(&value_offsets, "value_offsets")?;
    let o = rw(&mut out, "out")?;
    py.detach(|| rle::decode(&s, vo, &shape, o)).py(py)
}

#[pyfunction]
fn rle_to_bytes<'py>(
    py: Python<'py>,
    counts: PyReadonlyArrayDyn<'py, u8>,
    values: PyReadonlyArrayDyn<'py, u8>,
    code_offsets: PyReadonlyArrayDyn<'py, i64>,
    shape: Vec<usize>,
    count_bits: u32,
    value_bits: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let s = rle::Streams {
        count_bits,
        value_bits,
        counts: ro(&counts, "counts")?,
        values: ro(&values, "values")?,
        code_offsets: ro(&code_offsets, "code_offsets")?,
    };
    let v = py.detach(|| format::rle_to_bytes(&s, &shape)).py(py)?;
    Ok(PyBytes::new(py, &v))
}

#[pyfunction]
fn rle_from_bytes<'py>(
    py: Python<'py>,
    buf: PyReadonlyArrayDyn<'py, u8>,
) -> PyResult<(Vec<usize>, u32, EncodedPy<'py>)> {
    let b = ro(&buf, "buf")?;
    let (shape, e) = py.detach(|| format::rle_from_bytes(b)).py(py)?;
    let vb = e.value_bits;
    Ok((shape, vb, encoded_to_py(py, e)))
}

#[pyfunction]
fn rle_nbytes(
    ndim: usize,
    rows: usize,
    num_codes: u64,
    num_values: u64,
    count_bits: u32,
    value_bits: u32,
) -> PyResult<u64> {
    rle::serialized_len(ndim, rows, num_codes, num_values, count_bits, value_bits)
        .ok_or_else(|| PyValueError::new_err("size overflows"))
}

#[pyfunction]
fn crc32c(py: Python<'_>, buf: PyReadonlyArrayDyn<'_, u8>) -> PyResult<u32> {
    let b = ro(&buf, "buf")?;
    Ok(py.detach(|| crate::crc32c::crc32c(b)))
}

#[pyfunction]
fn simd_level() -> &'static str {
    simd::level().name()
}

#[pyfunction]
fn available_simd_levels() -> Vec<&'static str> {
    simd::available().into_iter().map(|l| l.name()).collect()
}

#[pyfunction]
fn set_simd_level(py: Python<'_>, name: &str) -> PyResult<()> {
    let lvl = simd::Level::parse(name)
        .ok_or_else(|| PyValueError::new_err(format!("unknown SIMD level {name:?}; use scalar, avx2 or avx512")))?;
    simd::set_level(lvl).py(py)
}

// ------------------------------------------------------------ PB tensors

/// (m, n, group_size, scale_bits, count_bits, value_bits)
type PbMeta = (usize, usize, usize, u32, u32, u32);
/// (signs, mu, alpha, sigma as f32, counts, values, code_offsets, value_offsets)
type PbArrays<'py> = (
    PyReadonlyArrayDyn<'py, u8>,
    PyReadonlyArrayDyn<'py, f32>,
    PyReadonlyArrayDyn<'py, f32>,
    PyReadonlyArrayDyn<'py, f32>,
    PyReadonlyArrayDyn<'py, u8>,
    PyReadonlyArrayDyn<'py, u8>,
    PyReadonlyArrayDyn<'py, i64>,
    PyReadonlyArrayDyn<'py, i64>,
);

fn pb_view<'a>(meta: PbMeta, a: &'a PbArrays<'_>) -> PyResult<PbRef<'a>> {
    let (m, n, group_size, scale_bits, count_bits, value_bits) = meta;
    let scale = ScaleType::from_bits(scale_bits).ok_or_else(|| PyValueError::new_err("scale bits must be 16 or 32"))?;
    Ok(PbRef {
        m,
        n,
        group_size,
        scale,
        signs: ro(&a.0, "signs")?,
        mu: ro(&a.1, "mu")?,
        alpha: ro(&a.2, "alpha")?,
        sigma: ro(&a.3, "sigma")?,
        res: rle::Streams {
            count_bits,
            value_bits,
            counts: ro(&a.4, "counts")?,
            values: ro(&a.5, "values")?,
            code_offsets: ro(&a.6, "code_offsets")?,
        },
        value_offsets: ro(&a.7, "value_offsets")?,
    })
}

type PbOut<'py> = (
    PbMeta,
    (
        Bound<'py, PyArray1<u8>>,
        Bound<'py, PyArray1<f32>>,
        Bound<'py, PyArray1<f32>>,
        Bound<'py, PyArray1<f32>>,
        Bound<'py, PyArray1<u8>>,
        Bound<'py, PyArray1<u8>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i64>>,
    ),
);

fn pb_to_py(py: Python<'_>, t: pb::PbTensor) -> PbOut<'_> {
    let r = t.residual;
    (
        (t.m, t.n, t.group_size, t.scale.bits(), r.count_bits, r.value_bits),
        (
            PyArray1::from_vec(py, t.signs),
            PyArray1::from_vec(py, t.mu),
            PyArray1::from_vec(py, t.alpha),
            PyArray1::from_vec(py, t.sigma),
            PyArray1::from_vec(py, r.counts),
            PyArray1::from_vec(py, r.values),
            PyArray1::from_vec(py, r.code_offsets),
            PyArray1::from_vec(py, r.value_offsets),
        ),
    )
}

/// `count_bits == 0`: auto; `group_size == 0`: whole row.
#[allow(clippy::too_many_arguments)]
#[pyfunction]
fn pb_compress<'py>(
    py: Python<'py>,
    w: PyReadonlyArrayDyn<'py, f32>,
    m: usize,
    n: usize,
    importance: Option<PyReadonlyArrayDyn<'py, f32>>,
    salient: f64,
    salient_bits: u32,
    count_bits: u32,
    group_size: usize,
    select_tensor: bool,
    shift: bool,
    scale_bits: u32,
) -> PyResult<PbOut<'py>> {
    let ws = ro(&w, "weight")?;
    let imp = match &importance {
        Some(a) => Some(ro(a, "importance")?),
        None => None,
    };
    let scale = ScaleType::from_bits(scale_bits).ok_or_else(|| PyValueError::new_err("scale bits must be 16 or 32"))?;
    let p = pb::Params {
        salient,
        salient_bits,
        count_bits: (count_bits != 0).then_some(count_bits),
        group_size: (group_size != 0).then_some(group_size),
        select_tensor,
        shift,
        scale,
    };
    let t = py.detach(|| pb::compress(ws, m, n, imp, &p)).py(py)?;
    Ok(pb_to_py(py, t))
}

#[pyfunction]
fn pb_decompress(
    py: Python<'_>,
    meta: PbMeta,
    arrays: PbArrays<'_>,
    mut out: PyReadwriteArrayDyn<'_, f32>,
) -> PyResult<()> {
    let v = pb_view(meta, &arrays)?;
    let o = rw(&mut out, "out")?;
    py.detach(|| v.decompress(o)).py(py)
}

#[pyfunction]
fn pb_matvec(
    py: Python<'_>,
    meta: PbMeta,
    arrays: PbArrays<'_>,
    x: PyReadonlyArrayDyn<'_, f32>,
    batch: usize,
    mut out: PyReadwriteArrayDyn<'_, f32>,
) -> PyResult<()> {
    let v = pb_view(meta, &arrays)?;
    let xs = ro(&x, "x")?;
    let o = rw(&mut out, "out")?;
    py.detach(|| crate::matvec::matvec(&v, xs, batch, o)).py(py)
}

/// The execution layout of a PBTensor (docs/format.md §6.5), built once and
/// kept by the Python object; opaque to Python.
#[pyclass(frozen, name = "ExecLayout", module = "pbcodec._core")]
struct PyLayout {
    inner: crate::layout::Layout,
}

#[pymethods]
impl PyLayout {
    /// Resident size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }
    /// Whether the int8 activation mode can run on it.
    #[getter]
    fn int8_supported(&self) -> bool {
        self.inner.int8_supported()
    }
    /// Whether the float32 layout kernels can run on it (group size a multiple of 4).
    #[getter]
    fn f32_supported(&self) -> bool {
        crate::fmatvec::supported(&self.inner)
    }
}

#[pyfunction]
fn pb_layout(py: Python<'_>, meta: PbMeta, arrays: PbArrays<'_>) -> PyResult<PyLayout> {
    let v = pb_view(meta, &arrays)?;
    let inner = py.detach(|| crate::layout::build(&v)).py(py)?;
    Ok(PyLayout { inner })
}

/// A matvec on the execution layout: `(layout, x, batch, bias, out)`.
type LayoutKernel = fn(&crate::layout::Layout, &[f32], usize, Option<&[f32]>, &mut [f32]) -> crate::Result<()>;

/// The arguments both layout matvec bindings take, checked and borrowed, then
/// `kernel(layout, x, batch, bias, out)` with the GIL released.
fn layout_matvec(
    py: Python<'_>,
    layout: &Bound<'_, PyLayout>,
    x: PyReadonlyArrayDyn<'_, f32>,
    batch: usize,
    mut out: PyReadwriteArrayDyn<'_, f32>,
    bias: Option<PyReadonlyArrayDyn<'_, f32>>,
    kernel: LayoutKernel,
) -> PyResult<()> {
    let l = &layout.get().inner;
    let xs = ro(&x, "x")?;
    let bs = match &bias {
        Some(b) => Some(ro(b, "bias")?),
        None => None,
    };
    let o = rw(&mut out, "out")?;
    py.detach(|| kernel(l, xs, batch, bs, o)).py(py)
}

/// int8-activation matvec on a layout (docs/format.md §6.4), plus `bias`.
#[pyfunction]
#[pyo3(signature = (layout, x, batch, out, bias=None))]
fn pb_matvec_int8(
    py: Python<'_>,
    layout: &Bound<'_, PyLayout>,
    x: PyReadonlyArrayDyn<'_, f32>,
    batch: usize,
    out: PyReadwriteArrayDyn<'_, f32>,
    bias: Option<PyReadonlyArrayDyn<'_, f32>>,
) -> PyResult<()> {
    layout_matvec(py, layout, x, batch, out, bias, crate::qmatvec::matvec_int8)
}

/// float32-activation matvec on a layout, plus `bias`.
#[pyfunction]
#[pyo3(signature = (layout, x, batch, out, bias=None))]
fn pb_matvec_layout_f32(
    py: Python<'_>,
    layout: &Bound<'_, PyLayout>,
    x: PyReadonlyArrayDyn<'_, f32>,
    batch: usize,
    out: PyReadwriteArrayDyn<'_, f32>,
    bias: Option<PyReadonlyArrayDyn<'_, f32>>,
) -> PyResult<()> {
    layout_matvec(py, layout, x, batch, out, bias, crate::fmatvec::matvec_f32)
}

#[pyfunction]
fn pb_to_bytes<'py>(py: Python<'py>, meta: PbMeta, arrays: PbArrays<'py>) -> PyResult<Bound<'py, PyBytes>> {
    let v = pb_view(meta, &arrays)?;
    let b = py.detach(|| pb::to_bytes(&v)).py(py)?;
    Ok(PyBytes::new(py, &b))
}

/// Validate parts (from a file); returns the recomputed value offsets.
#[pyfunction]
fn pb_validate<'py>(py: Python<'py>, meta: PbMeta, arrays: PbArrays<'py>) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let v = pb_view(meta, &arrays)?;
    let vo = py.detach(|| pb::validate(&v)).py(py)?;
    Ok(PyArray1::from_vec(py, vo))
}

#[pyfunction]
fn pb_nbytes(meta: PbMeta, arrays: PbArrays<'_>) -> PyResult<u64> {
    let v = pb_view(meta, &arrays)?;
    pb::serialized_len(&v).ok_or_else(|| PyValueError::new_err("size overflows"))
}

#[pyfunction]
fn pb_from_bytes<'py>(py: Python<'py>, buf: PyReadonlyArrayDyn<'py, u8>) -> PyResult<PbOut<'py>> {
    let b = ro(&buf, "buf")?;
    let t = py.detach(|| pb::from_bytes(b)).py(py)?;
    Ok(pb_to_py(py, t))
}

#[pyfunction]
fn set_num_threads(py: Python<'_>, n: usize) -> PyResult<()> {
    parallel::set_num_threads(n).py(py)
}

/// Why `PBCODEC_SPIN_US` is ignored, or None when it is unset or valid.
#[pyfunction]
fn env_spin_error() -> Option<String> {
    parallel::env_spin_us().err().map(|e| e.to_string())
}

/// Why `PBCODEC_NUM_THREADS` is ignored, or None when it is unset or valid.
#[pyfunction]
fn env_threads_error() -> Option<String> {
    parallel::env_threads().err().map(|e| e.to_string())
}

/// Parse a JSON "table" (json.rs) with the schema named by `schema` ("header":
/// safetensors header, "descriptions": pbcodec's metadata). Returns `(rows, strings)`:
/// rows a list of `(key, values)` with `values` a tuple in the schema's field order
/// (None for a missing field; str, int, float, bool, None or a list of ints), and
/// strings None or a dict (the header's `__metadata__`). Field values are built
/// directly, without per-field pairs, and short strings (dtype codes) are interned, so
/// a valid header costs little more than the Python objects it describes.
#[pyfunction]
fn json_table<'py>(py: Python<'py>, buf: &[u8], schema: &str) -> PyResult<(Bound<'py, PyList>, Py<PyAny>)> {
    use crate::json::{Value, DESCRIPTIONS, HEADER};
    use pyo3::types::{PyDict, PyString, PyTuple};
    let schema = match schema {
        "header" => &HEADER,
        "descriptions" => &DESCRIPTIONS,
        _ => return Err(PyValueError::new_err(format!("unknown schema {schema:?}"))),
    };
    let table = py.detach(|| crate::json::parse_table(buf, schema)).py(py)?;
    let rows = PyList::empty(py);
    // Consumed row by row, so the Rust copy shrinks while the Python one grows.
    for (key, fields) in table.rows {
        let mut values: Vec<Py<PyAny>> = Vec::with_capacity(fields.len());
        for v in fields {
            values.push(match v {
                None | Some(Value::Null) => py.None(),
                Some(Value::Bool(b)) => b.into_pyobject(py)?.to_owned().into_any().unbind(),
                Some(Value::Int(i)) => i.into_pyobject(py)?.into_any().unbind(),
                Some(Value::Float(f)) => f.into_pyobject(py)?.into_any().unbind(),
                Some(Value::Str(s)) if s.len() <= 16 => PyString::intern(py, &s).into_any().unbind(),
                Some(Value::Str(s)) => s.into_pyobject(py)?.into_any().unbind(),
                Some(Value::Ints(v)) => PyList::new(py, v)?.into_any().unbind(),
            });
        }
        rows.append((key, PyTuple::new(py, values)?))?;
    }
    let strings = match table.strings {
        None => py.None(),
        Some(pairs) => {
            let d = PyDict::new(py);
            for (k, v) in pairs {
                d.set_item(k, v)?;
            }
            d.into_any().unbind()
        }
    };
    Ok((rows, strings))
}

#[pyfunction]
fn get_num_threads() -> usize {
    parallel::num_threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pack_bits, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_bits, m)?)?;
    m.add_function(wrap_pyfunction!(pack_signs16, m)?)?;
    m.add_function(wrap_pyfunction!(pack_signs32, m)?)?;
    m.add_function(wrap_pyfunction!(pack_signs64, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_signs16, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_signs32, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_signs64, m)?)?;
    m.add_function(wrap_pyfunction!(rle_encode, m)?)?;
    m.add_function(wrap_pyfunction!(rle_decode, m)?)?;
    m.add_function(wrap_pyfunction!(rle_to_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(rle_from_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(rle_nbytes, m)?)?;
    m.add_function(wrap_pyfunction!(crc32c, m)?)?;
    m.add_class::<PyLayout>()?;
    m.add_function(wrap_pyfunction!(pb_layout, m)?)?;
    m.add_function(wrap_pyfunction!(pb_matvec_int8, m)?)?;
    m.add_function(wrap_pyfunction!(pb_matvec_layout_f32, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(available_simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    for f in [
        wrap_pyfunction!(pb_compress, m)?,
        wrap_pyfunction!(pb_decompress, m)?,
        wrap_pyfunction!(pb_matvec, m)?,
        wrap_pyfunction!(pb_to_bytes, m)?,
        wrap_pyfunction!(pb_nbytes, m)?,
        wrap_pyfunction!(pb_validate, m)?,
        wrap_pyfunction!(pb_from_bytes, m)?,
        wrap_pyfunction!(set_num_threads, m)?,
        wrap_pyfunction!(get_num_threads, m)?,
        wrap_pyfunction!(env_threads_error, m)?,
        wrap_pyfunction!(env_spin_error, m)?,
        wrap_pyfunction!(json_table, m)?,
    ] {
        m.add_function(f)?;
    }
    m.add("__doc__", "pbcodec compiled core (internal; use the pbcodec package)")?;
    Ok(())
}
