"""pbcodec.torch: PBLinear, the pbcodec::pb_linear custom op, compress_model,
replace_linear_layers."""

import copy
import io
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import pbcodec  # noqa: E402
import pbcodec.torch as pbt  # noqa: E402


def make_layer(n=64, m=48, bias=True, seed=0, activations="float32", **kw):
    """A compressed layer; float32 activations unless asked (these tests check the float
    kernel path against dense float math; int8 mode has its own tests)."""
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias)
    return lin, pbt.PBLinear.from_linear(lin, activations=activations, **kw)


def dense_ref(layer, x):
    """F.linear with the dequantized weight, in float32."""
    return F.linear(x.float(), layer.dequantize(), None if layer.bias is None else layer.bias.float())


def test_import_pbcodec_does_not_import_torch():
    code = "import sys, pbcodec; assert 'torch' not in sys.modules, 'pbcodec imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- forward -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64,), (5, 64), (2, 3, 64), (0, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_float32_matches_dense(shape, bias):
    lin, layer = make_layer(bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
        ref = dense_ref(layer, x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert layer.dequantize().shape == lin.weight.shape


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("shape", [(64,), (4, 64), (2, 3, 64)])
def test_forward_half_dtypes(dtype, rtol, shape):
    _, layer = make_layer()
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 48)
    # float32 arithmetic, one rounding to the input dtype at the end
    torch.testing.assert_close(y.float(), dense_ref(layer, x), rtol=rtol, atol=1e-4)


def test_forward_4bit_groups_float32_scales_and_noncontiguous_input():
    _, layer = make_layer(n=96, m=40, salient=0.2, salient_bits=4, group_size=32, scale_dtype="float32")
    assert layer.weight.residual.values.dtype == torch.uint8 and layer.weight.mu.dtype == torch.float32
    x = torch.randn(96, 6).t()  # non-contiguous
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_ref(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_batch_is_one_kernel_call_zero_copy(monkeypatch, activations):
    _, layer = make_layer(activations=activations)
    calls = []
    name = "pb_matvec_int8" if activations == "int8" else "pb_matvec_layout_f32"
    orig = getattr(pbcodec._core, name)

    def spy(layout, x, batch, out, bias=None):
        calls.append(x)
        return orig(layout, x, batch, out, bias)

    monkeypatch.setattr(pbcodec._core, name, spy)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        y = layer(x)
    assert len(calls) == 1
    assert calls[0].shape == (6, 64)
    assert calls[0].__array_interface__["data"][0] == x.data_ptr()  # float32 contiguous: no copy
    if activations == "float32":
        torch.testing.assert_close(y, dense_ref(layer, x), rtol=1e-5, atol=1e-5)
    else:
        want = layer.pb.matvec(x.reshape(6, 64).numpy(), activations="int8") + layer.bias.detach().numpy()
        np.testing.assert_array_equal(y.reshape(6, -1).numpy(), want)
    calls.clear()
    with torch.no_grad():
        layer(x.half())
    assert len(calls) == 1


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_fast_path_matches_the_checked_path_and_steps_aside(activations):
    """After the first direct call, plain float32 CPU inference takes forward's fast
    path: same bits as the checked path, and every state change that the checked path
    would see (bias object, bias values, activations, force_dense, autograd, dtype,
    layout, new weights) either shows through or sends the call back to it."""
    _, layer = make_layer(activations=activations)
    x = torch.randn(2, 3, 64)

    def checked(inp):
        return layer._forward(inp)

    with torch.no_grad():
        first = layer(x)
        assert layer._fast is not None
        for inp in (x, x[0, 0], x.reshape(6, 64), x[:, :0]):
            np.testing.assert_array_equal(layer(inp).numpy(), checked(inp).numpy())
        assert layer(x).shape == first.shape == (2, 3, 48)
        layer.bias.add_(1.0)  # in place: the cached view shows it
        y = layer(x)
        np.testing.assert_array_equal(y.numpy(), checked(x).numpy())
        torch.testing.assert_close(y, first + 1.0)
        layer.bias = nn.Parameter(torch.zeros(48))  # a new object: checked path again
        np.testing.assert_array_equal(layer(x).numpy(), checked(x).numpy())
        layer(x)
        layer.bias.data = torch.full((48,), 100.0)  # same object, new storage
        np.testing.assert_array_equal(layer(x).numpy(), checked(x).numpy())
        layer(x)
        layer.bias.data = torch.full((48,), 3.0, dtype=torch.float64)  # same object, new dtype
        np.testing.assert_array_equal(layer(x).numpy(), checked(x).numpy())
        layer.bias = nn.Parameter(torch.zeros(48))
        layer(x)
        other = "float32" if activations == "int8" else "int8"
        layer.activations = other
        assert layer._fast is None
        np.testing.assert_array_equal(layer(x).numpy(), checked(x).numpy())
        layer.activations = activations
        layer.force_dense = True
        torch.testing.assert_close(layer(x), dense_ref(layer, x), rtol=1e-5, atol=1e-5)
        layer.force_dense = False
        # non-contiguous and float64 inputs take the checked path
        xt = torch.randn(64, 5).t()
        np.testing.assert_array_equal(layer(xt).numpy(), checked(xt.contiguous()).numpy())
        assert layer(x.double()).dtype == torch.float64
    # autograd: the op (with its backward), not the fast path
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert xg.grad is not None and layer.bias.grad is not None
    # new weights (load_state_dict) drop the plan
    _, other_layer = make_layer(seed=1, activations=activations)
    layer.load_state_dict(other_layer.state_dict())
    assert layer._fast is None
    with torch.no_grad():
        np.testing.assert_array_equal(layer(x).numpy(), other_layer(x).numpy())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_fast_path_bias_reparametrized_and_zero_inputs():
    """A bias moved out of _parameters (pruning, parametrizations) and a layer with
    no inputs take the checked path instead of failing in the fast one."""
    import torch.nn.utils.prune

    _, layer = make_layer(activations="int8")
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer(x)
        assert layer._fast is not None
        torch.nn.utils.prune.identity(layer, "bias")
        np.testing.assert_array_equal(layer(x).numpy(), layer._forward(x).numpy())
    lin0 = nn.Linear(0, 5)
    layer0 = pbt.PBLinear.from_linear(lin0, activations="float32")
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer0(torch.randn(4, 0)), lin0.bias.expand(4, 5))


def test_pb_view_is_zero_copy_and_matches_buffers():
    _, layer = make_layer()
    t = layer.pb
    assert np.shares_memory(t.signs, layer.weight.signs.numpy())
    assert np.shares_memory(t.residual.counts, layer.weight.residual.counts.numpy())
    assert t.shape == (48, 64) and t.salient_bits == 8
    np.testing.assert_array_equal(layer.dequantize().numpy(), t.decompress())


# -- state_dict ------------------------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "kw", [{}, {"salient_bits": 4, "group_size": 16, "scale_dtype": "float32"}, {"bias": False, "count_bits": 3}]
)
def test_state_dict_roundtrip_into_empty_layer(kw):
    kw = dict(kw)
    bias = kw.pop("bias", True)
    _, layer = make_layer(bias=bias, **kw)
    sd = layer.state_dict()
    # A file's component names under "weight." (docs/format.md §8.2, §8.4), plus pb_meta.
    assert set(sd) == {f"weight.{k}" for k in pbcodec.files.COMPONENTS} | {"weight.pb_meta"} | (
        {"bias"} if bias else set()
    )
    pm = sd["weight.pb_meta"].tolist()
    assert pm == [2, 48, 64, layer.group_size, layer.pb.residual.count_bits, layer.salient_bits]
    empty = pbt.PBLinear(64, 48, bias=bias, activations="float32")
    assert not empty.is_loaded
    with pytest.raises(RuntimeError, match="empty"):
        empty(torch.randn(64))
    empty.load_state_dict(_roundtrip(sd))
    assert empty.is_loaded and empty.pb == layer.pb
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(empty(x), layer(x))
    assert repr(empty) == repr(layer)
    # a loaded layer takes a differently sized compressed weight (buffers are resized)
    _, other = make_layer(bias=bias, seed=3, salient=0.3, salient_bits=8, group_size=8)
    assert other.weight.residual.values.shape != layer.weight.residual.values.shape
    empty.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(empty(x), other(x))


