"""What every LoRA-family method shares beyond its own layer: not a method, no ``register()``.

- **Extra trained modules** (``peft.additional_targets``; PEFT's ``modules_to_save``,
  LLaMA-Factory's ``additional_target``): each named module is kept frozen as
  ``original_module`` and trained in full as a copy, ``modules_to_save``, saved with the
  adapter under the module's own name (PEFT's file layout: ``base_model.model.lm_head.weight``).
- **Embeddings resized for added tokens**: an adapter whose trained embedding has more rows than
  the base grows the base's embeddings to match before it is applied
  (``prepare_base_for_adapter``, called by ``export.adapter.load_adapter``).
- **Continuing from an adapter**: ``peft.init_from=DIR`` starts training from an adapter's
  tensors (same method, rank and targets); ``peft.merge_first=DIR[,DIR...]`` merges adapters
  into the base first and trains a fresh adapter on top of the result.
- **Merging**: folding wrapper layers into plain ones, dequantising a quantised base, untying
  embeddings whose shared weight a merge would otherwise change twice.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import find_targets, set_submodule
from ..quant import dequantize_layer, dequantize_model, is_quantized, model_is_quantized, quantize_model
from ..registry import PEFT_PREFIX, add_peft_prefix, strip_peft_prefix

SAVE = "modules_to_save"


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path``, in the train/eval mode of the module it replaces (a wrapper built
    in an eval-mode model must not run its dropout)."""
    new.train(model.get_submodule(path).training)
    set_submodule(model, path, new)


# ---------------------------------------------------------------------------- extra trained modules


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


def additional_targets_for_peft(cfg) -> list[str] | None:
    names = getattr(cfg, "additional_targets", None)
    return list(names) if names else None


def to_peft_keys(state: dict) -> dict:
    """peftlab names -> file names: ``X.modules_to_save.weight`` is saved as ``X.weight`` (PEFT)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        out[".".join(p for p in parts if p != SAVE)] = v
    return add_peft_prefix(out)


def make_from_peft_keys(own: tuple[str, ...]):
    """file names -> peftlab names, for a method whose own tensors have components in ``own``.

    Any other tensor in the file is an extra trained module: ``X.weight`` -> ``X.modules_to_save.weight``
    (extra trained modules are leaf modules, so the parameter name is the last component).
    """

    def from_peft_keys(state: dict) -> dict:
        out = {}
        for k, v in strip_peft_prefix(state).items():
            parts = k.split(".")
            if not any(p.startswith(own) for p in parts) and SAVE not in parts:
                parts = parts[:-1] + [SAVE, parts[-1]]
            out[".".join(parts)] = v
        return out

    return from_peft_keys


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


# ---------------------------------------------------------------------------- continuing from an adapter


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def merge_adapters_first(model: nn.Module, dirs: list[str] | None) -> None:
    """``peft.merge_first``: load each adapter, merge it into the base (in order), freeze again.

    A quantised base is dequantised for the merge and quantised again after it (lossy: the
    merged weights are rounded to the 4/8-bit grid once more).
    """
    if not dirs or _is_meta(model):
        return
    from .. import registry
    from ..export.adapter import load_adapter

    kind = model_is_quantized(model)
    for d in dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"peft.merge_first: adapter directory {d!r} does not exist")
        cfg = load_adapter(model, d)
        method = registry.get(cfg.method)
        if method.merge is None:
            raise ConfigError(f"peft.merge_first: {d} is a {cfg.method} adapter, which cannot be merged into "
                              "the base; continue training it with peft.init_from instead")
        method.merge(model)
    if kind:
        quantize_model(model, kind)
    freeze(model)


def init_from_adapter(model: nn.Module, method, adapter_dir: str) -> None:
    """``peft.init_from``: copy an adapter's tensors into the freshly applied method's tensors."""
    from safetensors.torch import load_file

    from ..export.adapter import WEIGHTS_NAME, adapter_state, read_adapter_config

    read_adapter_config(adapter_dir)  # clear errors for a missing directory or pickle files
    loaded = method.from_peft_keys(prepare_base_for_adapter(model, load_file(str(Path(adapter_dir) / WEIGHTS_NAME))))
    expected = adapter_state(model, method)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = [(k, tuple(loaded[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in loaded and loaded[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                  else f"{shapes[0][0]} has shape {shapes[0][1]}, this run builds {shapes[0][2]}")
        raise ConfigError(
            f"peft.init_from={adapter_dir}: the adapter does not fit this run's {method.name} setup ({detail}); "
            "use the same peft.method, peft.r and peft.targets it was trained with (a PiSSA/OLoRA adapter "
            "is saved as plain LoRA of rank 2r: continue it with peft.init=kaiming and peft.r=2r)"
        )
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(loaded[k].to(v.device, v.dtype))


# ---------------------------------------------------------------------------- merging


def peft_targets(d: dict, method: str) -> str | list[str]:
    """``target_modules`` of a PEFT adapter_config.json for a method that keeps no biases; a clear
    error for a bias setting it cannot load or a missing target list."""
    if d.get("bias", "none") not in (None, "none"):
        raise ConfigError(f"adapter_config.json has bias={d['bias']!r}, which peftlab's {method} does not load")
    targets = d.get("target_modules")
    if targets is None:
        raise ConfigError("adapter_config.json has no target_modules")
    return targets if isinstance(targets, str) else list(targets)


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision merges are computed in: fp64 stays fp64, everything else fp32."""
    return t.double() if t.dtype == torch.float64 else t.float()


