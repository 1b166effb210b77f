"""The KV cache's name across transformers 5.x.

Up to 5.24 a model's ``forward`` takes the cache as ``past_key_values`` and returns it under that
name; from 5.25 the argument and the output field are ``cache`` (``past_key_values`` is a deprecated
alias: a model given both keeps ``cache`` and drops the other). Code that passes a cache through a
wrapper must use the name the wrapped model reads, or the cache is silently ignored.
"""

from __future__ import annotations

import inspect

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