def test_safetensors_roundtrip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    _, layer = make_layer()
    st.save_file(layer.state_dict(), str(tmp_path / "l.safetensors"))
    empty = pbt.PBLinear(64, 48, activations="float32")
    empty.load_state_dict(st.load_file(str(tmp_path / "l.safetensors")))
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(empty(x), layer(x))


def _set(sd, key, value):
    d = dict(sd)
    d[key] = value
    return d


def _meta(sd, i, v):
    pm = sd[PM].clone()
    pm[i] = v
    return _set(sd, PM, pm)


PM, COUNTS, VALUES, OFFSETS = (
    "weight.pb_meta",
    "weight.residual.counts",
    "weight.residual.values",
    "weight.residual.code_offsets",
)
SIGNS, MU, SIGMA = "weight.signs", "weight.mu", "weight.sigma"

MALFORMED = {
    "counts_all_escapes": lambda sd: _set(sd, COUNTS, torch.full_like(sd[COUNTS], 255)),
    "counts_truncated": lambda sd: _set(sd, COUNTS, sd[COUNTS][:-1]),
    "values_truncated": lambda sd: _set(sd, VALUES, sd[VALUES][:-3]),
    "offsets_reversed": lambda sd: _set(sd, OFFSETS, sd[OFFSETS].flip(0)),
    "meta_version": lambda sd: _meta(sd, 0, 3),
    "meta_version_1_under_new_names": lambda sd: _meta(sd, 0, 1),
    "meta_rows": lambda sd: _meta(sd, 1, 47),
    "meta_group_size_negative": lambda sd: _meta(sd, 3, -1),
    "meta_count_bits": lambda sd: _meta(sd, 4, 0),
    "meta_salient_bits": lambda sd: _meta(sd, 5, 4),
    "meta_dtype": lambda sd: _set(sd, PM, sd[PM].int()),
    "meta_short": lambda sd: _set(sd, PM, sd[PM][:5]),
    "scales_bfloat16": lambda sd: _set(sd, MU, sd[MU].bfloat16()),
    "scales_mixed_dtypes": lambda sd: _set(sd, MU, sd[MU].float()),
    "scale_not_finite": lambda sd: _set(sd, SIGMA, torch.full_like(sd[SIGMA], float("nan"))),
    "signs_float": lambda sd: _set(sd, SIGNS, sd[SIGNS].float()),
    "signs_short": lambda sd: _set(sd, SIGNS, sd[SIGNS][:-1]),
    "values_wrong_width": lambda sd: _set(sd, VALUES, sd[VALUES].view(torch.uint8)),
    "not_a_tensor": lambda sd: _set(sd, VALUES, "nope"),
    "missing_key": lambda sd: {k: v for k, v in sd.items() if k != COUNTS},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_state_dict_raises_format_error(case):
    _, layer = make_layer()
    bad = MALFORMED[case](layer.state_dict())
    with pytest.raises(pbcodec.FormatError):
        pbt.PBLinear(64, 48).load_state_dict(bad)
    # a loaded layer is left as it was
    _, target = make_layer(seed=1)
    x = torch.randn(64)
    with torch.no_grad():
        before = target(x)
        with pytest.raises(pbcodec.FormatError):
            target.load_state_dict(bad)
        assert torch.equal(target(x), before)


def test_meta_skeleton_with_assign():
    _, layer = make_layer()
    sd = {"0." + k: v for k, v in layer.state_dict().items()}
    with torch.device("meta"):
        skel = nn.Sequential(nn.Linear(64, 48), nn.Tanh())
    assert pbt.replace_linear_layers(skel, state_dict=sd, activations="float32") == ["0"]
    skel.load_state_dict(sd, assign=True)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(skel(x), torch.tanh(layer(x)))


# -- state-dict layouts (docs/format.md §8.4) ---------------------------------------
#: Layout 1 (the first): the flat names, written out here from the spec's table.
LAYOUT1 = {
    "signs": SIGNS,
    "mu": MU,
    "alpha": "weight.alpha",
    "sigma": SIGMA,
    "res_counts": COUNTS,
    "res_values": VALUES,
    "res_code_offsets": OFFSETS,
    "pb_meta": PM,
}


def _layout1(sd, prefix=""):
    """A layout-2 state dict (keys under ``prefix``) in layout 1."""
    inv = {prefix + new: prefix + old for old, new in LAYOUT1.items()}
    out = {inv.get(k, k): v for k, v in sd.items()}
    pm = out[prefix + "pb_meta"].clone()
    pm[0] = 1
    out[prefix + "pb_meta"] = pm
    return out


def test_state_dict_names_are_the_file_components(tmp_path):
    """One saved layout: under "<layer>.weight." a state dict holds exactly the tensors a
    file stores for the compressed tensor "<layer>.weight", with the same dtypes, shapes
    and bytes; only the description differs (pb_meta here, JSON metadata there)."""
    _, layer = make_layer(salient_bits=4, group_size=16)
    sd = {"enc.q." + k: v for k, v in layer.state_dict().items()}
    p = tmp_path / "f.safetensors"
    pbcodec.save_file({"enc.q.weight": layer.pb}, p)
    raw, _ = pbcodec.files.read_safetensors(str(p))
    assert set(raw) == set(sd) - {"enc.q.weight.pb_meta", "enc.q.bias"}
    for k, t in raw.items():
        a = sd[k].numpy()
        assert (t.shape, t.array().dtype, t.array().tobytes()) == (a.shape, a.dtype, a.tobytes()), k


@pytest.mark.parametrize("assign", [False, True])
def test_layout1_state_dict_still_loads(assign):
    _, layer = make_layer(salient_bits=4, group_size=16, scale_dtype="float32")
    v1 = _layout1({"0." + k: v for k, v in layer.state_dict().items()}, "0.")
    assert "0.res_counts" in v1 and "0.weight.residual.counts" not in v1
    with torch.device("meta" if assign else "cpu"):
        skel = nn.Sequential(nn.Linear(64, 48), nn.Tanh())
    assert pbt.replace_linear_layers(skel, state_dict=v1, activations="float32") == ["0"]
    skel.load_state_dict(v1, assign=assign)
    assert skel[0].pb == layer.pb and skel[0].weight.residual.counts.device.type == "cpu"
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(skel(x), torch.tanh(layer(x)))
    # saved again, it is layout 2
    assert skel[0].state_dict()[PM].tolist()[0] == 2 and "res_counts" not in skel[0].state_dict()


MALFORMED_LAYOUT1 = {
    "missing_key": lambda sd: {k: v for k, v in sd.items() if k != "res_counts"},
    "both_layouts": lambda sd: {**sd, COUNTS: sd["res_counts"]},
    "version_2_under_old_names": lambda sd: {**sd, "pb_meta": torch.tensor([2, *sd["pb_meta"].tolist()[1:]])},
    "meta_dtype": lambda sd: {**sd, "pb_meta": sd["pb_meta"].int()},
    "meta_not_a_tensor": lambda sd: {**sd, "pb_meta": [1, 48, 64, 64, 4, 8]},
    "bad_counts": lambda sd: {**sd, "res_counts": torch.full_like(sd["res_counts"], 255)},
}


@pytest.mark.parametrize("case", sorted(MALFORMED_LAYOUT1))
def test_malformed_layout1_raises_format_error(case):
    _, layer = make_layer()
    bad = MALFORMED_LAYOUT1[case](_layout1(layer.state_dict()))
    _, target = make_layer(seed=1)
    x = torch.randn(64)
    with torch.no_grad():
        before = target(x)
        with pytest.raises(pbcodec.FormatError):
            target.load_state_dict(bad)
        assert torch.equal(target(x), before)


def test_weight_parts_load_only_through_the_layer():
    """PBWeight and its residual hold tensors the PBLinear validated as a whole: loading
    them on their own (which would skip that) is refused, and nothing changes."""
    _, layer = make_layer()
    _, other = make_layer(seed=2)
    x = torch.randn(64)
    with torch.no_grad():
        before = layer(x)
    for part in (layer.weight, layer.weight.residual):
        donor = other.weight if part is layer.weight else other.weight.residual
        with pytest.raises(RuntimeError, match="load the PBLinear"):
            part.load_state_dict(donor.state_dict())
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    # and the layer itself still loads (the parts take what it validated)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(layer(x), other(x))


# -- conversions, copies, fallback ----------------------------------------------
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_dtype_casts_keep_scales(scale_dtype):
    _, layer = make_layer(scale_dtype=scale_dtype)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = layer(x)
        w = layer.weight
        sdt = w.mu.dtype
        for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double(), lambda m: m.float()):
            cast(layer)
            assert w.mu.dtype == w.alpha.dtype == w.sigma.dtype == sdt
            assert w.signs.dtype == torch.uint8 and w.residual.code_offsets.dtype == torch.int64
        # bias was rounded by the casts (bf16 round trip), the weight not at all
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=2e-2)
        assert layer.pb.scale_dtype == np.dtype(scale_dtype)


