"""Pack PB-LLM's own output into pbcodec tensors (``pbcodec.from_pbllm``,
``pbcodec import-pbllm``).

PB-LLM (Shang et al., "PB-LLM: Partially Binarized Large Language Models",
ICLR 2024; code hahnyuan/PB-LLM, ``gptq_pb/``) saves every quantized Linear
weight *fake-quantized*, as float16 of the original size. In each output row
(and column group, when it ran with ``--groupsize``):

- the non-salient ("binarized") weights take one of two values
  ``mean ± scale`` (its ``xnor`` binarization; the code averages mean and scale
  over the whole group with the salient positions zeroed, which does not
  matter here: only the two resulting values are used);
- the salient weights lie on a per-row asymmetric 8-bit min/max grid
  ``scale · (q − zero_point)`` (GPTQ's quantizer, ``q`` in 0..255).

:func:`from_pbllm` finds, per row and group, the two binary values (from the
salient mask when given, else as the two most frequent values), sets
``mu = (hi + lo) / 2``, ``alpha = (hi − lo) / 2`` (float32 scales) and the sign
plane so that every binarized weight is reproduced **exactly**, and codes the
salient weights as the residual ``W − (mu ± alpha)`` on a per-row grid
``sigma``. Format v1 cannot hold PB-LLM's salient grid exactly (its offset is
not a multiple of ``sigma`` and it has 256 levels where v1's 8-bit residual
has 255), so salient weights are reproduced within ``sigma_i / 2`` plus float32
rounding, where ``sigma_i`` is chosen per row to minimize the largest error
(about one PB-LLM grid step of that row). :func:`pbllm_error` measures it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .pb import PBTensor
from .rle import rle_encode

__all__ = ["PbllmReport", "from_pbllm", "pbllm_error", "pbllm_shape_check"]

# Candidate residual scales tried per row, as multiples of the smallest one
# that keeps every residual code within -Q..Q (the best is kept).
_SIGMA_STEPS = np.linspace(1.0, 1.25, 33)


def _as_matrix(weight: Any) -> np.ndarray:
    if type(weight).__module__.startswith("torch"):
        weight = weight.detach().cpu().float().numpy()
    w = np.asarray(weight)
    if w.dtype.kind != "f":
        raise TypeError(f"weight must be a float array (float16 as PB-LLM saves it), got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {w.shape}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError("weight has non-finite values")
    return w


def _two_values(block: np.ndarray, salient: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``block`` ``(m, g)``: (lo, hi, count) of its two most frequent
    values among the non-salient positions (all positions without a mask).
    Rows without any get lo = hi = 0, count 0. Vectorized over rows: sort each
    row, number its runs of equal values, count them with one bincount."""
    m, g = block.shape
    b = block.astype(np.float32, copy=True)
    if salient is not None:
        b[salient] = np.nan  # sorted last, and each NaN is a run of its own
    srt = np.sort(b, axis=1)
    new_run = np.ones((m, g), bool)
    new_run[:, 1:] = srt[:, 1:] != srt[:, :-1]
    run = np.cumsum(new_run, axis=1) - 1  # run index within the row, 0..g-1
    key = (np.arange(m)[:, None] * g + run).ravel()
    counts = np.bincount(key, minlength=m * g).reshape(m, g)
    vals = np.zeros((m, g), np.float32)
    vals.reshape(-1)[key] = srt.ravel()
    counts[np.isnan(vals)] = 0
    if g >= 2:
        top = np.argsort(-counts, axis=1, kind="stable")[:, :2]
    else:
        top = np.zeros((m, 2), np.intp)
    c2 = np.take_along_axis(counts, top, axis=1)
    v2 = np.take_along_axis(vals, top, axis=1)
    v2[c2 == 0] = np.nan
    # A row with one value repeated: both entries are that value.
    v2[:, 1] = np.where(np.isnan(v2[:, 1]), v2[:, 0], v2[:, 1])
    v2 = np.nan_to_num(v2, nan=0.0)
    return v2.min(axis=1), v2.max(axis=1), c2.sum(axis=1) if g >= 2 else c2[:, 0]


def _ulps(x: np.float32, k: int) -> np.float32:
    toward = np.float32(np.inf) if k > 0 else np.float32(-np.inf)
    for _ in range(abs(k)):
        x = np.nextafter(x, toward)
    return x


