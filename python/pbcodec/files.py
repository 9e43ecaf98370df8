"""Files other runtimes can read: compressed tensors in **safetensors** files
(docs/format.md §8).

A :class:`PBTensor` named ``NAME`` is stored as plain safetensors tensors
``NAME.signs`` (U8), ``NAME.mu``, ``NAME.alpha``, ``NAME.sigma`` (F16/F32),
``NAME.residual.counts`` (U8), ``NAME.residual.values`` (I8, or U8 for 4-bit) and
``NAME.residual.code_offsets`` (I64), and described in ``__metadata__["pbcodec"]``
(a JSON object: codec name, format version, shape, parameters). Any safetensors
reader can open the file and read every component; :func:`load_file` validates
everything and memory-maps the data, so a multi-GB file is not read into RAM.
No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FormatError
from .pb import PBTensor

CODEC = "pbcodec.pb"
VERSION = 1
META_KEY = "pbcodec"
MAX_HEADER = 100 * 2**20  # what the safetensors reference implementation accepts

_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {"BF16": 2, **{k: v.itemsize for k, v in _DTYPES.items()}}
# Component name suffix -> (PBTensor attribute path, required dtype codes).
_PARTS = {
    "signs": ("U8",),
    "mu": ("F16", "F32"),
    "alpha": ("F16", "F32"),
    "sigma": ("F16", "F32"),
    "residual.counts": ("U8",),
    "residual.values": ("I8", "U8"),
    "residual.code_offsets": ("I64",),
}


def _bf16_dtype() -> np.dtype | None:
    try:
        import ml_dtypes  # optional: numpy has no bfloat16 of its own

        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        return None


@dataclass
class RawTensor:
    """A tensor as stored: safetensors dtype code, shape, and its bytes (a
    memory-mapped view when read from a file). BF16 stays BF16."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def array(self) -> np.ndarray:
        """As a numpy array (zero-copy). BF16 needs ml_dtypes, else raw uint16 bits."""
        if self.dtype == "BF16":
            dt = _bf16_dtype() or np.dtype(np.uint16)
        else:
            dt = _DTYPES[self.dtype]
        return np.frombuffer(self.data, dtype=dt).reshape(self.shape)

    def float32(self) -> np.ndarray:
        """Float data as float32 (BF16 widened exactly, without ml_dtypes)."""
        if self.dtype == "BF16":
            bits = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        return self.array().astype(np.float32)


def _raw(a: np.ndarray) -> RawTensor:
    a = np.ascontiguousarray(a)
    if a.dtype == _bf16_dtype():
        code = "BF16"
    elif a.dtype.newbyteorder("<") in _NAMES and a.dtype.byteorder in "=<|":
        code = _NAMES[a.dtype.newbyteorder("<")]
    else:
        raise TypeError(f"cannot store dtype {a.dtype} in a safetensors file")
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not _little()):
        a = a.astype(a.dtype.newbyteorder("<"))
    flat: Any = a.reshape(-1).view(np.uint8)  # ndarray supports the buffer protocol
    return RawTensor(code, tuple(int(d) for d in a.shape), memoryview(flat))


def _little() -> bool:
    return np.little_endian