def test_deepcopy_and_pickle():
    _, layer = make_layer()
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = layer(x)
        layer.force_dense = True
        layer(x)  # fill the dense cache
        layer.force_dense = False
        c = copy.deepcopy(layer)
        assert c._dense is None
        assert np.shares_memory(c.pb.signs, c.weight.signs.numpy())
        assert torch.equal(c(x), ref)
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), ref)


def test_dense_fallback_path_caches():
    _, layer = make_layer()
    x = torch.randn(4, 64)
    with torch.no_grad():
        fused = layer(x)
        layer.force_dense = True
        y = layer(x)
        w = layer._dense
        assert w is not None and w.shape == (48, 64) and w.dtype == torch.float32
        torch.testing.assert_close(y, fused, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, F.linear(x, layer.dequantize(), layer.bias))
        layer(x)
        assert layer._dense is w  # cached: dequantized once
        y64 = layer(x.double())
        assert y64.dtype == torch.float64 and layer._dense.dtype == torch.float64
        layer.clear_cache()
        assert layer._dense is None
        layer(x)
        layer.to("cpu")  # any _apply drops the caches
        assert layer._dense is None


def test_meta_device():
    _, layer = make_layer()
    with torch.no_grad():
        # meta input, CPU layer: shape-only fallback (nothing is dequantized)
        y = layer(torch.empty(3, 5, 64, device="meta"))
        assert y.device.type == "meta" and y.shape == (3, 5, 48)
        assert layer._dense is not None and layer._dense.is_meta
        # meta layer and input: the op's fake (meta) kernel
        ml = copy.deepcopy(layer).to("meta")
        y = ml(torch.empty(7, 64, device="meta", dtype=torch.bfloat16))
        assert y.device.type == "meta" and y.shape == (7, 48) and y.dtype == torch.bfloat16


