"""``PBLinear``: an ``nn.Linear`` whose weight is a compressed PBTensor."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _core
from ..errors import FormatError
from ..files import COMPONENTS, pb_arrays, pb_from_components
from ..pb import PBTensor, compress
from ._op import (
    _NUMPY_DTYPES,
    _SCALES,
    DENSE_ROWS,
    FORMAT_VERSION,
    _build_pb,
    _check_input,
    _cpu_numpy,
    _from_numpy,
    drop_layout,
    layout_tensor,
    linear_forward,
    new_layout_handle,
)

#: The state-dict keys of a PBLinear's compressed weight, under ``<layer>.weight.``: the
#: components of a file's tensor (docs/format.md §8.2) and its description ``pb_meta``.
STATE_KEYS = (*COMPONENTS, "pb_meta")
#: Layout 1 of the state dict (the first): flat keys under the layer's prefix, mapped
#: to today's (layout 2) names; ``load_state_dict`` still reads it (docs/format.md §8.4).
V1_KEYS = {
    "signs": "weight.signs",
    "mu": "weight.mu",
    "alpha": "weight.alpha",
    "sigma": "weight.sigma",
    "res_counts": "weight.residual.counts",
    "res_values": "weight.residual.values",
    "res_code_offsets": "weight.residual.code_offsets",
    "pb_meta": "weight.pb_meta",
}

#: Activation modes of :class:`PBLinear` (see :meth:`pbcodec.PBTensor.matvec`).
ACTIVATIONS = ("float32", "int8")
#: Columns per int8 activation block (docs/format.md §6.4): groups must be multiples.
INT8_BLOCK = 64


def int8_supported(in_features: int, group_size: int) -> bool:
    """Whether the int8 activation mode can run a weight with this group size."""
    return group_size >= in_features or group_size % INT8_BLOCK == 0


class _Part(nn.Module):
    """A container of some of a PBLinear's compressed tensors (its ``weight`` and
    ``weight.residual``): filled only through the PBLinear's ``load_state_dict``, which
    validates the weight as a whole before any of its tensors change."""

    def __init__(self) -> None:
        super().__init__()
        self._validated = False  # set by the owning PBLinear for the load that follows

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if not self._validated and any(k.startswith(prefix) for k in state_dict):
            what = f"'{prefix[:-1]}'" if prefix else f"this {type(self).__name__}"
            raise RuntimeError(
                f"{what} is part of a PBLinear's compressed weight: load the PBLinear's state dict "
                "(it validates the weight as a whole)"
            )
        self._validated = False
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for k, b in self._buffers.items():  # what the kernels read stays contiguous (assign=True may not be)
            if b is not None and not b.is_contiguous():
                self._buffers[k] = b.contiguous()


class _Residual(_Part):
    """The residual's zero-run code: ``counts``, ``values``, ``code_offsets``, and the
    ``value_offsets`` derived from the codes on load (moved with the module, not saved)."""

    def __init__(self, device: Any = None) -> None:
        super().__init__()
        for name, dt in (("counts", torch.uint8), ("values", torch.int8), ("code_offsets", torch.int64)):
            self.register_buffer(name, torch.empty(0, dtype=dt, device=device))
        self.register_buffer("value_offsets", torch.empty(0, dtype=torch.int64, device=device), persistent=False)


class PBWeight(_Part):
    """The compressed weight of a :class:`PBLinear`, in buffers named like the components
    of a file's tensor (docs/format.md §8.2, §8.4): ``signs``, ``mu``, ``alpha``, ``sigma``,
    the description ``pb_meta`` and ``residual`` (``counts``, ``values``, ``code_offsets``).
    Device moves apply to all of them; dtype casts (``.half()``, ``.to(torch.bfloat16)``)
    do not touch the scales, since the format stores float16/float32 only."""

    def __init__(self, out_features: int, in_features: int, device: Any = None) -> None:
        super().__init__()
        for name, dt in (
            ("signs", torch.uint8),
            ("mu", torch.float16),
            ("alpha", torch.float16),
            ("sigma", torch.float16),
        ):
            self.register_buffer(name, torch.empty(0, dtype=dt, device=device))
        meta = [FORMAT_VERSION, out_features, in_features, 0, 0, 0]
        self.register_buffer("pb_meta", torch.tensor(meta, dtype=torch.int64, device=device))
        self.residual = _Residual(device)

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors ``torch.ops.pbcodec.pb_linear`` takes, in its argument order."""
        b, r = self._buffers, self._modules["residual"]._buffers
        return (
            b["signs"],
            b["mu"],
            b["alpha"],
            b["sigma"],
            r["counts"],
            r["values"],
            r["code_offsets"],
            r["value_offsets"],
        )

    def _slot(self, key: str) -> tuple[nn.Module, str]:
        """The module and buffer name that hold state key ``key`` (``residual.counts``...)."""
        path, _, name = key.rpartition(".")
        return (self.get_submodule(path) if path else self), name

    def _apply(self, fn, recurse=True):
        scales = {k: self._buffers[k] for k in _SCALES}
        super()._apply(fn, recurse)
        for k, old in scales.items():
            new = self._buffers[k]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        return self


