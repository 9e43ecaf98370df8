"""PyTorch integration: compressed ``nn.Linear`` layers (``pip install pbcodec[torch]``).

``import pbcodec`` never imports torch; only ``import pbcodec.torch`` does (it needs
torch >= 2.4 for :func:`torch.library.custom_op`).

- :class:`PBLinear`: a drop-in for ``nn.Linear`` that stores the weight as a
  :class:`pbcodec.PBTensor` (registered buffers, so ``state_dict()`` carries it) and
  multiplies on the CPU straight from the compressed bytes with the fused kernel
  (one call per forward for the whole batch), via the custom op
  ``torch.ops.pbcodec.pb_linear`` (``torch.compile`` / ``torch.export`` /
  ``torch.jit.trace`` see one opaque op, no graph break).
- :func:`compress_model`: replace the ``nn.Linear`` layers of a model in place and get a
  :class:`CompressionReport` (bits/weight, SNR, sizes per layer).
- :func:`activation_importance`: per-channel importance from calibration inputs, for
  ``compress_model(..., importance=...)`` (activation-aware salient selection).
- :func:`calibrate_model` (or ``compress_model(..., calibration=run)``): calibrated
  compression, each layer compensating its own output error on calibration data
  (:func:`pbcodec.compress_gptq`, layer after layer); the accurate choice at 2-3 bits.
- :func:`replace_linear_layers`: turn the matching ``nn.Linear`` layers of a fresh model
  skeleton into empty :class:`PBLinear` modules that ``load_state_dict`` fills.

Saving and rebuilding a compressed model::

    import torch, pbcodec.torch as pbt

    model = MyModel(...)                        # trained float model
    report = pbt.compress_model(model, salient=0.1, salient_bits=8)
    print(report)
    torch.save(model.state_dict(), "model.pb.pt")   # or safetensors.torch.save_file(...)

    # later, in another process
    model = MyModel(...)                        # skeleton (weights are overwritten)
    sd = torch.load("model.pb.pt", weights_only=True)   # or safetensors.torch.load_file(...)
    pbt.replace_linear_layers(model, state_dict=sd)      # exactly the layers stored compressed
    model.load_state_dict(sd)

``replace_linear_layers(model, state_dict=sd)`` replaces the ``nn.Linear`` modules whose
compressed weight ``sd`` holds (a ``pb_meta`` entry), so it needs no knowledge of the filter used when
compressing; ``replace_linear_layers(model)`` (no state_dict) uses the same default filter
as :func:`compress_model`. Loading validates every compressed layer like
:meth:`pbcodec.PBTensor.from_bytes` does (sizes, offsets, every residual row, finite
scales): a malformed entry raises :class:`pbcodec.FormatError` before that layer is
touched (layers loaded earlier in the same call keep their new state, as with any
exception from ``load_state_dict``). For a skeleton built on the
``meta`` device, load with ``model.load_state_dict(sd, assign=True)`` (or call
``model.to_empty(device="cpu")`` first): copying into meta tensors is a no-op in PyTorch.

State of a :class:`PBLinear` (keys under the module's prefix; docs/format.md §8.4)::

    weight.signs                   uint8   (m, ceil(n/8))   packed sign plane
    weight.mu, weight.alpha        float16/float32 (m, n_groups)
    weight.sigma                   float16/float32 (m,)
    weight.residual.counts         uint8   (bytes of the packed run codes,)
    weight.residual.values         int8 (8-bit residual) / uint8 (4-bit, packed nibbles)
    weight.residual.code_offsets   int64   (m + 1,)
    weight.pb_meta                 int64   [layout version 2, m, n, group_size, count_bits, salient_bits]
    bias                           the original bias (its dtype), if any

The names under ``weight.`` are those of a compressed tensor ``<module>.weight`` in a
pbcodec file (docs/format.md §8.2), whose description is JSON metadata instead of
``pb_meta``. State dicts of layout 1 (``signs``, ``res_counts``, ... directly under the
prefix, ``pb_meta[0] = 1``) still load.

Gradients: the compressed weight is frozen (buffers, not parameters; nothing flows to
it). Inputs and the bias do get gradients: the op's backward rebuilds the dense weight
for the duration of the backward call (``grad_x = grad_y @ Ŵ``), so a PBLinear can sit
inside a model whose other parts are trained (adapters, prompt tuning, attribution).
For inference, run under ``torch.no_grad()`` / ``torch.inference_mode()`` as usual.

Devices: the fused kernel is CPU-only. On another device (CUDA, MPS, ...) a PBLinear
falls back to dequantizing once, caching the dense weight on that device and dtype
(``PBLinear.clear_cache()`` drops it) and calling ``F.linear``: correct, but it holds a
dense copy of the weight there. ``meta`` inputs go through the op's fake (meta) kernel.
"""

from __future__ import annotations

from ._op import DENSE_ROWS, FORMAT_VERSION, pb_linear
from .calibrate import DEFAULT_SALIENT_BUDGET, analyze_model, calibrate_model, layer_hessians, layer_kwargs
from .convert import activation_importance, compress_model, default_filter, replace_linear_layers
from .module import PBLinear, PBWeight
from .report import CompressionReport

__all__ = [
    "DEFAULT_SALIENT_BUDGET",
    "DENSE_ROWS",
    "FORMAT_VERSION",
    "CompressionReport",
    "PBLinear",
    "PBWeight",
    "activation_importance",
    "analyze_model",
    "calibrate_model",
    "compress_model",
    "default_filter",
    "layer_hessians",
    "layer_kwargs",
    "pb_linear",
    "replace_linear_layers",
]
