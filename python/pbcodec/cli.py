"""The ``pbcodec`` command line: compress, inspect, analyze, demo, bench, quality.

Default tensor selection for ``compress``: every 2-D floating-point tensor
(F32/F16/BF16) with both dimensions >= 16 whose name matches none of
``*embed*``, ``*lm_head*``, ``*norm*``: that is, the Linear weights.
Embedding tables are row *lookups* (a matvec kernel does not help them and
their rows are read individually), norms are tiny vectors, and the output head
is usually the most sensitive layer. ``--include GLOB`` replaces the name rule
(any 2-D float tensor matching a glob is compressed), ``--exclude GLOB`` removes
matches; both may be repeated.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_SKIP = ("*embed*", "*lm_head*", "*norm*")
FLOAT_CODES = ("F32", "F16", "BF16")


class CliError(Exception):
    """An error reported as one line on stderr with exit status 1."""


# ---------------------------------------------------------------- progress


class _Progress:
    """tqdm when installed and stderr is a terminal; a line per tensor on a
    terminal without tqdm; silent when stderr is not a terminal (logs, pipes)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="compressing", file=sys.stderr)
            except ImportError:
                pass

    def step(self, name: str, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name[-40:], refresh=False)
            self.bar.update(nbytes)
        elif self.enabled and sys.stderr.isatty():
            print(f"  {name} ({nbytes / 2**20:.1f} MB)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------ compress


def make_selector(include: list[str], exclude: list[str]) -> Callable[[str, Any], bool]:
    def selected(name: str, t: Any) -> bool:
        if t.dtype not in FLOAT_CODES or len(t.shape) != 2 or min(t.shape) < 16:
            return False
        if include:
            if not any(fnmatch.fnmatchcase(name, g) for g in include):
                return False
        elif any(fnmatch.fnmatchcase(name.lower(), g) for g in DEFAULT_SKIP):
            return False
        return not any(fnmatch.fnmatchcase(name, g) for g in exclude)

    return selected


def compress_file(
    src: Path, dst: Path, selected: Callable, kwargs: dict, progress: _Progress | None
) -> tuple[list[dict], list[str]]:
    """Compress the selected tensors of one safetensors file into ``dst``
    (atomically); copy the rest byte for byte. Returns one summary row per
    input tensor and the names of the tensors written."""
    import numpy as np

    from . import compress, snr_db
    from .files import META_KEY, pb_components, read_safetensors, write_safetensors

    raw, meta = read_safetensors(src)
    if META_KEY in meta:
        raise CliError(f"{src} already holds pbcodec-compressed tensors")
    out: dict[str, Any] = {}
    desc: dict[str, Any] = {}
    rows = []
    for name in sorted(raw):
        t = raw[name]
        if selected(name, t):
            w = t.float32()
            pbt = compress(w, **kwargs)
            parts, desc[name] = pb_components(name, pbt)
            for k in parts:
                if k in raw or k in out:
                    raise CliError(f"{src}: component name {k!r} collides with an existing tensor")
            out.update(parts)
            rows.append(
                dict(
                    name=name,
                    shape=t.shape,
                    dtype=t.dtype,
                    before=t.nbytes,
                    after=pbt.nbytes,
                    bpw=pbt.bits_per_weight,
                    snr=snr_db(w, pbt.decompress()),
                    compressed=True,
                )
            )
            del w, pbt
        else:
            out[name] = t
            rows.append(
                dict(
                    name=name,
                    shape=t.shape,
                    dtype=t.dtype,
                    before=t.nbytes,
                    after=t.nbytes,
                    bpw=8.0 * t.nbytes / max(int(np.prod(t.shape)), 1),
                    snr=None,
                    compressed=False,
                )
            )
        if progress is not None:
            progress.step(name, t.nbytes)
    new_meta = dict(meta)
    if desc:
        new_meta[META_KEY] = json.dumps(desc, sort_keys=True)
    write_safetensors(dst, out, new_meta)
    return rows, list(out)


def _find_index(src: Path) -> Path | None:
    found = sorted(src.glob("*.safetensors.index.json"))
    return found[0] if found else None


def cmd_compress(args: argparse.Namespace) -> None:
    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise CliError(f"{src}: no such file or directory")
    if dst.exists() and not args.force:
        raise CliError(f"{dst} exists; pass --force to replace it")
    count_bits: Any = args.count_bits if args.count_bits == "auto" else int(args.count_bits)
    kwargs = dict(
        salient=args.salient,
        salient_bits=args.salient_bits,
        count_bits=count_bits,
        group_size=args.group_size,
        select=args.select,
        scale_dtype=args.scale_dtype,
    )
    selected = make_selector(args.include or [], args.exclude or [])
    import numpy as np

    from . import compress

    # Bad options fail here, before any file is read or written.
    compress(np.zeros((1, 64), np.float32), **{**kwargs, "group_size": None if args.group_size is None else 1})
    if args.group_size is not None and args.group_size < 1:
        raise CliError(f"--group-size must be at least 1, got {args.group_size}")
    t0 = time.perf_counter()
    if src.is_dir():
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            raise CliError(f"{src}: no .safetensors files")
        total = sum(p.stat().st_size for p in shards)
        progress = _Progress(total, not args.quiet)
        # Build everything in a temporary sibling directory, then rename: a
        # failure never leaves a partial OUT behind.
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pbcodec-", dir=dst.parent))
        try:
            rows: list[dict] = []
            weight_map: dict[str, str] = {}
            for shard in shards:
                shard_rows, names = compress_file(shard, tmp / shard.name, selected, kwargs, progress)
                rows += shard_rows
                weight_map.update((name, shard.name) for name in names)
            index = _find_index(src)
            for item in src.iterdir():  # configs, tokenizers: copied as they are
                if item.suffix != ".safetensors" and item != index:
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            if index is not None:
                total_size = sum((tmp / s.name).stat().st_size for s in shards)
                with open(index) as f:
                    old = json.load(f)
                new = {
                    "metadata": {**old.get("metadata", {}), "total_size": total_size},
                    "weight_map": dict(sorted(weight_map.items())),
                }
                with open(tmp / index.name, "w") as f:
                    json.dump(new, f, indent=2)
            progress.close()
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        progress = _Progress(src.stat().st_size, not args.quiet)
        dst.parent.mkdir(parents=True, exist_ok=True)
        rows, _ = compress_file(src, dst, selected, kwargs, progress)
        progress.close()
    _print_summary(rows, time.perf_counter() - t0)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _print_summary(rows: list[dict], seconds: float) -> None:
    comp = [r for r in rows if r["compressed"]]
    w = max([len(r["name"]) for r in comp] + [6])
    print(
        f"\n{'tensor':<{w}}  {'shape':>12}  {'dtype':>5}  {'bits/w':>7}  {'SNR dB':>7}  {'before':>10}  {'after':>10}"
    )
    for r in comp:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['name']:<{w}}  {shape:>12}  {r['dtype']:>5}  {r['bpw']:7.3f}  {r['snr']:7.2f}  "
            f"{_fmt_bytes(r['before']):>10}  {_fmt_bytes(r['after']):>10}"
        )
    before = sum(r["before"] for r in rows)
    after = sum(r["after"] for r in rows)
    copied = [r for r in rows if not r["compressed"]]
    print(
        f"\n{len(comp)} tensors compressed, {len(copied)} copied unchanged "
        f"({_fmt_bytes(sum(r['before'] for r in copied))}) in {seconds:.1f} s"
    )
    if comp:
        cb, ca = sum(r["before"] for r in comp), sum(r["after"] for r in comp)
        print(f"compressed tensors: {_fmt_bytes(cb)} -> {_fmt_bytes(ca)} ({cb / ca:.2f}x)")
    print(f"total tensor data:  {_fmt_bytes(before)} -> {_fmt_bytes(after)} ({before / max(after, 1):.2f}x)")


