"""model.kv_cache: new DynamicCaches built from an old one's layers (the serving engine's reshaping)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from peftlab.model.kv_cache import join_caches, map_cache


def _cache(batch: int, length: int, layers: int = 3, seed: int = 0) -> tuple[DynamicCache, list]:
    g = torch.Generator().manual_seed(seed)
    kv = [(torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g))
          for _ in range(layers)]
    return DynamicCache(ddp_cache_data=kv), kv


def _layers(cache: DynamicCache) -> list:
    return [(k, v) for k, v, *_ in cache]


def test_map_cache_applies_fn_to_every_key_and_value():
    cache, kv = _cache(3, 5)
    idx = torch.tensor([0, 2])
    out = map_cache(cache, lambda t: t.index_select(0, idx)[..., 1:4, :])
    assert isinstance(out, DynamicCache) and len(_layers(out)) == 3
    for (k, v), (k0, v0) in zip(_layers(out), kv):
        assert torch.equal(k, k0[[0, 2], :, 1:4]) and torch.equal(v, v0[[0, 2], :, 1:4])
    assert out.get_seq_length() == 3
    assert map_cache(kv, lambda t: t * 2).get_seq_length() == 5  # a list of (key, value) works too


def test_join_caches_pairs_layers_and_keeps_keys_and_values_apart():
    (a, kv_a), (b, kv_b) = _cache(2, 4, seed=1), _cache(1, 4, seed=2)
    out = join_caches(a, b, lambda x, y: torch.cat([x, y]))
    for (k, v), (ka, va), (kb, vb) in zip(_layers(out), kv_a, kv_b):
        assert torch.equal(k, torch.cat([ka, kb])) and torch.equal(v, torch.cat([va, vb]))
    assert _layers(out)[0][0].shape == (3, 2, 4, 4)
