"""Load and save pbcodec-compressed models with Hugging Face transformers.

``import pbcodec.hf`` registers the quantization method ``"pbcodec"`` with
transformers' public registry (``register_quantization_config`` /
``register_quantizer``, transformers >= 4.47), after which::

    model = AutoModel.from_pretrained("compressed-dir")   # PBLinear layers, no dense copy
    model.save_pretrained("again")                         # the same file layout

work on a directory whose safetensors files hold compressed tensors as
``pbcodec compress`` writes them (docs/format.md §8: ``NAME.signs``,
``NAME.mu``, ... described in ``__metadata__["pbcodec"]``) and whose
``config.json`` has ``"quantization_config": {"quant_method": "pbcodec"}``.
Every compressed ``<module>.weight`` of an ``nn.Linear`` is loaded into a
:class:`pbcodec.torch.PBLinear` (validated, memory-mapped parts); biases and
all other tensors load as usual. sentence-transformers models work the same
way (they call ``from_pretrained``).

- :func:`mark_compressed` adds the ``quantization_config`` to a ``config.json``
  (e.g. after ``pbcodec compress MODEL_DIR OUT_DIR``).
- :func:`prepare_for_save` attaches the quantizer to a model compressed in
  memory (``pbcodec.torch.compress_model``), so ``save_pretrained`` writes
  this layout.

Transformers keeps registrations per process: import ``pbcodec.hf`` before
``from_pretrained``. Needs ``pip install "pbcodec[torch]" transformers``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .files import COMPONENTS, META_KEY, VERSION, _build_pb, _describe, pb_description, read_safetensors
from .pb import PBTensor
from .torch import PBLinear

__all__ = ["METHOD", "PbcodecConfig", "PbcodecHfQuantizer", "mark_compressed", "prepare_for_save"]

METHOD = "pbcodec"
# A compressed ``<module>.weight`` in a file (docs/format.md §8.2) has the components a
# PBLinear's state dict has under the same names (§8.4), less its description
# ``pb_meta``, which the files keep as JSON metadata instead.
_COMPONENT_RE = r"\.weight\.(" + "|".join(c.replace(".", r"\.") for c in COMPONENTS) + ")$"
_META_RE = r"\.weight\.pb_meta$"


@register_quantization_config(METHOD)
class PbcodecConfig(QuantizationConfigMixin):
    """``quantization_config`` of a pbcodec model: ``{"quant_method": "pbcodec",
    "format_version": 1}``. The compression parameters live with each tensor
    (the files' ``__metadata__``), so there is nothing else to configure."""

    def __init__(self, format_version: int = VERSION, **kwargs: Any) -> None:
        self.quant_method = METHOD
        self.format_version = int(format_version)
        if self.format_version != VERSION:
            raise ValueError(f"pbcodec format version {format_version} is not supported (this build reads {VERSION})")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "format_version": self.format_version}


def _module(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, child, getattr(parent, child)


@register_quantizer(METHOD)
class PbcodecHfQuantizer(HfQuantizer):
    """Loads pre-compressed pbcodec checkpoints (it does not compress: use
    ``pbcodec compress`` or ``pbcodec.torch.compress_model`` first)."""

    requires_calibration = True  # only pre-quantized checkpoints

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._loaded: dict[str, PBTensor] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and any(v == "disk" for v in device_map.values()):
            raise ValueError("pbcodec models cannot be offloaded to disk")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Any = None, **kwargs: Any):
        """Replace every nn.Linear whose weight the checkpoint holds compressed by a
        PBLinear built from the (validated, memory-mapped) components; the
        loader then fills biases and every other tensor as usual."""
        found = 0
        for path in checkpoint_files or []:
            if not str(path).endswith(".safetensors"):
                continue
            raw, metadata = read_safetensors(path)
            for name, desc in _describe(metadata, str(path)).items():
                if not name.endswith(".weight"):
                    continue
                mod_path = name[: -len(".weight")]
                try:
                    parent, child, old = _module(model, mod_path)
                except AttributeError:
                    continue  # not part of this model (e.g. a head the class lacks)
                if not isinstance(old, nn.Linear):
                    raise ValueError(f"{path}: {name} is compressed but {mod_path} is a {type(old).__name__}")
                t: PBTensor = _build_pb(name, desc, raw, str(path))
                if t.shape != (old.out_features, old.in_features):
                    raise ValueError(f"{path}: {name} has shape {t.shape}, the layer is {old.weight.shape}")
                with torch.device("cpu"):  # outside the meta-device init context
                    new = PBLinear.from_pbtensor(t)
                if old.bias is not None:
                    # A placeholder the loader fills from the checkpoint like any bias.
                    new.bias = nn.Parameter(torch.empty_like(old.bias, device="meta"), requires_grad=False)
                setattr(parent, child, new)
                self._loaded[mod_path] = t
                found += 1
        if not found:
            raise ValueError("quantization_config says pbcodec, but no checkpoint file holds compressed Linear weights")
        # The components were read and validated here (and are put back after loading);
        # those of weights this model does not use are not errors, and the descriptions
        # (pb_meta) are JSON metadata in the files, not tensors.
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or []) | {_COMPONENT_RE}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or []) | {_META_RE}
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any):
        """Put the validated parts back (transformers loaded the components into the
        PBLinear buffers of the same names itself, and materialized the missing
        ``pb_meta``), keeping the biases it loaded."""
        for path, t in self._loaded.items():
            parent, child, old = _module(model, path)
            bias = old.bias
            device = bias.device if bias is not None else None
            with torch.device("cpu"):
                new = PBLinear.from_pbtensor(t, device=device)
            if bias is not None:
                new.bias = bias
            new.train(old.training)
            setattr(parent, child, new)
        self._loaded.clear()
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The model's state dict as a pbcodec file (what ``pbcodec compress`` writes):
        each PBLinear's state already names its weight's components like the file does
        (docs/format.md §8.4); its ``pb_meta`` becomes the description in the metadata."""
        pb_paths = {n: m for n, m in model.named_modules() if isinstance(m, PBLinear)}
        metas = {f"{n}.weight.pb_meta" if n else "weight.pb_meta" for n in pb_paths}
        state = {k: v for k, v in model.state_dict().items() if k not in metas}
        desc = {f"{n}.weight" if n else "weight": pb_description(m.pb) for n, m in sorted(pb_paths.items())}
        return state, {META_KEY: json.dumps(desc, sort_keys=True)}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def prepare_for_save(model: nn.Module) -> nn.Module:
    """Mark a transformers model compressed in memory (its Linear layers
    replaced by PBLinear, e.g. by ``pbcodec.torch.compress_model``) so that
    ``model.save_pretrained(dir)`` writes a pbcodec directory that
    ``from_pretrained`` loads back. Returns the model."""
    if not any(isinstance(m, PBLinear) for m in model.modules()):
        raise ValueError("the model has no PBLinear layer: compress it first (pbcodec.torch.compress_model)")
    config = PbcodecConfig()
    model.config.quantization_config = config
    model.hf_quantizer = PbcodecHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    return model


def mark_compressed(directory: str | os.PathLike) -> None:
    """Add ``"quantization_config": {"quant_method": "pbcodec", ...}`` to
    ``directory/config.json`` (for a directory written by ``pbcodec compress``)."""
    path = os.path.join(os.fspath(directory), "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = PbcodecConfig().to_dict()
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
