"""Packing PB-LLM's fake-quantized weights (pbcodec.from_pbllm, pbcodec
import-pbllm). The PB-LLM-style matrices are built here from the rule the
issue describes (our own implementation, not PB-LLM's code): per row group,
the non-salient weights binarized to mean ± scale with mean and scale averaged
over the whole group with salient positions zeroed; salient weights on a
per-row asymmetric min/max 8-bit grid scale · (q − zero); float32 arithmetic,
float16 result, like PB-LLM's saved checkpoints."""

import json

import numpy as np
import pbcodec
import pytest
from pbcodec.cli import main
from pbcodec.pbllm import from_pbllm, pbllm_error, pbllm_shape_check


def pbllm_fake_quant(w, salient, group_size=None, high_bits=8):
    """(float16 weight, salient mask, per-row step of the salient grid)."""
    w = np.asarray(w, np.float32)
    m, n = w.shape
    g = n if group_size is None else group_size
    maxq = (1 << high_bits) - 1
    # Salient grid: asymmetric min/max over the whole row (zero included).
    xmin, xmax = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    step = ((xmax - xmin) / maxq).astype(np.float32)
    zero = np.rint(-xmin / step).astype(np.float32)
    q = np.clip(np.rint(w / step[:, None]) + zero[:, None], 0, maxq)
    high = (step[:, None] * (q - zero[:, None])).astype(np.float32)
    out, sal = np.empty_like(w), np.zeros(w.shape, bool)
    for a in range(0, n, g):
        blk = w[:, a : a + g]
        mag = np.sort(np.abs(blk).ravel())
        binarized = np.abs(blk) <= mag[min(int(mag.size * (1 - salient)), mag.size - 1)]
        zeroed = blk * binarized
        mean = zeroed.mean(-1, keepdims=True, dtype=np.float32)
        scale = np.abs(zeroed - mean).mean(-1, keepdims=True, dtype=np.float32)
        low = (np.sign(blk - mean) * scale + mean).astype(np.float32)
        out[:, a : a + g] = np.where(binarized, low, high[:, a : a + g])
        sal[:, a : a + g] = ~binarized
    return out.astype(np.float16), sal, step


