"""LongLoRA: S²-Attn against its formula, position interpolation, the method's count, eval = full attention."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import batch_of, randomize, small_model, train_steps
from peftlab import registry
from peftlab.config import build_dataclass
from peftlab.methods.longlora import group_size, shifted_sparse_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(q, k, v, group, scale):
    """Dense attention with the mask written from the definition, one head at a time."""
    b, h, n, d = q.shape
    m = -(-n // group) * group
    shift = group // 2
    pos = torch.arange(n)
    out = torch.empty(b, n, h, d)
    for head in range(h):
        if head < h // 2:
            allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] // group == pos[:, None] // group)
        else:  # rolled index of original position p is (p - shift) mod m; same rolled group, not after p
            r = (pos - shift) % m
            allowed = (pos[None, :] <= pos[:, None]) & (r[None, :] // group == r[:, None] // group)
        kh, vh = k[:, head * k.shape[1] // h], v[:, head * v.shape[1] // h]
        logits = q[:, head] @ kh.transpose(-1, -2) * scale
        out[:, :, head] = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1) @ vh
    return out


@pytest.mark.parametrize("n,group", [(16, 4), (12, 4), (10, 4), (9, 6)])
def test_s2_attention_equals_its_formula(n, group):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(2, 4, n, 8, generator=g)
    k, v = torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g)
    got = shifted_sparse_attention(q, k, v, group, scaling=8**-0.5)
    torch.testing.assert_close(got, reference(q, k, v, group, 8**-0.5), atol=1e-5, rtol=1e-5)
    # the unshifted half is full causal attention inside each group
    full = torch.nn.functional.scaled_dot_product_attention(q[:, :2, :group], k[:, :1, :group].repeat(1, 2, 1, 1),
                                                            v[:, :1, :group].repeat(1, 2, 1, 1), is_causal=True,
                                                            scale=8**-0.5)
    torch.testing.assert_close(got[:, :group, :2], full.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_group_size_is_even_and_a_quarter():
    assert [group_size(0.25, n) for n in (8192, 12, 10, 3)] == [2048, 4, 2, 2]


def _apply(model, **opts):
    m = registry.get("longlora")
    cfg = build_dataclass(m.config_cls, {"method": "longlora", "r": 4, **opts}, "peft")
    torch.manual_seed(0)
    m.apply(model, cfg)
    return m, cfg


def test_count_identity_eval_attention_and_merge():
    ids = batch_of(rows=2, length=24)["input_ids"]
    base = small_model("llama")
    with torch.no_grad():
        want = base(ids).logits
    model = small_model("llama")
    method, cfg = _apply(model)
    c = model.config
    h, kv = c.hidden_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    lora = c.num_hidden_layers * 4 * (2 * (h + h) + 2 * (h + kv))  # r (in + out): q, o; k, v
    emb = c.vocab_size * c.hidden_size
    norms = (2 * c.num_hidden_layers + 1) * c.hidden_size
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora + emb + norms
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)  # eval: full attention, B = 0
    randomize(model, names=("lora_B",), std=0.2)
    model.train()
    with torch.no_grad():  # training mode runs S²-Attn: another function of the same weights
        sparse = model(ids).logits
    model.eval()
    with torch.no_grad():
        dense = model(ids).logits
    assert (sparse - dense).abs().max() > 1e-3
    method.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=1e-5 * dense.abs().max().item(), rtol=0)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "s2_group_ratio")


def test_position_interpolation_divides_positions():
    model = small_model("llama")
    before = model.config.max_position_embeddings
    rot = model.model.rotary_emb
    x = torch.zeros(1, 3, 8)
    cos0, sin0 = rot(x, torch.tensor([[0, 1, 2]]))
    _apply(model, context_factor=2.0)
    cos1, sin1 = model.model.rotary_emb(x, torch.tensor([[0, 2, 4]]))
    torch.testing.assert_close((cos1, sin1), (cos0, sin0))
    assert model.config.max_position_embeddings == 2 * before
    assert model.config.rope_parameters["rope_type"] == "linear"


def test_learns_with_s2_attention():
    model = small_model("llama")
    _, cfg = _apply(model, group_ratio=0.25)
    losses = train_steps(model, cfg, batch_of(rows=2, length=24), steps=15, lr=5e-3)
    assert losses[-1] < 0.7 * losses[0]
