//! PyO3 binding layer: converts arrays and errors, releases the GIL, nothing
//! else. Shapes, dtypes and `out=` are prepared by the Python package
//! (`python/pbcodec`); the core re-checks every size, so a caller that skips
//! the package still gets an exception, never unsoundness.
use numpy::{PyArray1, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyType};

use crate::{bitpack, format, rle, simd, Error};

static FORMAT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn to_py(py: Python<'_>, e: Error) -> PyErr {
    match e {
        Error::Invalid(m) => PyValueError::new_err(m),
        Error::Format(m) => match FORMAT_ERROR.import(py, "pbcodec.errors", "FormatError") {
            Ok(t) => PyErr::from_type(t.clone(), m),
            Err(err) => err,
        },
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

fn ro<'a, T: numpy::Element>(a: &'a PyReadonlyArrayDyn<'_, T>, name: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}
fn rw<'a, T: numpy::Element>(a: &'a mut PyReadwriteArrayDyn<'_, T>, name: &str) -> PyResult<&'a mut [T]> {
    a.as_slice_mut().map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
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

type EncodedPy<'py> = (
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    u32,
);

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
fn rle_nbytes(ndim: usize, rows: usize, num_codes: u64, num_values: u64, count_bits: u32, value_bits: u32) -> PyResult<u64> {
    format::rle_serialized_len(ndim, rows, num_codes, num_values, count_bits, value_bits)
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
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(available_simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    m.add("__doc__", "pbcodec compiled core (internal; use the pbcodec package)")?;
    Ok(())
}