def stored_layers(state_dict: Mapping[str, Any]) -> set[str]:
    """The names of the PBLinear layers whose compressed weight ``state_dict`` holds, in
    either layout (docs/format.md §8.4), found by their ``pb_meta`` and a sibling key."""
    out = set()
    for k in state_dict:
        if k.endswith("pb_meta") and (k == "pb_meta" or k.endswith(".pb_meta")):
            stem = k[: -len("pb_meta")]  # "<layer>.weight." (layout 2) or "<layer>." (layout 1)
            if stem.endswith("weight.") and stem + "residual.counts" in state_dict:
                out.add(stem[: -len("weight.")].removesuffix("."))
            elif stem + "res_counts" in state_dict:
                out.add(stem.removesuffix("."))
    return out


def _upgrade_v1(state_dict: dict, prefix: str) -> None:
    """Rename a layout-1 PBLinear state (flat keys, docs/format.md §8.4) under ``prefix``
    to layout 2, in place; FormatError for a mix of the two or an incomplete one."""
    old = [k for k in V1_KEYS if prefix + k in state_dict]
    if not old:
        return
    where = f"PBLinear '{prefix[:-1] or '<root>'}'"
    both = [prefix + V1_KEYS[k] for k in old if prefix + V1_KEYS[k] in state_dict]
    if both:
        raise FormatError(f"{where}: both state-dict layouts hold the weight ({both[0]!r} and its layout-1 name)")
    if len(old) != len(V1_KEYS):
        absent = [prefix + k for k in V1_KEYS if k not in old]
        raise FormatError(f"incomplete PBLinear state (layout 1) for '{prefix}': missing {absent}")
    pm = state_dict[prefix + "pb_meta"]
    if not (isinstance(pm, Tensor) and pm.dtype == torch.int64 and tuple(pm.shape) == (6,) and not pm.is_meta):
        raise FormatError(f"{where}: pb_meta must be int64 of shape (6,)")
    if int(pm[0]) != 1:
        raise FormatError(f"{where}: the layout-1 keys hold version {int(pm[0])}, not 1")
    for k in old:
        state_dict[prefix + V1_KEYS[k]] = state_dict.pop(prefix + k)
    pm = pm.clone()
    pm[0] = FORMAT_VERSION  # the same description in layout 2
    state_dict[prefix + V1_KEYS["pb_meta"]] = pm


