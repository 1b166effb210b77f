"""Folding adapted layers back into plain ones, for every method whose update merges.

``merge_wrappers(model, classes, merge_layer)`` merges each wrapper (``lowrank.merge_delta`` for an
additive update, DoRA's rescaling for DoRA) and puts its base layer
back, puts the trained copies of extra trained modules in place of the originals, and dequantises
what is left of a quantised base (a merged model is plain). Embeddings tied to the output head are
untied first where a merge would otherwise change the shared weight twice.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..model.targets import set_submodule
from ..quant.convert import dequantize_layer, dequantize_model, is_quantized, model_is_quantized
from .modules_to_save import ModulesToSave


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


def merge_wrappers(model: nn.Module, classes: tuple[type, ...], merge_layer: Callable[[nn.Module], None]) -> None:
    """Fold every wrapper of ``classes`` into its base (``merge_layer(layer)``) and put plain layers back; then the extra
    trained modules; then dequantise what is left of a quantised base (a merged model is plain)."""
    shared = shared_weight_ids(model)
    untied = False
    for path, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]:
        float_base(layer)
        if id(layer.base_layer.weight) in shared:
            untie_base(layer)
            untied = True
        merge_layer(layer)
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
