//! The C functions, called as C would call them: results equal the core's,
//! every error path returns a status and a message, and no malformed input
//! crashes.
use std::ffi::{CStr, CString};
use std::ptr;

use core_::pb::{self, Params, ScaleType};
use pbcodec_c::*;

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

/// What the C API's FLOAT32 mode computes: the layout kernel where the group
/// size allows it (as Python's PBTensor.matvec), else the row-wise kernel.
fn f32_ref(core: &pb::PbTensor, x: &[f32], batch: usize, want: &mut [f32]) {
    let lay = core_::layout::build(&core.view()).unwrap();
    if core_::fmatvec::supported(&lay) {
        core_::fmatvec::matvec_f32(&lay, x, batch, None, want).unwrap();
    } else {
        core_::matvec::matvec(&core.view(), x, batch, want).unwrap();
    }
}

fn sample(m: usize, n: usize, scale: ScaleType, group: Option<usize>, bits: u32) -> pb::PbTensor {
    let p = Params { salient_bits: bits, group_size: group, scale, ..Params::default() };
    pb::compress(&gaussian(m, n, 7), m, n, None, &p).unwrap()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(pbcodec_last_error()) }.to_string_lossy().into_owned()
}

fn open_blob(b: &[u8]) -> (PbcodecStatus, *mut PbcodecTensor) {
    let mut t = ptr::null_mut();
    let st = unsafe { pbcodec_tensor_from_bytes(b.as_ptr(), b.len(), &mut t) };
    (st, t)
}

fn matvec(t: *const PbcodecTensor, x: &[f32], m: usize) -> Vec<f32> {
    let mut info = PbcodecInfo::default();
    assert_eq!(unsafe { pbcodec_tensor_info(t, &mut info) }, PbcodecStatus::Ok);
    let b = x.len() / info.n as usize;
    let mut y = vec![0f32; b * m];
    let st = unsafe {
        pbcodec_tensor_matvec(t, PbcodecActivation::Float32 as u32, x.as_ptr(), x.len(), y.as_mut_ptr(), y.len())
    };
    assert_eq!(st, PbcodecStatus::Ok, "{}", last_error());
    y
}

#[test]
fn blob_round_trip_matches_core() {
    for (scale, group, bits) in [(ScaleType::F16, None, 8), (ScaleType::F32, Some(16), 4), (ScaleType::F16, Some(7), 8)]
    {
        let (m, n) = (37, 75);
        let core = sample(m, n, scale, group, bits);
        let blob = pb::to_bytes(&core.view()).unwrap();
        let (st, t) = open_blob(&blob);
        assert_eq!(st, PbcodecStatus::Ok, "{}", last_error());
        assert_eq!(last_error(), "");
        let mut info = PbcodecInfo::default();
        assert_eq!(unsafe { pbcodec_tensor_info(t, &mut info) }, PbcodecStatus::Ok);
        assert_eq!((info.m, info.n, info.salient_bits, info.scale_bits), (m as u64, n as u64, bits, scale.bits()));
        assert_eq!(info.serialized_bytes, blob.len() as u64);
        assert_eq!(info.num_salient, core.residual.num_values());
        // matvec, batch 1 and 3, equals the core kernel bit for bit.
        for batch in [1usize, 3] {
            let x = gaussian(batch, n, 3);
            let mut want = vec![0f32; batch * m];
            f32_ref(&core, &x, batch, &mut want);
            assert_eq!(matvec(t, &x, m), want);
        }
        // decompress equals the core's.
        let mut want = vec![0f32; m * n];
        core.view().decompress(&mut want).unwrap();
        let mut got = vec![0f32; m * n];
        assert_eq!(unsafe { pbcodec_tensor_decompress(t, got.as_mut_ptr(), got.len()) }, PbcodecStatus::Ok);
        assert_eq!(got, want);
        // to_bytes: size query, then the same bytes.
        let mut len = 0usize;
        let st = unsafe { pbcodec_tensor_to_bytes(t, ptr::null_mut(), 0, &mut len) };
        assert_eq!((st, len), (PbcodecStatus::BufferTooSmall, blob.len()));
        let mut out = vec![0u8; len];
        assert_eq!(unsafe { pbcodec_tensor_to_bytes(t, out.as_mut_ptr(), out.len(), &mut len) }, PbcodecStatus::Ok);
        assert_eq!(out, blob);
        assert_eq!(unsafe { pbcodec_validate_bytes(blob.as_ptr(), blob.len()) }, PbcodecStatus::Ok);
        unsafe { pbcodec_tensor_free(t) };
    }
}