class PBLinear(nn.Module):
    """``nn.Linear`` with a partially-binarized weight (:class:`pbcodec.PBTensor`).

    ``PBLinear(in_features, out_features, bias=True)`` makes an *empty* layer (placeholder
    buffers) to be filled by ``load_state_dict``; :meth:`from_linear` compresses an
    existing ``nn.Linear``; :meth:`from_pbtensor` wraps a compressed tensor.

    forward(x): ``x`` of shape ``(..., in_features)``, float32/float16/bfloat16 (any
    float dtype); returns ``(..., out_features)`` in ``x``'s dtype. Integer, bool and
    complex inputs raise ``RuntimeError``, as with ``nn.Linear``. On the CPU the whole
    batch goes through one call of the fused kernel (float32 arithmetic; float32
    contiguous input is used without a copy) and the bias is added in float32. On other
    devices, or when ``force_dense`` is set, the weight is dequantized once and cached
    (see the module docstring).

    activations: ``"int8"`` (default) or ``"float32"``. int8: the input is quantized per
    block of 64 columns and multiplied with exact integer dot products on an execution
    layout built on the first call (docs/format.md §6.4-6.5; ~2.9 bits/weight resident
    at 10 % salient, never saved); on all-MiniLM-L6-v2 the embeddings move by a cosine of
    < 0.002 against float32. It needs whole-row groups or groups of a multiple of 64
    columns: other layers run in float32 (a loaded layer falls back silently; setting
    ``activations = "int8"`` on it raises ValueError). float32: the decode-fused float
    kernel on ``x`` as given.

    ``weight`` is a :class:`PBWeight`: buffers named like the components a pbcodec file
    stores for the tensor ``<layer>.weight``, so ``state_dict()`` holds them under the
    same names (``weight.signs``, ..., ``weight.residual.counts``, ...) plus the
    description ``weight.pb_meta`` (docs/format.md §8.4). ``load_state_dict`` validates
    them like :func:`pbcodec.load_file` and still reads layout 1 (``signs``,
    ``res_counts``, ... directly under the layer's prefix).

    The weight is frozen: gradients reach the input and the bias, never the compressed
    weight. ``.half()`` / ``.to(torch.bfloat16)`` convert the bias only; the stored
    scales keep their dtype (the format allows float16/float32 only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
        activations: str = "int8",
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if self.in_features < 0 or self.out_features < 0:
            raise ValueError(f"features must be non-negative, got in={in_features}, out={out_features}")
        self.weight = PBWeight(self.out_features, self.in_features, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)
        #: Use the dequantize-and-cache path even on the CPU (e.g. large batches, where a
        #: dense BLAS matmul can beat the fused kernel, at the cost of a dense copy).
        self.force_dense = False
        self._meta: tuple[int, int, int, int, int] | None = None  # (m, n, group_size, count_bits, salient_bits)
        self._summary: dict[str, float] = {}
        self._pb: PBTensor | None = None
        self._dense: Tensor | None = None
        self._activations = "float32"
        self._bias_np: tuple | None = None
        self._fast: tuple | None = None  # forward's fast path (see _fast_plan)
        self.activations = activations
        self._handle: int | None = None  # int8 mode: key of the cached execution layout

    # -- construction ------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activations: str = "int8", **compress_kwargs: Any) -> PBLinear:
        """Compress ``linear.weight`` with :func:`pbcodec.compress` (keyword arguments
        passed on) and copy its bias (same dtype). The result lives on the weight's device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():
            t = compress(linear.weight, **compress_kwargs)
        return cls.from_pbtensor(t, linear.bias, device=linear.weight.device, activations=activations)

    @classmethod
    def from_pbtensor(
        cls, t: PBTensor, bias: Tensor | None = None, *, device: Any = None, activations: str = "int8"
    ) -> PBLinear:
        """Wrap a :class:`pbcodec.PBTensor` ``(out_features, in_features)`` (zero-copy on
        the CPU); ``bias`` (any float dtype) is copied."""
        if not isinstance(t, PBTensor):
            raise TypeError(f"expected a pbcodec.PBTensor, got {type(t).__name__}")
        m, n = t.shape
        if bias is not None and tuple(bias.shape) != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
        mod = cls(n, m, bias=bias is not None)
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        r = t.residual
        w = mod.weight
        for k, a in (*pb_arrays(t).items(), ("residual.value_offsets", r.value_offsets)):
            holder, name = w._slot(k)
            holder._buffers[name] = _from_numpy(a)
        w._buffers["pb_meta"] = torch.tensor(
            [FORMAT_VERSION, m, n, t.group_size, r.count_bits, r.value_bits], dtype=torch.int64
        )
        if bias is not None:
            with torch.no_grad():
                mod.bias = nn.Parameter(bias.detach().to("cpu").clone(), requires_grad=bias.requires_grad)
        mod._set_loaded((m, n, t.group_size, r.count_bits, r.value_bits), t)
        if int8_supported(n, t.group_size) or activations == "float32":
            mod.activations = activations
        else:
            mod.activations = "float32"
        # (mod.pb rebuilds a zero-copy view of the buffers: t.signs and the scales are
        # read-only arrays, which the buffers had to copy)
        if device is not None and torch.device(device).type != "cpu":
            mod.to(device)
        return mod

    def _set_loaded(self, meta: tuple[int, int, int, int, int], t: PBTensor) -> None:
        self._meta = meta
        m, n = t.shape
        self._summary = {
            "bits_per_weight": t.bits_per_weight,
            "nbytes": t.nbytes,
            "salient_fraction": t.residual.num_values / (m * n) if m * n else 0.0,
        }
        self._invalidate()

    # -- state ---------------------------------------------------------------
    @property
    def is_loaded(self) -> bool:
        """False for an empty layer that has not been given a compressed weight yet."""
        return self._meta is not None

    def _check_loaded(self) -> None:
        if self._meta is None:
            raise RuntimeError(
                "this PBLinear is empty: fill it with load_state_dict(...) or build it with PBLinear.from_linear(...)"
            )

    def _invalidate(self) -> None:
        self._fast = None
        self._pb = None
        self._dense = None
        drop_layout(self._handle)

    @property
    def activations(self) -> str:
        """``"float32"`` or ``"int8"`` (see the class docstring); settable."""
        return self._activations

    @activations.setter
    def activations(self, mode: str) -> None:
        if mode not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {mode!r}")
        if mode == "int8" and self._meta is not None and not int8_supported(self.in_features, self._meta[2]):
            raise ValueError(
                f"int8 activations need group_size a multiple of {INT8_BLOCK} (or whole rows); "
                f"this layer has group_size {self._meta[2]}"
            )
        self._activations = mode
        self._fast = None

    def _bias_numpy(self) -> Any:
        """A float32 numpy view of the bias for the direct path (cached; a new bias
        object, dtype or device gets a new one; in-place updates show through)."""
        b = self.bias
        if b is None:
            return None
        c = self._bias_np
        if c is not None and c[0] is b and c[1] == b.dtype and c[2] == b.data_ptr():
            return c[3]
        d = b.detach()
        arr = (d if d.dtype == torch.float32 else d.float()).contiguous().numpy()
        if d.dtype == torch.float32 and d.is_contiguous():
            self._bias_np = (b, b.dtype, b.data_ptr(), arr)  # a view: stays current
        return arr

    def _needs_op(self, x: Tensor) -> bool:
        """Whether a call must go through the custom op: under torch.compile/export or
        jit tracing (the graph must see the op), for meta inputs (fake kernel), or when
        autograd records (the op carries the backward)."""
        if x.device.type == "meta" or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return True
        if torch.is_grad_enabled():
            return x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        return False

    def _layout_handle(self) -> int:
        if self._handle is None:
            import weakref

            self._handle = new_layout_handle()
            weakref.finalize(self, drop_layout, self._handle)
        return self._handle

    def clear_cache(self) -> None:
        """Drop the cached dense weight of the fallback path (and the PBTensor view)."""
        self._invalidate()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # PBWeight keeps the scales' dtype
        self._invalidate()
        return self

    @property
    def pb(self) -> PBTensor:
        """The compressed weight as a :class:`pbcodec.PBTensor`: zero-copy views of the
        buffers when they are on the CPU (a CPU copy otherwise)."""
        self._check_loaded()
        if self._pb is None:
            self._pb = _build_pb(self._meta, [_cpu_numpy(a) for a in self.weight.tensors()])
        return self._pb

    @property
    def bits_per_weight(self) -> float:
        self._check_loaded()
        return float(self._summary["bits_per_weight"])

    @property
    def salient_bits(self) -> int:
        self._check_loaded()
        return self._meta[4]

    @property
    def group_size(self) -> int:
        self._check_loaded()
        return self._meta[2]

    def dequantize(self, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """The dense weight ``Ŵ`` ``(out_features, in_features)`` (a new tensor, not cached)."""
        w = torch.from_numpy(self.pb.decompress())
        return w.to(device=device if device is not None else self.weight.signs.device, dtype=dtype)

    def _dense_weight(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        d = self._dense
        if d is not None and d.device == device and d.dtype == dtype:
            return d
        return self._fill_dense(device, dtype)

    @torch.compiler.disable
    def _fill_dense(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        # Outside any compiled graph (numpy + the Rust core are not traceable): under
        # torch.compile a cold cache costs one graph break; a warm one costs none.
        if device.type == "meta":
            d = torch.empty((self.out_features, self.in_features), device=device, dtype=dtype)
        else:
            d = self.dequantize(dtype=dtype, device=device)
        self._dense = d
        return d

    def __getstate__(self):
        # pickle / deepcopy: the caches are views of (or derived from) the buffers; the
        # copy rebuilds its own.
        state = self.__dict__.copy()
        state["_pb"] = None
        state["_dense"] = None
        state["_handle"] = None  # a copy gets its own layout cache entry
        state["_bias_np"] = None
        state["_fast"] = None
        return state

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # torch hands each module a copy of the state dict to adapt, before its children
        # load from it: layout 1 is renamed here, and the weight is validated as a whole
        # and its buffers given the incoming shapes before PBWeight's default loader (copy,
        # assign or swap) fills them.
        _upgrade_v1(state_dict, prefix)
        keys = {k: f"{prefix}weight.{k}" for k in STATE_KEYS}
        present = [k for k, key in keys.items() if key in state_dict]
        loaded = None
        if present:
            if len(present) != len(keys):
                absent = [key for k, key in keys.items() if k not in present]
                raise FormatError(f"incomplete PBLinear state for '{prefix}': missing {absent}")
            incoming = {k: state_dict[key] for k, key in keys.items()}
            loaded = self._validate_state(incoming, prefix)  # raises before touching the module
            w = self.weight
            for k, src in incoming.items():
                holder, name = w._slot(k)
                cur = holder._buffers[name]
                if cur is None or cur.shape != src.shape or cur.dtype != src.dtype:
                    dev = src.device if cur is None else cur.device
                    holder._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=dev)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if loaded is not None:
            meta, t = loaded
            w = self.weight
            w._validated = w.residual._validated = True
            # Where the codes will be once the children have loaded: assign=True keeps the
            # incoming tensors (a meta skeleton's placeholders are replaced), else a copy.
            assign = local_metadata.get("assign_to_params_buffers", False)
            dev = state_dict[keys["signs"]].device if assign else w.signs.device
            w.residual._buffers["value_offsets"] = torch.from_numpy(t.residual.value_offsets.copy()).to(dev)
            self._set_loaded(meta, t)

    def _validate_state(self, st: Mapping[str, Any], prefix: str) -> tuple[tuple[int, int, int, int, int], PBTensor]:
        where = f"PBLinear '{prefix[:-1] or '<root>'}'"
        for k, v in st.items():
            if not isinstance(v, Tensor):
                raise FormatError(f"{where}: {k} must be a tensor, got {type(v).__name__}")
            if v.is_meta:
                raise FormatError(f"{where}: {k} is a meta tensor (no data to load)")
            if v.dtype not in _NUMPY_DTYPES:
                raise FormatError(f"{where}: {k} has unsupported dtype {v.dtype}")
        pm = st["pb_meta"]
        if pm.dtype != torch.int64 or tuple(pm.shape) != (6,):
            raise FormatError(f"{where}: pb_meta must be int64 of shape (6,), got {pm.dtype} {tuple(pm.shape)}")
        version, m, n, gs, cb, sb = (int(v) for v in pm.tolist())
        if version != FORMAT_VERSION:
            raise FormatError(
                f"{where}: unsupported state-dict version {version} under the layout-{FORMAT_VERSION} names "
                f"(this build reads {FORMAT_VERSION}, and 1 under its own names)"
            )
        if (m, n) != (self.out_features, self.in_features):
            raise FormatError(
                f"{where}: stored weight is {m}x{n} (out x in), the layer is {self.out_features}x{self.in_features}"
            )
        try:  # the validator load_file uses too: exact dtypes and shapes, then contents
            t = pb_from_components((m, n), {k: _cpu_numpy(st[k]) for k in COMPONENTS}, gs, cb, sb)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        except (ValueError, TypeError, OverflowError) as e:  # anything else the parts trip over
            raise FormatError(f"{where}: {e}") from None
        return (m, n, gs, cb, sb), t

    # -- compute -------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        # Checked first, so that torch.compile folds the fast path away without
        # tracing (or guarding on) anything in it.
        if not torch.compiler.is_compiling() and not torch._C._get_tracing_state():
            f = self._fast
            if (
                f is not None
                and type(x) is Tensor  # not a subclass (e.g. Parameter)
                and x.is_cpu
                and x.dtype is torch.float32
                and x.dim() >= 1
                and x.shape[-1] == f[1]
                and x.is_contiguous()
                and not self.force_dense
                and self._parameters.get("bias") is f[3]
                and (f[3] is None or (f[3].data_ptr() == f[7] and f[3].dtype is torch.float32))
                and not (torch.is_grad_enabled() and (x.requires_grad or (f[3] is not None and f[3].requires_grad)))
            ):
                # Plain CPU float32 inference: the kernel call and little else (the
                # checked path costs ~5 µs more, as much as a MiniLM-sized kernel).
                rows = x.numel() // f[1]
                if rows < f[6]:
                    xn = x.numpy()
                    y = np.empty((rows, f[0]), np.float32)
                    f[4](f[5], xn if xn.ndim == 2 else xn.reshape(rows, f[1]), rows, y, f[2])
                    y = torch.from_numpy(y)
                    return y if x.dim() == 2 else y.view(*x.shape[:-1], f[0])
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        self._check_loaded()
        _check_input(x)
        w = self._modules["weight"]
        dev = w._buffers["signs"].device
        if not self.force_dense and x.device.type in ("cpu", "meta") and x.device == dev:
            int8 = self._activations == "int8" and int8_supported(self.in_features, self._meta[2])
            h = self._layout_handle()
            if not self._needs_op(x):
                # Plain CPU inference: skip the custom-op dispatch (~20 µs a call, more
                # than the kernel on MiniLM-sized layers); the same code as the op's.
                t = layout_tensor(h, self._meta, w.tensors())
                bn = self._bias_numpy()
                self._fast = self._fast_plan(t, bn, int8)
                return linear_forward(t, x, bn, *self._meta[:2], int8=int8, use_layout=True)
            return torch.ops.pbcodec.pb_linear(x, *w.tensors(), self.bias, *self._meta, h, int8)
        wd = self._dense_weight(x.device, x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, wd, b)

    def _fast_plan(self, t: PBTensor, bn: Any, int8: bool) -> tuple | None:
        """What :meth:`forward`'s fast path needs, for a layer whose direct path ran:
        (m, n, bias array, bias object, kernel, layout, row limit, bias data pointer);
        None where the bias is not a cached float32 view (it would go stale), the layer
        has no inputs, or float32 mode runs another kernel. Dropped by ``_invalidate``
        and the ``activations`` setter; the fast path also re-checks the bias object,
        its storage and dtype (``bias.data = ...`` keeps the object)."""
        b = self.bias
        if b is not None and (self._bias_np is None or self._bias_np[3] is not bn):
            return None
        m, n = self._meta[:2]
        if n == 0:
            return None
        ptr = None if b is None else b.data_ptr()
        lay = t._exec_layout()
        if int8:
            return (m, n, bn, b, _core.pb_matvec_int8, lay, sys.maxsize, ptr)
        if lay.f32_supported:  # below DENSE_ROWS rows, as linear_forward decides
            return (m, n, bn, b, _core.pb_matvec_layout_f32, lay, DENSE_ROWS, ptr)
        return None

    def _op_tensors(self) -> tuple[Tensor, ...]:
        """The compressed-weight tensors the custom op takes, in its argument order."""
        return self.weight.tensors()

    def __repr__(self) -> str:
        # One line, like nn.Linear: the weight's containers have nothing to show.
        return f"{self._get_name()}({self.extra_repr()})"

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self._meta is None:
            return s + ", empty"
        sm = self._summary
        return (
            f"{s}, bits_per_weight={sm['bits_per_weight']:.3f}, salient_bits={self._meta[4]}, "
            f"salient={sm['salient_fraction']:.3f}, group_size={self._meta[2]}, activations={self._activations}"
        )
