"""Speed levers change no math: the chunked LM-head loss and the LoRA autograd function give the
plain computation's loss, outputs and gradients (fp32: to rounding; bf16 autocast: to bf16
rounding), and the LoRA function really saves fewer bytes for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import randomize, tiny_model
from peftlab.data.tokenize import IGNORE
from peftlab.methods import lora as lora_mod
from peftlab.methods import lora_kernels
from peftlab.methods.lora import LoRAConfig
from peftlab.methods.lowrank import LoRALinear, lora_layers
from peftlab.train.fused_loss import chunked_linear_cross_entropy
from peftlab.train.loss import causal_lm_loss


def _plain_ce(h, w, b, y, weights=None, mult=1.0, cap=None):
    z = F.linear(h, w, b).float() * mult
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    losses = F.cross_entropy(z, y, reduction="none")
    return (losses * weights).sum() if weights is not None else losses.sum()


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    loss = fn()
    (loss * 0.37).backward()  # a non-unit upstream gradient (the loop divides by the token count)
    return loss.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("variant", ["plain", "bias_weights", "scale_softcap"])
def test_chunked_ce_equals_plain_loss_and_grads(chunk, variant):
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 16, 300
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    b = torch.randn(v, generator=g, requires_grad=True) if variant == "bias_weights" else None
    y = torch.randint(0, v, (n,), generator=g)
    weights = torch.rand(n, generator=g) if variant == "bias_weights" else None
    mult, cap = (0.7, 5.0) if variant == "scale_softcap" else (1.0, None)
    params = [t for t in (h, w, b) if t is not None]
    ref_loss, ref = _grads(lambda: _plain_ce(h, w, b, y, weights, mult, cap), params)
    loss, got = _grads(lambda: chunked_linear_cross_entropy(h, w, b, y, weights, chunk, mult, cap), params)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation path: same loss, no gradient buffers
        torch.testing.assert_close(chunked_linear_cross_entropy(h, w, b, y, weights, chunk, mult, cap), ref_loss,
                                   rtol=1e-5, atol=1e-4)


def test_chunked_ce_frozen_head_gives_no_weight_grad():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (20,), generator=g)
    chunked_linear_cross_entropy(h, w, None, y, chunk=6).backward()
    assert w.grad is None
    h2 = h.detach().clone().requires_grad_()
    _plain_ce(h2, w, None, y).backward()
    torch.testing.assert_close(h.grad, h2.grad)


def test_chunked_ce_bf16_autocast_matches_plain_autocast():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(500, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 500, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = _grads(lambda: _plain_ce(h, w, None, y), [h, w])
        loss, got = _grads(lambda: chunked_linear_cross_entropy(h, w, None, y, chunk=16), [h, w])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-2)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


def _batch(tok, rows=3, width=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :6] = IGNORE  # a prompt
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fused_model_loss_equals_plain(arch, method):
    """The whole model: fused chunked loss == chunked plain autograd loss, every gradient too
    (full fine-tuning trains the (tied) head, so dL/dW goes through the fused function)."""
    model, tok = tiny_model(arch)
    if method == "lora":
        lora_mod.apply(model, LoRAConfig(r=4))


        randomize(model)
    model.train()
    batch = _batch(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss(model, batch, chunk_rows=9, fused=fused)
        (loss / n).backward()
        out[fused] = (loss.detach(), [p.grad.clone() for p in params])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-4)
    for a, r in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- LoRA function


def _layer(kind: str, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(24, 40, bias=True) if kind == "linear" else Conv1D(40, 24)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    base.requires_grad_(False)
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    layer.train()
    return layer


def _run(layer, x, fast: bool, amp: bool):
    layer.fast_path = fast
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_function_equals_plain_path_fp32(kind):
    layer = _layer(kind)
    x = torch.randn(3, 5, 24)
    assert lora_kernels.fast_path_ok(layer, x)
    ref = _run(layer, x, fast=False, amp=False)
    got = _run(layer, x, fast=True, amp=False)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_lora_function_equals_plain_path_bf16_autocast():
    layer = _layer("linear")
    x = torch.randn(4, 6, 24)
    ref = _run(layer, x, fast=False, amp=True)
    got = _run(layer, x, fast=True, amp=True)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=3e-2)


def test_lora_function_weight_cache_follows_in_place_updates():
    """The cached bf16 copy of the frozen weight is refreshed when the weight changes (merge,
    load_state_dict, copy_): the output then equals the plain path's for the new weight."""
    layer = _layer("linear")
    x = torch.randn(2, 24)
    _run(layer, x, fast=True, amp=True)
    with torch.no_grad():
        layer.base_layer.weight.mul_(-2.0)
    ref = _run(layer, x, fast=False, amp=True)
    got = _run(layer, x, fast=True, amp=True)
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=2e-2, atol=3e-2)
    layer.cache_weight = False  # FSDP: cast every call, no persistent copy
    torch.testing.assert_close(_run(layer, x, fast=True, amp=True)[0], got[0])