#[test]
fn int8_mode_matches_the_core_and_refuses_unsupported_groups() {
    let core = sample(8, 32, ScaleType::F16, None, 8);
    let blob = pb::to_bytes(&core.view()).unwrap();
    let (_, t) = open_blob(&blob);
    let x: Vec<f32> = (0..64).map(|j| ((j * 7 % 13) as f32 - 6.0) / 3.0).collect();
    let mut y = [0f32; 16];
    for _ in 0..2 {
        // the second call reuses the layout built by the first
        let st =
            unsafe { pbcodec_tensor_matvec(t, PbcodecActivation::Int8 as u32, x.as_ptr(), 64, y.as_mut_ptr(), 16) };
        assert_eq!(st, PbcodecStatus::Ok, "{}", last_error());
        let lay = core_::layout::build(&core.view()).unwrap();
        let mut want = [0f32; 16];
        core_::qmatvec::matvec_int8(&lay, &x, 2, None, &mut want).unwrap();
        assert_eq!(y.map(f32::to_bits), want.map(f32::to_bits));
    }
    unsafe { pbcodec_tensor_free(t) };
    let grouped = sample(8, 32, ScaleType::F16, Some(16), 8);
    let (_, t) = open_blob(&pb::to_bytes(&grouped.view()).unwrap());
    let x = [1f32; 32];
    let mut y = [0f32; 8];
    let st = unsafe { pbcodec_tensor_matvec(t, PbcodecActivation::Int8 as u32, x.as_ptr(), 32, y.as_mut_ptr(), 8) };
    assert_eq!(st, PbcodecStatus::InvalidArgument);
    assert!(last_error().contains("multiple of 64"), "{}", last_error());
    let st = unsafe { pbcodec_tensor_matvec(t, 7, x.as_ptr(), 32, y.as_mut_ptr(), 8) };
    assert_eq!(st, PbcodecStatus::InvalidArgument);
    assert!(last_error().contains("unknown activation mode 7"));
    unsafe { pbcodec_tensor_free(t) };
}

#[test]
fn bad_arguments_are_reported_not_crashed() {
    let core = sample(8, 32, ScaleType::F16, None, 8);
    let blob = pb::to_bytes(&core.view()).unwrap();
    let (_, t) = open_blob(&blob);
    let x = vec![1f32; 64];
    let mut y = vec![0f32; 16];
    unsafe {
        let mut out = ptr::null_mut();
        assert_eq!(pbcodec_tensor_from_bytes(ptr::null(), 10, &mut out), PbcodecStatus::InvalidArgument);
        assert!(last_error().contains("NULL"));
        assert_eq!(
            pbcodec_tensor_from_bytes(blob.as_ptr(), blob.len(), ptr::null_mut()),
            PbcodecStatus::InvalidArgument
        );
        assert_eq!(
            pbcodec_tensor_matvec(ptr::null(), 0, x.as_ptr(), 32, y.as_mut_ptr(), 8),
            PbcodecStatus::InvalidArgument
        );
        // Lengths that are not batch x n / batch x m.
        assert_eq!(pbcodec_tensor_matvec(t, 0, x.as_ptr(), 33, y.as_mut_ptr(), 8), PbcodecStatus::InvalidArgument);
        assert_eq!(pbcodec_tensor_matvec(t, 0, x.as_ptr(), 64, y.as_mut_ptr(), 8), PbcodecStatus::InvalidArgument);
        assert_eq!(pbcodec_tensor_matvec(t, 0, x.as_ptr(), 64, y.as_mut_ptr(), 16), PbcodecStatus::Ok);
        assert_eq!(pbcodec_tensor_matvec(t, 0, ptr::null(), 32, y.as_mut_ptr(), 8), PbcodecStatus::InvalidArgument);
        // Misaligned float pointers are refused, not dereferenced.
        let aligned = [0f32; 34];
        let mis = (aligned.as_ptr() as *const u8).add(1) as *const f32;
        assert_eq!(pbcodec_tensor_matvec(t, 0, mis, 32, y.as_mut_ptr(), 8), PbcodecStatus::InvalidArgument);
        assert_eq!(pbcodec_tensor_decompress(t, y.as_mut_ptr(), 16), PbcodecStatus::InvalidArgument);
        assert_eq!(pbcodec_tensor_info(t, ptr::null_mut()), PbcodecStatus::InvalidArgument);
        assert_eq!(pbcodec_set_num_threads(0), PbcodecStatus::InvalidArgument);
        assert_eq!(pbcodec_set_num_threads(2), PbcodecStatus::Ok);
        assert_eq!(pbcodec_get_num_threads(), 2);
        assert_eq!(last_error(), "");
        pbcodec_tensor_free(ptr::null_mut());
        pbcodec_file_close(ptr::null_mut());
        assert_eq!(pbcodec_abi_version(), PBCODEC_ABI_VERSION);
        assert_eq!(CStr::from_ptr(pbcodec_version()).to_str().unwrap(), env!("CARGO_PKG_VERSION"));
        pbcodec_tensor_free(t);
    }
}