# ------------------------------------------------------------------ inspect


def cmd_inspect(args: argparse.Namespace) -> None:
    import numpy as np

    from .files import load_file, read_safetensors
    from .pb import PBTensor

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    tensors = load_file(path)  # validates everything
    raw, meta = read_safetensors(path)
    w = max([len(k) for k in tensors] + [6])
    print(f"{'tensor':<{w}}  {'codec':>7}  {'dtype':>5}  {'shape':>12}  {'params':<22}  {'bytes':>10}  {'bits/w':>7}")
    total = 0
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, PBTensor):
            r = t.residual
            params = f"s{r.value_bits} c{r.count_bits} g{t.group_size} {t.mu.dtype}"
            n, shape = t.nbytes, "x".join(map(str, t.shape))
            print(
                f"{name:<{w}}  {'pbcodec':>7}  {'':>5}  {shape:>12}  {params:<22}  {n:>10}  {t.bits_per_weight:7.3f}"
                f"  salient {r.num_values / max(t.shape[0] * t.shape[1], 1):.3f}"
            )
        else:
            n = raw[name].nbytes
            shape = "x".join(map(str, t.shape)) or "scalar"
            print(
                f"{name:<{w}}  {'-':>7}  {raw[name].dtype:>5}  {shape:>12}  {'':<22}  {n:>10}  "
                f"{8 * n / max(int(np.prod(t.shape)), 1):7.3f}"
            )
        total += n
    other = {k: v for k, v in meta.items() if k != "pbcodec"}
    print(f"\n{len(tensors)} tensors, {_fmt_bytes(total)} of tensor data, file {_fmt_bytes(path.stat().st_size)}")
    if other:
        print(f"metadata: {other}")


