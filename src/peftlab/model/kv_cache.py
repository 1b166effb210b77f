"""The KV cache's name across transformers 5.x.

Up to 5.24 a model's ``forward`` takes the cache as ``past_key_values`` and returns it under that
name; from 5.25 the argument and the output field are ``cache`` (``past_key_values`` is a deprecated
alias: a model given both keeps ``cache`` and drops the other). Code that passes a cache through a
wrapper must use the name the wrapped model reads, or the cache is silently ignored.

``map_cache`` and ``join_caches`` build a new ``DynamicCache`` from an old one's layers (rows kept,
columns cut, two batches stacked): the serving engine reshapes its running batch's cache with them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn


def cache_arg(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes the KV cache under: ``cache`` or ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache a model output carries (None when it has none), under either name."""
    if isinstance(out, tuple):
        return None
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def drop_output_cache(out) -> None:
    """Remove the KV cache from a model output in place, under either name."""
    for key in ("cache", "past_key_values"):
        if key in out:
            out[key] = None


def map_cache(cache, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A new ``DynamicCache`` whose every layer holds ``fn(key)`` and ``fn(value)`` of ``cache``'s
    (a ``DynamicCache`` or a list of per-layer ``(key, value)``); tensors are [B, H, T, d]."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(fn(k), fn(v)) for k, v, *_ in cache])


def join_caches(first, second, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """A new ``DynamicCache`` whose every layer holds ``fn(a, b)`` of the two caches' keys, and of their values."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(fn(ka, kb), fn(va, vb)) for (ka, va, *_), (kb, vb, *_) in zip(first, second)])