# -- autograd ----------------------------------------------------------------------
def test_gradients_reach_input_and_bias_not_weight():
    _, layer = make_layer()
    assert [n for n, _ in layer.named_parameters()] == ["bias"]  # the weight is buffers
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = layer(x)
    assert y.requires_grad
    g = torch.randn_like(y)
    y.backward(g)
    W = layer.dequantize()
    torch.testing.assert_close(x.grad, g @ W, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert all(b.grad is None for b in layer.buffers())
    with torch.no_grad():
        assert not layer(x).requires_grad
    with torch.inference_mode():
        assert torch.equal(layer(x.detach()), y.detach())


def test_gradients_half_input_no_bias():
    _, layer = make_layer(bias=False)
    x = torch.randn(4, 64).bfloat16().requires_grad_()
    layer(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), torch.ones(4, 48) @ layer.dequantize(), rtol=2**-7, atol=1e-3)


# -- the custom op --------------------------------------------------------------------
def _op_args(layer, x):
    return (x, *layer._op_tensors(), layer.bias, *layer._meta)


# torch's own fake-tensor conversion touches .grad of non-leaf tensors (a UserWarning
# inside torch, not from pbcodec)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(bias, requires_grad):
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    _, layer = make_layer(bias=bias)
    x = torch.randn(2, 3, 64, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.pbcodec.pb_linear.default, _op_args(layer, x))
    torch.library.opcheck(torch.ops.pbcodec.pb_linear.default, _op_args(layer, torch.randn(64).half()))


