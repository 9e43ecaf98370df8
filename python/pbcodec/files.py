"""Files other runtimes can read: compressed tensors in **safetensors** files
(docs/format.md §8).

A :class:`PBTensor` named ``NAME`` is stored as plain safetensors tensors
``NAME.signs`` (U8), ``NAME.mu``, ``NAME.alpha``, ``NAME.sigma`` (F16/F32),
``NAME.residual.counts`` (U8), ``NAME.residual.values`` (I8, or U8 for 4-bit) and
``NAME.residual.code_offsets`` (I64), and described in ``__metadata__["pbcodec"]``
(a JSON object: codec name, format version, shape, parameters). Any safetensors
reader can open the file and read every component; :func:`load_file` validates
everything. No pickle anywhere.

Every dtype safetensors defines round-trips exactly (bytes, dtype name, shape):
numpy's own types as numpy arrays, ``BF16`` and the ``F8_*`` types as ``ml_dtypes``
arrays when ``ml_dtypes`` is installed, and otherwise (and always for the packed
4- and 6-bit types) as a :class:`RawTensor` that keeps the safetensors dtype and
converts on request. Writes are atomic and durable; loads read the data into
memory the arrays own unless ``mmap=True`` is asked for.
"""

from __future__ import annotations

import json
import math
import mmap as _mmap
import operator
import os
import re
import secrets
import socket
import stat
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .errors import FormatError
from .pb import PBTensor

CODEC = "pbcodec.pb"
VERSION = 1
META_KEY = "pbcodec"
#: Largest header accepted, as in the safetensors reference implementation (100 MB).
MAX_HEADER = 100_000_000
#: Most dimensions a tensor may have (numpy 1.x's limit, and the RLE format's).
MAX_NDIM = 32

# safetensors dtype code -> (bits per element, numpy dtype name or None, ml_dtypes name or None).
_DTYPES: dict[str, tuple[int, str | None, str | None]] = {
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
    # Packed: two 4-bit / four 6-bit values per byte group; safetensors does not define
    # the element order inside a byte, so these stay raw bytes (RawTensor) here.
    "F4": (4, None, None),
    "F6_E2M3": (6, None, None),
    "F6_E3M2": (6, None, None),
}
#: Every safetensors dtype code this module reads and writes.
DTYPE_CODES = tuple(_DTYPES)
_NUMPY_CODES = {np.dtype(nm): code for code, (_, nm, _) in _DTYPES.items() if nm is not None}
_ML_CODES = {ml: code for code, (_, _, ml) in _DTYPES.items() if ml is not None}

# Small float formats for RawTensor.float32() without ml_dtypes:
# (exponent bits, mantissa bits, bias, special values) -- OCP 8-bit float / MX definitions.
_SMALL_FLOATS = {
    "F8_E5M2": (5, 2, 15, "ieee"),  # inf and NaN at the top exponent, like IEEE
    "F8_E4M3": (4, 3, 7, "fn"),  # no inf; NaN = S.1111.111
    "F8_E4M3FNUZ": (4, 3, 8, "fnuz"),  # no inf, no -0; NaN = 0x80
    "F8_E5M2FNUZ": (5, 2, 16, "fnuz"),
    "F8_E8M0": (8, 0, 127, "e8m0"),  # unsigned powers of two; NaN = 0xFF
}

# Fields of a description, in the order the core's "descriptions" schema returns them.
_DESC_FIELDS = ("codec", "version", "shape", "dense_bits", "group_size", "count_bits", "salient_bits", "scale_dtype")
# Component name -> allowed dtype codes (docs/format.md §8.2).
_PARTS = {
    "signs": ("U8",),
    "mu": ("F16", "F32"),
    "alpha": ("F16", "F32"),
    "sigma": ("F16", "F32"),
    "residual.counts": ("U8",),
    "residual.values": ("I8", "U8"),
    "residual.code_offsets": ("I64",),
}
#: The components of a compressed tensor ``NAME``, stored as ``NAME.<component>``
#: (docs/format.md §8.2); a PBLinear's state dict uses the same names under
#: ``<layer>.weight.`` (§8.4).
COMPONENTS = tuple(_PARTS)


