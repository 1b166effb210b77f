"""The base model inside an adapted one: every method's modules switched off, no second copy.

Preference training needs the model it started from (the reference policy). For a method
that leaves the base weights untouched, that model is still there: each wrapper keeps the
module it wraps and calls it (STYLE.md: composition), under one of three names:

    base_layer       LoRA, DoRA, VeRA, AdaLoRA, (IA)3, MoE-LoRA layers
    base             bottleneck adapters; the virtual-token backbone of prompt/prefix methods
    original_module  ``modules_to_save`` (the frozen original beside the trained copy)

``adapters_off(model)`` swaps every outermost wrapper for its wrapped module in its parent for
the duration of the block, so the forward is exactly the base model's (prompt and prefix
methods run without their virtual tokens), bit for bit; leaving the block puts every wrapper
back. Methods that change the base weights themselves (``Method.edits_base``: full
fine-tuning, BitFit, LISA, ReLoRA's merges, Delta-LoRA) have no such base and need a frozen
copy instead (train/preference.py decides).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

WRAPPED = ("base_layer", "base", "original_module")


def wrapped_module(module: nn.Module) -> nn.Module | None:
    """The module a method's wrapper wraps, or None when ``module`` is no wrapper."""
    for name in WRAPPED:
        inner = module._modules.get(name)
        if isinstance(inner, nn.Module):
            return inner
    return None


def _swaps(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """(parent, attribute, wrapper, the module it finally wraps) for every wrapper, inner ones
    included (a backbone wrapper's layers hold LoRA or adapter wrappers of their own: MAM)."""
    found = []

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            inner = child
            while wrapped_module(inner) is not None:
                inner = wrapped_module(inner)
            if inner is not child:
                found.append((parent, name, child, inner))
            walk(inner)

    walk(model)
    return found


def has_wrappers(model: nn.Module) -> bool:
    return bool(_swaps(model))


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block (see the module docstring)."""
    swaps = _swaps(model)
    try:
        for parent, name, _, inner in swaps:
            parent._modules[name] = inner
        yield model
    finally:
        for parent, name, wrapper, _ in reversed(swaps):
            parent._modules[name] = wrapper
