"""The custom op ``torch.ops.pbcodec.pb_linear`` (fused kernel on the CPU, fake
implementation for tracing, autograd for inputs and bias) and the conversions
between a :class:`pbcodec.PBTensor` and the tensors the op takes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._parts import PBArrays, PBMeta, PBParts
from ..errors import FormatError
from ..pb import _SCALE_BITS, PBTensor, _assemble

if not hasattr(torch.library, "custom_op") or not hasattr(torch.library, "register_fake"):
    raise ImportError(f"pbcodec.torch needs torch >= 2.4 (torch.library.custom_op); found torch {torch.__version__}")

#: Version of the PBLinear state-dict layout, stored in ``pb_meta[0]`` (docs/format.md
#: §8.4): 2 names the weight's tensors like a file's components (``<layer>.weight.signs``,
#: ...); layout 1 (flat ``<layer>.signs``, ``<layer>.res_counts``, ...) is still read.
FORMAT_VERSION = 2

#: Row count from which :func:`pb_linear` dequantizes into a temporary dense weight and
#: uses torch's GEMM instead of the decode-fused kernel (see its docstring).
DENSE_ROWS = 64

_SCALES = ("mu", "alpha", "sigma")

_NUMPY_DTYPES = {
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.bool: np.bool_,
}


def _check_input(x: Tensor) -> None:
    """Floating-point inputs only, like ``nn.Linear`` (whose float weight makes integer,
    bool and complex inputs fail with the same RuntimeError): a cast would wrap, saturate
    or drop the imaginary part silently."""
    if not x.is_floating_point():
        raise RuntimeError(f"PBLinear needs a floating-point input, got {x.dtype} (as nn.Linear does)")


# ---------------------------------------------------------------------------
# PBTensor <-> tensors
# ---------------------------------------------------------------------------
def _cpu_numpy(t: Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (zero-copy when contiguous); other devices are copied."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().numpy()


def _build_pb(meta: tuple[int, int, int, int, int], arrays: Iterable[np.ndarray]) -> PBTensor:
    """An (unvalidated) PBTensor over the given arrays (in :class:`PBArrays` order, scales
    of their stored dtype), zero-copy. Only used on parts that were validated when they
    entered the module; the kernels still check sizes and offsets and bound every
    position, so inconsistent parts raise, never crash."""
    m, n, gs, cb, sb = meta
    a = PBArrays._make(arrays)
    if a.mu.dtype not in _SCALE_BITS or a.alpha.dtype != a.mu.dtype or a.sigma.dtype != a.mu.dtype:
        raise FormatError(
            f"scales must all be float16 or all float32, got {a.mu.dtype}, {a.alpha.dtype}, {a.sigma.dtype}"
        )
    try:
        return _assemble(PBParts(PBMeta(m, n, gs, _SCALE_BITS[a.mu.dtype], cb, sb), a))
    except ValueError as e:  # reshape of a wrongly sized part
        raise FormatError(f"PBLinear parts have inconsistent sizes: {e}") from None


def _from_numpy(a: np.ndarray, device: Any = None) -> Tensor:
    a = np.ascontiguousarray(a)
    # Buffers must own writable memory (PBTensor's scale arrays are read-only views).
    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t if device is None else t.to(device)


# ---------------------------------------------------------------------------
# Execution-layout cache
# ---------------------------------------------------------------------------
#: Execution layouts of PBLinear layers: handle -> PBTensor with its layout. A PBLinear
#: owns a handle and drops its entry when its buffers change or it is collected; the op
#: rebuilds a missing entry from the component tensors it is given (e.g. in a new process
#: running an exported program), so the cache can never serve stale weights.
_LAYOUTS: dict[int, PBTensor] = {}
_HANDLES = itertools.count(1)


def new_layout_handle() -> int:
    return next(_HANDLES)


def drop_layout(handle: int | None) -> None:
    if handle is not None:
        _LAYOUTS.pop(handle, None)


# ---------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------
@torch.library.custom_op("pbcodec::pb_linear", mutates_args=(), device_types="cpu")
def pb_linear(
    x: Tensor,
    signs: Tensor,
    mu: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    res_counts: Tensor,
    res_values: Tensor,
    res_code_offsets: Tensor,
    res_value_offsets: Tensor,
    bias: Tensor | None,
    m: int,
    n: int,
    group_size: int,
    count_bits: int,
    salient_bits: int,
    handle: int = -1,
    int8: bool = False,
) -> Tensor:
    """``y = x @ Ŵ.T + bias`` for ``x`` of shape ``(..., n)`` (any float dtype), in float32;
    returns ``(..., m)`` in ``x``'s dtype. CPU tensors only (``torch.ops.pbcodec.pb_linear``).

    ``handle >= 0``: the layer's cached PBTensor with its execution layout (built from the
    components on a miss, see :func:`layout_tensor`); ``-1``: the components as given,
    without a layout. ``int8``: int8 activations (docs/format.md §6.4) for every row count.
    Otherwise (float32), up to :data:`DENSE_ROWS` - 1 rows go through the fused kernel in
    one call, and from :data:`DENSE_ROWS` rows on the weight is dequantized into a
    temporary float32 matrix for torch's GEMM."""
    meta = (m, n, group_size, count_bits, salient_bits)
    comps = (signs, mu, alpha, sigma, res_counts, res_values, res_code_offsets, res_value_offsets)
    if handle >= 0:
        t = layout_tensor(handle, meta, comps)
    else:
        t = _build_pb(meta, (_cpu_numpy(a) for a in comps))
    return linear_forward(t, x, bias, m, n, int8=int8, use_layout=handle >= 0)


