"""The pbcodec command line: compress (file and sharded directory), inspect,
selection rules, errors as one line with a non-zero exit, no partial output."""

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pbcodec
import pytest
from pbcodec.cli import main


def write_model(path, rng, shards=False):
    tensors = {
        "embed_tokens.weight": rng.standard_normal((100, 32)).astype(np.float32),
        "layers.0.q_proj.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "layers.0.up_proj.weight": rng.standard_normal((96, 32)).astype(np.float16),
        "layers.0.norm.weight": np.ones(32, np.float32),
        "layers.0.tiny.weight": rng.standard_normal((8, 32)).astype(np.float32),
        "lm_head.weight": rng.standard_normal((100, 32)).astype(np.float32),
        "step": np.array([3], np.int64),
    }
    if not shards:
        pbcodec.save_file(tensors, path, metadata={"format": "pt"})
        return tensors
    path.mkdir()
    names = sorted(tensors)
    split = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for shard, keys in split.items():
        pbcodec.save_file({k: tensors[k] for k in keys}, path / shard)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, ks in split.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text('{"hidden_size": 32}')
    return tensors


def test_compress_file_default_selection(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = write_model(src, rng)
    assert main(["compress", str(src), str(dst), "-q"]) == 0
    out = capsys.readouterr().out
    assert "2 tensors compressed" in out and "bits/w" in out
    got = pbcodec.load_file(dst)
    assert isinstance(got["layers.0.q_proj.weight"], pbcodec.PBTensor)
    assert isinstance(got["layers.0.up_proj.weight"], pbcodec.PBTensor)
    for k in ("embed_tokens.weight", "lm_head.weight", "layers.0.norm.weight", "layers.0.tiny.weight", "step"):
        np.testing.assert_array_equal(got[k], tensors[k])  # copied byte for byte
    # Same bytes as compressing in memory with the same settings.
    want = pbcodec.compress(tensors["layers.0.up_proj.weight"])
    assert got["layers.0.up_proj.weight"].to_bytes() == want.to_bytes()
    assert pbcodec.load_metadata(dst)["format"] == "pt"


def test_include_exclude_and_options(tmp_path):
    rng = np.random.default_rng(1)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = write_model(src, rng)
    assert (
        main(
            [
                "compress",
                str(src),
                str(dst),
                "-q",
                "--include",
                "*head*",
                "--include",
                "*proj*",
                "--exclude",
                "*up_proj*",
                "--salient",
                "0.2",
                "--salient-bits",
                "4",
                "--group-size",
                "16",
                "--count-bits",
                "3",
            ]
        )
        == 0
    )
    got = pbcodec.load_file(dst)
    assert isinstance(got["lm_head.weight"], pbcodec.PBTensor)
    assert not isinstance(got["layers.0.up_proj.weight"], pbcodec.PBTensor)
    t = got["layers.0.q_proj.weight"]
    assert (t.salient_bits, t.group_size, t.residual.count_bits) == (4, 16, 3)
    assert t == pbcodec.compress(
        tensors["layers.0.q_proj.weight"], salient=0.2, salient_bits=4, group_size=16, count_bits=3
    )


def test_sharded_directory_with_index(tmp_path):
    rng = np.random.default_rng(2)
    src, dst = tmp_path / "model", tmp_path / "model-pb"
    tensors = write_model(src, rng, shards=True)
    assert main(["compress", str(src), str(dst), "-q"]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    assert wm["layers.0.q_proj.weight.signs"] == wm["layers.0.q_proj.weight.residual.counts"]
    assert (dst / "config.json").read_text() == '{"hidden_size": 32}'
    total = 0
    loaded = {}
    for shard in sorted(set(wm.values())):
        loaded.update(pbcodec.load_file(dst / shard))
        total += (dst / shard).stat().st_size
    assert index["metadata"]["total_size"] == total
    assert set(loaded) == set(tensors)
    np.testing.assert_array_equal(loaded["step"], tensors["step"])
    assert isinstance(loaded["layers.0.q_proj.weight"], pbcodec.PBTensor)


def test_inspect(tmp_path, capsys):
    rng = np.random.default_rng(3)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_model(src, rng)
    main(["compress", str(src), str(dst), "-q"])
    capsys.readouterr()
    assert main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "pbcodec" in out and "layers.0.q_proj.weight" in out and "s8 c" in out


@pytest.mark.parametrize(
    "argv_fn, message",
    [
        (lambda d: ["compress", str(d / "missing.safetensors"), str(d / "o.safetensors")], "no such file"),
        (lambda d: ["compress", str(d / "garbage.safetensors"), str(d / "o.safetensors")], "error"),
        (lambda d: ["compress", str(d / "in.safetensors"), str(d / "o.safetensors"), "--group-size", "0"], "group"),
        (lambda d: ["compress", str(d / "in.safetensors"), str(d / "in.safetensors")], "inside the input"),
        (lambda d: ["compress", str(d / "in.safetensors"), str(d / "o.safetensors"), "--salient", "2"], "salient"),
        (lambda d: ["inspect", str(d / "garbage.safetensors")], "error"),
    ],
)
def test_errors_are_one_line_and_leave_nothing(tmp_path, capsys, argv_fn, message):
    write_model(tmp_path / "in.safetensors", np.random.default_rng(4))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all")
    before = set(tmp_path.iterdir())
    assert main(argv_fn(tmp_path)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pbcodec: error:") and "\n" not in err and message in err
    assert set(tmp_path.iterdir()) == before  # no partial output, no temp files


def test_refuses_already_compressed_input(tmp_path, capsys):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_model(src, np.random.default_rng(5))
    main(["compress", str(src), str(dst), "-q"])
    assert main(["compress", str(dst), str(tmp_path / "again.safetensors"), "-q"]) == 1
    assert "already" in capsys.readouterr().err


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="console_scripts") if e.name == "pbcodec"]
    assert eps and eps[0].value == "pbcodec.cli:main"


# -- issue 7: per-tensor adaptation, errors naming tensors, modes, durability ---------
def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_group_size_wider_than_a_tensor_means_whole_rows(tmp_path, capsys):
    rng = np.random.default_rng(7)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = {
        "narrow.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "wide.weight": rng.standard_normal((32, 96)).astype(np.float32),
    }
    pbcodec.save_file(tensors, src)
    code, out, _ = run(["compress", str(src), str(dst), "-q", "--group-size", "48"], capsys)
    assert code == 0
    assert "group size 48 > 32 columns: whole rows" in out and "1 with adapted settings" in out
    got = pbcodec.load_file(dst)
    assert got["narrow.weight"].group_size == 32 and got["wide.weight"].group_size == 48
    # The same rule as compress_model: exactly what compress() gives with whole rows.
    assert got["narrow.weight"] == pbcodec.compress(tensors["narrow.weight"])


def test_scales_out_of_float16_range_are_adapted(tmp_path, capsys):
    rng = np.random.default_rng(8)
    base = rng.standard_normal((32, 32)).astype(np.float32)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    pbcodec.save_file({"tiny.weight": base * 1e-8, "big.weight": base * 1e6, "fine.weight": base}, src)
    code, out, _ = run(["compress", str(src), str(dst), "-q"], capsys)
    assert code == 0, out
    got, orig = pbcodec.load_file(dst), pbcodec.load_file(src)
    for name in ("tiny.weight", "big.weight"):  # float32 scales for these two, noted
        assert got[name].scale_dtype == np.float32
        assert got[name] == pbcodec.compress(orig[name], scale_dtype="float32")
    assert got["fine.weight"].scale_dtype == np.float16
    assert "underflows to 0" in out and "overflows float16" in out and "float32 scales" in out


def test_a_tensor_whose_scales_fit_nothing_is_copied_with_the_reason(tmp_path, capsys, monkeypatch):
    # Finite float32 weights always fit float32 scales (means and mean deviations stay
    # in range); the rule for the case anyway: copy the tensor unchanged, say why.
    import pbcodec._adapt as adapt

    def never_fits(w, **kw):
        raise pbcodec.ScaleRangeError("row 0: alpha = 1e39 overflows float32; use scale_dtype='float32'")

    monkeypatch.setattr(adapt, "compress", never_fits)
    rng = np.random.default_rng(8)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    pbcodec.save_file({"w.weight": w}, src)
    code, out, _ = run(["compress", str(src), str(dst), "-q"], capsys)
    assert code == 0
    np.testing.assert_array_equal(pbcodec.load_file(dst)["w.weight"], w)
    assert "not compressed: scales do not fit float32 (row 0: alpha = 1e39 overflows float32)" in out


def test_errors_name_the_tensor(tmp_path, capsys):
    rng = np.random.default_rng(9)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    bad = rng.standard_normal((32, 32)).astype(np.float32)
    bad[3, 5] = np.nan
    pbcodec.save_file(
        {f"layers.{i}.weight": rng.standard_normal((32, 32)).astype(np.float32) for i in range(5)}
        | {"layers.3.mlp.weight": bad},
        src,
    )
    code, _, err = run(["compress", str(src), str(dst), "-q"], capsys)
    assert code == 1 and "\n" not in err
    assert "'layers.3.mlp.weight'" in err and "weight[3, 5] is not finite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_outputs_honour_the_umask(tmp_path, capsys):
    rng = np.random.default_rng(10)
    src = tmp_path / "model"
    write_model(src, rng, shards=True)
    old = os.umask(0o027)
    try:
        assert main(["compress", str(src), str(tmp_path / "pb"), "-q"]) == 0
        assert main(["compress", str(src / "model-00001-of-00002.safetensors"), str(tmp_path / "one.st"), "-q"]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert stat.S_IMODE((tmp_path / "pb").stat().st_mode) == 0o750
    for p in (tmp_path / "pb").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    assert stat.S_IMODE((tmp_path / "one.st").stat().st_mode) == 0o640
    # Replacing an output keeps its mode, as writing into it would.
    (tmp_path / "one.st").chmod(0o644)
    assert (
        main(["compress", str(src / "model-00001-of-00002.safetensors"), str(tmp_path / "one.st"), "-q", "--force"])
        == 0
    )
    assert stat.S_IMODE((tmp_path / "one.st").stat().st_mode) == 0o644


def test_directory_output_is_durable(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(11)
    src = tmp_path / "model"
    write_model(src, rng, shards=True)
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), stat.S_ISDIR(os.fstat(fd).st_mode)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["compress", str(src), str(tmp_path / "pb"), "-q"]) == 0
    files_synced = [n for n, d in synced if not d]
    dirs_synced = [n for n, d in synced if d]
    # Each shard (under its temporary name, before its rename), each copied file and the
    # index; the temporary directory before its rename, and the parent after it.
    assert sum(n.startswith(".pbcodec-") for n in files_synced) == 2
    assert "config.json" in files_synced and "model.safetensors.index.json" in files_synced
    assert any(n.startswith(".pbcodec-") for n in dirs_synced) and dirs_synced[-1] == tmp_path.name


KILLED_CLI = """
import os, signal, sys
from pbcodec.cli import main
real = os.replace
def replace(a, b):
    if os.path.isdir(a):
        os.kill(os.getpid(), signal.SIGKILL)  # killed just before the directory is renamed
    return real(a, b)
os.replace = replace
main(["compress", sys.argv[1], sys.argv[2], "-q"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses SIGKILL and /proc pids")
def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path, capsys):
    rng = np.random.default_rng(12)
    src, dst = tmp_path / "model", tmp_path / "pb"
    write_model(src, rng, shards=True)
    r = subprocess.run([sys.executable, "-c", KILLED_CLI, str(src), str(dst)], timeout=300)
    assert r.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".pbcodec-")]
    assert len(left) == 1 and not dst.exists()
    assert main(["compress", str(src), str(dst), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pb"]
    # A rerun with --force replaces the directory and leaves nothing else behind.
    assert main(["compress", str(src), str(dst), "-q", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pb"]
    capsys.readouterr()


def test_output_inside_the_input_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(13)
    src = tmp_path / "model"
    write_model(src, rng, shards=True)
    before = sorted(p.name for p in src.iterdir())
    for argv in (
        ["compress", str(src), str(src / "out")],
        ["compress", str(src), str(src / "out")],  # a rerun must not nest either
        ["compress", str(src), str(src)],
        ["compress", str(src), str(src / "deeper" / "out"), "--force"],
        [
            "compress",
            str(src / "model-00001-of-00002.safetensors"),
            str(src / "model-00001-of-00002.safetensors"),
            "--force",
        ],
    ):
        code, _, err = run(argv, capsys)
        assert code == 1 and "inside the input" in err and "\n" not in err
    assert sorted(p.name for p in src.iterdir()) == before
    # The input inside an existing output that --force would replace.
    outer = tmp_path / "outer"
    (outer / "model").mkdir(parents=True)
    write_model(outer / "model" / "m", rng, shards=True)
    code, _, err = run(["compress", str(outer / "model" / "m"), str(outer), "--force"], capsys)
    assert code == 1 and "inside" in err
    assert (outer / "model" / "m" / "config.json").exists()


@pytest.mark.parametrize("index", ["[]", "{not json", '{"metadata": []}', '"x"', "\xff"])
def test_malformed_index_is_one_line(tmp_path, capsys, index):
    rng = np.random.default_rng(14)
    src = tmp_path / "model"
    write_model(src, rng, shards=True)
    (src / "model.safetensors.index.json").write_bytes(index.encode("latin-1"))
    code, _, err = run(["compress", str(src), str(tmp_path / "pb"), "-q"], capsys)
    assert code == 1 and err.startswith("pbcodec: error:") and "\n" not in err and "index" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_symlinks_in_the_input(tmp_path, capsys):
    rng = np.random.default_rng(15)
    blobs, src = tmp_path / "blobs", tmp_path / "snapshot"
    write_model(blobs, rng, shards=True)
    src.mkdir()
    for p in blobs.iterdir():  # a Hugging Face cache snapshot: every file a symlink to a blob
        (src / p.name).symlink_to(p)
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "vocab.txt").write_text("a b c")
    assert main(["compress", str(src), str(tmp_path / "pb"), "-q"]) == 0
    assert (tmp_path / "pb" / "config.json").read_text() == '{"hidden_size": 32}'
    assert not (tmp_path / "pb" / "config.json").is_symlink()
    assert (tmp_path / "pb" / "tokenizer" / "vocab.txt").read_text() == "a b c"
    # A symlink loop: one line, exit 1, nothing left behind.
    (src / "tokenizer" / "loop").symlink_to(src / "tokenizer")
    code, _, err = run(["compress", str(src), str(tmp_path / "pb2"), "-q"], capsys)
    assert code == 1 and "symlink loop" in err and "\n" not in err
    assert not (tmp_path / "pb2").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pbcodec")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_in_the_input_are_refused(tmp_path, capsys):
    src = tmp_path / "model"
    write_model(src, np.random.default_rng(16), shards=True)
    os.mkfifo(src / "pipe")  # reading it would block forever
    code, _, err = run(["compress", str(src), str(tmp_path / "pb"), "-q"], capsys)
    assert code == 1 and "not a regular file" in err and "\n" not in err
    (src / "pipe").unlink()
    (src / "dangling").symlink_to(tmp_path / "nowhere")
    code, _, err = run(["compress", str(src), str(tmp_path / "pb"), "-q"], capsys)
    assert code == 1 and "dangling" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
