"""``PBLinear``: an ``nn.Linear`` whose weight is a compressed PBTensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FormatError
from ..pb import PBTensor, compress
from ._op import (
    _NUMPY_DTYPES,
    _OP_TENSORS,
    _PERSISTENT,
    _SCALES,
    FORMAT_VERSION,
    _build_pb,
    _check_input,
    _cpu_numpy,
    _from_numpy,
)


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
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if self.in_features < 0 or self.out_features < 0:
            raise ValueError(f"features must be non-negative, got in={in_features}, out={out_features}")
        for name, dt in (
            ("signs", torch.uint8),
            ("mu", torch.float16),
            ("alpha", torch.float16),
            ("sigma", torch.float16),
            ("res_counts", torch.uint8),
            ("res_values", torch.int8),
            ("res_code_offsets", torch.int64),
        ):
            self.register_buffer(name, torch.empty(0, dtype=dt, device=device))
        # Derived from the codes on load (validation walks them): moves with the module,
        # not saved.
        self.register_buffer("res_value_offsets", torch.empty(0, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer(
            "pb_meta",
            torch.tensor(
                [FORMAT_VERSION, self.out_features, self.in_features, 0, 0, 0], dtype=torch.int64, device=device
            ),
        )
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

    # -- construction ------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, **compress_kwargs: Any) -> PBLinear:
        """Compress ``linear.weight`` with :func:`pbcodec.compress` (keyword arguments
        passed on) and copy its bias (same dtype). The result lives on the weight's device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():
            t = compress(linear.weight, **compress_kwargs)
        return cls.from_pbtensor(t, linear.bias, device=linear.weight.device)

    @classmethod
    def from_pbtensor(cls, t: PBTensor, bias: Tensor | None = None, *, device: Any = None) -> PBLinear:
        """Wrap a :class:`pbcodec.PBTensor` ``(out_features, in_features)`` (zero-copy on
        the CPU); ``bias`` (any float dtype) is copied."""
        if not isinstance(t, PBTensor):
            raise TypeError(f"expected a pbcodec.PBTensor, got {type(t).__name__}")
        m, n = t.shape
        if bias is not None and tuple(bias.shape) != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
        mod = cls(n, m, bias=bias is not None)
        r = t.residual
        parts = {
            "signs": t.signs,
            "mu": t.mu,
            "alpha": t.alpha,
            "sigma": t.sigma,
            "res_counts": r.counts,
            "res_values": r.values,
            "res_code_offsets": r.code_offsets,
            "res_value_offsets": r.value_offsets,
        }
        for k, a in parts.items():
            mod._buffers[k] = _from_numpy(a)
        mod._buffers["pb_meta"] = torch.tensor(
            [FORMAT_VERSION, m, n, t.group_size, r.count_bits, r.value_bits], dtype=torch.int64
        )
        if bias is not None:
            with torch.no_grad():
                mod.bias = nn.Parameter(bias.detach().to("cpu").clone(), requires_grad=bias.requires_grad)
        mod._set_loaded((m, n, t.group_size, r.count_bits, r.value_bits), t)
        mod._pb = t  # its arrays are the buffers' memory
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
        self._pb = None
        self._dense = None

    def clear_cache(self) -> None:
        """Drop the cached dense weight of the fallback path (and the PBTensor view)."""
        self._invalidate()

    def _apply(self, fn, recurse=True):
        # Device moves apply to everything; dtype casts (.half(), .to(bfloat16), .double())
        # must not touch the scales: the format stores float16/float32 only.
        scales = {k: self._buffers[k] for k in _SCALES}
        super()._apply(fn, recurse)
        for k, old in scales.items():
            new = self._buffers[k]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        self._invalidate()
        return self

    @property
    def pb(self) -> PBTensor:
        """The compressed weight as a :class:`pbcodec.PBTensor`: zero-copy views of the
        buffers when they are on the CPU (a CPU copy otherwise)."""
        self._check_loaded()
        if self._pb is None:
            self._pb = _build_pb(self._meta, [_cpu_numpy(self._buffers[k]) for k in _OP_TENSORS])
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
        return w.to(device=device if device is not None else self.signs.device, dtype=dtype)

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
        return state

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        present = [k for k in _PERSISTENT if prefix + k in state_dict]
        loaded = None
        if present:
            if len(present) != len(_PERSISTENT):
                absent = [prefix + k for k in _PERSISTENT if k not in present]
                raise FormatError(f"incomplete PBLinear state for '{prefix}': missing {absent}")
            incoming = {k: state_dict[prefix + k] for k in _PERSISTENT}
            loaded = self._validate_state(incoming, prefix)  # raises before touching the module
            # Give the buffers the incoming shapes/dtypes so the default loader (copy,
            # assign or swap) accepts them.
            for k, src in incoming.items():
                cur = self._buffers[k]
                if cur is None or cur.shape != src.shape or cur.dtype != src.dtype:
                    dev = src.device if cur is None else cur.device
                    self._buffers[k] = torch.empty(src.shape, dtype=src.dtype, device=dev)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if loaded is not None:
            meta, t = loaded
            for k in _PERSISTENT:  # keep what the kernel sees contiguous (assign=True may not be)
                b = self._buffers[k]
                if not b.is_contiguous():
                    self._buffers[k] = b.contiguous()
            self._buffers["res_value_offsets"] = torch.from_numpy(t.residual.value_offsets.copy()).to(self.signs.device)
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
            raise FormatError(f"{where}: unsupported format version {version} (this build reads {FORMAT_VERSION})")
        if (m, n) != (self.out_features, self.in_features):
            raise FormatError(
                f"{where}: stored weight is {m}x{n} (out x in), the layer is {self.out_features}x{self.in_features}"
            )
        try:  # the validator load_file uses too: exact dtypes and shapes, then contents
            t = PBTensor.from_parts(
                (m, n),
                signs=_cpu_numpy(st["signs"]),
                mu=_cpu_numpy(st["mu"]),
                alpha=_cpu_numpy(st["alpha"]),
                sigma=_cpu_numpy(st["sigma"]),
                counts=_cpu_numpy(st["res_counts"]),
                values=_cpu_numpy(st["res_values"]),
                code_offsets=_cpu_numpy(st["res_code_offsets"]),
                group_size=gs,
                count_bits=cb,
                salient_bits=sb,
            )
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        except (ValueError, TypeError, OverflowError) as e:  # anything else the parts trip over
            raise FormatError(f"{where}: {e}") from None
        return (m, n, gs, cb, sb), t

    # -- compute -------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._check_loaded()
        _check_input(x)
        dev = self.signs.device
        if not self.force_dense and x.device.type in ("cpu", "meta") and x.device == dev:
            return torch.ops.pbcodec.pb_linear(x, *(self._buffers[k] for k in _OP_TENSORS), self.bias, *self._meta)
        w = self._dense_weight(x.device, x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self._meta is None:
            return s + ", empty"
        sm = self._summary
        return (
            f"{s}, bits_per_weight={sm['bits_per_weight']:.3f}, salient_bits={self._meta[4]}, "
            f"salient={sm['salient_fraction']:.3f}, group_size={self._meta[2]}"
        )
