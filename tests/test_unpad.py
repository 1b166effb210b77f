"""train.unpad: a right-padded batch run on its real tokens only gives the padded batch's loss and
gradients, for every method and architecture it is allowed on; everything else keeps padding."""

from __future__ import annotations

import pytest
import torch

from conftest import SMALL_VOCAB, perturb, small_model, with_method
from peftlab import registry
from peftlab.data.tokenize import IGNORE
from peftlab.model.load import load_model
from peftlab.train import unpad as unpad_mod
from peftlab.train.loss import causal_lm_loss
from peftlab.train.unpad import METHODS, unpad_blocker, worth_unpadding
from test_contract import CONTRACT

LENGTHS = (17, 9, 4, 13)  # right-padded rows of four lengths (one much shorter than the width)


def padded_batch(seed: int = 0, vocab: int = SMALL_VOCAB) -> dict:
    g = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.randint(3, vocab, (len(LENGTHS), width), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    labels = ids.clone()
    labels[:, :3] = IGNORE  # a prompt
    labels[mask == 0] = IGNORE
    ids[mask == 0] = 0  # the pad id
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, unpad: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(model, batch, unpad=unpad)
    (loss / n).backward()
    return (loss / n).detach(), [p.grad.clone() if p.grad is not None else None for p in params]


def assert_same(model, batch, rtol=1e-4, atol=1e-6):
    model.train()
    ref = loss_and_grads(model, batch, unpad=False)
    got = loss_and_grads(model, batch, unpad=True)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    assert sum(g is not None for g in ref[1]) > 0
    for a, b in zip(got[1], ref[1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, float(b.abs().max())))


@pytest.fixture(params=["padded", "per_sequence"])
def attention_way(request, monkeypatch):
    """Pin the unpadded attention to one way: a huge or a zero per-call cost in ``per_sequence``."""
    monkeypatch.setattr(unpad_mod, "CALL_PAIRS", 10**12 if request.param == "padded" else 0)
    assert unpad_mod.per_sequence(list(LENGTHS)) == (request.param == "per_sequence")
    return request.param


def first_case(method: str):
    case = CONTRACT[method][0]
    return {k: v for k, v in case.peft.items()}, case.model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_allowed_method_trains_the_same_unpadded(method, attention_way):
    options, model_settings = first_case(method)
    if model_settings:
        pytest.skip(f"{method}'s first contract case needs model settings {model_settings}")
    model = small_model("llama")
    model, m, cfg = with_method(model, method, **options)
    perturb(model)
    assert unpad_blocker(model, method) is None
    if attention_way == "per_sequence":
        # SDPA on shorter rows tiles its sums differently: in float32 a few gradients (BOFT, OFT,
        # KronA, DoRA) move by ~3e-6 of their largest; in float64 every method agrees to 1e-12
        assert_same(model.double(), padded_batch(), rtol=1e-9, atol=1e-12)
    else:
        assert_same(model, padded_batch())


@pytest.mark.parametrize("arch,extra", [
    ("llama", {}),
    ("mistral", {"sliding_window": None}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("gemma", {"head_dim": 16}),
    ("olmo2", {}),
    ("phi3", {"sliding_window": None, "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": 0}),
])
def test_every_allowed_architecture_trains_the_same_unpadded(arch, extra, attention_way):
    from peftlab.config import ModelConfig

    shape = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 96, "vocab": SMALL_VOCAB,
             "max_position_embeddings": 64, **extra}
    model, _ = load_model(ModelConfig(name=f"config:{arch}", config_overrides=shape), seed=0, with_tokenizer=False)
    assert model.config.model_type in unpad_mod.ARCHITECTURES
    model, _, _ = with_method(model, "lora", r=4, alpha=8)
    perturb(model)
    assert unpad_blocker(model, "lora") is None
    assert_same(model, padded_batch(1))


def test_per_sequence_attention_is_chosen_by_its_count_and_takes_one_token_rows(monkeypatch):
    """Long rows of mixed lengths run one SDPA call per sequence; many short rows, one padded call;
    a sequence of one token (SDPA without its causal flag) still gives the padded batch's loss and
    gradients."""
    assert unpad_mod.per_sequence([398, 250, 180, 120])  # alpaca-like: 2.4x less attention work
    assert not unpad_mod.per_sequence([25] * 63 + [40])  # many short rows: B calls cost more
    assert not unpad_mod.per_sequence([17, 17, 17, 16])  # nearly no padding to skip
    monkeypatch.setattr(unpad_mod, "CALL_PAIRS", 0)
    model = small_model("llama")
    with_method(model, "lora", r=4)
    perturb(model)
    batch = padded_batch(2)
    batch["attention_mask"][2, 1:] = 0  # the third row keeps one token
    batch["labels"][2, :] = IGNORE
    batch["input_ids"][2, 1:] = 0
    # in float64, as every per-sequence case: in float32 SDPA on shorter rows tiles its sums
    # differently (one gradient of 256 moved by 1.7e-6 of the largest on an AVX-512 CPU)
    assert_same(model.double(), batch, rtol=1e-9, atol=1e-12)
    assert unpad_mod._STATE.per_sequence and unpad_mod._STATE.lengths == [17, 9, 1, 13]


def test_methods_outside_the_list_are_refused_with_a_reason():
    model = small_model("llama")
    outside = sorted(set(registry.names()) - METHODS)
    assert {"prompt_tuning", "prefix_tuning", "moe_lora", "longlora", "lora_drop"} <= set(outside)
    for name in outside:
        assert "per-token" in unpad_blocker(model, name)
    assert "gradient checkpointing" in unpad_blocker(model, "lora", gradient_checkpointing=True)
    assert "compile" in unpad_blocker(model, "lora", compiled=True)
    gpt2 = small_model("gpt2")
    assert "architecture" in unpad_blocker(gpt2, "lora")
    model.config._attn_implementation = "eager"
    assert "eager" in unpad_blocker(model, "lora")


def test_only_right_padded_batches_with_padding_are_unpadded():
    mask = padded_batch()["attention_mask"]
    assert worth_unpadding(mask)
    assert not worth_unpadding(torch.ones_like(mask))  # nothing to win
    assert not worth_unpadding(mask.flip(1))  # left padding keeps its mask
    assert not worth_unpadding(None)


def test_the_attention_switch_is_undone_and_counted():
    """After an unpadded forward the model's attention setting is back; outside one, the function refuses."""
    model = small_model("llama")
    with_method(model, "lora", r=4)
    causal_lm_loss(model, padded_batch(), unpad=True)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="outside an unpadded forward"):
        unpad_mod._attention(None, None, None, None, None)


def test_the_loop_turns_it_on_for_lora_and_off_for_prompt_tuning():
    from types import SimpleNamespace

    from peftlab.train.step import apply_speed_options

    t = SimpleNamespace(fast_lora=True, compile=False, distributed="none", loss_chunk=1024, fused_loss=True,
                        skip_pad_mask=True, unpad=True)
    model = small_model("llama")
    with_method(model, "lora", r=4)
    assert apply_speed_options(model, registry.get("lora"), t)["unpad"] is True
    model = small_model("llama")
    with_method(model, "prompt_tuning", num_virtual_tokens=4)
    assert apply_speed_options(model, registry.get("prompt_tuning"), t)["unpad"] is False
    t.unpad = False
    model = small_model("llama")
    with_method(model, "lora", r=4)
    assert apply_speed_options(model, registry.get("lora"), t)["unpad"] is False
