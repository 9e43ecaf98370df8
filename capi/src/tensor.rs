//! The tensor behind a `PbcodecTensor` handle: validated parts, each either
//! owned or borrowed (from the caller's buffers, or from a file's memory map
//! that `keep` holds alive).
use std::any::Any;
use std::sync::{Arc, OnceLock};

use core_::layout::Layout;
use core_::pb::{self, PbRef, ScaleType};
use core_::rle::Streams;

/// A slice that is either owned or points into memory someone else keeps alive.
pub(crate) enum Part<T: 'static> {
    Owned(Vec<T>),
    /// Validated, aligned, immutable for the tensor's lifetime (the caller's
    /// promise for `pbcodec_tensor_from_parts` without a copy; a file's map
    /// otherwise).
    Borrowed(&'static [T]),
}

impl<T> Part<T> {
    pub(crate) fn get(&self) -> &[T] {
        match self {
            Part::Owned(v) => v,
            Part::Borrowed(s) => s,
        }
    }
}

pub(crate) struct TensorData {
    pub m: usize,
    pub n: usize,
    pub group_size: usize,
    pub scale: ScaleType,
    pub count_bits: u32,
    pub value_bits: u32,
    pub signs: Part<u8>,
    pub counts: Part<u8>,
    pub values: Part<u8>,
    pub code_offsets: Part<i64>,
    /// Scales widened to f32 (exact for float16), as the kernels read them.
    pub mu: Vec<f32>,
    pub alpha: Vec<f32>,
    pub sigma: Vec<f32>,
    /// Recomputed by the validating walk; never taken from the caller.
    pub value_offsets: Vec<i64>,
    /// The execution layout for INT8 activations (docs/format.md §6.5), built on
    /// the first INT8 matvec and kept with the tensor.
    pub layout: OnceLock<Result<Layout, core_::Error>>,
    /// Whatever owns borrowed memory (a file's map); dropped last.
    pub _keep: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: every part is immutable after construction (borrowed parts point
// to memory that is never written while the tensor lives); the kernels only
// read them, from any thread.
unsafe impl Send for TensorData {}
unsafe impl Sync for TensorData {}

impl TensorData {
    pub(crate) fn view(&self) -> PbRef<'_> {
        PbRef {
            m: self.m,
            n: self.n,
            group_size: self.group_size,
            scale: self.scale,
            signs: self.signs.get(),
            mu: &self.mu,
            alpha: &self.alpha,
            sigma: &self.sigma,
            res: Streams {
                count_bits: self.count_bits,
                value_bits: self.value_bits,
                counts: self.counts.get(),
                values: self.values.get(),
                code_offsets: self.code_offsets.get(),
            },
            value_offsets: &self.value_offsets,
        }
    }

    /// The execution layout, built once (thread-safe) on first use.
    pub(crate) fn layout(&self) -> Result<&Layout, core_::Error> {
        self.layout.get_or_init(|| core_::layout::build(&self.view())).as_ref().map_err(Clone::clone)
    }

    /// From a parsed blob (owns everything; already validated by the parser).
    pub(crate) fn from_core(t: pb::PbTensor) -> TensorData {
        TensorData {
            m: t.m,
            n: t.n,
            group_size: t.group_size,
            scale: t.scale,
            count_bits: t.residual.count_bits,
            value_bits: t.residual.value_bits,
            signs: Part::Owned(t.signs),
            counts: Part::Owned(t.residual.counts),
            values: Part::Owned(t.residual.values),
            code_offsets: Part::Owned(t.residual.code_offsets),
            mu: t.mu,
            alpha: t.alpha,
            sigma: t.sigma,
            value_offsets: t.residual.value_offsets,
            layout: OnceLock::new(),
            _keep: None,
        }
    }

    /// Run every check `PBTensor.from_bytes` makes (core `pb::validate`) and
    /// fill in the value offsets. Parts must be set; `value_offsets` is replaced.
    pub(crate) fn validate(mut self) -> core_::Result<TensorData> {
        self.value_offsets = vec![0; self.m.saturating_add(1)];
        let vo = pb::validate(&self.view())?;
        self.value_offsets = vo;
        Ok(self)
    }
}

/// Scales stored as little-endian float16 or float32 bytes, widened to f32.
pub(crate) fn scales_from_le(bytes: &[u8], scale: ScaleType) -> Vec<f32> {
    match scale {
        ScaleType::F16 => {
            bytes.chunks_exact(2).map(|c| core_::half::f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
        }
        ScaleType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    }
}

/// Little-endian int64 bytes as a slice: borrowed when aligned on a
/// little-endian host, else decoded into an owned copy.
///
/// # Safety
/// `bytes` must stay alive and unchanged for as long as the returned part.
pub(crate) unsafe fn i64_part(bytes: &[u8]) -> Part<i64> {
    let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<i64>());
    if cfg!(target_endian = "little") && aligned && bytes.len().is_multiple_of(8) {
        // SAFETY: aligned, length a multiple of 8, any bit pattern is a valid i64;
        // lifetime per this function's contract.
        let s = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const i64, bytes.len() / 8) };
        Part::Borrowed(s)
    } else {
        Part::Owned(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
    }
}

/// # Safety
/// `bytes` must stay alive and unchanged for as long as the returned part.
pub(crate) unsafe fn u8_part(bytes: &[u8]) -> Part<u8> {
    // SAFETY: lifetime per this function's contract.
    Part::Borrowed(unsafe { std::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) })
}
