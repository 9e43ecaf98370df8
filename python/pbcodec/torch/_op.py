"""The custom op ``torch.ops.pbcodec.pb_linear`` (fused kernel on the CPU, fake
implementation for tracing, autograd for inputs and bias) and the conversions
between a :class:`pbcodec.PBTensor` and the tensors the op takes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import FormatError
from ..pb import PBTensor
from ..rle import RLE

if not hasattr(torch.library, "custom_op") or not hasattr(torch.library, "register_fake"):
    raise ImportError(f"pbcodec.torch needs torch >= 2.4 (torch.library.custom_op); found torch {torch.__version__}")

#: Version stored in ``pb_meta[0]``.
FORMAT_VERSION = 1

#: Row count from which :func:`pb_linear` dequantizes into a temporary dense weight and
#: uses torch's GEMM instead of the decode-fused kernel (see its docstring).
DENSE_ROWS = 64

# Buffer names, in registration (and state_dict) order.
_COMPONENTS = ("signs", "mu", "alpha", "sigma", "res_counts", "res_values", "res_code_offsets")
_SCALES = ("mu", "alpha", "sigma")
_PERSISTENT = _COMPONENTS + ("pb_meta",)
# Every tensor the op takes, in its argument order (value offsets are derived on load).
_OP_TENSORS = _COMPONENTS + ("res_value_offsets",)

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
    """An (unvalidated) PBTensor over the given arrays, zero-copy. Only used on parts
    that were validated when they entered the module; the kernels still check sizes and
    offsets and bound every position, so inconsistent parts raise, never crash."""
    m, n, gs, cb, sb = meta
    signs, mu, alpha, sigma, counts, values, co, vo = arrays
    ng = 0 if n == 0 else -(-n // max(gs, 1))
    if mu.dtype not in (np.float16, np.float32) or alpha.dtype != mu.dtype or sigma.dtype != mu.dtype:
        raise FormatError(f"scales must all be float16 or all float32, got {mu.dtype}, {alpha.dtype}, {sigma.dtype}")
    try:
        residual = RLE((m, n), cb, sb, counts, values, co, vo)
        return PBTensor(
            (m, n),
            signs.reshape(m, (n + 7) // 8),
            mu.reshape(m, ng),
            alpha.reshape(m, ng),
            sigma.reshape(m),
            residual,
            gs,
        )
    except ValueError as e:  # reshape of a wrongly sized part
        raise FormatError(f"PBLinear parts have inconsistent sizes: {e}") from None


def _from_numpy(a: np.ndarray, device: Any = None) -> Tensor:
    a = np.ascontiguousarray(a)
    # Buffers must own writable memory (PBTensor's scale arrays are read-only views).
    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t if device is None else t.to(device)


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
) -> Tensor:
    """``y = x @ Ŵ.T + bias`` for ``x`` of shape ``(..., n)`` (any float dtype), in float32;
    returns ``(..., m)`` in ``x``'s dtype. CPU tensors only (``torch.ops.pbcodec.pb_linear``).

    Up to :data:`DENSE_ROWS` - 1 rows: the decode-fused kernel, one call for all rows.
    From :data:`DENSE_ROWS` rows on, the weight is dequantized into a temporary float32
    matrix (freed after the call) and multiplied with torch's GEMM: the fused kernel's
    cost grows with the row count like a dense GEMM's but with less efficient
    arithmetic, so past ~64 rows the dequantize cost is the smaller one (measured on
    the benchmark machine: 2.3x faster at 128 rows for 384x1536, 1.6x for 4096x4096)."""
    _check_input(x)
    t = _build_pb(
        (m, n, group_size, count_bits, salient_bits),
        (_cpu_numpy(a) for a in (signs, mu, alpha, sigma, res_counts, res_values, res_code_offsets, res_value_offsets)),
    )
    lead = tuple(x.shape[:-1])
    if x.dim() == 0 or x.shape[-1] != n:
        raise ValueError(f"input must have shape (..., {n}), got {tuple(x.shape)}")
    x2 = x.detach().reshape(math.prod(lead), n)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    if x2.shape[0] >= DENSE_ROWS:
        y = torch.nn.functional.linear(x2, torch.from_numpy(t.decompress()))
    else:
        y = torch.from_numpy(t.matvec(x2.contiguous().numpy()))  # zero-copy for contiguous float32 x
    if bias is not None:
        y += bias.detach().float()
    return y.to(x.dtype).reshape(*lead, m)


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
    x, *comps, bias, m, n, gs, cb, sb = inputs
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
    return (gx,) + (None,) * 8 + (gb,) + (None,) * 5


pb_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# PBLinear
# ---------------------------------------------------------------------------
