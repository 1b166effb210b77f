"""LoRA and full fine-tuning contracts on tiny GPT-2 (Conv1D) and Llama (nn.Linear) models."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from conftest import randomize, tiny_model
from peftlab import registry
from peftlab.configure import load_config
from peftlab.errors import ConfigError
from peftlab.export.adapter import load_adapter, save_adapter
from peftlab.methods.lora import LoRAConfig
from peftlab.methods.lowrank import LoRALinear, lora_layers, merge_delta, unmerge_delta
from peftlab.model.params import param_report


def _lora(arch, init_range=None, **kw):
    model, tok = tiny_model(arch, **({"initializer_range": init_range} if init_range else {}))
    cfg = LoRAConfig(**kw)
    registry.get("lora").apply(model, cfg)
    return model, cfg


def test_identity_at_init(arch, ids):
    base, _ = tiny_model(arch)
    model, _ = _lora(arch, r=4)
    with torch.no_grad():
        assert torch.equal(base(ids).logits, model(ids).logits)


def test_trainable_names_and_counts(arch):
    model, cfg = _lora(arch, r=4, targets="all-linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = lora_layers(model)
    expected = {f"{path}.lora_{ab}.weight" for path in layers for ab in "AB"}
    assert trainable == expected
    # closed form: r * (in + out) per adapted layer
    from peftlab.model.targets import linear_shape

    formula = sum(cfg.r * sum(linear_shape(m.base_layer)) for m in layers.values())
    assert param_report(model).trainable == formula
    head = model.get_output_embeddings()
    assert not any(m.base_layer is head for m in layers.values()), "all-linear must not adapt the LM head"


def test_merge_equals_unmerged_and_unmerge_restores(arch, ids):
    # realistic weight scale (init 0.02): fp32 logits then differ only by rounding, < 1e-5
    model, _ = _lora(arch, init_range=0.02, r=4, alpha=8)
    randomize(model)
    with torch.no_grad():
        before = model(ids).logits
        w0 = {n: m.base_layer.weight.clone() for n, m in lora_layers(model).items()}
        for m in lora_layers(model).values():
            merge_delta(m)
        merged = model(ids).logits
        for m in lora_layers(model).values():
            unmerge_delta(m)
        after = model(ids).logits
    assert torch.allclose(before, merged, atol=1e-5)
    assert torch.allclose(before, after, atol=1e-5)
    for n, m in lora_layers(model).items():
        assert torch.allclose(m.base_layer.weight, w0[n], atol=1e-6)


def test_method_merge_returns_plain_modules(arch, ids):
    model, _ = _lora(arch, init_range=0.02, r=2)
    randomize(model)
    with torch.no_grad():
        before = model(ids).logits
        registry.get("lora").merge(model)
        after = model(ids).logits
    assert not lora_layers(model)
    kinds = (Conv1D,) if arch == "gpt2" else (torch.nn.Linear,)
    assert any(isinstance(m, kinds) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5)


def test_eval_and_train_never_merge(arch, ids):
    model, _ = _lora(arch, r=2)
    randomize(model)
    model.eval()
    model.train()
    model.eval()
    assert not any(m.merged for m in lora_layers(model).values())
    w = {n: m.base_layer.weight.clone() for n, m in lora_layers(model).items()}
    for n, m in lora_layers(model).items():
        assert torch.equal(m.base_layer.weight, w[n])


def test_delta_formula_conv1d_and_linear():
    """h = W x + (alpha/r) B A x, for both weight layouts; rsLoRA uses alpha/sqrt(r)."""
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    for base in (torch.nn.Linear(6, 5), Conv1D(5, 6)):
        for rs in (False, True):
            layer = LoRALinear(base, r=2, alpha=3.0, use_rslora=rs)
            torch.nn.init.normal_(layer.lora_B.weight)
            s = 3.0 / (math.sqrt(2) if rs else 2)
            expected = base(x) + s * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
            assert torch.allclose(layer(x), expected, atol=1e-6)


def test_save_load_bit_identical(arch, ids, tmp_path):
    model, cfg = _lora(arch, r=4)
    randomize(model)
    save_adapter(model, cfg, tmp_path / "a")
    fresh, _ = tiny_model(arch)
    loaded_cfg = load_adapter(fresh, tmp_path / "a")
    assert loaded_cfg == cfg
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_overfits_one_batch(arch):
    model, _ = _lora(arch, r=8, alpha=16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 16), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    first = None
    for _ in range(60):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.2 * first


def test_full_finetuning_trains_everything(arch):
    model, _ = tiny_model(arch)
    registry.get("full").apply(model, load_config(None, ["peft.method=full"]).peft)
    rep = param_report(model)
    assert rep.trainable == rep.total == sum(p.numel() for p in model.parameters())


def test_rank_and_target_errors(arch):
    model, _ = tiny_model(arch)
    with pytest.raises(ConfigError, match="rank must be between 1 and"):
        registry.get("lora").apply(model, LoRAConfig(r=10_000))
    model, _ = tiny_model(arch)
    with pytest.raises(ConfigError) as e:
        registry.get("lora").apply(model, LoRAConfig(targets=["qkv_proj"]))
    msg = str(e.value)
    assert "'qkv_proj' matches no layer" in msg and ("c_attn" in msg or "q_proj" in msg)
    with pytest.raises(ConfigError, match="regex"):
        registry.get("lora").apply(tiny_model(arch)[0], LoRAConfig(targets=r"nothing\.here.*"))


def test_target_forms_select_the_same_layers():
    model, _ = tiny_model("llama")
    from peftlab.model.targets import find_targets

    by_names = find_targets(model, ["q_proj", "v_proj"])
    by_string = find_targets(model, "q_proj,v_proj")
    by_regex = find_targets(model, r"model\.layers\.\d+\.self_attn\.(q|v)_proj")
    assert by_names == by_string == by_regex
    assert len(by_names) == 2 * model.config.num_hidden_layers
