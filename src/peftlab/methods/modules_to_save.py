"""Modules trained in full beside an adapter, and a base grown to an adapter's vocabulary.

- **Extra trained modules** (``peft.additional_targets``; PEFT's ``modules_to_save``,
  LLaMA-Factory's ``additional_target``): each named module is kept frozen as
  ``original_module`` and trained in full as a copy, ``modules_to_save``, saved with the
  adapter under the module's own name (PEFT's file layout: ``base_model.model.lm_head.weight``).
- **Embeddings resized for added tokens**: an adapter whose trained embedding has more rows than
  the base grows the base's embeddings to match before it is applied
  (``prepare_base_for_adapter``, called by ``export.adapter.load_adapter``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import find_targets, replace_module
from ..quant.convert import dequantize_layer, is_quantized
from ..registry import PEFT_PREFIX, strip_peft_prefix

SAVE = "modules_to_save"


class ModulesToSave(nn.Module):
    """A module trained in full beside an adapter: a frozen original and a trainable copy.

    The copy is what runs. Parameters: those of the wrapped module, twice (the original frozen).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        trained = dequantize_layer(module) if is_quantized(module) else copy.deepcopy(module)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.modules_to_save = trained

    def forward(self, *args, **kwargs):
        return self.modules_to_save(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("modules_to_save", "original_module"):
                raise
            return getattr(self.modules_to_save, name)  # weight, num_embeddings, ... of the trained copy


def add_additional_targets(model: nn.Module, names: list[str] | None) -> list[str]:
    """Wrap the named modules in ``ModulesToSave``; returns their paths."""
    if not names:
        return []
    paths = find_targets(model, names, kinds=(nn.Module,), what="peft.additional_targets")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, ModulesToSave):
            continue
        if not any(True for _ in module.parameters(recurse=False)) or any(
                any(True for _ in c.parameters()) for c in module.children()):
            leaves = [n for n, m in module.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
            raise ConfigError(
                f"peft.additional_targets: {path!r} ({type(module).__name__}) is a container; name the layers "
                f"inside it that should train in full, e.g. {', '.join(leaves[:3]) or 'its sub-layers'}"
            )
        if any(part.startswith(("lora_", "vera_")) for part in path.split(".")) or hasattr(module, "base_layer"):
            raise ConfigError(f"peft.additional_targets: {path!r} is already adapted by peft.targets; "
                              "a module is either adapted or trained in full, not both")
        replace_module(model, path, ModulesToSave(module))
    return paths


# ---------------------------------------------------------------------------- added tokens


def _embedding_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Paths of the input embedding and the output head (unwrapping peftlab wrappers)."""
    out = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)() if hasattr(model, getter) else None
        if module is None:
            continue
        for name, m in model.named_modules():
            if m is module:
                out[name] = m
                break
    return out


def prepare_base_for_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make the base fit an adapter file before the method is applied; returns the remaining tensors.

    - When the adapter's trained embedding (an extra trained module, or PEFT's saved embedding
      layer ``<embed>.base_layer.weight``) has another number of rows than the base's vocabulary
      (tokens were added before training), the base's token embeddings are resized to match.
    - PEFT saves the full embedding matrix as ``<embed>.base_layer.weight`` when LoRA adapts the
      embeddings; PEFT loads it into the base, and so do we (the tensor leaves the returned dict).
    """
    plain = strip_peft_prefix(tensors)
    paths = _embedding_paths(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return tensors
    vocab = emb.weight.shape[0]
    rows = {k: v.shape[0] for p in paths for k, v in plain.items()
            if k in (f"{p}.weight", f"{p}.base_layer.weight") and v.ndim == 2}
    sizes = set(rows.values())
    if len(sizes) > 1:
        raise ConfigError(f"the adapter's embedding tensors disagree on the vocabulary size: {rows}")
    if sizes and sizes != {vocab}:
        (new_vocab,) = sizes
        model.resize_token_embeddings(new_vocab, mean_resizing=False)
        for p in model.parameters():
            p.requires_grad_(False)
    kept = dict(tensors)
    for p in paths:
        key = f"{p}.base_layer.weight"
        if key in plain:
            module = model.get_submodule(p)
            with torch.no_grad():
                module.weight.copy_(plain[key].to(module.weight.dtype))
            kept.pop(PEFT_PREFIX + key, None)
            kept.pop(key, None)
    return kept