def test_op_rejects_wrong_input_width():
    _, layer = make_layer()
    with pytest.raises((ValueError, RuntimeError)):
        layer(torch.randn(3, 63))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(256, 512)
        self.act = nn.GELU()
        self.down = nn.Linear(512, 256, bias=False)
        self.gate = nn.Linear(256, 8)  # too small: stays dense
        self.lm_head = nn.Linear(256, 64)  # by name: stays dense

    def forward(self, x):
        h = self.down(self.act(self.up(x)))
        return self.lm_head(h) + self.gate(h).sum(-1, keepdim=True)


def _compiled_model(activations="int8"):
    torch.manual_seed(0)
    model = MLP()
    pbt.compress_model(model, progress=False, activations=activations)
    return model


def test_compile_without_graph_breaks():
    model = _compiled_model()
    x = torch.randn(4, 256)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
        y = compiled(torch.randn(2, 3, 256))  # other shape: recompiles or dynamic, still no break
        assert y.shape == (2, 3, 64)
    torch._dynamo.reset()


@pytest.mark.skipif(
    os.environ.get("PBCODEC_TEST_INDUCTOR") != "1",
    reason="inductor compiles C++ for ~15 s on a small CPU; set PBCODEC_TEST_INDUCTOR=1 to run",
)
def test_compile_inductor():
    model = _compiled_model()
    x = torch.randn(4, 256)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("activations", ["int8", "float32"])
