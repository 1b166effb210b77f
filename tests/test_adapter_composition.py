"""Method-specific behaviour of the adapter compositions: AdapterDrop, UniPELT, AdapterFusion, LoRA-drop.

The shared contract (identity, counts, save/load, merge refusal, learning, generation) is in
tests/test_contract.py; this file proves what each method adds, against a formula or a
hand-built reference.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import batch_of, perturb, small_model, with_method
from conftest import batch_logits as logits
from peftlab.errors import ConfigError
from peftlab.methods.adapter import BottleneckAdapter, decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def three_layers(arch: str) -> dict:
    return {"n_layer": 3} if arch == "gpt2" else {"layers": 3}


# ---------------------------------------------------------------------------- AdapterDrop


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_drop_backward_stops_at_the_lowest_adapted_layer(arch):
    """With n = 1 nothing in layer 0 (or the embeddings) requires a gradient: autograd records no
    graph there, so the backward pass does no input-gradient work in the frozen layers below."""
    model, _, _ = with_method(small_model(arch, **three_layers(arch)), "adapter", bottleneck=4, drop_layers=1)
    needs_grad = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: needs_grad.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).requires_grad)) for i, (_, layer) in enumerate(decoder_layers(model))]
    model.train()
    batch = batch_of(0)
    model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    assert needs_grad == {0: False, 1: True, 2: True}
    layer0 = decoder_layers(model)[0][1]
    assert not any(isinstance(m, BottleneckAdapter) for m in layer0.modules())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_drop_at_inference_skips_exactly_the_lower_adapters(arch):
    """drop_layers_inference = m: in eval mode the adapters below m are skipped — the output equals a
    model built with drop_layers = m carrying the same upper adapters; in train mode all of them run."""
    base = small_model(arch, **three_layers(arch))
    model, _, _ = with_method(copy.deepcopy(base), "adapter", bottleneck=4, drop_layers_inference=2)
    perturb(model)
    ref, _, _ = with_method(copy.deepcopy(base), "adapter", bottleneck=4, drop_layers=2)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(own[name])
    batch = batch_of(1)
    assert torch.equal(logits(model.eval(), batch), logits(ref.eval(), batch))
    model.train()
    with torch.no_grad():
        train_out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(train_out, logits(ref, batch))
    # all layers skipped at inference: the base model's output exactly
    everything, _, _ = with_method(copy.deepcopy(base), "adapter", bottleneck=4, drop_layers_inference=3)
    perturb(everything)
    assert torch.equal(logits(everything.eval(), batch), logits(base, batch))


def test_adapter_drop_refuses_dropping_every_layer():
    with pytest.raises(ConfigError, match="drop_layers=2.*2 decoder layers"):
        with_method(small_model("llama"), "adapter", drop_layers=2)
    with pytest.raises(ConfigError, match="drop_layers_inference=0 is below peft.drop_layers=1"):
        with_method(small_model("llama"), "adapter", drop_layers=1, drop_layers_inference=0)