def _mu_alpha(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 mu, alpha with f32(mu + alpha) == hi and f32(mu - alpha) == lo
    (decompression's arithmetic, docs/format.md §6.2): the exact midpoint and
    half-width when float32 holds them (PB-LLM's float16 values: always in
    practice), else the nearest float32 neighbours that reproduce both."""
    f32 = np.float32
    lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
    mu, al = ((hi64 + lo64) / 2).astype(f32), ((hi64 - lo64) / 2).astype(f32)
    bad = np.flatnonzero(((mu + al) != hi) | ((mu - al) != lo))
    for k in bad:
        for dm in (0, 1, -1, 2, -2):
            for da in (0, 1, -1, 2, -2):
                m2, a2 = _ulps(mu[k], dm), _ulps(al[k], da)
                if a2 >= 0 and f32(m2 + a2) == hi[k] and f32(m2 - a2) == lo[k]:
                    mu[k], al[k] = m2, a2
                    break
            else:
                continue
            break
    return mu, al


def _residual(
    rows: np.ndarray, w: np.ndarray, off_hi: np.ndarray, off_lo: np.ndarray, m: int, qmax: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residual of the salient positions (row ids ``rows``, sorted; targets ``w``;
    the two dense values there): per row the sigma that minimizes the largest
    error of ``f32(offset + f32(sigma * q))``, and per position the sign choice
    (True = the lower value) and code."""
    f32 = np.float32
    w64 = w.astype(np.float64)
    r_hi, r_lo = w64 - off_hi, w64 - off_lo
    reach = np.zeros(m)
    np.maximum.at(reach, rows, np.minimum(np.abs(r_hi), np.abs(r_lo)))
    base = reach / qmax
    best_err = np.full(m, np.inf)
    sigma = np.zeros(m, f32)
    use_lo = np.abs(r_lo) < np.abs(r_hi)
    q = np.zeros(w.size, np.int8)
    for step in _SIGMA_STEPS:
        sg = (base * step).astype(f32)
        s = sg[rows]
        safe = np.where(s > 0, s, f32(1)).astype(np.float64)
        q_hi = np.where(s > 0, np.clip(np.rint(r_hi / safe), -qmax, qmax), 0).astype(f32)
        q_lo = np.where(s > 0, np.clip(np.rint(r_lo / safe), -qmax, qmax), 0).astype(f32)
        # Decompression arithmetic: B + S, each rounded to float32.
        e_hi = np.abs((off_hi + s * q_hi).astype(np.float64) - w64)
        e_lo = np.abs((off_lo + s * q_lo).astype(np.float64) - w64)
        lo_better = e_lo < e_hi
        err = np.where(lo_better, e_lo, e_hi)
        worst = np.zeros(m)
        np.maximum.at(worst, rows, err)
        better = worst < best_err
        if not better.any():
            continue
        best_err = np.where(better, worst, best_err)
        sigma = np.where(better, sg, sigma)
        take = better[rows]
        use_lo = np.where(take, lo_better, use_lo)
        q = np.where(take, np.where(lo_better, q_lo, q_hi).astype(np.int8), q)
    return sigma, use_lo, q


def from_pbllm(
    weight: Any,
    salient_mask: Any = None,
    *,
    group_size: int | None = None,
    salient_bits: int = 8,
    count_bits: int | str = "auto",
) -> PBTensor:
    """Pack a PB-LLM fake-quantized weight into a :class:`PBTensor`.

    weight: ``(m, n)`` float array (float16 as PB-LLM saves it; torch tensors
        accepted). salient_mask: optional bool ``(m, n)``, True at salient
        (non-binarized) positions. Note that PB-LLM's ``gptq_pb`` saves the
        opposite (True = binarized): pass ``~mask`` for its files. Without a mask
        the binarized weights are recovered as the two most frequent values of
        each row's group (a salient weight that happens to equal one of them is
        then stored as binarized, which reproduces it exactly too).
    group_size: PB-LLM's ``--groupsize`` (columns per mean/scale group); default
        the whole row. salient_bits: residual code width, 8 (PB-LLM's
        ``--high_bit 8``) or 4. count_bits: zero-run code width or ``"auto"``.

    Returns a PBTensor with float32 scales whose ``decompress()`` equals
    ``weight`` exactly at every binarized position, and within
    ``sigma[i] / 2`` (plus float32 rounding) at salient positions of row ``i``
    (see :func:`pbllm_error`). Raises TypeError/ValueError for bad arguments.
    """
    w = _as_matrix(weight)
    m, n = w.shape
    if salient_bits not in (4, 8):
        raise ValueError(f"salient_bits must be 4 or 8, got {salient_bits}")
    g = n if group_size is None else int(group_size)
    if n and not 1 <= g <= n:
        raise ValueError(f"group_size must be in 1..{n}, got {group_size}")
    g = max(g, 1)
    mask = None
    if salient_mask is not None:
        if type(salient_mask).__module__.startswith("torch"):
            salient_mask = salient_mask.detach().cpu().numpy()
        mask = np.asarray(salient_mask)
        if mask.shape != w.shape:
            raise ValueError(f"salient_mask has shape {mask.shape}, expected {w.shape}")
        mask = mask.astype(bool)
    qmax = (1 << (salient_bits - 1)) - 1
    ng = 0 if n == 0 else -(-n // g)
    mu = np.zeros((m, ng), np.float32)
    alpha = np.zeros((m, ng), np.float32)
    off_hi = np.zeros((m, n), np.float32)
    off_lo = np.zeros((m, n), np.float32)
    binarized = np.zeros((m, n), bool)
    neg = np.zeros((m, n), bool)  # s = -1
    for gi in range(ng):
        a, b = gi * g, min(n, (gi + 1) * g)
        blk = w[:, a:b]
        lo, hi, _ = _two_values(blk, None if mask is None else mask[:, a:b])
        mu[:, gi], alpha[:, gi] = _mu_alpha(lo, hi)
        off_hi[:, a:b] = (mu[:, gi] + alpha[:, gi])[:, None]
        off_lo[:, a:b] = (mu[:, gi] - alpha[:, gi])[:, None]
        on_hi = blk == off_hi[:, a:b]
        on_lo = (blk == off_lo[:, a:b]) & ~on_hi
        is_bin = on_hi | on_lo
        if mask is not None:
            is_bin &= ~mask[:, a:b]
        binarized[:, a:b] = is_bin
        neg[:, a:b] = on_lo & is_bin
    rows, cols = np.nonzero(~binarized)
    sigma, use_lo, codes = _residual(rows, w[rows, cols], off_hi[rows, cols], off_lo[rows, cols], m, qmax)
    neg[rows, cols] = use_lo
    q = np.zeros((m, n), np.int8)
    q[rows, cols] = codes
    signs = np.packbits(neg, axis=-1, bitorder="little")
    residual = rle_encode(q, count_bits=count_bits, value_bits=salient_bits)
    return PBTensor.from_parts(
        (m, n),
        signs=signs,
        mu=mu,
        alpha=alpha,
        sigma=sigma,
        counts=residual.counts,
        values=residual.values,
        code_offsets=residual.code_offsets,
        group_size=g,
        count_bits=residual.count_bits,
        salient_bits=salient_bits,
    )


@dataclasses.dataclass
class PbllmReport:
    """How closely a packed tensor reproduces the PB-LLM weight."""

    max_abs_error: float
    """max |Ŵ − W| over all positions (float64 of the float32 values)."""
    exact_fraction: float
    """fraction of positions where Ŵ (float32) equals W."""
    exact_fraction_at_dtype: float
    """fraction equal after rounding Ŵ to the weight's own dtype (float16)."""
    exact: bool
    """every position equal after rounding to the weight's dtype."""
    salient_fraction: float
    """fraction of positions holding a residual code."""
    max_error_over_sigma: float
    """max over rows of (max error in row) / sigma_row (≤ 0.5 + rounding)."""
    bits_per_weight: float


def pbllm_error(weight: Any, t: PBTensor) -> PbllmReport:
    """Compare ``t.decompress()`` with the PB-LLM weight it came from."""
    dtype = np.asarray(weight).dtype if not type(weight).__module__.startswith("torch") else np.float32
    w = _as_matrix(weight)
    wh = t.decompress()
    err = np.abs(wh.astype(np.float64) - w.astype(np.float64))
    at = np.dtype(dtype) if np.dtype(dtype).kind == "f" else np.dtype(np.float32)
    same_at = wh.astype(at) == np.asarray(w, dtype=at)
    sigma = t.sigma.astype(np.float64)
    row_err = err.max(axis=1) if err.size else np.zeros(t.shape[0])
    ratio = np.where(sigma > 0, row_err / np.where(sigma > 0, sigma, 1), np.where(row_err > 0, np.inf, 0))
    return PbllmReport(
        max_abs_error=float(err.max()) if err.size else 0.0,
        exact_fraction=float((err == 0).mean()) if err.size else 1.0,
        exact_fraction_at_dtype=float(same_at.mean()) if err.size else 1.0,
        exact=bool(same_at.all()),
        salient_fraction=t.residual.num_values / max(w.size, 1),
        max_error_over_sigma=float(ratio.max()) if ratio.size else 0.0,
        bits_per_weight=t.bits_per_weight,
    )


def pbllm_shape_check(weight: Any, *, group_size: int | None = None, max_salient: float = 0.6) -> str | None:
    """None when ``weight`` looks like a PB-LLM output (in every row group the
    two most frequent values cover at least ``1 − max_salient`` of the
    positions), else a sentence saying why not."""
    w = _as_matrix(weight)
    m, n = w.shape
    g = n if group_size is None else int(group_size)
    if n == 0 or m == 0:
        return "empty matrix"
    if not 1 <= g <= n:
        return f"group_size {g} out of range 1..{n}"
    for a in range(0, n, g):
        block = w[:, a : a + g]
        _, _, k = _two_values(block, None)
        frac = k / block.shape[1]
        i = int(np.argmin(frac))
        if frac[i] < 1 - max_salient:
            return (
                f"row {i}: its two most frequent values cover {frac[i]:.0%} of a group "
                f"(PB-LLM's binarized weights cover >= {1 - max_salient:.0%})"
            )
    return None


# ------------------------------------------------------------ command line


def _import_file(src, dst, selected, args, masks, rows, log) -> list[str]:
    """Import one safetensors file; returns the tensor names written."""
    from .cli import CliError
    from .files import META_KEY, pb_components, read_safetensors, write_safetensors

    raw, meta = read_safetensors(src)
    if META_KEY in meta:
        raise CliError(f"{src} already holds pbcodec-compressed tensors")
    out: dict[str, Any] = {}
    desc: dict[str, Any] = {}
    for name in sorted(raw):
        t = raw[name]
        row = dict(name=name, shape=t.shape, dtype=t.dtype, before=t.nbytes, after=t.nbytes, status="copied")
        if selected(name, t):
            w = t.array() if t.dtype in ("F16", "F32") else t.float32()
            why = pbllm_shape_check(w, group_size=args.group_size, max_salient=args.max_salient)
            if why is not None:
                if args.other == "refuse":
                    raise CliError(f"{src}: {name} is not PB-LLM-shaped: {why} (use --other copy to keep it as is)")
                row["status"] = f"not PB-LLM-shaped, copied ({why})"
            else:
                mask = None
                if masks is not None:
                    if name not in masks:
                        raise CliError(f"--masks has no tensor {name!r}")
                    mask = masks[name].astype(bool)
                    if args.mask_marks == "binarized":
                        mask = ~mask
                pbt = from_pbllm(w, mask, group_size=args.group_size, salient_bits=args.salient_bits)
                rep = pbllm_error(w, pbt)
                parts, desc[name] = pb_components(name, pbt)
                for k in parts:
                    if k in raw or k in out:
                        raise CliError(f"{src}: component name {k!r} collides with an existing tensor")
                out.update(parts)
                row.update(after=pbt.nbytes, status="packed", report=rep)
                rows.append(row)
                log(name)
                continue
        out[name] = t
        rows.append(row)
    new_meta = dict(meta)
    if desc:
        import json

        new_meta[META_KEY] = json.dumps(desc, sort_keys=True)
    write_safetensors(dst, out, new_meta)
    return list(out)


def cli_import(args: Any) -> None:
    """``pbcodec import-pbllm IN OUT``: see ``pbcodec import-pbllm --help``."""
    import json
    import os
    import shutil
    import sys
    import tempfile
    import time
    from pathlib import Path

    from .cli import CliError, _find_index, _fmt_bytes, make_selector
    from .files import load_file

    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise CliError(f"{src}: no such file or directory")
    if dst.exists() and not args.force:
        raise CliError(f"{dst} exists; pass --force to replace it")
    if args.group_size is not None and args.group_size < 1:
        raise CliError(f"--group-size must be at least 1, got {args.group_size}")
    masks = None
    if args.masks:
        loaded = load_file(args.masks)
        masks = {k: np.asarray(v) for k, v in loaded.items() if isinstance(v, np.ndarray)}
    selected = make_selector(args.include or [], args.exclude or [])

    def log(name: str) -> None:
        if not args.quiet and sys.stderr.isatty():
            print(f"  {name}", file=sys.stderr, flush=True)

    rows: list[dict] = []
    t0 = time.perf_counter()
    if src.is_dir():
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            raise CliError(f"{src}: no .safetensors files")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pbcodec-", dir=dst.parent))
        try:
            weight_map: dict[str, str] = {}
            for shard in shards:
                names = _import_file(shard, tmp / shard.name, selected, args, masks, rows, log)
                weight_map.update((n, shard.name) for n in names)
            index = _find_index(src)
            for item in src.iterdir():
                if item.suffix != ".safetensors" and item != index:
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            if index is not None:
                with open(index) as f:
                    old = json.load(f)
                total = sum((tmp / s.name).stat().st_size for s in shards)
                new = {"metadata": {**old.get("metadata", {}), "total_size": total}, "weight_map": weight_map}
                (tmp / index.name).write_text(json.dumps(new, indent=2))
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _import_file(src, dst, selected, args, masks, rows, log)
    packed = [r for r in rows if r["status"] == "packed"]
    w = max([len(r["name"]) for r in rows] + [6])
    print(
        f"\n{'tensor':<{w}}  {'shape':>12}  {'dtype':>5}  {'bits/w':>7}  {'salient':>7}  {'max err':>9}  "
        f"{'exact':>6}  {'before':>10}  {'after':>10}"
    )
    for r in packed:
        rep = r["report"]
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['name']:<{w}}  {shape:>12}  {r['dtype']:>5}  {rep.bits_per_weight:7.3f}  {rep.salient_fraction:7.1%}  "
            f"{rep.max_abs_error:9.2e}  {rep.exact_fraction_at_dtype:6.1%}  {_fmt_bytes(r['before']):>10}  "
            f"{_fmt_bytes(r['after']):>10}"
        )
    for r in rows:
        if r["status"].startswith("not"):
            print(f"{r['name']}: {r['status']}")
    copied = [r for r in rows if r["status"] != "packed"]
    n_exact = sum(r["report"].exact for r in packed)
    print(
        f"\n{len(packed)} tensors packed ({n_exact} reproduced exactly), {len(copied)} copied unchanged "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    if packed:
        cb, ca = sum(r["before"] for r in packed), sum(r["after"] for r in packed)
        print(f"packed tensors: {_fmt_bytes(cb)} -> {_fmt_bytes(ca)} ({cb / ca:.2f}x)")
    print(
        "exact: fraction of weights equal to the input after rounding to its dtype; binarized weights are "
        "always exact, salient ones within half a residual step (format v1)"
    )


def add_parser(sub: Any) -> None:
    """The ``import-pbllm`` subcommand (called by pbcodec.cli)."""
    p = sub.add_parser(
        "import-pbllm",
        help="pack a PB-LLM fake-quantized checkpoint (.safetensors file or directory of shards)",
        description=(
            "Pack the Linear weights of a PB-LLM checkpoint (float16, fake-quantized) into pbcodec tensors. "
            "Binarized weights are reproduced exactly; salient weights within half a residual step. Tensor "
            "selection as in `pbcodec compress`; selected tensors that are not PB-LLM-shaped are copied "
            "(--other copy) or refused (--other refuse)."
        ),
    )
    p.add_argument("input", help=".safetensors file, or a directory of shards")
    p.add_argument("output")
    p.add_argument("--group-size", type=int, default=None, help="PB-LLM's --groupsize (default: whole rows)")
    p.add_argument("--salient-bits", type=int, default=8, choices=(4, 8))
    p.add_argument("--masks", help="safetensors file of masks named like the weights (PB-LLM's saved masks)")
    p.add_argument(
        "--mask-marks",
        default="binarized",
        choices=("binarized", "salient"),
        help="what True means in --masks (PB-LLM's gptq_pb saves True = binarized)",
    )
    p.add_argument("--other", default="copy", choices=("copy", "refuse"), help="selected tensors not PB-LLM-shaped")
    p.add_argument("--max-salient", type=float, default=0.6, help="largest salient fraction accepted as PB-LLM-shaped")
    p.add_argument("--include", action="append", metavar="GLOB")
    p.add_argument("--exclude", action="append", metavar="GLOB")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true")