def test_export_keeps_the_op(activations):
    model = _compiled_model(activations)
    x = torch.randn(4, 256)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("pbcodec.pb_linear.default") == 2
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
    if activations == "int8":
        # The program does not depend on this process's layout cache: emptied, the op
        # rebuilds the layouts from the component tensors and gives the same bits.
        from pbcodec.torch import _op

        _op._LAYOUTS.clear()
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated in recent torch
def test_jit_trace():
    model = _compiled_model()
    x = torch.randn(4, 256)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        assert "pbcodec::pb_linear" in str(traced.inlined_graph)
        x2 = torch.randn(4, 256)
        torch.testing.assert_close(traced(x2), model(x2), rtol=1e-5, atol=1e-5)


# -- compress_model / replace_linear_layers ------------------------------------------
def test_compress_model_mlp():
    torch.manual_seed(0)
    model = MLP()
    orig = copy.deepcopy(model)
    x = torch.randn(8, 256)
    report = pbt.compress_model(model, salient=0.1, salient_bits=8, progress=False, activations="float32")
    assert isinstance(model.up, pbt.PBLinear) and isinstance(model.down, pbt.PBLinear)
    assert [L["activations"] for L in report.layers] == ["float32", "float32"]
    assert type(model.gate) is nn.Linear and type(model.lm_head) is nn.Linear
    assert [L["name"] for L in report.layers] == ["up", "down"]
    assert report.skipped == ["gate", "lm_head"]
    for L, lin in zip(report.layers, (orig.up, orig.down), strict=False):
        m, n = lin.weight.shape
        assert L["shape"] == (m, n) and L["params"] == m * n and L["dtype"] == "torch.float32"
        assert 2.0 < L["bits_per_weight"] < 3.0
        assert L["snr_db"] > 0
        assert abs(L["salient_fraction"] - 0.1) < 0.01
        assert L["bytes_before"] == L["bytes_float32"] == 4 * m * n
        assert L["bytes_after"] == pytest.approx(L["bits_per_weight"] * m * n / 8)
    assert model.up.bits_per_weight == pytest.approx(report.layers[0]["bits_per_weight"])
    assert report.params == 2 * 256 * 512
    assert report.ratio == pytest.approx(report.bytes_before / report.bytes_after)
    assert report.ratio > 10
    assert 2.0 < report.bits_per_weight < 3.0
    d = report.to_dict()
    assert d["totals"]["params"] == report.params and len(d["layers"]) == 2 and d["skipped"] == ["gate", "lm_head"]
    text = str(report)
    for word in ("up", "down", "512x256", "SNR", "bits/w", "total", "lm_head", "ratio"):
        assert word in text
    with torch.no_grad():
        y = model(x)
        # exactly the model with dequantized weights ...
        deq = copy.deepcopy(orig)
        deq.up.weight.copy_(model.up.dequantize())
        deq.down.weight.copy_(model.down.dequantize())
        torch.testing.assert_close(y, deq(x), rtol=1e-4, atol=1e-4)
        # ... and as close to the original as the weight SNR says: for iid inputs,
        # E|(W - Ŵ)x|² / E|Wx|² = mean (W - Ŵ)² / mean W² = 10^(-SNR/10)
        xs = torch.randn(4096, 256)
        err = model.up(xs) - orig.up(xs)
        sig = orig.up(xs) - orig.up.bias
        rel = float(err.pow(2).mean() / sig.pow(2).mean())
        assert rel == pytest.approx(10 ** (-report.layers[0]["snr_db"] / 10), rel=0.2)
        cos = F.cosine_similarity(y.flatten(), orig(x).flatten(), dim=0)
        assert cos > 0.6  # two ~7 dB layers of uniform random weights in a row
        # int8 activations: exactly PBTensor.matvec(..., activations="int8") per layer,
        # and within the int8 mode's error bound of the float32 mode
        for lay in (model.up, model.down):
            lay.activations = "int8"
        h = model.up(x)
        ref = model.up.pb.matvec(x.numpy(), activations="int8") + model.up.bias.numpy()
        np.testing.assert_array_equal(h.numpy(), ref)
        y8 = model(x)
        assert float((y8 - y).pow(2).sum() / y.pow(2).sum()) < 5e-4


