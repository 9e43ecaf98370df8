"""Calibrated compression of a whole model (:func:`calibrate_model`): every selected
``nn.Linear`` is compressed with :func:`pbcodec.compress_gptq` on the Hessian of its own
inputs, layer after layer in forward order with the layers before it already compressed
(GPTQ's sequential scheme), and per-layer settings (:data:`DEFAULT_SALIENT_BUDGET`,
``overrides``)."""

from __future__ import annotations

import fnmatch
import inspect
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..gptq import compress_gptq
from ..pb import compress
from .convert import _layer_importance, _linear_slots, _swap, default_filter
from .module import PBLinear
from .report import CompressionReport, layer_row

#: Per-layer salient budget used by :func:`calibrate_model` unless told otherwise:
#: ``{name glob: factor}``, the layer's salient fraction is ``factor * salient``
#: (capped at 1; the first matching glob wins; unmatched layers: 1). Attention query and
#: key projections at half, value and attention output at 1.5x (the four are the same
#: size in most transformers, so the total stays the same): measured on
#: all-MiniLM-L6-v2 (benches/bench_quality.py), where the attention-score projections
#: tolerate binarization best and the value/output path least.
DEFAULT_SALIENT_BUDGET: dict[str, float] = {
    "*.query": 0.5,
    "*.key": 0.5,
    "*.q_proj": 0.5,
    "*.k_proj": 0.5,
    "*.value": 1.5,
    "*.v_proj": 1.5,
    "*.attention.output.dense": 1.5,
    "*.o_proj": 1.5,
    "*.out_proj": 1.5,
}