# ------------------------------------------------------------------ analyze


def cmd_analyze(args: argparse.Namespace) -> None:
    """Rate–distortion table (and plot) of the selected tensors of a file or directory."""
    from .analyze import DEFAULT_CANDIDATES, format_table, plot, rate_distortion, suggest_overrides
    from .files import META_KEY, read_safetensors

    src = Path(args.source)
    if src.is_dir():
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            raise CliError(f"{src}: no .safetensors files")
    elif src.is_file():
        shards = [src]
    else:
        raise CliError(f"{src}: no such file or directory")
    cands = DEFAULT_CANDIDATES
    if args.candidates:
        try:
            cands = tuple((float(s), int(b)) for s, b in (c.split(":") for c in args.candidates.split(",")))
        except ValueError:
            raise CliError(f"--candidates must look like 0.1:4,0.2:8, got {args.candidates!r}") from None
    selected = make_selector(args.include or [], args.exclude or [])

    def weights():
        for shard in shards:
            raw, meta = read_safetensors(shard)
            if META_KEY in meta:
                raise CliError(f"{shard} holds pbcodec-compressed tensors: analyze the original weights")
            for name in sorted(raw):
                if selected(name, raw[name]):
                    yield name, raw[name].float32()

    results = rate_distortion(weights(), cands, group_size=args.group_size)
    if not results:
        raise CliError(f"{src}: no tensor selected")
    print(format_table(results))
    setting = cands[min(1, len(cands) - 1)]
    sugg = suggest_overrides(results, setting)
    if sugg:
        mods = {k[: -len(".weight")] if k.endswith(".weight") else k: v for k, v in sugg.items()}
        print(
            f"\nweakest layers at {setting[0]:.0%}/{setting[1]}-bit (SQNR > 2 dB below the median), with the "
            "cheapest setting that reaches the median; for compress_model(overrides=...):"
        )
        print(json.dumps(mods, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        try:
            plot(results, args.plot)
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install 'pbcodec[plot]'") from None
        print(f"plot written to {args.plot}")


# --------------------------------------------------------------------- main


def cmd_quality(args: argparse.Namespace, extra: list[str]) -> int:
    """Run ``benches/bench_quality.py`` of a source checkout with the given arguments."""
    import subprocess

    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        script = root / "benches" / "bench_quality.py"
        if script.is_file():
            return subprocess.run([sys.executable, str(script), *extra]).returncode
    raise CliError(
        "pbcodec quality runs benches/bench_quality.py of a source checkout: run it from the repository root"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``benches/run_all.py`` of a source checkout (benchmarks are not in the wheel)."""
    import subprocess

    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        script = root / "benches" / "run_all.py"
        if script.is_file():
            return subprocess.run([sys.executable, str(script)] + (["--quick"] if args.quick else [])).returncode
    raise CliError("pbcodec bench runs the benchmarks of a source checkout: run it from the repository root")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pbcodec", description="Partially-binarized weight codec.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="compress built-in synthetic layers and report size, accuracy and speed")
    d.add_argument("--seed", type=int, default=0)

    c = sub.add_parser(
        "compress",
        help="compress the Linear weights of a .safetensors file or a directory of shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("input", help=".safetensors file, or a directory of shards (with an optional index)")
    c.add_argument("output", help="output file (or directory, for a directory input)")
    c.add_argument("--salient", type=float, default=0.1, help="salient fraction per row (default 0.1)")
    c.add_argument("--salient-bits", type=int, default=8, choices=(4, 8))
    c.add_argument("--count-bits", default="auto", choices=["auto"] + [str(i) for i in range(1, 9)])
    c.add_argument("--group-size", type=int, default=None, help="columns per (mu, alpha) group; default: whole row")
    c.add_argument("--select", default="row", choices=("row", "tensor"))
    c.add_argument("--scale-dtype", default="float16", choices=("float16", "float32"))
    c.add_argument("--include", action="append", metavar="GLOB", help="compress 2-D float tensors matching GLOB")
    c.add_argument("--exclude", action="append", metavar="GLOB", help="never compress tensors matching GLOB")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    i = sub.add_parser("inspect", help="list the tensors of a file with codec parameters and sizes")
    i.add_argument("file")

    b = sub.add_parser("bench", help="run the benchmark suite (side by side with numpy/torch) and print its tables")
    b.add_argument("--quick", action="store_true", help="small sizes, few repeats (about a minute)")

    a = sub.add_parser(
        "analyze",
        help="rate–distortion per layer: SQNR against bits/weight for candidate settings (and a PNG plot)",
    )
    a.add_argument("source", help="a .safetensors file or a directory of shards (original, uncompressed weights)")
    a.add_argument("--candidates", help="salient:bits pairs, e.g. 0.05:4,0.1:4,0.2:8 (default: 5-30%% at 4 and 8 bits)")
    a.add_argument("--group-size", type=int, default=None)
    a.add_argument("--include", action="append", metavar="GLOB")
    a.add_argument("--exclude", action="append", metavar="GLOB")
    a.add_argument("--plot", metavar="PNG", help="write SQNR vs bits/weight per layer (needs matplotlib)")
    a.add_argument("--json", metavar="FILE", help="write the measurements as JSON")

    sub.add_parser(
        "quality",
        help="quality report of calibrated/plain compression on all-MiniLM-L6-v2 (source checkout; "
        "arguments go to benches/bench_quality.py)",
        add_help=False,
    )

    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd != "quality":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.cmd == "demo":
            from .demo import run

            run(seed=args.seed)
        elif args.cmd == "compress":
            cmd_compress(args)
        elif args.cmd == "inspect":
            cmd_inspect(args)
        elif args.cmd == "bench":
            return cmd_bench(args)
        elif args.cmd == "analyze":
            cmd_analyze(args)
        elif args.cmd == "quality":
            return cmd_quality(args, extra)
        return 0
    except BrokenPipeError:  # e.g. `pbcodec inspect F | head`: not an error
        sys.stderr.close()
        return 0
    except (CliError, ValueError, TypeError, OSError) as e:  # one clear line, non-zero status
        print(f"pbcodec: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pbcodec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
