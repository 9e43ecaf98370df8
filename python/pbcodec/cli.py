"""The ``pbcodec`` command line: compress, inspect, analyze, demo, bench, quality.

Default tensor selection for ``compress``: every 2-D floating-point tensor
(F32/F16/BF16) with both dimensions >= 16 whose name matches none of
``*embed*``, ``*lm_head*``, ``*norm*``: that is, the Linear weights.
Embedding tables are row *lookups* (a matvec kernel does not help them and
their rows are read individually), norms are tiny vectors, and the output head
is usually the most sensitive layer. ``--include GLOB`` replaces the name rule
(any 2-D float tensor matching a glob is compressed), ``--exclude GLOB`` removes
matches; both may be repeated.

Options that do not fit a tensor are adapted for that tensor, with the reason in the
summary table (the rule :func:`pbcodec.torch.compress_model` follows too):
``--group-size`` larger than its number of columns means whole rows; float16 scales
that overflow or underflow become float32 scales; a tensor whose scales do not fit
even float32 is copied unchanged. Any other problem (non-finite weights, a malformed
file) stops the run with one line naming the file and tensor, exit status 1.

The output is written atomically and durably (temporary file or directory, fsync,
rename; temporaries of killed runs are removed by the next run), with the
permissions ``open()`` gives new files (umask honoured). OUT may not be inside the
input directory (nor the input itself).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import stat
import sys
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
    from . import snr_db
    from ._adapt import compress_adapted
    from .errors import ScaleRangeError
    from .files import META_KEY, pb_components, read_safetensors, write_safetensors

    raw, meta = read_safetensors(src)
    if META_KEY in meta:
        raise CliError(f"{src} already holds pbcodec-compressed tensors")
    out: dict[str, Any] = {}
    desc: dict[str, Any] = {}
    rows = []
    for name in sorted(raw):
        t = raw[name]
        row = dict(name=name, shape=t.shape, dtype=t.dtype, before=t.nbytes, selected=False, notes=[])
        if selected(name, t):
            row["selected"] = True
            w = t.float32()
            try:
                pbt, row["notes"] = compress_adapted(w, **kwargs)
            except ScaleRangeError as e:
                pbt = None
                row["notes"] = [f"not compressed: scales do not fit float32 ({str(e).split(';')[0]})"]
            except (ValueError, TypeError) as e:
                raise CliError(f"{src}: tensor {name!r}: {e}") from None
            if pbt is not None:
                parts, desc[name] = pb_components(name, pbt)
                for k in parts:
                    if k in raw or k in out:
                        raise CliError(f"{src}: tensor {name!r}: component name {k!r} collides with an existing tensor")
                out.update(parts)
                row.update(
                    after=pbt.nbytes,
                    bpw=pbt.bits_per_weight,
                    snr=snr_db(w, pbt.decompress()),
                    compressed=True,
                    group=pbt.group_size,
                    scale=str(pbt.scale_dtype),
                )
                rows.append(row)
                del w, pbt
                if progress is not None:
                    progress.step(name, t.nbytes)
                continue
            del w
        out[name] = t
        row.update(after=t.nbytes, bpw=8.0 * t.nbytes / max(math.prod(t.shape), 1), snr=None, compressed=False)
        rows.append(row)
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


def _read_index(index: Path) -> dict:
    """The shard index (``model.safetensors.index.json``), checked: a JSON object whose
    ``metadata``, when present, is an object."""
    try:
        with open(index, encoding="utf-8") as f:
            old = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CliError(f"{index}: not a valid shard index ({e})") from None
    if not isinstance(old, dict) or not isinstance(old.get("metadata", {}), dict):
        raise CliError(f"{index}: not a valid shard index (expected a JSON object with an object 'metadata')")
    return old


def _inside(path: Path, parent: Path) -> bool:
    """Whether ``path`` is ``parent`` or lies under it (symlinks resolved)."""
    p, q = path.resolve(), parent.resolve()
    return p == q or q in p.parents


def _copy_file(src: Path, dst: Path) -> None:
    """Copy a file's bytes (following symlinks) into a new file with the permissions
    ``open()`` gives (umask honoured), fsync'ed."""
    from .files import create_file

    fd = create_file(os.fspath(dst))
    with open(src, "rb") as fi, os.fdopen(fd, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


def _copy_tree(src: Path, dst: Path, ancestors: tuple = ()) -> None:
    """Copy a directory (configs, tokenizers), following symlinks like ``cp -rL`` but
    refusing a symlink loop (a directory that contains itself)."""
    from .files import fsync_dir

    st = src.stat()
    ident = (st.st_dev, st.st_ino)
    if ident in ancestors:
        raise CliError(f"{src}: symlink loop (this directory contains itself)")
    os.mkdir(dst, 0o777)  # umask applies
    for item in sorted(src.iterdir()):
        if item.is_dir():
            _copy_tree(item, dst / item.name, ancestors + (ident,))
        else:
            _copy_item(item, dst / item.name)
    fsync_dir(dst)


def _copy_item(item: Path, dst: Path) -> None:
    """Copy a file or directory of the input next to the shards; anything else (a FIFO,
    a socket, a device: reading one could block forever) is refused."""
    if item.is_dir():
        _copy_tree(item, dst)
    elif item.is_file():
        _copy_file(item, dst)
    else:
        raise CliError(f"{item}: not a regular file or directory (broken symlink, FIFO, device...)")


def _check_options(args: argparse.Namespace) -> None:
    """Option errors named by their flags, before any file is read or written."""
    if not (0.0 <= args.salient <= 1.0):
        raise CliError(f"--salient must be in [0, 1], got {args.salient}")
    if args.group_size is not None and args.group_size < 1:
        raise CliError(f"--group-size must be at least 1, got {args.group_size}")


def cmd_compress(args: argparse.Namespace) -> None:
    from .files import fsync_dir, remove_stale_temps, temp_path

    src, dst = Path(args.input), Path(args.output)
    _check_options(args)
    if not src.exists():
        raise CliError(f"{src}: no such file or directory")
    if _inside(dst, src) and (src.is_dir() or dst.resolve() == src.resolve()):
        raise CliError(f"{dst} is inside the input {src}; write the output elsewhere")
    if src.is_dir() and dst.exists() and _inside(src, dst):
        raise CliError(f"the input {src} is inside {dst}; write the output elsewhere")
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
    t0 = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst.parent)
    if src.is_dir():
        shards = sorted(p for p in src.glob("*.safetensors") if not p.name.startswith(".pbcodec-"))
        if not shards:
            raise CliError(f"{src}: no .safetensors files")
        index = _find_index(src)
        old_index = _read_index(index) if index is not None else None
        total = sum(p.stat().st_size for p in shards)
        progress = _Progress(total, not args.quiet)
        # Build everything in a temporary sibling directory, then rename: a
        # failure never leaves a partial OUT behind.
        tmp = Path(temp_path(dst.parent))
        os.mkdir(tmp, 0o777)  # umask applies, like any new directory
        try:
            rows: list[dict] = []
            weight_map: dict[str, str] = {}
            for shard in shards:
                shard_rows, names = compress_file(shard, tmp / shard.name, selected, kwargs, progress)
                rows += shard_rows
                weight_map.update((name, shard.name) for name in names)
            for item in sorted(src.iterdir()):  # configs, tokenizers: copied as they are
                if item.suffix == ".safetensors" or item == index or item.name.startswith(".pbcodec-"):
                    continue
                _copy_item(item, tmp / item.name)
            if old_index is not None and index is not None:
                total_size = sum((tmp / s.name).stat().st_size for s in shards)
                new = {
                    "metadata": {**old_index.get("metadata", {}), "total_size": total_size},
                    "weight_map": dict(sorted(weight_map.items())),
                }
                tmp_index = tmp / index.name
                with os.fdopen(_create(tmp_index), "w") as f:
                    json.dump(new, f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
            progress.close()
            if dst.exists() and dst.is_dir() and not dst.is_symlink():
                os.chmod(tmp, stat.S_IMODE(dst.stat().st_mode))  # replacing keeps the mode
            fsync_dir(tmp)
            _replace_dir(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(dst.parent)
    else:
        progress = _Progress(src.stat().st_size, not args.quiet)
        if dst.is_dir() and not dst.is_symlink():
            raise CliError(f"{dst} is a directory; the output of a file is a file")
        rows, _ = compress_file(src, dst, selected, kwargs, progress)
        progress.close()
    _print_summary(rows, time.perf_counter() - t0)


def _create(path: Path) -> int:
    from .files import create_file

    return create_file(os.fspath(path))


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Put the finished directory ``tmp`` at ``dst``. A directory cannot be renamed
    over a non-empty one, so an old ``dst`` is first renamed to a temporary name
    (removed afterwards, or by the next run if this one is killed)."""
    from .files import temp_path

    old = None
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        old = Path(temp_path(dst.parent))
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _print_summary(rows: list[dict], seconds: float) -> None:
    comp = [r for r in rows if r["compressed"]]
    skipped = [r for r in rows if r["selected"] and not r["compressed"]]
    w = max([len(r["name"]) for r in comp + skipped] + [6])
    print(
        f"\n{'tensor':<{w}}  {'shape':>12}  {'dtype':>5}  {'group':>6}  {'scales':>7}  {'bits/w':>7}  {'SNR dB':>7}"
        f"  {'before':>10}  {'after':>10}  note"
    )
    for r in comp + skipped:
        shape = "x".join(map(str, r["shape"]))
        if r["compressed"]:
            group = str(r["group"]) if r["group"] != r["shape"][1] else "row"
            cols = f"{group:>6}  {r['scale']:>7}  {r['bpw']:7.3f}  {r['snr']:7.2f}"
        else:
            cols = f"{'-':>6}  {'-':>7}  {r['bpw']:7.3f}  {'-':>7}"
        print(
            f"{r['name']:<{w}}  {shape:>12}  {r['dtype']:>5}  {cols}  "
            f"{_fmt_bytes(r['before']):>10}  {_fmt_bytes(r['after']):>10}  {'; '.join(r['notes'])}".rstrip()
        )
    before = sum(r["before"] for r in rows)
    after = sum(r["after"] for r in rows)
    copied = [r for r in rows if not r["compressed"]]
    adapted = sum(1 for r in comp if r["notes"])
    print(
        f"\n{len(comp)} tensors compressed ({adapted} with adapted settings, see notes), {len(copied)} copied "
        f"unchanged ({_fmt_bytes(sum(r['before'] for r in copied))}; {len(skipped)} of them selected but not "
        f"compressed) in {seconds:.1f} s"
    )
    if comp:
        cb, ca = sum(r["before"] for r in comp), sum(r["after"] for r in comp)
        print(f"compressed tensors: {_fmt_bytes(cb)} -> {_fmt_bytes(ca)} ({cb / ca:.2f}x)")
    print(f"total tensor data:  {_fmt_bytes(before)} -> {_fmt_bytes(after)} ({before / max(after, 1):.2f}x)")


# ------------------------------------------------------------------ inspect


def cmd_inspect(args: argparse.Namespace) -> None:
    from .files import load_file, read_header
    from .pb import PBTensor

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    tensors = load_file(path)  # validates everything
    with open(path, "rb") as f:
        _, entries, meta, _ = read_header(f, os.fspath(path))
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
            code, _, b, e = entries[name]
            n = e - b
            shape = "x".join(map(str, t.shape)) or "scalar"
            print(
                f"{name:<{w}}  {'-':>7}  {code:>5}  {shape:>12}  {'':<22}  {n:>10}  "
                f"{8 * n / max(math.prod(t.shape), 1):7.3f}"
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

    from .pbllm import add_parser as add_pbllm_parser

    add_pbllm_parser(sub)

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
            from .demo import ensure_lib_env, run

            ensure_lib_env(sys.argv[1:] if argv is None else list(argv))

            run(seed=args.seed)
        elif args.cmd == "compress":
            cmd_compress(args)
        elif args.cmd == "inspect":
            cmd_inspect(args)
        elif args.cmd == "import-pbllm":
            from .pbllm import cli_import

            cli_import(args)
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