def test_lora_fast_path_declines_what_it_does_not_cover():
    layer = _layer("linear")
    x = torch.randn(2, 24)
    drop = LoRALinear(nn.Linear(24, 40).requires_grad_(False), r=4, alpha=8, dropout=0.1)
    drop.train()
    assert not lora_kernels.fast_path_ok(drop, x)
    drop.eval()  # dropout is the identity in eval mode
    assert lora_kernels.fast_path_ok(drop, x)
    assert not lora_kernels.fast_path_ok(layer, x.double())  # mixed dtypes without autocast
    layer.base_layer.weight.requires_grad_(True)  # a base that trains needs its own gradient
    assert not lora_kernels.fast_path_ok(layer, x)
    layer.base_layer.weight.requires_grad_(False)
    layer.fast_path = False
    assert not lora_kernels.fast_path_ok(layer, x)
    layer.fast_path = True
    with torch.no_grad():  # inference runs the plain path
        assert not lora_kernels.fast_path_ok(layer, x)


def _saved_copies_of(shape, fn) -> int:
    """Distinct tensors of ``shape`` that autograd saves for backward while ``fn`` runs."""
    ptrs = set()

    def pack(t):
        if tuple(t.shape) == tuple(shape):
            ptrs.add(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return len(ptrs)


def test_lora_function_saves_one_copy_of_a_shared_input():
    """q/k/v-like siblings fed the same (non-leaf) input under bf16 autocast: the plain path
    saves a bf16 cast of x in every layer (for dL/dA), three in all; the function saves one
    cast shared by the three layers."""
    layers = [_layer("linear", seed=i) for i in range(3)]
    x0 = torch.randn(64, 24, requires_grad=True)

    def step(fast):
        x = x0 * 1.0  # an activation, as inside a model (autocast caches casts of leaves only)
        for layer in layers:
            layer.fast_path = fast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [layer(x) for layer in layers]

    assert _saved_copies_of(x0.shape, lambda: step(False)) == 3
    assert _saved_copies_of(x0.shape, lambda: step(True)) == 1


def test_lora_model_fast_path_equals_plain(arch):
    """Whole tiny models (q/k/v share one input, so the shared cast is exercised): loss and every
    LoRA gradient equal with and without the function."""
    model, tok = tiny_model(arch)
    lora_mod.apply(model, LoRAConfig(r=4))
    from conftest import randomize

    randomize(model)
    model.train()
    batch = _batch(tok, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for fast in (False, True):
        for m in lora_layers(model).values():
            m.fast_path = fast
        model.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss(model, batch, fused=False)
        (loss / n).backward()
        out[fast] = (loss.detach(), [p.grad.clone() for p in params])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-4)
    for a, r in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_right_padded_batch_without_mask_gives_the_same_loss_and_grads(arch):
    """Dropping the padding mask of a right-padded batch changes nothing a label sees."""
    from peftlab.train.loss import right_padded

    model, tok = tiny_model(arch)
    lora_mod.apply(model, LoRAConfig(r=4))
    randomize(model)
    model.train()
    batch = _batch(tok, seed=4)
    batch["attention_mask"][1, 11:] = 0  # rows of three different lengths
    batch["labels"][batch["attention_mask"] == 0] = IGNORE
    assert right_padded(batch["attention_mask"])
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for skip in (False, True):
        model.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss(model, batch, skip_pad_mask=skip)
        (loss / n).backward()
        out[skip] = (loss.detach(), [p.grad.clone() for p in params])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-4)
    for a, r in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    left = batch["attention_mask"].flip(1)
    assert not right_padded(left)  # left padding keeps its mask


def test_fused_adamw_on_cpu_equals_foreach():
    """build_optimizer picks fused AdamW on CPU; its updates equal the foreach implementation's."""
    from types import SimpleNamespace

    from peftlab import registry
    from peftlab.train.optim import build_optimizer

    model, _ = tiny_model("llama")
    lora_mod.apply(model, LoRAConfig(r=4))
    t = SimpleNamespace(lr=1e-2, weight_decay=0.1, adam_betas=[0.9, 0.99])
    opt = build_optimizer(model, registry.get("lora"), LoRAConfig(r=4), t)
    assert opt.defaults["fused"]
    params = [p for g in opt.param_groups for p in g["params"]]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW([{"params": twins[:len(opt.param_groups[0]["params"])], "weight_decay": 0.1}]
                            + ([{"params": twins[len(opt.param_groups[0]["params"]):], "weight_decay": 0.0}]
                               if len(opt.param_groups) > 1 else []),
                            lr=1e-2, betas=(0.9, 0.99), foreach=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