def _ml_dtypes() -> Any:
    """The ml_dtypes module, or None when it is not installed (looked up each time,
    so tests can hide it)."""
    try:
        import ml_dtypes  # optional: numpy has no bfloat16 / float8 of its own

        return ml_dtypes
    except ImportError:
        return None


def _numpy_dtype(code: str, ml: Any) -> np.dtype | None:
    """The numpy dtype that holds ``code`` exactly, or None (packed, or ml_dtypes missing)."""
    _, nm, mlname = _DTYPES[code]
    if nm is not None:
        return np.dtype(nm)
    if mlname is not None and ml is not None and hasattr(ml, mlname):
        return np.dtype(getattr(ml, mlname))
    return None


def tensor_nbytes(code: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors dtype ``code`` and ``shape``; ValueError when
    the dtype is unknown, the shape is not a tuple of at most :data:`MAX_NDIM`
    non-negative ints, the product of its nonzero dimensions times the element size
    reaches 2**63 (numpy could not represent it, even empty), or a packed 4-/6-bit
    tensor does not fill whole bytes (docs/format.md §8)."""
    if code not in _DTYPES:
        raise ValueError(f"unknown safetensors dtype {code!r}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{len(shape)} dimensions; at most {MAX_NDIM} are supported")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"shape {list(shape)} must hold non-negative integers")
    bits = _DTYPES[code][0]
    if math.prod(d for d in shape if d) * max(bits // 8, 1) >= 1 << 63:
        raise ValueError(f"shape {list(shape)} is too large for {code} (limit: 2**63 bytes)")
    total = math.prod(shape) * bits
    if total % 8:
        raise ValueError(f"{code} tensor of shape {list(shape)} does not fill whole bytes")
    return total // 8


def _decode_small_float(code: str, raw: np.ndarray) -> np.ndarray:
    """float32 values of 8-bit float codes (exact: every such value is a float32)."""
    e_bits, m_bits, bias, kind = _SMALL_FLOATS[code]
    c = np.arange(256, dtype=np.int64)
    if kind == "e8m0":
        with np.errstate(over="ignore"):
            table = np.ldexp(np.float64(1.0), (c - bias).astype(np.int32))
        table[255] = np.nan
    else:
        sign = np.where(c >> (e_bits + m_bits) & 1, -1.0, 1.0)
        e = (c >> m_bits) & ((1 << e_bits) - 1)
        m = c & ((1 << m_bits) - 1)
        mag = np.where(
            e == 0,
            np.ldexp(m.astype(np.float64), (1 - bias - m_bits)),
            np.ldexp((m + (1 << m_bits)).astype(np.float64), (e - bias - m_bits).astype(np.int32)),
        )
        table = sign * mag
        top = e == (1 << e_bits) - 1
        if kind == "ieee":
            table[top & (m == 0)] = sign[top & (m == 0)] * np.inf
            table[top & (m != 0)] = np.nan
        elif kind == "fn":
            table[top & (m == (1 << m_bits) - 1)] = np.nan
        else:  # fnuz: the "negative zero" code is the only NaN
            table[0x80] = np.nan
    return table.astype(np.float32)[raw]


class RawTensor:
    """A tensor as a safetensors file stores it: dtype code (``"BF16"``, ``"F8_E4M3"``,
    ...; see :data:`DTYPE_CODES`), shape, and its little-endian bytes.

    :func:`load_file` returns one for a dtype numpy cannot hold as it is (``BF16`` and
    ``F8_*`` when ``ml_dtypes`` is not installed; the packed ``F4``/``F6_*`` always);
    :func:`save_file` writes it back byte for byte, with the same dtype code.
    Convert on request: :meth:`array` (exact numpy dtype, ``ml_dtypes`` for BF16/F8),
    :meth:`float32` (BF16 and F8 widened exactly, no ``ml_dtypes`` needed),
    :attr:`data` / :meth:`tobytes` (the raw bytes). ``np.asarray(t)`` works when an
    exact numpy dtype exists and raises ``TypeError`` otherwise: never a silent
    reinterpretation as integers.
    """

    __slots__ = ("dtype", "shape", "_data")

    def __init__(self, dtype: str, shape: Iterable[int], data: Any) -> None:
        shape = tuple(operator.index(d) for d in shape)  # numpy integers too; TypeError for others
        n = tensor_nbytes(dtype, shape)
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError("data must be a contiguous buffer")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if view.nbytes != n:
            raise ValueError(f"{dtype} tensor of shape {list(shape)} needs {n} bytes, got {view.nbytes}")
        self.dtype = dtype
        self.shape = shape
        self._data = view

    @property
    def data(self) -> memoryview:
        """The tensor's bytes (little-endian, row-major), as stored in the file."""
        return self._data

    @property
    def nbytes(self) -> int:
        return self._data.nbytes

    def tobytes(self) -> bytes:
        return self._data.tobytes()

    def array(self) -> np.ndarray:
        """As a numpy array of the exact dtype (zero-copy view of :attr:`data`).
        ``BF16`` and ``F8_*`` need ``ml_dtypes`` (ImportError otherwise; see
        :meth:`float32`); the packed ``F4``/``F6_*`` have no numpy dtype (TypeError)."""
        dt = _numpy_dtype(self.dtype, _ml_dtypes())
        if dt is None:
            if _DTYPES[self.dtype][2] is not None:
                raise ImportError(
                    f"a {self.dtype} array needs the ml_dtypes package (pip install ml_dtypes); "
                    "RawTensor.float32() converts without it"
                )
            raise TypeError(f"{self.dtype} is a packed sub-byte type with no numpy dtype; use .data for its bytes")
        return np.frombuffer(self._data, dtype=dt.newbyteorder("<")).reshape(self.shape)

    def float32(self) -> np.ndarray:
        """The values as float32: exact for BF16, F16, F32 and the F8 types (without
        ``ml_dtypes``); F64 and integers are rounded like ``astype(np.float32)``.
        TypeError for C64 and the packed F4/F6 types."""
        if self.dtype == "BF16":
            bits = np.frombuffer(self._data, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        if self.dtype in _SMALL_FLOATS:
            return _decode_small_float(self.dtype, np.frombuffer(self._data, np.uint8)).reshape(self.shape)
        if self.dtype == "C64" or _DTYPES[self.dtype][1] is None:
            raise TypeError(f"{self.dtype} has no float32 conversion")
        return self.array().astype(np.float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if _numpy_dtype(self.dtype, _ml_dtypes()) is None:
            raise TypeError(
                f"no numpy dtype holds {self.dtype} here (BF16/F8 need ml_dtypes; F4/F6 have none): "
                "use RawTensor.float32() or .data instead of an implicit conversion"
            )
        a = self.array()
        return a if dtype is None else a.astype(dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RawTensor):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape and self._data == other._data

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RawTensor(dtype={self.dtype!r}, shape={self.shape}, nbytes={self.nbytes})"


def _raw(a: Any, name: str) -> RawTensor:
    """A numpy array (or RawTensor) as stored bytes; TypeError/ValueError, naming the
    tensor, for anything safetensors cannot hold exactly."""
    if isinstance(a, RawTensor):
        return a
    a = np.asarray(a)
    dt = a.dtype
    code = _NUMPY_CODES.get(dt.newbyteorder("="))
    if code is None and dt.name in _ML_CODES:
        ml = _ml_dtypes()
        if ml is not None and dt == np.dtype(getattr(ml, dt.name)):
            code = _ML_CODES[dt.name]
    if code is None:
        raise TypeError(
            f"tensor {name!r}: cannot store dtype {dt} in a safetensors file exactly "
            f"(supported: numpy {', '.join(sorted(str(d) for d in _NUMPY_CODES))}, "
            "and ml_dtypes bfloat16 / float8_e5m2 / float8_e4m3fn / float8_e4m3fnuz / float8_e5m2fnuz / "
            "float8_e8m0fnu)"
        )
    if a.ndim > MAX_NDIM:
        raise ValueError(f"tensor {name!r}: {a.ndim} dimensions; at most {MAX_NDIM} are supported")
    a = np.require(a, requirements="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
    if dt.byteorder == ">" or (dt.byteorder == "=" and not np.little_endian):
        a = a.astype(dt.newbyteorder("<"))
    return RawTensor(code, tuple(int(d) for d in a.shape), a.reshape(-1).view(np.uint8))


def pb_arrays(t: PBTensor) -> dict[str, np.ndarray]:
    """The arrays that store ``t``, by component name (:data:`COMPONENTS` order)."""
    r = t.residual
    arrays = (t.signs, t.mu, t.alpha, t.sigma, r.counts, r.values, r.code_offsets)
    return dict(zip(COMPONENTS, arrays, strict=True))


def pb_description(t: PBTensor) -> dict[str, Any]:
    """``t``'s entry in ``__metadata__["pbcodec"]`` (docs/format.md §8.2)."""
    r = t.residual
    return {
        "codec": CODEC,
        "version": VERSION,
        "shape": list(t.shape),
        "dense_bits": 1,
        "group_size": t.group_size,
        "count_bits": r.count_bits,
        "salient_bits": r.value_bits,
        "scale_dtype": str(t.mu.dtype),
    }


def pb_from_components(
    shape: tuple[int, int], arrays: Mapping[str, Any], group_size: int, count_bits: int, salient_bits: int
) -> PBTensor:
    """A validated PBTensor from arrays named by component (:data:`COMPONENTS`): the one
    validator of a file's compressed tensor and of a PBLinear state dict's
    (:meth:`PBTensor.from_parts`; :class:`FormatError` on anything malformed)."""
    return PBTensor.from_parts(
        shape,
        signs=arrays["signs"],
        mu=arrays["mu"],
        alpha=arrays["alpha"],
        sigma=arrays["sigma"],
        counts=arrays["residual.counts"],
        values=arrays["residual.values"],
        code_offsets=arrays["residual.code_offsets"],
        group_size=group_size,
        count_bits=count_bits,
        salient_bits=salient_bits,
    )


def pb_components(name: str, t: PBTensor) -> tuple[dict[str, RawTensor], dict[str, Any]]:
    """The safetensors tensors and the metadata entry that store ``t`` as ``name``.
    ``t`` is validated first, so no file is written that :func:`load_file` rejects."""
    from . import _core

    _core.pb_validate(*t._parts())
    parts = {f"{name}.{k}": _raw(a, name) for k, a in pb_arrays(t).items()}
    return parts, pb_description(t)


# ------------------------------------------------------------------ writing

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\.pbcodec-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+\.tmp$")


def temp_path(directory: str | os.PathLike) -> str:
    """A fresh name for a temporary file or directory in ``directory``:
    ``.pbcodec-<host>-<pid>-<random>.tmp``, so :func:`remove_stale_temps` can tell
    whose it is."""
    return os.path.join(os.fspath(directory), f".pbcodec-{_HOST}-{os.getpid()}-{secrets.token_hex(6)}.tmp")


def remove_stale_temps(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary files and directories that killed pbcodec runs on this
    host left in ``directory`` (their process no longer exists); others' are left
    alone. Returns the paths removed."""
    import shutil

    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for nm in names:
        m = _TEMP_RE.match(nm)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        p = os.path.join(os.fspath(directory), nm)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            removed.append(p)
        except OSError:
            pass  # e.g. removed concurrently: nothing to do
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        return True  # (on Windows os.kill would terminate the process: never probe there)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: keep its files
    return True


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or creation inside ``directory`` durable (no-op where directories
    cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def create_file(path: str, mode_like: str | None = None) -> int:
    """Create ``path`` (must not exist) for writing, with the permissions ``open()``
    would give a new file (0o666 minus the umask), or those of ``mode_like`` when that
    file exists (replacing a file keeps its mode, as writing into it would)."""
    # The kernel applies the umask to 0o666, exactly as for open(path, "w").
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    if mode_like is not None and hasattr(os, "fchmod"):
        try:
            st = os.stat(mode_like)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
    return fd


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, RawTensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file atomically and durably: into a temporary file in the
    same directory, fsync'ed, renamed over ``path``, and the directory fsync'ed, so
    ``path`` holds either the old or the complete new file even after a crash. A new
    file gets the permissions ``open()`` would give it (umask honoured); a replaced
    file keeps its mode. Temporaries left by killed runs are removed first
    (:func:`remove_stale_temps`). Tensors are laid out by decreasing element size so
    every tensor is aligned for memory mapping."""
    order = sorted(tensors, key=lambda k: (-_DTYPES[tensors[k].dtype][0], k))
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
    remove_stale_temps(d)
    tmp = temp_path(d)
    fd = create_file(tmp, mode_like=path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for k in order:
                f.write(tensors[k].data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)


# ------------------------------------------------------------------ reading


def _parse_table(raw: bytes, schema: str, what: str) -> tuple[list, dict | None]:
    """A JSON "table" (an object of objects with known fields, each a scalar or an
    array of integers) parsed by the core, which checks the schema as it reads, so a
    malformed header costs about its own size before it is rejected (docs/format.md
    §8); FormatError naming ``what``."""
    from . import _core

    try:
        return _core.json_table(raw, schema)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None


def read_header(f: Any, path: str) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str], int]:
    """Read and validate the header of the safetensors file open as ``f``. Returns
    ``(data_start, {name: (dtype, shape, begin, end)}, metadata, data_length)``; every
    tensor's span is checked against the data buffer of ``data_length`` bytes (exact
    cover, no holes or overlaps), measured once: a file that changes size afterwards is
    caught by the reader, not trusted."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    if size < 8:
        raise FormatError(f"{path}: {size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER or n > size - 8:
        raise FormatError(f"{path}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER}-byte limit")
    hb = f.read(n)
    if len(hb) != n:
        raise FormatError(f"{path}: file ended inside the header (changed while reading?)")
    # The core checks that every entry has exactly dtype, shape and data_offsets (each a
    # scalar or a short integer array), and that __metadata__ maps strings to strings.
    rows, strings = _parse_table(hb, "header", f"{path}: header")
    del hb
    metadata: dict[str, str] = strings or {}
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    buf_len = size - 8 - n
    spans = []
    for name, (dt, shape, offs) in rows:
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise FormatError(f"{path}: tensor {name!r}: unsupported dtype {dt!r}")
        if not isinstance(shape, list) or not all(d >= 0 for d in shape):
            raise FormatError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and offs[0] >= 0):
            raise FormatError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        try:
            want = tensor_nbytes(dt, tuple(shape))
        except ValueError as e:
            raise FormatError(f"{path}: tensor {name!r}: {e}") from None
        b, end = offs
        if not b <= end <= buf_len or end - b != want:
            raise FormatError(
                f"{path}: tensor {name!r}: data_offsets {offs} do not hold {want} bytes in a {buf_len}-byte buffer"
            )
        spans.append((b, end, name))
        entries[name] = (dt, tuple(shape), b, end)
    # Like the safetensors reference: the data buffer is covered exactly, no holes or overlaps.
    pos = 0
    for b, end, name in sorted(spans):
        if b != pos:
            raise FormatError(f"{path}: tensor {name!r} starts at {b}, expected {pos} (hole or overlap)")
        pos = end
    if pos != buf_len:
        raise FormatError(f"{path}: {buf_len - pos} bytes after the last tensor")
    return 8 + n, entries, metadata, buf_len


def _read_data(f: Any, start: int, length: int, path: str) -> np.ndarray:
    """The data buffer, read into memory this process owns (peak: its own size)."""
    buf = np.empty(length, np.uint8)
    view = memoryview(buf)
    f.seek(start)
    got = 0
    while got < length:
        k = f.readinto(view[got:])
        if not k:
            raise FormatError(f"{path}: file ended after {got} of {length} data bytes (truncated while loading?)")
        got += k
    return buf


def read_safetensors(path: str | os.PathLike, *, mmap: bool = False) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Parse and validate a safetensors file. Returns ``({name: RawTensor}, metadata)``.

    By default the data are read into one buffer the returned tensors share (peak
    memory about the file's size); nothing refers to the file afterwards, so it may be
    changed or deleted. ``mmap=True`` maps the file instead (no read, pages loaded on
    access) -- but if the file is then truncated or rewritten in place while tensors
    are alive, touching them kills the process with SIGBUS: use it only for files
    nobody modifies. Raises :class:`FormatError` for anything malformed (sizes are
    checked against the file before anything is allocated) and if the file changes
    size while it is read.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        # One size for everything: the header was validated against it, and the data must
        # still have it once read (a file truncated or extended meanwhile is an error).
        start, entries, metadata, length = read_header(f, path)
        changed = FormatError(f"{path}: the file changed size while it was read")
        if mmap:
            mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ) if length else None
            if mm is not None and len(mm) != start + length:
                raise changed
            data: Any = memoryview(mm)[start:] if mm is not None else memoryview(b"")
        else:
            data = memoryview(_read_data(f, start, length, path))
            if os.fstat(f.fileno()).st_size != start + length or f.read(1):
                raise changed
    tensors = {name: RawTensor(dt, shape, data[b:end]) for name, (dt, shape, b, end) in entries.items()}
    return tensors, metadata


def _describe(metadata: Mapping[str, str], path: str) -> dict[str, dict]:
    raw = metadata.get(META_KEY)
    if raw is None:
        return {}
    rows, _ = _parse_table(raw.encode(), "descriptions", f"{path}: __metadata__[{META_KEY!r}]")
    return {name: {k: v for k, v in zip(_DESC_FIELDS, values, strict=True) if v is not None} for name, values in rows}


def _int(d: dict, key: str, name: str, path: str) -> int:
    v = d.get(key)
    if type(v) is not int:
        raise FormatError(f"{path}: {name}: metadata field {key!r} must be an integer, got {v!r}")
    return v


def _build_pb(name: str, d: dict, raw: Mapping[str, RawTensor], path: str) -> PBTensor:
    """Metadata checks specific to files, then the one validator of compressed parts
    (:meth:`PBTensor.from_parts`: exact shapes, dtypes, contents), shared with
    :class:`pbcodec.torch.PBLinear`'s state-dict loading."""
    if d.get("codec") != CODEC:
        raise FormatError(f"{path}: {name}: unknown codec {d.get('codec')!r}")
    version = _int(d, "version", name, path)
    if version != VERSION:
        raise FormatError(f"{path}: {name}: unsupported {CODEC} version {version} (this build reads {VERSION})")
    if "dense_bits" in d and _int(d, "dense_bits", name, path) != 1:
        raise FormatError(f"{path}: {name}: dense_bits {d.get('dense_bits')!r} is not supported")
    shape = d.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(s >= 0 for s in shape)):
        raise FormatError(f"{path}: {name}: bad shape {shape!r}")
    scale = {"float16": "F16", "float32": "F32"}.get(str(d.get("scale_dtype")))
    if scale is None:
        raise FormatError(f"{path}: {name}: bad scale_dtype {d.get('scale_dtype')!r}")
    g = _int(d, "group_size", name, path)
    cb = _int(d, "count_bits", name, path)
    sb = _int(d, "salient_bits", name, path)
    parts = {}
    for suffix, codes in _PARTS.items():
        t = raw.get(f"{name}.{suffix}")
        if t is None:
            raise FormatError(f"{path}: {name}: missing component {name}.{suffix}")
        if t.dtype not in codes:
            raise FormatError(f"{path}: {name}.{suffix}: dtype {t.dtype} not allowed here")
        parts[suffix] = t
    for suffix in ("mu", "alpha", "sigma"):
        if parts[suffix].dtype != scale:
            raise FormatError(f"{path}: {name}.{suffix}: dtype {parts[suffix].dtype}, metadata says {scale}")
    if parts["residual.values"].dtype != {8: "I8", 4: "U8"}.get(sb):
        raise FormatError(
            f"{path}: {name}.residual.values: dtype {parts['residual.values'].dtype} does not match salient_bits {sb}"
        )
    try:
        return pb_from_components(tuple(shape), {k: v.array() for k, v in parts.items()}, g, cb, sb)
    except FormatError as e:
        raise FormatError(f"{path}: {name}: {e}") from None


def _user_value(t: RawTensor, ml: Any) -> np.ndarray | RawTensor:
    """What load_file returns for a plain tensor: a numpy array of the exact dtype when
    one exists here, else the RawTensor itself (never a reinterpretation)."""
    dt = _numpy_dtype(t.dtype, ml)
    if dt is None:
        return t
    return np.frombuffer(t.data, dtype=dt if np.little_endian else dt.newbyteorder("<")).reshape(t.shape)


def _check_text(s: str, what: str) -> None:
    """Header strings must be valid Unicode (a lone surrogate would be written as an
    escape that no JSON parser reads back)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {s!r} is not valid Unicode (lone surrogate)") from None


def save_file(
    tensors: Mapping[str, PBTensor | np.ndarray | RawTensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a mapping of names to :class:`PBTensor`, numpy arrays or :class:`RawTensor`
    as a safetensors file (atomic and durable, see :func:`write_safetensors`).

    Arrays keep their bytes, dtype and shape exactly (0-d included): numpy bool,
    (u)int8..64, float16/32/64 and complex64, and the ``ml_dtypes`` bfloat16 /
    float8 types; any other dtype (float128, complex128, strings, objects, ...) or
    more than :data:`MAX_NDIM` dimensions is refused (TypeError / ValueError naming
    the tensor) **before anything is written**. ``metadata``: extra string pairs for
    ``__metadata__`` (the key ``"pbcodec"`` is reserved).
    """
    if metadata and META_KEY in metadata:
        raise ValueError(f"metadata key {META_KEY!r} is reserved")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map strings to strings")
    for k, v in (metadata or {}).items():
        _check_text(k, "metadata key")
        _check_text(v, f"metadata value of {k!r}")
    raw: dict[str, RawTensor] = {}
    desc: dict[str, Any] = {}

    def put(k: str, t: RawTensor) -> None:
        if k in raw:
            raise ValueError(f"tensor name {k!r} is used twice (a compressed tensor's components collide with it)")
        raw[k] = t

    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved by the safetensors format and cannot name a tensor")
        _check_text(name, "tensor name")
        if isinstance(value, PBTensor):
            parts, desc[name] = pb_components(name, value)
            for k, t in parts.items():
                put(k, t)
        else:
            put(name, _raw(value, name))
    meta = dict(metadata or {})
    if desc:
        meta[META_KEY] = json.dumps(desc, sort_keys=True)
    write_safetensors(path, raw, meta)


def load_file(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, PBTensor | np.ndarray | RawTensor]:
    """Load what :func:`save_file` (or any safetensors writer) wrote.

    Compressed tensors come back as validated :class:`PBTensor`; the rest as numpy
    arrays of their exact dtype (``ml_dtypes`` types for BF16/F8 when it is
    installed), or as :class:`RawTensor` when numpy has no such dtype here. Raises
    :class:`FormatError` on any malformed content.

    By default the data are read into memory the arrays own (peak about the file's
    size, writable arrays); the file may change afterwards without affecting them.
    ``mmap=True`` memory-maps it instead (read-only views, nothing read up front), at
    a price: if the file is truncated or rewritten in place while the arrays are
    alive, the next access kills the process (SIGBUS). Use it only for files that
    nobody modifies while they are loaded.
    """
    path = os.fspath(path)
    raw, metadata = read_safetensors(path, mmap=mmap)
    desc = _describe(metadata, path)
    out: dict[str, PBTensor | np.ndarray | RawTensor] = {}
    owned: set[str] = set()
    for name, d in desc.items():
        out[name] = _build_pb(name, d, raw, path)
        owned.update(f"{name}.{s}" for s in _PARTS)
    ml = _ml_dtypes()
    for k, t in raw.items():
        if k not in owned:
            if k in out:
                raise FormatError(f"{path}: tensor {k!r} collides with a compressed tensor's name")
            out[k] = _user_value(t, ml)
    return out


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's ``__metadata__`` (string pairs); reads and validates the header only."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        return read_header(f, path)[2]


def iter_components(desc: Iterable[str]) -> list[str]:
    """Component tensor names of the compressed tensors named in ``desc``."""
    return [f"{name}.{s}" for name in desc for s in _PARTS]
