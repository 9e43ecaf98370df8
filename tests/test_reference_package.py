"""pbcodec.reference stays an independent twin: its modules import only the standard
library, numpy (and the optional ml_dtypes), pbcodec.errors and each other (never the compiled core or the package
code it is compared with), and its public names are the ones the tests use."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pbcodec.reference as ref

# ml_dtypes: optional, for the bfloat16/float8 dtypes of §8 (as in pbcodec.files).
ALLOWED_ABSOLUTE = {"json", "math", "struct", "numpy", "ml_dtypes", "__future__"}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield 0, a.name
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


def test_reference_imports_nothing_but_numpy_errors_and_itself():
    files = sorted(Path(ref.__file__).parent.glob("*.py"))
    assert len(files) > 1
    siblings = {p.stem for p in files}
    for p in files:
        for level, mod in _imports(p):
            root = mod.split(".")[0]
            if level == 0:
                assert root in ALLOWED_ABSOLUTE or root in sys.stdlib_module_names, (p.name, mod)
                assert root != "pbcodec", (p.name, mod)
            elif level == 1:
                assert root in siblings, (p.name, mod)
            else:
                assert level == 2 and mod == "errors", (p.name, level, mod)


def test_public_names():
    for name in ref.__all__:
        assert getattr(ref, name) is not None, name
    assert set(ref.__all__) >= {"PBTensor", "RLE", "compress", "rle_encode", "rle_decode", "load_file", "save_file"}
    assert ref.PBTensor.__module__ == "pbcodec.reference.pb"
    assert ref.rle_encode.__module__ == "pbcodec.reference.rle"
