"""Shared by the Python fuzz targets: which pbcodec modules atheris must not
instrument. Imports nothing of pbcodec (it must be imported instrumented)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def not_instrumented() -> list[str]:
    """The pure-Python reference (the oracle, not the target) and the torch integration:
    every module of theirs by name, since atheris excludes exact module names only. The
    files are listed without importing pbcodec, which must be imported instrumented."""
    root = Path(importlib.util.find_spec("pbcodec").submodule_search_locations[0])
    return [
        f"pbcodec.{pkg}" + ("" if p.stem == "__init__" else f".{p.stem}")
        for pkg in ("reference", "torch")
        for p in sorted((root / pkg).glob("*.py"))
    ]