def layout_tensor(handle: int, meta: tuple[int, int, int, int, int], comps: Iterable[Tensor]) -> PBTensor:
    """The PBTensor (with its execution layout built) cached under ``handle``, built
    from the component tensors on a miss."""
    t = _LAYOUTS.get(handle)
    if t is None:
        t = _build_pb(meta, (_cpu_numpy(a) for a in comps))
        t._exec_layout()
        _LAYOUTS[handle] = t
    return t


def linear_forward(
    t: PBTensor, x: Tensor, bias: Tensor | np.ndarray | None, m: int, n: int, *, int8: bool, use_layout: bool
) -> Tensor:
    """``x @ Ŵ.T + bias`` for a CPU input: one kernel call for all rows (float32
    arithmetic, the bias added in the same call), result in ``x``'s dtype. ``bias``
    may be a tensor or a float32 numpy array (PBLinear passes a cached view)."""
    _check_input(x)
    if x.dim() == 0 or x.shape[-1] != n:
        raise ValueError(f"input must have shape (..., {n}), got {tuple(x.shape)}")
    x2 = x.detach()
    if x2.dim() != 2:
        x2 = x2.reshape(-1, n)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    rows = x2.shape[0]
    bn = bias
    if isinstance(bias, Tensor):
        b = bias.detach()
        bn = (b if b.dtype == torch.float32 else b.float()).contiguous().numpy()
    if not int8 and rows >= DENSE_ROWS:
        b = None if bn is None else torch.from_numpy(bn)
        y = torch.nn.functional.linear(x2, torch.from_numpy(t.decompress()), b)
    else:
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        yn = np.empty((rows, m), np.float32)
        t._matvec_into(x2.numpy(), rows, yn, "int8" if int8 else "float32", bn, build_layout=use_layout)
        y = torch.from_numpy(yn)
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], m)


@pb_linear.register_fake
def _pb_linear_fake(
    x,
    signs,
    mu,
    alpha,
    sigma,
    res_counts,
    res_values,
    res_code_offsets,
    res_value_offsets,
    bias,
    m,
    n,
    group_size,
    count_bits,
    salient_bits,
    handle=-1,
    int8=False,
):
    torch._check(x.dim() >= 1 and x.shape[-1] == n, lambda: f"input must have shape (..., {n}), got {tuple(x.shape)}")
    torch._check(x.is_floating_point(), lambda: f"PBLinear needs a floating-point input, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], m))


@torch.library.custom_op("pbcodec::pb_linear_grad_input", mutates_args=(), device_types="cpu")
def _pb_linear_grad_input(
    grad: Tensor,
    signs: Tensor,
    mu: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    res_counts: Tensor,
    res_values: Tensor,
    res_code_offsets: Tensor,
    res_value_offsets: Tensor,
    m: int,
    n: int,
    group_size: int,
    count_bits: int,
    salient_bits: int,
) -> Tensor:
    """``grad @ Ŵ`` (``(..., m)`` -> ``(..., n)``): rebuilds the dense weight for this call."""
    t = _build_pb(
        (m, n, group_size, count_bits, salient_bits),
        (_cpu_numpy(a) for a in (signs, mu, alpha, sigma, res_counts, res_values, res_code_offsets, res_value_offsets)),
    )
    lead = tuple(grad.shape[:-1])
    g = grad.detach().reshape(math.prod(lead), m).float()
    w = torch.from_numpy(t.decompress())
    return (g @ w).to(grad.dtype).reshape(*lead, n)


@_pb_linear_grad_input.register_fake
def _pb_linear_grad_input_fake(
    grad,
    signs,
    mu,
    alpha,
    sigma,
    res_counts,
    res_values,
    res_code_offsets,
    res_value_offsets,
    m,
    n,
    group_size,
    count_bits,
    salient_bits,
):
    return grad.new_empty((*grad.shape[:-1], n))


def _setup_context(ctx, inputs, output):
    x, *comps, bias, m, n, gs, cb, sb = inputs[:15]
    ctx.save_for_backward(*comps)
    ctx.pb_meta = (m, n, gs, cb, sb)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    comps = ctx.saved_tensors
    m = ctx.pb_meta[0]
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = _pb_linear_grad_input(grad, *comps, *ctx.pb_meta)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[9]:
        gb = grad.reshape(-1, m).float().sum(0).to(ctx.bias_dtype)
    return (gx,) + (None,) * 8 + (gb,) + (None,) * 7


pb_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# PBLinear
# ---------------------------------------------------------------------------
