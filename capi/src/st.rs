//! pbcodec files: safetensors holding compressed tensors (docs/format.md §8).
//! The same checks as `pbcodec.files.load_file`, in the same spirit: every
//! size is checked against the buffer before anything is built, and every
//! compressed tensor passes the core's full validation.
use std::collections::BTreeMap;
use std::ffi::CStr;
use std::sync::Arc;

use core_::pb::ScaleType;
use serde_json::{Map, Value};

use crate::tensor::{i64_part, scales_from_le, u8_part, TensorData};

/// What the safetensors reference implementation accepts.
const MAX_HEADER: u64 = 100 * 1024 * 1024;
const CODEC: &str = "pbcodec.pb";
const VERSION: u64 = 1;
const META_KEY: &str = "pbcodec";
/// Dtype code, element size, and the code as a C string (handed out to C).
const DTYPES: [(&str, usize, &CStr); 13] = [
    ("BOOL", 1, c"BOOL"),
    ("U8", 1, c"U8"),
    ("I8", 1, c"I8"),
    ("U16", 2, c"U16"),
    ("I16", 2, c"I16"),
    ("F16", 2, c"F16"),
    ("BF16", 2, c"BF16"),
    ("U32", 4, c"U32"),
    ("I32", 4, c"I32"),
    ("F32", 4, c"F32"),
    ("U64", 8, c"U64"),
    ("I64", 8, c"I64"),
    ("F64", 8, c"F64"),
];

/// A tensor as stored: dtype code, shape, byte range in the data buffer.
pub(crate) struct Raw {
    pub dtype: &'static CStr,
    pub shape: Vec<u64>,
    pub start: usize,
    pub end: usize,
}

pub(crate) struct Parsed {
    /// Offset of the data buffer in the file.
    pub data_start: usize,
    pub raw: BTreeMap<String, Raw>,
    /// Compressed tensors by name, with their description from the metadata.
    pub compressed: BTreeMap<String, Map<String, Value>>,
}

type Res<T> = Result<T, String>;

fn dtype_of(code: &str) -> Option<(usize, &'static CStr)> {
    DTYPES.iter().find(|d| d.0 == code).map(|d| (d.1, d.2))
}