def layer_kwargs(
    name: str,
    *,
    salient: float,
    salient_budget: Mapping[str, float] | None,
    overrides: Mapping[str, Mapping[str, Any]] | None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The compression settings of the layer ``name``: ``salient`` times the factor of the
    first ``salient_budget`` glob that matches (capped at 1), then the keyword arguments
    of every ``overrides`` glob that matches, in mapping order (later ones win; an
    override's ``salient`` is absolute, not scaled). Globs use :mod:`fnmatch` rules on the
    dotted module name."""
    sal = float(salient)
    for pattern, factor in (salient_budget or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            f = float(factor)
            if not f >= 0:
                raise ValueError(f"salient_budget[{pattern!r}] must be >= 0, got {factor!r}")
            sal = min(1.0, sal * f)
            break
    out = dict(kwargs, salient=sal)
    for pattern, settings in (overrides or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            if not isinstance(settings, Mapping):
                raise TypeError(f"overrides[{pattern!r}] must be a mapping of compress arguments, got {settings!r}")
            out.update(settings)
    return out


class _Capture:
    """Forward pre-hooks that add ``2 XᵀX`` (a float32 product per call, summed in float64)
    of each watched layer's input, and
    (with ``record=True``) the order of first calls, grouping layers that receive the very
    same input tensor (query/key/value: they can be compressed from one run)."""

    def __init__(self, layers: Mapping[str, nn.Linear], record: bool = False, first_only: bool = False) -> None:
        self.hessians: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.groups: list[list[str]] = []
        self._record = record
        self._first_only = first_only  # keep only the first group's Hessians (memory)
        self._last: Tensor | None = None
        self._seen: set[str] = set()
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in layers.items()]

    def _hook(self, name: str):
        def f(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if self._record and name not in self._seen:
                self._seen.add(name)
                if self.groups and x is self._last:
                    self.groups[-1].append(name)
                else:
                    self.groups.append([name])
            self._last = x
            if self._first_only and name not in self.groups[0]:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32)
            h = (2.0 * (x2.T @ x2)).to(torch.float64)
            if name in self.hessians:
                self.hessians[name] += h
                self.tokens[name] += x2.shape[0]
            else:
                self.hessians[name] = h
                self.tokens[name] = x2.shape[0]

        return f

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None


def _run(model: nn.Module, run: Callable[[nn.Module], Any], capture: _Capture) -> None:
    """``run(model)`` in eval mode (dropout off: the Hessians are of the model as it will
    be used) under ``torch.no_grad()``; the mode is restored afterwards."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run(model)
    finally:
        capture.close()
        model.train(training)


def calibrate_model(
    model: nn.Module,
    run: Callable[[nn.Module], Any],
    *,
    salient: float = 0.1,
    salient_bits: int = 4,
    filter: Callable[[str, nn.Module], bool] | None = None,
    salient_budget: Mapping[str, float] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    sequential: bool = True,
    progress: bool = True,
    activations: str = "int8",
    **kwargs: Any,
) -> CompressionReport:
    """Compress the matching ``nn.Linear`` layers of ``model`` in place with
    :func:`pbcodec.compress_gptq` on calibration data: each layer minimizes its own output
    error on the inputs it sees. The layers become ordinary :class:`PBLinear` modules (the
    same format as :func:`compress_model`'s; files and state dicts read as before).

    run: ``run(model)`` pushes the calibration data through the model (called in eval
        mode under ``torch.no_grad()``; e.g. ``lambda m: m.encode(sentences)``); a few hundred
        sentences or a few thousand tokens are typical. It is called once, then once per
        group of layers (``sequential=True``): layers are taken in the order of their
        first call, those fed the same input tensor (query/key/value) form one group,
        and each group's Hessian ``2 XᵀX`` is collected with every earlier group already
        compressed (GPTQ's sequential scheme), so later layers compensate for the
        errors of earlier ones. ``sequential=False``: one run, all Hessians from the
        float model (faster, less accurate).
    salient, salient_bits: the default setting; ``salient_bits`` defaults to 4 (at equal
        bits/weight, more salient weights with 4-bit codes measured better than fewer
        with 8-bit ones).
    salient_budget: ``{glob: factor}`` per-layer salient fractions relative to ``salient``
        (see :func:`layer_kwargs`); ``None`` means :data:`DEFAULT_SALIENT_BUDGET`, ``{}``
        a uniform budget.
    overrides: ``{glob: {argument: value}}`` per-layer settings (e.g. keep a sensitive
        layer at ``{"salient": 0.3, "salient_bits": 8}``), applied after the budget.
    filter: as for :func:`compress_model` (default :func:`default_filter`).
    kwargs: passed to :func:`pbcodec.compress_gptq` (``count_bits``, ``group_size``,
        ``select``, ``score``, ``shift``, ``scale_dtype``, ``damp``, ``act_order``,
        ``block_size``, ``refit``, ``num_threads``); unknown names raise TypeError before
        any run. ``group_size`` larger than a layer's ``in_features`` means whole rows.
        ``importance`` (with ``score="magnitude"``) may be a mapping ``{name: tensor}`` or
        a callable ``(name, module) -> tensor | None``, as for :func:`compress_model`.
    progress: a tqdm bar (when installed and stderr is a terminal).
    activations: the layers' activation mode (:attr:`PBLinear.activations`, default
        ``"int8"`` as in :func:`compress_model`); with ``sequential``, later layers are
        calibrated on what the already-compressed layers compute in that mode.

    Layers that ``run`` never calls (e.g. an unused pooler) are compressed without
    calibration by :func:`pbcodec.compress` with their resolved settings. Returns a
    :class:`CompressionReport` whose layer entries also carry ``calibrated`` (bool),
    ``tokens`` (calibration rows seen) and ``salient_target`` (the resolved fraction);
    :attr:`CompressionReport.seconds` holds the wall time.

    Deterministic for a deterministic ``run``: the same model, data and settings give the
    same bytes (on the same machine and thread counts). If ``run`` or a layer raises, the
    layers compressed until then stay replaced (the model is modified in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("model is itself an nn.Linear: use pbcodec.compress_gptq on its weight instead")
    if not callable(run):
        raise TypeError(f"run must be callable as run(model), got {type(run).__name__}")
    t_start = time.perf_counter()
    filt = filter or default_filter
    budget = DEFAULT_SALIENT_BUDGET if salient_budget is None else salient_budget
    group_size = kwargs.pop("group_size", None)
    slots = _linear_slots(model)
    targets: dict[str, nn.Linear] = {}
    skipped: list[str] = []
    seen: set[int] = set()
    for path, _, _, lin in slots:
        if id(lin) in seen:
            continue
        seen.add(id(lin))
        if filt(path, lin):
            targets[path] = lin
        else:
            skipped.append(path)
    importance = kwargs.pop("importance", None)
    settings: dict[str, dict[str, Any]] = {}
    for name, lin in targets.items():
        kw = dict(kwargs)
        if group_size is not None:
            kw["group_size"] = min(int(group_size), lin.in_features) if lin.in_features else group_size
        imp = _layer_importance(importance, name, lin)
        if imp is not None:
            kw["importance"] = imp
        settings[name] = layer_kwargs(
            name, salient=salient, salient_budget=budget, overrides=overrides, salient_bits=salient_bits, **kw
        )
        try:  # unknown argument names fail now, before any calibration run
            inspect.signature(compress_gptq).bind(None, None, **settings[name])
        except TypeError as e:
            raise TypeError(f"layer {name!r}: {e} (arguments of pbcodec.compress_gptq)") from None

    first = _Capture(targets, record=True, first_only=sequential)
    _run(model, run, first)
    groups = first.groups
    called = {n for g in groups for n in g}
    uncalled = [n for n in targets if n not in called]

    it: Iterable[int] = range(len(groups))
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is optional
            pass
        else:
            it = tqdm(it, desc="pbcodec calibrate", unit="group", disable=not sys.stderr.isatty())

    layers: dict[str, dict[str, Any]] = {}
    for gi in it:
        group = groups[gi]
        if gi == 0 or not sequential:
            cap = first
        else:
            cap = _Capture({n: targets[n] for n in group})
            _run(model, run, cap)
        for name in group:
            if name not in cap.hessians:  # not reached with the earlier groups compressed
                uncalled.append(name)
                continue
            layers[name] = _compress_layer(
                slots, name, targets[name], settings[name], cap.hessians.pop(name), cap.tokens[name], activations
            )
    for name in uncalled:
        layers[name] = _compress_layer(slots, name, targets[name], settings[name], None, 0, activations)
    report = CompressionReport([layers[n] for n in targets], skipped)
    report.seconds = time.perf_counter() - t_start
    return report


def _compress_layer(
    slots, name: str, lin: nn.Linear, kw: dict[str, Any], h: Tensor | None, tokens: int, activations: str
):
    with torch.no_grad():
        w = lin.weight.detach()
        w32 = w.to("cpu", torch.float32).numpy()
        if h is None:
            plain = {k: v for k, v in kw.items() if k in _PLAIN_ARGS}
            t = compress(w32, **plain)
        else:
            t = compress_gptq(w32, h.numpy(), **kw)
        pbl = PBLinear.from_pbtensor(t, lin.bias, device=w.device, activations=activations)
    _swap(slots, {id(lin): pbl})
    return layer_row(
        name, w, w32, pbl, salient_target=float(kw["salient"]), calibrated=h is not None, tokens=int(tokens)
    )


_PLAIN_ARGS = ("salient", "salient_bits", "count_bits", "group_size", "select", "importance", "shift", "scale_dtype")


def layer_hessians(
    model: nn.Module, run: Callable[[nn.Module], Any], *, filter: Callable[[str, nn.Module], bool] | None = None
) -> dict[str, Tensor]:
    """``{name: H}`` with ``H = 2 XᵀX`` (float64 CPU tensors: float32 products per call of
    the layer, summed in float64) of the inputs each selected
    ``nn.Linear`` (default :func:`default_filter`) receives during one ``run(model)``
    (under ``torch.no_grad()``). Layers that never run are absent. The model is not
    changed."""
    filt = filter or default_filter
    layers: dict[str, nn.Linear] = {}
    seen: set[int] = set()
    for path, _, _, lin in _linear_slots(model):
        if id(lin) not in seen:
            seen.add(id(lin))
            if filt(path, lin):
                layers[path] = lin
    cap = _Capture(layers)
    _run(model, run, cap)
    return cap.hessians


def analyze_model(
    model: nn.Module,
    run: Callable[[nn.Module], Any] | None = None,
    candidates: Sequence[tuple[float, int]] | None = None,
    *,
    calibrated: bool = False,
    filter: Callable[[str, nn.Module], bool] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Rate–distortion of every selected layer (:func:`pbcodec.analyze.rate_distortion`):
    bits/weight, weight SQNR and, with ``run``, the SQNR of the layer's outputs on the
    calibration data (``output_sqnr_db``; Hessians from the float model, one run). With
    ``calibrated=True`` (needs ``run``) the candidates are compressed with
    :func:`pbcodec.compress_gptq` (slower). The model is not changed. Show the result with
    :func:`pbcodec.analyze.format_table` / :func:`pbcodec.analyze.plot` (``key=
    "output_sqnr_db"``), pick the layers to keep at a higher precision with
    :func:`pbcodec.analyze.suggest_overrides` and pass them to ``compress_model(overrides=...)``."""
    from ..analyze import DEFAULT_CANDIDATES, rate_distortion

    if calibrated and run is None:
        raise ValueError("calibrated=True needs run")
    filt = filter or default_filter
    hess = None if run is None else {k: v.numpy() for k, v in layer_hessians(model, run, filter=filt).items()}
    weights = []
    seen: set[int] = set()
    for path, _, _, lin in _linear_slots(model):
        if id(lin) not in seen and filt(path, lin):
            seen.add(id(lin))
            weights.append((path, lin.weight.detach().to("cpu", torch.float32).numpy()))
    return rate_distortion(
        weights,
        DEFAULT_CANDIDATES if candidates is None else candidates,
        hessians=hess,
        calibrated=calibrated,
        **kwargs,
    )