def test_compress_model_filter_shared_and_kwargs():
    torch.manual_seed(0)
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(32, 24, dtype=torch.bfloat16))
    seen = []

    def filt(name, module):
        seen.append(name)
        return True

    imp = {"0": torch.rand(32)}
    report = pbt.compress_model(model, filter=filt, progress=True, group_size=128, importance=imp, salient_bits=4)
    assert seen == ["0", "3"]  # a shared module is offered once
    assert isinstance(model[0], pbt.PBLinear) and model[0] is model[2]
    assert model[0].group_size == 32  # clamped to in_features
    assert model[3].bias.dtype == torch.bfloat16 and model[3].salient_bits == 4
    assert report.layers[1]["dtype"] == "torch.bfloat16"
    assert report.layers[1]["bytes_before"] == 2 * 24 * 32 and report.layers[1]["bytes_float32"] == 4 * 24 * 32
    with torch.no_grad():
        assert model(torch.randn(2, 32).bfloat16()).dtype == torch.bfloat16
    with pytest.raises(TypeError):
        pbt.compress_model(nn.Linear(32, 32))


def test_default_filter():
    assert pbt.default_filter("layers.0.q_proj", nn.Linear(16, 16))
    assert not pbt.default_filter("layers.0.q_proj", nn.Linear(15, 64))
    assert not pbt.default_filter("lm_head", nn.Linear(64, 64))
    mha = nn.MultiheadAttention(32, 4)
    assert not pbt.default_filter("attn.out_proj", mha.out_proj)  # a Linear subclass read via .weight


def test_compressed_model_save_and_rebuild():
    model = _compiled_model()
    sd = _roundtrip(model.state_dict())
    x = torch.randn(3, 256)
    # from the state_dict: exactly the stored layers
    torch.manual_seed(1)
    skel = MLP()
    assert pbt.replace_linear_layers(skel, state_dict=sd) == ["up", "down"]
    skel.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(skel(x), model(x))
    # with the default filter: the same layers
    skel2 = MLP()
    assert pbt.replace_linear_layers(skel2) == ["up", "down"]
    assert isinstance(skel2.up, pbt.PBLinear) and not skel2.up.is_loaded and skel2.down.bias is None
    skel2.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(skel2(x), model(x))


def test_extra_repr():
    _, layer = make_layer(salient=0.2, salient_bits=4, group_size=32)
    r = repr(layer)
    assert r.startswith("PBLinear(")
    for part in (
        "in_features=64",
        "out_features=48",
        "bias=True",
        f"bits_per_weight={layer.pb.bits_per_weight:.3f}",
        "salient_bits=4",
        "salient=0.2",
        "group_size=32",
    ):
        assert part in r, (part, r)
    assert repr(pbt.PBLinear(8, 4, bias=False)) == "PBLinear(in_features=8, out_features=4, bias=False, empty)"