/// Parse and check the header of the file in `buf` (§8).
pub(crate) fn parse(buf: &[u8]) -> Res<Parsed> {
    if buf.len() < 8 {
        return Err(format!("{} bytes is too short for a safetensors file", buf.len()));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if n > MAX_HEADER || n > (buf.len() - 8) as u64 {
        return Err(format!("header length {n} exceeds the file ({} bytes) or the 100 MiB limit", buf.len()));
    }
    let n = n as usize;
    let text = std::str::from_utf8(&buf[8..8 + n]).map_err(|e| format!("header is not valid UTF-8 ({e})"))?;
    let header: Value = serde_json::from_str(text).map_err(|e| format!("header is not valid JSON ({e})"))?;
    let Value::Object(mut header) = header else {
        return Err("header is not a JSON object".into());
    };
    let metadata = match header.remove("__metadata__") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) if m.values().all(Value::is_string) => m,
        Some(_) => return Err("__metadata__ must map strings to strings".into()),
    };
    let data_start = 8 + n;
    let buf_len = buf.len() - data_start;
    let mut raw = BTreeMap::new();
    let mut spans = Vec::with_capacity(header.len());
    for (name, ent) in &header {
        let ent = ent.as_object().filter(|e| {
            e.len() == 3 && e.contains_key("dtype") && e.contains_key("shape") && e.contains_key("data_offsets")
        });
        let Some(ent) = ent else {
            return Err(format!("tensor {name:?}: entry must have exactly dtype, shape, data_offsets"));
        };
        let code = ent["dtype"].as_str().unwrap_or("");
        let Some((size, dtype)) = dtype_of(code) else {
            return Err(format!("tensor {name:?}: unsupported dtype {}", ent["dtype"]));
        };
        let shape: Option<Vec<u64>> = ent["shape"].as_array().and_then(|a| a.iter().map(Value::as_u64).collect());
        let Some(shape) = shape else {
            return Err(format!("tensor {name:?}: bad shape {}", ent["shape"]));
        };
        let offs: Option<Vec<u64>> =
            ent["data_offsets"].as_array().filter(|a| a.len() == 2).and_then(|a| a.iter().map(Value::as_u64).collect());
        let Some(offs) = offs else {
            return Err(format!("tensor {name:?}: bad data_offsets {}", ent["data_offsets"]));
        };
        let want = shape.iter().try_fold(size as u64, |a, &d| a.checked_mul(d));
        let (b, e) = (offs[0], offs[1]);
        if want.is_none() || !(b <= e && e <= buf_len as u64) || Some(e - b) != want {
            return Err(format!(
                "tensor {name:?}: data_offsets [{b}, {e}] do not fit its shape in a {buf_len}-byte buffer"
            ));
        }
        spans.push((b, e, name.clone()));
        raw.insert(name.clone(), Raw { dtype, shape, start: b as usize, end: e as usize });
    }
    // The data buffer is covered exactly: no holes, no overlaps.
    spans.sort();
    let mut pos = 0u64;
    for (b, e, name) in &spans {
        if *b != pos {
            return Err(format!("tensor {name:?} starts at {b}, expected {pos} (hole or overlap)"));
        }
        pos = *e;
    }
    if pos != buf_len as u64 {
        return Err(format!("{} bytes after the last tensor", buf_len as u64 - pos));
    }
    let mut compressed = BTreeMap::new();
    if let Some(desc) = metadata.get(META_KEY) {
        let desc: Value = serde_json::from_str(desc.as_str().unwrap_or(""))
            .map_err(|e| format!("__metadata__[{META_KEY:?}] is not JSON ({e})"))?;
        let Value::Object(desc) = desc else {
            return Err(format!("__metadata__[{META_KEY:?}] must be an object of objects"));
        };
        for (name, d) in desc {
            let Value::Object(d) = d else {
                return Err(format!("__metadata__[{META_KEY:?}] must be an object of objects"));
            };
            compressed.insert(name, d);
        }
    }
    for name in compressed.keys() {
        if raw.contains_key(name) {
            return Err(format!("tensor {name:?} collides with a compressed tensor's name"));
        }
    }
    Ok(Parsed { data_start, raw, compressed })
}

fn int(d: &Map<String, Value>, key: &str, name: &str) -> Res<u64> {
    match d.get(key) {
        Some(Value::Number(v)) if v.is_u64() => Ok(v.as_u64().unwrap()),
        v => Err(format!("{name}: metadata field {key:?} must be a non-negative integer, got {v:?}")),
    }
}

