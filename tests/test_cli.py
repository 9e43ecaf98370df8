"""The pbcodec command line: compress (file and sharded directory), inspect,
selection rules, errors as one line with a non-zero exit, no partial output."""

import json

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
