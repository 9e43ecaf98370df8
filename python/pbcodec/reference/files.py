"""§8 files: plain and compressed tensors in safetensors (docs/format.md)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from ..errors import CorruptError, FormatError
from ._common import _nonzero_product, _packed_len
from .bitpack import unpack_bits
from .pb import PBTensor, _n_groups
from .rle import RLE

# ---------------------------------------------------------------------------
# §8 files: compressed tensors in safetensors
# ---------------------------------------------------------------------------

# §8 dtype table: code -> (bits per element, numpy dtype name, ml_dtypes name).
_ST_DTYPES = {
    "BOOL": (8, "bool", None),
    "U8": (8, "uint8", None),
    "I8": (8, "int8", None),
    "U16": (16, "uint16", None),
    "I16": (16, "int16", None),
    "F16": (16, "float16", None),
    "U32": (32, "uint32", None),
    "I32": (32, "int32", None),
    "F32": (32, "float32", None),
    "U64": (64, "uint64", None),
    "I64": (64, "int64", None),
    "F64": (64, "float64", None),
    "C64": (64, "complex64", None),
    "BF16": (16, None, "bfloat16"),
    "F8_E5M2": (8, None, "float8_e5m2"),
    "F8_E4M3": (8, None, "float8_e4m3fn"),
    "F8_E4M3FNUZ": (8, None, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, None, "float8_e5m2fnuz"),
    "F8_E8M0": (8, None, "float8_e8m0fnu"),
    "F4": (4, None, None),
    "F6_E2M3": (6, None, None),
    "F6_E3M2": (6, None, None),
}
_ST_MAX_HEADER = 100_000_000
_ST_MAX_NDIM = 32
_PB_PARTS = ("signs", "mu", "alpha", "sigma", "residual.counts", "residual.values", "residual.code_offsets")


class StoredTensor:
    """A tensor kept as its safetensors dtype code, shape and bytes (what the reference
    ``load_file`` returns when numpy has no such dtype here)."""

    def __init__(self, dtype, shape, data):
        self.dtype, self.shape, self.data = dtype, tuple(shape), bytes(data)

    def __eq__(self, other):
        return (self.dtype, self.shape, bytes(self.data)) == (other.dtype, other.shape, bytes(other.data))


def _ml_dtype(name):
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else None


def _st_exact_dtype(code):
    """The numpy dtype holding ``code`` exactly here, or None."""
    _, nm, ml = _ST_DTYPES[code]
    if nm is not None:
        return np.dtype(nm)
    return _ml_dtype(ml) if ml is not None else None


def _st_nbytes(code, shape) -> int:
    """§8: bytes of a tensor; ValueError when the shape breaks the §8 rules."""
    bits = _ST_DTYPES[code][0]
    if len(shape) > _ST_MAX_NDIM:
        raise ValueError(f"{len(shape)} dimensions, at most {_ST_MAX_NDIM}")
    if _nonzero_product(shape) * max(bits // 8, 1) >= 1 << 63:
        raise ValueError(f"shape {list(shape)} is too large")
    if math.prod(shape) * bits % 8:
        raise ValueError(f"{code} of shape {list(shape)} does not fill whole bytes")
    return math.prod(shape) * bits // 8


def _st_entry(name, a):
    """(code, shape, little-endian bytes) of an array or a stored tensor."""
    if isinstance(getattr(a, "dtype", None), str):  # StoredTensor / pbcodec.RawTensor
        code, shape, data = a.dtype, tuple(a.shape), bytes(a.data)
        if code not in _ST_DTYPES or len(data) != _st_nbytes(code, shape):
            raise ValueError(f"tensor {name!r}: {code} data do not match shape {shape}")
        return code, [int(d) for d in shape], data
    a = np.asarray(a)
    code = None
    for c, (_, nm, ml) in _ST_DTYPES.items():
        want = np.dtype(nm) if nm is not None else (_ml_dtype(ml) if ml is not None else None)
        if want is not None and a.dtype.newbyteorder("=") == want:
            code = c
            break
    if code is None:
        raise TypeError(f"tensor {name!r}: cannot store dtype {a.dtype} in a safetensors file")
    if a.ndim > _ST_MAX_NDIM:
        raise ValueError(f"tensor {name!r}: {a.ndim} dimensions, at most {_ST_MAX_NDIM}")
    return code, [int(d) for d in a.shape], a.astype(a.dtype.newbyteorder("<")).tobytes()


def save_file(tensors, path, metadata=None) -> None:
    """Write ``{name: PBTensor | ndarray | StoredTensor}`` as a safetensors file with the
    canonical bytes of docs/format.md §8 (reference twin of ``pbcodec.save_file``).
    Everything is checked before the file is opened."""
    metadata = dict(metadata or {})
    if "pbcodec" in metadata:
        raise ValueError("metadata key 'pbcodec' is reserved")
    entries = {}
    desc = {}

    def put(key, value):
        if key in entries:
            raise ValueError(f"tensor name {key!r} is used twice")
        entries[key] = value

    for name, v in tensors.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' cannot name a tensor")
        if isinstance(v, PBTensor):
            v.to_bytes()  # validates, like the library does before writing
            r = v.residual
            arrays = (v.signs, v.mu, v.alpha, v.sigma, r.counts, r.values, r.code_offsets)
            for suffix, arr in zip(_PB_PARTS, arrays, strict=True):
                put(f"{name}.{suffix}", _st_entry(name, arr))
            desc[name] = {
                "codec": "pbcodec.pb",
                "version": 1,
                "shape": list(v.shape),
                "dense_bits": 1,
                "group_size": v.group_size,
                "count_bits": r.count_bits,
                "salient_bits": r.value_bits,
                "scale_dtype": str(v.mu.dtype),
            }
        else:
            put(name, _st_entry(name, v))
    order = sorted(entries, key=lambda k: (-_ST_DTYPES[entries[k][0]][0], k))
    header = {}
    offset = 0
    for k in order:
        code, shape, data = entries[k]
        header[k] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if desc:
        metadata["pbcodec"] = json.dumps(desc, sort_keys=True)
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-(8 + len(hb)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(entries[k][2] for k in order))


class _Pairs(list):
    """A JSON object as its (key, value) pairs, in file order."""


_DESC_FIELDS = ("codec", "version", "shape", "dense_bits", "group_size", "count_bits", "salient_bits", "scale_dtype")


def _descriptions(text) -> dict:
    """§8.2: the description object. Keys may not repeat in it nor among a description's
    known fields; other fields are ignored, whatever they hold."""
    try:
        top = json.loads(text, object_pairs_hook=_Pairs)
    except (json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"pbcodec metadata is not valid JSON ({e})") from None
    if not isinstance(top, _Pairs):
        raise FormatError("pbcodec metadata must be a JSON object")
    out = {}
    for name, row in top:
        if name in out:
            raise FormatError(f"description {name!r} appears twice")
        if not isinstance(row, _Pairs):
            raise FormatError(f"{name}: description is not an object")
        fields = {}
        for k, v in row:
            if k not in _DESC_FIELDS:
                continue
            if k in fields:
                raise FormatError(f"{name}: field {k!r} appears twice")
            if isinstance(v, _Pairs) or (isinstance(v, list) and not all(_is_json_int(x) for x in v)):
                raise FormatError(f"{name}: field {k!r} must be a scalar or a list of integers")
            fields[k] = v
        out[name] = fields
    return out


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise FormatError("a JSON object repeats a key")
    return dict(pairs)


def _is_json_int(x) -> bool:
    return type(x) is int  # not bool, not float


def load_file(path) -> dict:
    """Read a safetensors file (reference twin of ``pbcodec.load_file``): compressed
    tensors are rebuilt from their components and serialized-form validated; plain
    tensors come back as numpy arrays of their exact dtype, or as
    :class:`StoredTensor` when numpy has none here (§8)."""
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8:
        raise FormatError("file too short for safetensors")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > min(_ST_MAX_HEADER, len(buf) - 8):
        raise FormatError("header length exceeds the file or the 100 MB limit")
    try:
        header = json.loads(buf[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("__metadata__ must map strings to strings")
    data = buf[8 + n :]
    arrays, spans = {}, []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: bad entry")
        code, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(code, str) or code not in _ST_DTYPES:
            raise FormatError(f"tensor {name!r}: unknown dtype {code!r}")
        if not isinstance(shape, list) or not all(_is_json_int(d) and d >= 0 for d in shape):
            raise FormatError(f"tensor {name!r}: bad shape")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_json_int(o) and o >= 0 for o in offs):
            raise FormatError(f"tensor {name!r}: bad data_offsets")
        try:
            nbytes = _st_nbytes(code, shape)
        except ValueError as err:
            raise FormatError(f"tensor {name!r}: {err}") from None
        b, end = offs
        if not b <= end <= len(data) or end - b != nbytes:
            raise FormatError(f"tensor {name!r}: bad data_offsets")
        spans.append((b, end))
        dt = _st_exact_dtype(code)
        raw = data[b:end]
        if dt is None:
            arrays[name] = StoredTensor(code, shape, raw)
        else:
            arrays[name] = np.frombuffer(raw, dtype=dt.newbyteorder("<")).reshape(shape)
    pos = 0
    for b, end in sorted(spans):
        if b != pos:
            raise FormatError("hole or overlap in the data buffer")
        pos = end
    if pos != len(data):
        raise FormatError("bytes after the last tensor")
    out = {}
    desc = _descriptions(metadata["pbcodec"]) if "pbcodec" in metadata else {}
    owned = set()
    for name, d in desc.items():
        d = {k: v for k, v in d.items() if v is not None}  # §8.2: a null field counts as absent
        if d.get("codec") != "pbcodec.pb" or not _is_json_int(d.get("version")) or d["version"] != 1:
            raise FormatError(f"{name}: unknown codec or version")
        missing = [k for k in _PB_PARTS if f"{name}.{k}" not in arrays]
        if missing:
            raise FormatError(f"{name}: missing component(s) {missing}")
        owned.update(f"{name}.{k}" for k in _PB_PARTS)
        a = {k: arrays[f"{name}.{k}"] for k in _PB_PARTS}
        try:
            m, n_ = d["shape"]
            if not all(_is_json_int(v) for v in (m, n_, d["group_size"], d["count_bits"], d["salient_bits"])):
                raise FormatError("non-integer parameters")
            dense_bits = d.get("dense_bits", 1)
            if d.get("scale_dtype") not in ("float16", "float32") or not _is_json_int(dense_bits) or dense_bits != 1:
                raise FormatError("bad scale_dtype or dense_bits")
            ng = _n_groups(n_, d["group_size"]) if d["group_size"] > 0 else -1
            want = {
                "signs": (np.uint8, (m, _packed_len(n_, 1))),
                "mu": (np.dtype(d["scale_dtype"]), (m, ng)),
                "alpha": (np.dtype(d["scale_dtype"]), (m, ng)),
                "sigma": (np.dtype(d["scale_dtype"]), (m,)),
                "residual.code_offsets": (np.int64, (m + 1,)),
                "residual.counts": (np.uint8, None),
                "residual.values": (np.int8 if d["salient_bits"] == 8 else np.uint8, None),
            }
            for k, (dt, shp) in want.items():
                arr = a[k]
                if not isinstance(arr, np.ndarray) or arr.dtype != dt:
                    raise FormatError(f"{k}: wrong dtype")
                if (arr.shape != shp) if shp is not None else (arr.ndim != 1):
                    raise FormatError(f"{k}: wrong shape {arr.shape}")
            co = a["residual.code_offsets"].astype(np.int64)
            vo = np.zeros(m + 1, np.int64)  # recomputed by from_bytes' validating walk below
            rle = RLE((m, n_), d["count_bits"], d["salient_bits"], a["residual.counts"], a["residual.values"], co, vo)
            num_values = _count_values(rle)
            rle = RLE(
                (m, n_), d["count_bits"], d["salient_bits"], a["residual.counts"], a["residual.values"], co, num_values
            )
            t = PBTensor((m, n_), a["signs"], a["mu"], a["alpha"], a["sigma"], rle, d["group_size"])
            out[name] = PBTensor.from_bytes(t.to_bytes())  # full §7 validation
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise FormatError(f"{name}: invalid components ({e})") from None
    for k, v in arrays.items():
        if k not in owned:
            out[k] = v
    return out


def _count_values(rle: RLE) -> np.ndarray:
    """value_offsets implied by the codes (non-escape codes per row)."""
    cb = rle.count_bits
    if not 1 <= cb <= 8:
        raise CorruptError(f"count_bits {cb} out of range")
    codes = unpack_bits(rle.counts, cb, int(rle.code_offsets[-1])) if rle.code_offsets.size else np.zeros(0, np.uint8)
    isval = (codes != (1 << cb) - 1).astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(isval)])
    return csum[np.clip(rle.code_offsets, 0, codes.size)].astype(np.int64)