#[test]
fn every_truncation_and_many_bit_flips_fail_cleanly() {
    let core = sample(5, 40, ScaleType::F16, Some(8), 4);
    let blob = pb::to_bytes(&core.view()).unwrap();
    for cut in 0..blob.len() {
        let (st, t) = open_blob(&blob[..cut]);
        assert_eq!(st, PbcodecStatus::Format, "cut {cut}");
        assert!(t.is_null());
        assert!(!last_error().is_empty());
    }
    for i in 0..blob.len() {
        for bit in [0, 3, 7] {
            let mut b = blob.clone();
            b[i] ^= 1 << bit;
            let (st, t) = open_blob(&b);
            // The CRC catches every single-bit flip.
            assert_eq!(st, PbcodecStatus::Format, "byte {i} bit {bit}");
            unsafe { pbcodec_tensor_free(t) };
        }
    }
}

fn parts_of(t: &pb::PbTensor, mu16: &[u16], al16: &[u16], sg16: &[u16]) -> PbcodecParts {
    PbcodecParts {
        m: t.m as u64,
        n: t.n as u64,
        group_size: t.group_size as u64,
        scale_bits: 16,
        count_bits: t.residual.count_bits,
        salient_bits: t.residual.value_bits,
        signs: t.signs.as_ptr(),
        signs_len: t.signs.len(),
        mu: mu16.as_ptr().cast(),
        mu_len: mu16.len(),
        alpha: al16.as_ptr().cast(),
        alpha_len: al16.len(),
        sigma: sg16.as_ptr().cast(),
        sigma_len: sg16.len(),
        counts: t.residual.counts.as_ptr(),
        counts_len: t.residual.counts.len(),
        values: t.residual.values.as_ptr(),
        values_len: t.residual.values.len(),
        code_offsets: t.residual.code_offsets.as_ptr(),
        code_offsets_len: t.residual.code_offsets.len(),
    }
}

fn f16s(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| core_::half::f64_to_f16(x as f64)).collect()
}

#[test]
fn from_parts_borrowed_and_copied() {
    let (m, n) = (19, 50);
    let core = sample(m, n, ScaleType::F16, Some(10), 8);
    let (mu, al, sg) = (f16s(&core.mu), f16s(&core.alpha), f16s(&core.sigma));
    let x = gaussian(2, n, 5);
    let mut want = vec![0f32; 2 * m];
    f32_ref(&core, &x, 2, &mut want);
    for flags in [0, PBCODEC_COPY] {
        let p = parts_of(&core, &mu, &al, &sg);
        let mut t = ptr::null_mut();
        assert_eq!(unsafe { pbcodec_tensor_from_parts(&p, flags, &mut t) }, PbcodecStatus::Ok, "{}", last_error());
        assert_eq!(matvec(t, &x, m), want);
        unsafe { pbcodec_tensor_free(t) };
    }
    // Inconsistent parts: each one a FORMAT error naming the problem.
    let mut bad_co = core.residual.code_offsets.clone();
    bad_co[3] = bad_co[4] + 1;
    let mut pad = core.signs.clone();
    pad[n.div_ceil(8) - 1] |= 0x80; // n = 50: bits 2..7 of a row's last byte are padding
    let neg_alpha = {
        let mut a = al.clone();
        a[0] = 0xBC00; // -1.0
        a
    };
    type Edit = Box<dyn Fn(&mut PbcodecParts)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("short signs", Box::new(|p: &mut PbcodecParts| p.signs_len -= 1)),
        ("code offsets", Box::new(move |p: &mut PbcodecParts| p.code_offsets = bad_co.as_ptr())),
        ("padding", Box::new(move |p: &mut PbcodecParts| p.signs = pad.as_ptr())),
        ("alpha < 0", Box::new(move |p: &mut PbcodecParts| p.alpha = neg_alpha.as_ptr().cast())),
        ("count_bits", Box::new(|p: &mut PbcodecParts| p.count_bits = 9)),
        ("group_size", Box::new(|p: &mut PbcodecParts| p.group_size = 0)),
        ("values", Box::new(|p: &mut PbcodecParts| p.values_len -= 1)),
    ];
    for (what, f) in cases {
        let mut p = parts_of(&core, &mu, &al, &sg);
        f(&mut p);
        let mut t = ptr::null_mut();
        let st = unsafe { pbcodec_tensor_from_parts(&p, 0, &mut t) };
        assert!(matches!(st, PbcodecStatus::Format | PbcodecStatus::InvalidArgument), "{what}: {st:?}");
        assert!(t.is_null());
        assert!(!last_error().is_empty());
    }
    let p = parts_of(&core, &mu, &al, &sg);
    let mut t = ptr::null_mut();
    assert_eq!(unsafe { pbcodec_tensor_from_parts(&p, 8, &mut t) }, PbcodecStatus::InvalidArgument);
}