def _weights(m=96, n=320, seed=0):
    return (np.random.default_rng(seed).standard_normal((m, n)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("salient", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("with_mask", [True, False])
def test_binarized_exact_salient_within_half_a_step(salient, group_size, with_mask):
    wq, sal, step = pbllm_fake_quant(_weights(seed=int(salient * 100)), salient, group_size)
    t = from_pbllm(wq, sal if with_mask else None, group_size=group_size)
    wh = t.decompress()
    w32 = wq.astype(np.float32)
    # Every binarized weight is reproduced exactly, in float32.
    np.testing.assert_array_equal(wh[~sal], w32[~sal])
    # They carry no residual code: the salient set is recovered (without a mask
    # too), up to salient weights that equal a binary value (exact either way).
    q = pbcodec.rle_decode(t.residual)
    assert not q[~sal].any()
    assert (q[sal] != 0).mean() > 0.95
    # Salient weights: within half the row's residual step (+ float32 rounding).
    rep = pbllm_error(wq, t)
    assert rep.max_error_over_sigma <= 0.5 + 1e-4
    err = np.abs(wh.astype(np.float64) - w32)
    assert (err.max(axis=1) <= 0.5 * t.sigma.astype(np.float64) * (1 + 1e-4)).all()
    # ... about half of PB-LLM's own grid step of that row (measured <= 0.58 steps
    # up to 1024x4096; more than 0.5 with groups, whose offsets differ per group).
    assert (err.max(axis=1) <= 0.75 * step).all()
    assert rep.exact_fraction_at_dtype >= 1 - sal.mean()
    # Bits per weight: what compressing a matrix with this salient fraction costs
    # (same sign plane, scales per group, residual stream), within 0.1.
    ref = pbcodec.compress(w32, salient=sal.mean(), group_size=group_size, scale_dtype="float32", select="tensor")
    assert abs(t.bits_per_weight - ref.bits_per_weight) < 0.1, (t.bits_per_weight, ref.bits_per_weight)
    # The result is an ordinary, valid tensor.
    assert pbcodec.PBTensor.from_bytes(t.to_bytes()) == t


def test_pure_binarization_is_exact_everywhere():
    wq, sal, _ = pbllm_fake_quant(_weights(), 0.0, 80)
    assert not sal.any()
    t = from_pbllm(wq, group_size=80)
    rep = pbllm_error(wq, t)
    assert rep.exact and rep.exact_fraction == 1.0 and rep.max_abs_error == 0.0
    assert t.residual.num_values == 0
    # One sign bit, plus float32 mu/alpha per group, sigma and the residual's
    # 4-byte row index per row (+ headers).
    assert t.bits_per_weight < 1 + 8 * (4 * (2 * 4 + 1) + 4) / 320 + 0.05


def test_four_bit_residual_and_degenerate_rows():
    wq, sal, _ = pbllm_fake_quant(_weights(32, 100), 0.1)
    t = from_pbllm(wq, salient_bits=4)
    assert t.salient_bits == 4
    np.testing.assert_array_equal(t.decompress()[~sal], wq.astype(np.float32)[~sal])
    assert pbllm_error(wq, t).max_error_over_sigma <= 0.5 + 1e-4
    # Constant rows, all-zero rows, a single column.
    w = np.zeros((3, 16), np.float16)
    w[1] = 0.5
    w[2, ::2] = -0.25
    rep = pbllm_error(w, from_pbllm(w))
    assert rep.exact
    assert pbllm_error(w[:, :1], from_pbllm(w[:, :1])).exact


def test_bad_arguments():
    w = np.zeros((4, 8), np.float16)
    with pytest.raises(ValueError, match="salient_mask"):
        from_pbllm(w, np.zeros((4, 9), bool))
    with pytest.raises(ValueError, match="group_size"):
        from_pbllm(w, group_size=9)
    with pytest.raises(ValueError, match="salient_bits"):
        from_pbllm(w, salient_bits=2)
    with pytest.raises(TypeError):
        from_pbllm(np.zeros((4, 8), np.int8))
    with pytest.raises(ValueError, match="2-D"):
        from_pbllm(np.zeros(8, np.float16))
    with pytest.raises(ValueError, match="finite"):
        from_pbllm(np.full((2, 2), np.inf, np.float16))
    assert pbllm_shape_check(_weights().astype(np.float16)) is not None
    assert pbllm_shape_check(pbllm_fake_quant(_weights(), 0.3)[0]) is None


def _checkpoint(path, rng):
    tensors, masks = {}, {}
    for i in range(2):
        wq, sal, _ = pbllm_fake_quant(rng.standard_normal((48, 128)).astype(np.float32) * 0.02, 0.1)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = wq
        masks[f"model.layers.{i}.mlp.up_proj.weight"] = ~sal  # PB-LLM saves True = binarized
    tensors["model.layers.0.self_attn.q_proj.weight"] = (rng.standard_normal((48, 128)) * 0.02).astype(np.float16)
    tensors["model.embed_tokens.weight"] = rng.standard_normal((64, 48)).astype(np.float16)
    tensors["model.norm.weight"] = np.ones(48, np.float16)
    pbcodec.save_file(tensors, path, metadata={"format": "pt"})
    return tensors, masks


def test_cli_import_file(tmp_path, capsys):
    rng = np.random.default_rng(4)
    src, dst = tmp_path / "pbllm.safetensors", tmp_path / "out.safetensors"
    tensors, masks = _checkpoint(src, rng)
    assert main(["import-pbllm", str(src), str(dst), "-q"]) == 0
    out = capsys.readouterr().out
    assert "2 tensors packed (0 reproduced exactly), 3 copied unchanged" in out
    assert "model.layers.0.self_attn.q_proj.weight: not PB-LLM-shaped, copied" in out
    assert "max err" in out and "exact" in out
    got = pbcodec.load_file(dst)
    for name, m in masks.items():
        t = got[name]
        assert isinstance(t, pbcodec.PBTensor)
        w32 = tensors[name].astype(np.float32)
        np.testing.assert_array_equal(t.decompress()[m], w32[m])
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        np.testing.assert_array_equal(got[name], tensors[name])
    assert pbcodec.load_metadata(dst)["format"] == "pt"
    # With PB-LLM's masks: the same tensors (the data already determine the salient set).
    mpath, dst2 = tmp_path / "masks.safetensors", tmp_path / "out2.safetensors"
    pbcodec.save_file(masks, mpath)
    assert main(["import-pbllm", str(src), str(dst2), "-q", "--masks", str(mpath)]) == 0
    got2 = pbcodec.load_file(dst2)
    for name in masks:
        assert got2[name] == got[name]
    # Refusing tensors that are not PB-LLM-shaped: error, nothing written.
    dst3 = tmp_path / "out3.safetensors"
    assert main(["import-pbllm", str(src), str(dst3), "--other", "refuse"]) == 1
    assert "not PB-LLM-shaped" in capsys.readouterr().err
    assert not dst3.exists()
    assert main(["import-pbllm", str(src), str(dst), "-q"]) == 1  # exists without --force


def test_cli_import_directory(tmp_path, capsys):
    rng = np.random.default_rng(5)
    src = tmp_path / "ckpt"
    src.mkdir()
    tensors, _ = _checkpoint(src / "model.safetensors", rng)
    index = {"metadata": {"total_size": 1}, "weight_map": {k: "model.safetensors" for k in tensors}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text("{}")
    dst = tmp_path / "packed"
    assert main(["import-pbllm", str(src), str(dst), "-q", "--exclude", "*q_proj*"]) == 0
    assert "2 tensors packed" in capsys.readouterr().out
    assert (dst / "config.json").exists()
    new = json.loads((dst / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.up_proj.weight.signs" in new["weight_map"]
    assert new["metadata"]["total_size"] == (dst / "model.safetensors").stat().st_size