/// Build and fully validate the compressed tensor `name` from its components.
/// The parts borrow `buf`.
///
/// # Safety
/// `buf` must outlive the returned tensor and stay unchanged (the caller
/// stores whatever owns it in the tensor's `_keep`).
pub(crate) unsafe fn build(
    name: &str,
    d: &Map<String, Value>,
    p: &Parsed,
    buf: &[u8],
) -> Res<(TensorData, Vec<String>)> {
    if d.get("codec").and_then(Value::as_str) != Some(CODEC) {
        return Err(format!("{name}: unknown codec {:?}", d.get("codec")));
    }
    let version = int(d, "version", name)?;
    if version != VERSION {
        return Err(format!("{name}: unsupported {CODEC} version {version} (this build reads {VERSION})"));
    }
    if d.contains_key("dense_bits") && int(d, "dense_bits", name)? != 1 {
        return Err(format!("{name}: dense_bits {} is not supported", d["dense_bits"]));
    }
    let shape: Option<Vec<u64>> = d
        .get("shape")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .and_then(|a| a.iter().map(Value::as_u64).collect());
    let Some(shape) = shape else {
        return Err(format!("{name}: bad shape {:?}", d.get("shape")));
    };
    let too_big = || format!("{name}: shape {shape:?} is too large");
    let m = usize::try_from(shape[0]).map_err(|_| too_big())?;
    let n = usize::try_from(shape[1]).map_err(|_| too_big())?;
    let g = int(d, "group_size", name)?;
    if !(1..=n.max(1) as u64).contains(&g) {
        return Err(format!("{name}: group_size {g} out of range"));
    }
    let g = g as usize;
    let ng = if n == 0 { 0 } else { n.div_ceil(g) } as u64;
    let (scale, scode) = match d.get("scale_dtype").and_then(Value::as_str) {
        Some("float16") => (ScaleType::F16, "F16"),
        Some("float32") => (ScaleType::F32, "F32"),
        v => return Err(format!("{name}: bad scale_dtype {v:?}")),
    };
    let sb = int(d, "salient_bits", name)?;
    let cb = int(d, "count_bits", name)?;
    let values_code = match sb {
        8 => "I8",
        4 => "U8",
        _ => return Err(format!("{name}: salient_bits {sb} must be 4 or 8")),
    };
    let (m64, n64) = (m as u64, n as u64);
    let expect: [(&str, &str, Option<Vec<u64>>); 7] = [
        ("signs", "U8", Some(vec![m64, n64.div_ceil(8)])),
        ("mu", scode, Some(vec![m64, ng])),
        ("alpha", scode, Some(vec![m64, ng])),
        ("sigma", scode, Some(vec![m64])),
        ("residual.counts", "U8", None),
        ("residual.values", values_code, None),
        ("residual.code_offsets", "I64", Some(vec![m64.checked_add(1).ok_or_else(too_big)?])),
    ];
    let mut bytes: Vec<&[u8]> = Vec::with_capacity(7);
    let mut names = Vec::with_capacity(7);
    for (suffix, code, shp) in expect {
        let full = format!("{name}.{suffix}");
        let Some(r) = p.raw.get(&full) else {
            return Err(format!("{name}: missing component {full}"));
        };
        if r.dtype.to_bytes() != code.as_bytes() {
            return Err(format!("{full}: dtype {} not allowed here (expected {code})", r.dtype.to_string_lossy()));
        }
        match shp {
            Some(s) if r.shape != s => return Err(format!("{full}: shape {:?}, expected {s:?}", r.shape)),
            None if r.shape.len() != 1 => return Err(format!("{full} must be 1-D")),
            _ => {}
        }
        bytes.push(&buf[p.data_start + r.start..p.data_start + r.end]);
        names.push(full);
    }
    let t = TensorData {
        m,
        n,
        group_size: g,
        scale,
        count_bits: u32::try_from(cb).unwrap_or(u32::MAX),
        value_bits: sb as u32,
        // SAFETY: `buf` outlives the tensor (this function's contract).
        signs: unsafe { u8_part(bytes[0]) },
        mu: scales_from_le(bytes[1], scale),
        alpha: scales_from_le(bytes[2], scale),
        sigma: scales_from_le(bytes[3], scale),
        counts: unsafe { u8_part(bytes[4]) },
        values: unsafe { u8_part(bytes[5]) },
        code_offsets: unsafe { i64_part(bytes[6]) },
        value_offsets: Vec::new(),
        layout: std::sync::OnceLock::new(),
        _keep: None,
    };
    let t = t.validate().map_err(|e| format!("{name}: {e}"))?;
    Ok((t, names))
}

/// A parsed, validated file: compressed tensors built, other tensors located.
pub(crate) struct FileData {
    pub compressed: BTreeMap<String, Arc<TensorData>>,
    pub raw: BTreeMap<String, Raw>,
    pub data_start: usize,
}

/// # Safety
/// `buf` must stay alive and unchanged while the result and every tensor
/// built from it live; `keep` must own it (or be None when the caller
/// guarantees that by other means).
pub(crate) unsafe fn open(buf: &[u8], keep: Option<Arc<dyn std::any::Any + Send + Sync>>) -> Res<FileData> {
    let mut p = parse(buf)?;
    let mut compressed = BTreeMap::new();
    let mut owned = Vec::new();
    for (name, d) in &p.compressed {
        // SAFETY: forwarded contract.
        let (mut t, names) = unsafe { build(name, d, &p, buf)? };
        t._keep = keep.clone();
        compressed.insert(name.clone(), Arc::new(t));
        owned.extend(names);
    }
    for k in owned {
        p.raw.remove(&k);
    }
    Ok(FileData { compressed, raw: p.raw, data_start: p.data_start })
}