def test_large_batches_use_the_dense_path_with_the_same_result(monkeypatch):
    import pbcodec.torch as pbt

    lin = nn.Linear(96, 80)
    layer = pbt.PBLinear.from_linear(lin, salient=0.1, activations="float32")
    calls = []
    orig = pbcodec._core.pb_matvec_layout_f32
    monkeypatch.setattr(pbcodec._core, "pb_matvec_layout_f32", lambda *a, **k: calls.append(1) or orig(*a, **k))
    for rows, fused in [(pbt.DENSE_ROWS - 1, True), (pbt.DENSE_ROWS, False), (3 * pbt.DENSE_ROWS, False)]:
        calls.clear()
        x = torch.randn(rows, 96)
        want = F.linear(x, layer.dequantize(), lin.bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        assert bool(calls) == fused


# -- issue 7: nn.Linear's dtype errors, one state-dict validator, adaptation rule -----
BAD_INPUTS = {
    "int64": lambda: torch.ones(3, 64, dtype=torch.int64),
    "uint8": lambda: torch.full((3, 64), 200, dtype=torch.uint8),
    "int32": lambda: torch.ones(64, dtype=torch.int32),
    "bool": lambda: torch.ones(3, 64, dtype=torch.bool),
    "complex64": lambda: torch.ones(3, 64, dtype=torch.complex64),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
@pytest.mark.parametrize("dense", [False, True])
def test_non_float_inputs_raise_like_nn_linear(kind, dense):
    lin, layer = make_layer()
    layer.force_dense = dense
    x = BAD_INPUTS[kind]()
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            lin(x)  # what nn.Linear does
        with pytest.raises(RuntimeError, match="floating-point"):
            layer(x)
        with pytest.raises(RuntimeError, match="floating-point"):
            torch.ops.pbcodec.pb_linear(x, *layer._op_tensors(), None, *layer._meta)


def test_state_dict_components_must_have_their_exact_shapes(tmp_path):
    """A transposed sign plane has the right element count but changes outputs by up
    to 2.0: it is refused, by the validator load_file uses too."""
    _, layer = make_layer(n=64, m=16, seed=3)
    sd = layer.state_dict()
    assert sd[SIGNS].shape == (16, 8)
    cases = {
        SIGNS: sd[SIGNS].t().contiguous(),
        MU: sd[MU].reshape(-1),
        SIGMA: sd[SIGMA].reshape(1, -1),
        OFFSETS: sd[OFFSETS].reshape(1, -1),
        COUNTS: sd[COUNTS].reshape(1, -1),
    }
    for key, bad in cases.items():
        with pytest.raises(pbcodec.FormatError, match="has shape"):
            pbt.PBLinear(64, 16).load_state_dict({**sd, key: bad})
    # The same component shapes in a file: the same check, the same message.
    t = layer.pb
    comps = {
        "w.signs": t.signs.T.copy(),
        "w.mu": t.mu,
        "w.alpha": t.alpha,
        "w.sigma": t.sigma,
        "w.residual.counts": t.residual.counts,
        "w.residual.values": t.residual.values,
        "w.residual.code_offsets": t.residual.code_offsets,
    }
    p = tmp_path / "w.safetensors"
    pbcodec.save_file({"w": t}, p)
    meta = pbcodec.load_metadata(p)
    from pbcodec.files import _raw, write_safetensors

    write_safetensors(p, {k: _raw(v, k) for k, v in comps.items()}, meta)
    with pytest.raises(pbcodec.FormatError, match=r"signs has shape \(8, 16\), expected \(16, 8\)"):
        pbcodec.load_file(p)


def test_compress_model_adapts_per_layer_and_names_failures(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 64), nn.Linear(64, 32))
    with torch.no_grad():
        model[1].weight.mul_(1e-8)  # float16 scales would underflow to zero
    report = pbt.compress_model(model, group_size=48, progress=False)
    notes = {L["name"]: L["notes"] for L in report.layers}
    assert notes["0"] == ["group size 48 > 32 columns: whole rows"]
    assert any("underflows to 0" in n for n in notes["1"]) and model[1].pb.scale_dtype == np.float32
    assert model[2].group_size == 48 and notes["2"] == []
    assert "note: 1: float16 scales do not fit" in str(report)
    # Non-finite weights: an error naming the layer.
    bad = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():
        bad[1].weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="layer '1'.*weight\\[3, 5\\] is not finite"):
        pbt.compress_model(bad, progress=False)
    # Scales that fit nothing (not reachable with finite float32 weights; the rule
    # anyway): the layer stays dense, with the reason.
    import pbcodec._adapt as adapt

    def never_fits(w, **kw):
        raise pbcodec.ScaleRangeError("row 0: alpha = 1e39 overflows float32; use scale_dtype='float32'")

    monkeypatch.setattr(adapt, "compress", never_fits)
    other = nn.Sequential(nn.Linear(32, 32))
    report = pbt.compress_model(other, progress=False)
    assert type(other[0]) is nn.Linear and report.skipped == ["0"]
    assert report.skip_reasons == {"0": "scales do not fit float32 (row 0: alpha = 1e39 overflows float32)"}