def pb_components(name: str, t: PBTensor) -> tuple[dict[str, RawTensor], dict[str, Any]]:
    """The safetensors tensors and the metadata entry that store ``t`` as ``name``.
    ``t`` is validated first, so no file is written that :func:`load_file` rejects."""
    from . import _core

    _core.pb_validate(*t._parts())
    r = t.residual
    parts = {
        f"{name}.signs": _raw(t.signs),
        f"{name}.mu": _raw(t.mu),
        f"{name}.alpha": _raw(t.alpha),
        f"{name}.sigma": _raw(t.sigma),
        f"{name}.residual.counts": _raw(r.counts),
        f"{name}.residual.values": _raw(r.values),
        f"{name}.residual.code_offsets": _raw(r.code_offsets),
    }
    desc = {
        "codec": CODEC,
        "version": VERSION,
        "shape": list(t.shape),
        "dense_bits": 1,
        "group_size": t.group_size,
        "count_bits": r.count_bits,
        "salient_bits": r.value_bits,
        "scale_dtype": str(t.mu.dtype),
    }
    return parts, desc


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, RawTensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file atomically (a temporary file renamed into place:
    no partial file is ever left at ``path``). Tensors are laid out by
    decreasing element size so every tensor is aligned for memory mapping."""
    order = sorted(tensors, key=lambda k: (-_ITEMSIZE[tensors[k].dtype], k))
    header: dict[str, Any] = {}
    offset = 0
    for k in order:
        t = tensors[k]
        header[k] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-(8 + len(hb)) % 8)  # data starts 8-byte aligned
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pbcodec-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for k in order:
                f.write(tensors[k].data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Parse and validate a safetensors file; tensors are memory-mapped views.
    Raises :class:`FormatError` for anything malformed (sizes are checked
    against the file before anything is allocated)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FormatError(f"{path}: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or n > size - 8:
            raise FormatError(f"{path}: header length {n} exceeds the file ({size} bytes) or the 100 MiB limit")
        hb = f.read(n)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
    try:
        header = json.loads(hb.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    buf_len = size - 8 - n
    view = memoryview(mm)[8 + n :] if mm is not None else memoryview(b"")
    spans = []
    tensors: dict[str, RawTensor] = {}
    for name, ent in header.items():
        if not isinstance(ent, dict) or set(ent) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{path}: tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dt, shape, offs = ent["dtype"], ent["shape"], ent["data_offsets"]
        if dt not in _ITEMSIZE:
            raise FormatError(f"{path}: tensor {name!r}: unsupported dtype {dt!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise FormatError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise FormatError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        b, end = offs
        want = math.prod(shape) * _ITEMSIZE[dt]
        if not 0 <= b <= end <= buf_len or end - b != want:
            raise FormatError(
                f"{path}: tensor {name!r}: data_offsets {offs} do not hold {want} bytes in a {buf_len}-byte buffer"
            )
        spans.append((b, end, name))
        tensors[name] = RawTensor(dt, tuple(shape), view[b:end])
    # Like the safetensors reference: the data buffer is covered exactly, no holes or overlaps.
    pos = 0
    for b, end, name in sorted(spans):
        if b != pos:
            raise FormatError(f"{path}: tensor {name!r} starts at {b}, expected {pos} (hole or overlap)")
        pos = end
    if pos != buf_len:
        raise FormatError(f"{path}: {buf_len - pos} bytes after the last tensor")
    return tensors, metadata


def _describe(metadata: Mapping[str, str], path: str) -> dict[str, dict]:
    raw = metadata.get(META_KEY)
    if raw is None:
        return {}
    try:
        desc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: __metadata__[{META_KEY!r}] is not JSON ({e})") from None
    if not isinstance(desc, dict) or not all(isinstance(v, dict) for v in desc.values()):
        raise FormatError(f"{path}: __metadata__[{META_KEY!r}] must be an object of objects")
    return desc


def _int(d: dict, key: str, name: str, path: str) -> int:
    v = d.get(key)
    if type(v) is not int:
        raise FormatError(f"{path}: {name}: metadata field {key!r} must be an integer, got {v!r}")
    return v


def _build_pb(name: str, d: dict, raw: Mapping[str, RawTensor], path: str) -> PBTensor:
    if d.get("codec") != CODEC:
        raise FormatError(f"{path}: {name}: unknown codec {d.get('codec')!r}")
    version = _int(d, "version", name, path)
    if version != VERSION:
        raise FormatError(f"{path}: {name}: unsupported {CODEC} version {version} (this build reads {VERSION})")
    if d.get("dense_bits", 1) != 1:
        raise FormatError(f"{path}: {name}: dense_bits {d.get('dense_bits')!r} is not supported")
    shape = d.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s >= 0 for s in shape)):
        raise FormatError(f"{path}: {name}: bad shape {shape!r}")
    m, n = shape
    g = _int(d, "group_size", name, path)
    if not (1 <= g <= max(n, 1)):
        raise FormatError(f"{path}: {name}: group_size {g} out of range")
    ng = 0 if n == 0 else -(-n // g)
    scale = {"float16": "F16", "float32": "F32"}.get(str(d.get("scale_dtype")))
    if scale is None:
        raise FormatError(f"{path}: {name}: bad scale_dtype {d.get('scale_dtype')!r}")
    parts = {}
    for suffix, codes in _PARTS.items():
        t = raw.get(f"{name}.{suffix}")
        if t is None:
            raise FormatError(f"{path}: {name}: missing component {name}.{suffix}")
        if t.dtype not in codes:
            raise FormatError(f"{path}: {name}.{suffix}: dtype {t.dtype} not allowed here")
        parts[suffix] = t
    expect = {
        "signs": (m, (n + 7) // 8),
        "mu": (m, ng),
        "alpha": (m, ng),
        "sigma": (m,),
        "residual.code_offsets": (m + 1,),
    }
    for suffix, shp in expect.items():
        if parts[suffix].shape != shp:
            raise FormatError(f"{path}: {name}.{suffix}: shape {parts[suffix].shape}, expected {shp}")
    for suffix in ("mu", "alpha", "sigma"):
        if parts[suffix].dtype != scale:
            raise FormatError(f"{path}: {name}.{suffix}: dtype {parts[suffix].dtype}, metadata says {scale}")
    sb = _int(d, "salient_bits", name, path)
    if parts["residual.values"].dtype != {8: "I8", 4: "U8"}.get(sb):
        raise FormatError(
            f"{path}: {name}.residual.values: dtype {parts['residual.values'].dtype} does not match salient_bits {sb}"
        )
    for suffix in ("residual.counts", "residual.values"):
        if len(parts[suffix].shape) != 1:
            raise FormatError(f"{path}: {name}.{suffix} must be 1-D")
    a = {k: v.array() for k, v in parts.items()}
    return PBTensor.from_parts(
        (m, n),
        signs=a["signs"],
        mu=a["mu"],
        alpha=a["alpha"],
        sigma=a["sigma"],
        counts=a["residual.counts"],
        values=a["residual.values"],
        code_offsets=a["residual.code_offsets"],
        group_size=g,
        count_bits=_int(d, "count_bits", name, path),
        salient_bits=sb,
    )


def save_file(
    tensors: Mapping[str, PBTensor | np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a mapping of names to :class:`PBTensor` or numpy arrays as a
    safetensors file (written atomically). ``metadata``: extra string pairs for
    ``__metadata__`` (the key ``"pbcodec"`` is reserved)."""
    if metadata and META_KEY in metadata:
        raise ValueError(f"metadata key {META_KEY!r} is reserved")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map strings to strings")
    raw: dict[str, RawTensor] = {}
    desc: dict[str, Any] = {}

    def put(k: str, t: RawTensor) -> None:
        if k in raw:
            raise ValueError(f"tensor name {k!r} is used twice (a compressed tensor's components collide with it)")
        raw[k] = t

    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if isinstance(value, PBTensor):
            parts, desc[name] = pb_components(name, value)
            for k, t in parts.items():
                put(k, t)
        else:
            put(name, _raw(np.asarray(value)))
    meta = dict(metadata or {})
    if desc:
        meta[META_KEY] = json.dumps(desc, sort_keys=True)
    write_safetensors(path, raw, meta)


def load_file(path: str | os.PathLike) -> dict[str, PBTensor | np.ndarray]:
    """Load what :func:`save_file` wrote: compressed tensors as validated
    :class:`PBTensor`, the rest as read-only numpy arrays memory-mapped from
    the file. Raises :class:`FormatError` on any malformed content."""
    path = os.fspath(path)
    raw, metadata = read_safetensors(path)
    desc = _describe(metadata, path)
    out: dict[str, PBTensor | np.ndarray] = {}
    owned: set[str] = set()
    for name, d in desc.items():
        out[name] = _build_pb(name, d, raw, path)
        owned.update(f"{name}.{s}" for s in _PARTS)
    for k, t in raw.items():
        if k not in owned:
            if k in out:
                raise FormatError(f"{path}: tensor {k!r} collides with a compressed tensor's name")
            out[k] = t.array()
    return out


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's ``__metadata__`` (string pairs), without loading tensors."""
    return read_safetensors(path)[1]


def iter_components(desc: Iterable[str]) -> list[str]:
    """Component tensor names of the compressed tensors named in ``desc``."""
    return [f"{name}.{s}" for name in desc for s in _PARTS]