class DeltaMerge:
    """``merge()`` / ``unmerge()`` for a wrapper whose update is a weight delta.

    The wrapper has ``base_layer``, a ``merged`` flag and ``delta_weight()`` (the update in the base
    weight's layout); merge adds it in fp32 (fp64 for fp64 weights) and rounds once, after first
    replacing a quantised base by its dequantised float layer. LoRA, LoRA on embeddings, AdaLoRA
    and VeRA share it; DoRA's merge is a rescaling and has its own.
    """

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        float_base(self)
        w = self.base_layer.weight
        w.copy_((wide(w) + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((wide(w) - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False


def shared_weight_ids(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied embeddings)."""
    count: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            count[id(p)] = count.get(id(p), 0) + 1
    return {i for i, c in count.items() if c > 1}


def float_base(layer: nn.Module) -> None:
    """Replace a quantised ``layer.base_layer`` by its dequantised float layer (original dtype)."""
    if is_quantized(layer.base_layer):
        layer.base_layer = dequantize_layer(layer.base_layer)


def untie_base(layer: nn.Module) -> None:
    """Give ``layer.base_layer`` its own copy of a weight shared with another module (tied embeddings),
    so a merge changes this module only."""
    w = layer.base_layer.weight
    layer.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=False)


def merge_wrappers(model: nn.Module, classes: tuple[type, ...]) -> None:
    """Fold every wrapper of ``classes`` into its base and put plain layers back; then the extra
    trained modules; then dequantise what is left of a quantised base (a merged model is plain)."""
    shared = shared_weight_ids(model)
    untied = False
    for path, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]:
        float_base(layer)
        if id(layer.base_layer.weight) in shared:
            untie_base(layer)
            untied = True
        layer.merge()
        set_submodule(model, path, layer.base_layer)
    for path, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        set_submodule(model, path, module.modules_to_save)
        module.modules_to_save.requires_grad_(False)
        untied = True
    if model_is_quantized(model):
        dequantize_model(model)
    for holder in [n for n, _ in model.named_children() if n.startswith("peftlab_")]:
        delattr(model, holder)
    if untied and hasattr(model, "get_input_embeddings"):
        cfg = getattr(model, "config", None)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if cfg is not None and head is not None and emb.weight is not head.weight:
            cfg.tie_word_embeddings = False
            text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            text.tie_word_embeddings = False