/// A safetensors file as docs/format.md §8 lays it out.
fn safetensors(tensors: &[(&str, &str, Vec<u64>, Vec<u8>)], meta: Option<String>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let e =
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]});
        header.insert(name.to_string(), e);
        data.extend_from_slice(bytes);
    }
    if let Some(m) = meta {
        header.insert("__metadata__".into(), serde_json::json!({ "pbcodec": m }));
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

fn file_of(core: &pb::PbTensor) -> Vec<u8> {
    let le16 = |v: &[f32]| f16s(v).iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>();
    let (m, n, ng) = (core.m as u64, core.n as u64, core.mu.len() as u64 / core.m as u64);
    let co: Vec<u8> = core.residual.code_offsets.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bias: Vec<u8> = (0..m).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let tensors = vec![
        ("w.residual.code_offsets", "I64", vec![m + 1], co),
        ("bias", "F32", vec![m], bias),
        ("w.mu", "F16", vec![m, ng], le16(&core.mu)),
        ("w.alpha", "F16", vec![m, ng], le16(&core.alpha)),
        ("w.sigma", "F16", vec![m], le16(&core.sigma)),
        ("w.signs", "U8", vec![m, n.div_ceil(8)], core.signs.clone()),
        ("w.residual.counts", "U8", vec![core.residual.counts.len() as u64], core.residual.counts.clone()),
        ("w.residual.values", "I8", vec![core.residual.values.len() as u64], core.residual.values.clone()),
    ];
    let meta = serde_json::json!({"w": {"codec": "pbcodec.pb", "version": 1, "shape": [m, n], "dense_bits": 1,
        "group_size": core.group_size, "count_bits": core.residual.count_bits, "salient_bits": 8,
        "scale_dtype": "float16"}});
    safetensors(&tensors, Some(meta.to_string()))
}

fn open_file(buf: &[u8], flags: u32) -> (PbcodecStatus, *mut PbcodecFile) {
    let mut f = ptr::null_mut();
    let st = unsafe { pbcodec_file_open_buffer(buf.as_ptr(), buf.len(), flags, &mut f) };
    (st, f)
}

#[test]
fn files_open_list_and_multiply() {
    let (m, n) = (24, 70);
    let core = sample(m, n, ScaleType::F16, None, 8);
    let buf = file_of(&core);
    let x = gaussian(1, n, 9);
    let mut want = vec![0f32; m];
    f32_ref(&core, &x, 1, &mut want);
    for flags in [0, PBCODEC_COPY] {
        let (st, f) = open_file(&buf, flags);
        assert_eq!(st, PbcodecStatus::Ok, "{}", last_error());
        unsafe {
            assert_eq!(pbcodec_file_num_tensors(f), 2);
            let mut names = Vec::new();
            for i in 0..2 {
                let (mut name, mut c) = (ptr::null(), -1);
                assert_eq!(pbcodec_file_tensor_name(f, i, &mut name, &mut c), PbcodecStatus::Ok);
                names.push((CStr::from_ptr(name).to_str().unwrap().to_string(), c));
            }
            assert_eq!(names, [("bias".to_string(), 0), ("w".to_string(), 1)]);
            let (mut name, mut c) = (ptr::null(), 0);
            assert_eq!(pbcodec_file_tensor_name(f, 2, &mut name, &mut c), PbcodecStatus::NotFound);
            let mut raw = std::mem::zeroed::<PbcodecRawTensor>();
            let bias = CString::new("bias").unwrap();
            assert_eq!(pbcodec_file_get_raw(f, bias.as_ptr(), &mut raw), PbcodecStatus::Ok);
            assert_eq!(CStr::from_ptr(raw.dtype).to_str().unwrap(), "F32");
            assert_eq!((raw.ndim, *raw.shape, raw.nbytes), (1, m as u64, 4 * m));
            assert_eq!(std::slice::from_raw_parts(raw.data as *const f32, m)[5], 5.0);
            let w = CString::new("w").unwrap();
            let mut t = ptr::null_mut();
            assert_eq!(pbcodec_file_get_raw(f, w.as_ptr(), &mut raw), PbcodecStatus::NotFound);
            assert!(last_error().contains("pbcodec_file_get_tensor"));
            assert_eq!(pbcodec_file_get_tensor(f, bias.as_ptr(), &mut t), PbcodecStatus::NotFound);
            assert_eq!(pbcodec_file_get_tensor(f, w.as_ptr(), &mut t), PbcodecStatus::Ok);
            pbcodec_file_close(f); // the tensor outlives the file handle
            assert_eq!(matvec(t, &x, m), want);
            pbcodec_tensor_free(t);
        }
    }
}

#[test]
fn malformed_files_fail_cleanly() {
    let core = sample(16, 40, ScaleType::F16, None, 8);
    let buf = file_of(&core);
    // Every truncation.
    for cut in 0..buf.len() {
        let (st, f) = open_file(&buf[..cut], 0);
        assert_eq!(st, PbcodecStatus::Format, "cut {cut}");
        assert!(f.is_null());
    }
    // Single-byte corruption anywhere: either rejected or (data bytes that
    // stay valid, e.g. a residual value or a scale) accepted; never a crash,
    // and an accepted file still multiplies.
    let mut rejected = 0;
    for i in 0..buf.len() {
        let mut b = buf.clone();
        b[i] ^= 0x5A;
        let (st, f) = open_file(&b, 0);
        if st == PbcodecStatus::Ok {
            let w = CString::new("w").unwrap();
            let mut t = ptr::null_mut();
            if unsafe { pbcodec_file_get_tensor(f, w.as_ptr(), &mut t) } == PbcodecStatus::Ok {
                let _ = matvec(t, &[1.0; 40], 16);
            }
            unsafe { pbcodec_tensor_free(t) };
        } else {
            assert_eq!(st, PbcodecStatus::Format);
            assert!(!last_error().is_empty());
            rejected += 1;
        }
        unsafe { pbcodec_file_close(f) };
    }
    assert!(rejected > buf.len() / 4, "only {rejected} of {} corruptions rejected", buf.len());
    // Specific header faults, each with its message.
    let text = |b: &[u8]| {
        let (st, f) = open_file(b, 0);
        assert_eq!(st, PbcodecStatus::Format);
        assert!(f.is_null());
        last_error()
    };
    let mut b = buf.clone();
    b[7] = 0xFF;
    assert!(text(&b).contains("header length"));
    let mut b = buf.clone();
    b[8] = b'[';
    assert!(text(&b).contains("JSON"));
    let meta = |m: &str| {
        let t = vec![("x", "U8", vec![2], vec![1, 2])];
        safetensors(&t, Some(m.to_string()))
    };
    assert!(text(&meta("{\"w\": {\"codec\": \"other\"}}")).contains("unknown codec"));
    assert!(text(&meta("{\"w\": {\"codec\": \"pbcodec.pb\", \"version\": 2}}")).contains("version 2"));
    assert!(text(&meta("not json")).contains("not JSON"));
    let ok_meta = "{\"w\": {\"codec\": \"pbcodec.pb\", \"version\": 1, \"shape\": [1, 8], \"group_size\": 8, \
                   \"count_bits\": 4, \"salient_bits\": 8, \"scale_dtype\": \"float16\"}}";
    assert!(text(&meta(ok_meta)).contains("missing component w.signs"));
    let hole = safetensors(&[("x", "U8", vec![2], vec![1, 2])], None);
    let mut h = hole.clone();
    h.push(0);
    assert!(text(&h).contains("after the last tensor"));
    let (st, f) = open_file(&hole, 0);
    assert_eq!(st, PbcodecStatus::Ok);
    unsafe { pbcodec_file_close(f) };
    // A missing file is an IO error.
    let mut f = ptr::null_mut();
    let p = CString::new("/nonexistent/pbcodec.safetensors").unwrap();
    assert_eq!(unsafe { pbcodec_file_open(p.as_ptr(), &mut f) }, PbcodecStatus::Io);
}

#[test]
fn handles_are_shared_across_threads() {
    let core = sample(64, 128, ScaleType::F16, None, 8);
    let blob = pb::to_bytes(&core.view()).unwrap();
    let (_, t) = open_blob(&blob);
    let x = gaussian(1, 128, 1);
    let want = matvec(t, &x, 64);
    let addr = t as usize;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let x = x.clone();
            std::thread::spawn(move || matvec(addr as *const PbcodecTensor, &x, 64))
        })
        .collect();
    for h in threads {
        assert_eq!(h.join().unwrap(), want);
    }
    unsafe { pbcodec_tensor_free(t) };
}
